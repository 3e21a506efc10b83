//! An LLM tier served by an external OpenAI-compatible server (`via = "openai"`: vLLM, llama-server,
//! another nimmer, a hosted API). The gateway keeps everything that is its own (slots, admission, fairness
//! between zones, deadlines, degradation, token budgets); this tier only posts each generation to the
//! server's `/chat/completions` as a stream and turns the server-sent events back into [`Event`]s.
//!
//! - **Prompt tokens** are counted with the tokenizer of the `[models]` entry `tokenizer` names, or
//!   estimated (one token per 4 bytes) without one; budgets are then charged from the server's reported
//!   usage (`stream_options.include_usage`).
//! - **Cancellation**: dropping the events receiver drops the HTTP response, so the server sees the client
//!   go away and stops the sequence.
//! - **Deadlines** bound the wait for the first token, as the local engine bounds admission: past it the
//!   stream ends with [`Event::Expired`] (504) and the request is dropped on the server.
//! - **Errors keep their meaning**: a 429 is a full queue (429 here), a 504 an expired request, a refused
//!   connection, a refused API key (401/403) or a 5xx a down tier (503, or degradation to the Driver), another
//!   4xx an invalid request (422).
//! - **Health** follows a probe of `GET /models` every second and the outcome of each request, so a
//!   server that goes away turns the tier down within about a second.
//!
//! Token ids are not part of the OpenAI protocol: streamed tokens carry id 0. Trait-LoRAs and prefix pins
//! are refused (the server's weights and prefix cache are its own).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use nimmer_config::LlmTierSpec;
use nimmer_loras::{BaseShape, Blend};
use nimmer_tiers::{EngineLimits, Event, GenerateRequest, Prompt, TierError};
use serde_json::{Value, json};
use tokio::sync::mpsc;

mod stream;

use super::remote::client::Shape;
use super::{Events, Health, LlmTier};

/// How often the server is probed, and how long a probe may take.
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait to connect to the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// An LLM tier on an OpenAI-compatible server.
pub struct OpenAiLlm {
    inner: Arc<Inner>,
    probe: tokio::task::JoinHandle<()>,
}

struct Inner {
    tier: String,
    /// The API base URL, without a trailing `/`.
    base: String,
    /// The server's name for its model.
    model: String,
    api_key: Option<String>,
    http: reqwest::Client,
    /// Counts prompt tokens exactly; `None`: estimated.
    shape: Option<Arc<dyn Shape>>,
    /// Reported as the capacity of a 429.
    max_batch: usize,
    limits: Mutex<EngineLimits>,
    health: Mutex<Health>,
}

impl OpenAiLlm {
    /// The tier `tier` as `spec` describes it (`via = "openai"`), counting tokens with `shape` when given.
    /// Starts the health probe on the current tokio runtime; the tier is down until the server answers it.
    pub fn start(
        tier: &str,
        spec: &LlmTierSpec,
        shape: Option<Arc<dyn Shape>>,
        limits: EngineLimits,
    ) -> Result<Self, TierError> {
        let url = spec
            .url
            .as_deref()
            .ok_or_else(|| TierError::InvalidRequest {
                field: "url",
                message: format!("tiers.{tier}: via = \"openai\" needs a url"),
            })?;
        let api_key = match spec.api_key_env.as_deref() {
            None => None,
            Some(var) => Some(std::env::var(var).map_err(|_| TierError::Spawn {
                what: format!("the {tier} tier on {url}"),
                message: format!("tiers.{tier}.api_key_env names `{var}`, which is not set"),
            })?),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| TierError::Spawn {
                what: format!("an HTTP client for the {tier} tier"),
                message: e.to_string(),
            })?;
        let inner = Arc::new(Inner {
            tier: tier.into(),
            base: url.trim_end_matches('/').into(),
            model: spec.model.clone(),
            api_key,
            http,
            shape,
            max_batch: spec.max_batch,
            limits: Mutex::new(limits),
            health: Mutex::new(Health::Down {
                reason: format!("{url} not reached yet"),
            }),
        });
        let probe = tokio::spawn(probe(Arc::downgrade(&inner)));
        Ok(Self { inner, probe })
    }
}

impl Drop for OpenAiLlm {
    fn drop(&mut self) {
        self.probe.abort();
    }
}

/// Probes the server's model list until the tier is dropped.
async fn probe(inner: std::sync::Weak<Inner>) {
    let mut every = tokio::time::interval(PROBE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(t) = inner.upgrade() else { return };
        let req = t.authorized(t.http.get(format!("{}/models", t.base)));
        let health = match tokio::time::timeout(PROBE_TIMEOUT, req.send()).await {
            Err(_) => Health::Down {
                reason: format!("{} did not answer within {PROBE_TIMEOUT:?}", t.base),
            },
            Ok(Err(e)) => Health::Down {
                reason: format!("{}: {}", t.base, short(&e)),
            },
            Ok(Ok(r)) if r.status().is_success() => Health::Ready,
            Ok(Ok(r)) => Health::Down {
                reason: format!("{}/models answered {}", t.base, r.status()),
            },
        };
        t.set_health(health);
    }
}

impl Inner {
    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(k) => req.bearer_auth(k),
            None => req,
        }
    }

    fn set_health(&self, h: Health) {
        let mut cur = self.health.lock().expect("health lock");
        if *cur != h {
            match &h {
                Health::Ready => {
                    tracing::info!(tier = %self.tier, url = %self.base, "remote tier up")
                }
                Health::Down { reason } => {
                    tracing::warn!(tier = %self.tier, reason = %reason, "remote tier down")
                }
            }
            *cur = h;
        }
    }

    fn down(&self) -> TierError {
        TierError::EngineDown {
            tier: self.tier.clone(),
        }
    }

    fn count(&self, prompt: &Prompt) -> Result<Vec<u32>, TierError> {
        match &self.shape {
            Some(s) => s.tokenize(prompt),
            None => Ok(vec![0; estimate(prompt)]),
        }
    }

    /// The request body: a chat completion for messages, a completion for text or token ids.
    fn body(&self, req: &GenerateRequest) -> (&'static str, Value) {
        let p = &req.params;
        let mut body = json!({
            "model": self.model,
            "stream": true,
            "stream_options": { "include_usage": true },
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
        });
        if let Some(seed) = p.seed {
            body["seed"] = json!(seed);
        }
        if !p.stop.is_empty() {
            body["stop"] = json!(p.stop);
        }
        if p.ignore_eos {
            // An extension vLLM, llama-server and nimmer share.
            body["ignore_eos"] = json!(true);
        }
        if !req.share.zone.is_empty() {
            // The zone travels as the OpenAI `user`: a nimmer server shares its steps by it.
            body["user"] = json!(&*req.share.zone);
        }
        match &req.prompt {
            Prompt::Chat(messages) => {
                body["messages"] = json!(messages);
                ("chat/completions", body)
            }
            Prompt::Text(text) => {
                body["prompt"] = json!(text);
                ("completions", body)
            }
            Prompt::Tokens(ids) => {
                body["prompt"] = json!(ids);
                ("completions", body)
            }
        }
    }

    /// What a non-success status means for the caller.
    async fn refusal(&self, r: reqwest::Response) -> Result<Events, TierError> {
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        let message = error_message(&text);
        tracing::warn!(tier = %self.tier, status, message = %message, "remote tier refused a generation");
        let refusal = refusal(&self.tier, self.max_batch, status, &message);
        if let Err(TierError::EngineDown { .. }) = refusal
            && matches!(status, 401 | 403)
        {
            // Our key, not the caller's request: the tier is down until the configuration is fixed.
            self.set_health(Health::Down {
                reason: format!("{} refused the API key ({status}): {message}", self.base),
            });
        }
        refusal
    }
}

/// What a server's refusal (`status`, its `message`) means for the caller: a 429 is a full queue, a
/// 408/504 an expired request, a refused key (401/403) or a 5xx a down tier, another 4xx an invalid request.
fn refusal(tier: &str, max_batch: usize, status: u16, message: &str) -> Result<Events, TierError> {
    match status {
        429 => Err(TierError::QueueFull {
            tier: tier.to_string(),
            capacity: max_batch,
        }),
        408 | 504 => Ok(ended(Event::Expired)),
        401 | 403 => Err(TierError::EngineDown {
            tier: tier.to_string(),
        }),
        400..=499 => Err(TierError::InvalidRequest {
            field: "messages",
            message: format!("the {tier} server refused it: {message}"),
        }),
        _ => Err(TierError::EngineDown {
            tier: tier.to_string(),
        }),
    }
}

impl LlmTier for OpenAiLlm {
    fn lora_base(&self) -> BaseShape {
        // No adapter fits a server's model: without a tokenizer's shape, one nothing matches.
        self.inner.shape.as_ref().map_or(
            BaseShape {
                n_layer: 0,
                dim: 0,
                n_head: 0,
                n_kv_head: 0,
                head_dim: 0,
                ffn: 0,
                rope_interleaved: false,
            },
            |s| s.lora_base(),
        )
    }

    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, TierError> {
        self.inner.count(prompt)
    }

    fn submit(&self, req: GenerateRequest) -> BoxFuture<'static, Result<Events, TierError>> {
        let t = self.inner.clone();
        Box::pin(async move {
            if req.lora.is_some() {
                return Err(TierError::InvalidRequest {
                    field: "traits",
                    message: format!(
                        "the {} tier runs on an OpenAI-compatible server, which takes no trait-LoRAs",
                        t.tier
                    ),
                });
            }
            if !t.health.lock().expect("health lock").is_ready() {
                return Err(t.down());
            }
            let started = Instant::now();
            let prompt_tokens = t.count(&req.prompt)?.len();
            let (path, body) = t.body(&req);
            let send = t
                .authorized(t.http.post(format!("{}/{path}", t.base)))
                .json(&body)
                .send();
            // The deadline bounds the wait for the first token (the server may hold the headers until then).
            let deadline = req.deadline.map(tokio::time::Instant::from_std);
            let resp = match until(deadline, send).await {
                None => return Ok(ended(Event::Expired)),
                Some(Err(e)) => {
                    t.set_health(Health::Down {
                        reason: format!("{}: {}", t.base, short(&e)),
                    });
                    return Err(t.down());
                }
                Some(Ok(r)) if !r.status().is_success() => return t.refusal(r).await,
                Some(Ok(r)) => r,
            };
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(stream::relay(t, resp, tx, deadline, started, prompt_tokens));
            Ok(rx)
        })
    }

    fn limits(&self) -> EngineLimits {
        *self.inner.limits.lock().expect("limits lock")
    }

    fn set_limits(&self, limits: EngineLimits) {
        *self.inner.limits.lock().expect("limits lock") = limits;
    }

    fn health(&self) -> Health {
        self.inner.health.lock().expect("health lock").clone()
    }

    fn pin(&self, _id: u64, _prompt: Prompt, _lora: Option<Arc<Blend>>) -> Result<(), TierError> {
        Err(TierError::InvalidRequest {
            field: "npcs",
            message: format!(
                "the {} tier runs on an OpenAI-compatible server: its prefix cache is its own, nothing to pin",
                self.inner.tier
            ),
        })
    }

    fn unpin(&self, _id: u64) {}

    fn takes_source_prompt(&self) -> bool {
        true
    }
}

/// `fut`'s output, or `None` once `deadline` passed first.
pub(super) async fn until<F: std::future::Future>(
    deadline: Option<tokio::time::Instant>,
    fut: F,
) -> Option<F::Output> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, fut).await.ok(),
        None => Some(fut.await),
    }
}

/// A stream that holds only `ev`.
fn ended(ev: Event) -> Events {
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = tx.send(ev);
    rx
}

/// The message of an OpenAI-style (`{"error": {"message"}}`) or nimmer-style (`{"error": "..."}`) body.
fn error_message(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let e = &v["error"];
    e["message"]
        .as_str()
        .or(e.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| body.chars().take(200).collect())
}

/// A reqwest error with its causes (a refused connection says so only in its source).
pub(super) fn short(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s = format!("{s}: {cause}");
        src = cause.source();
    }
    s
}

/// Prompt tokens without a tokenizer: one per 4 bytes of text, plus 4 per message for the template.
fn estimate(prompt: &Prompt) -> usize {
    match prompt {
        Prompt::Chat(m) => m.iter().map(|m| m.content.len().div_ceil(4) + 4).sum(),
        Prompt::Text(t) => t.len().div_ceil(4),
        Prompt::Tokens(ids) => ids.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_of_both_styles_give_their_message() {
        assert_eq!(
            error_message(r#"{"error":{"message":"bad model","type":"invalid_request_error"}}"#),
            "bad model"
        );
        assert_eq!(
            error_message(r#"{"error":"`messages`: empty","kind":"invalid"}"#),
            "`messages`: empty"
        );
        assert_eq!(error_message("plain text"), "plain text");
    }

    #[test]
    fn a_refusal_keeps_its_meaning() {
        let r = |status| refusal("theia", 4, status, "no");
        assert!(matches!(
            r(429),
            Err(TierError::QueueFull { capacity: 4, .. })
        ));
        assert!(matches!(
            r(504).map(|mut e| e.try_recv()),
            Ok(Ok(Event::Expired))
        ));
        assert!(matches!(
            r(408).map(|mut e| e.try_recv()),
            Ok(Ok(Event::Expired))
        ));
        for down in [401, 403, 500, 502, 503] {
            assert!(
                matches!(r(down), Err(TierError::EngineDown { .. })),
                "{down}"
            );
        }
        match r(400) {
            Err(TierError::InvalidRequest { field, message }) => {
                assert_eq!(field, "messages");
                assert!(message.contains("theia server refused it: no"), "{message}");
            }
            _ => panic!("400 is the caller's"),
        }
    }

    #[test]
    fn the_estimate_counts_a_token_per_four_bytes_and_four_per_message() {
        let m = nimmer_tiers::tokenizer::Message::new("user", "12345678");
        assert_eq!(estimate(&Prompt::Chat(vec![m])), 6);
        assert_eq!(estimate(&Prompt::Text("12345".into())), 2);
        assert_eq!(estimate(&Prompt::Tokens(vec![1, 2, 3])), 3);
    }
}

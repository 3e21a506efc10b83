//! The gateway side: [`NatsLlm`] is an [`LlmTier`] whose engines are tier workers reached over NATS. It
//! tokenizes locally (the gateway's admission needs token counts before any tier work), sends each
//! generation to the worker [`super::route`] picks from their load messages (the least loaded, preferring
//! one holding the request's adapters; the shared subject's queue group when none reported yet), and turns
//! the worker's numbered stream back into [`Event`]s: a dropped receiver cancels the sequence on the worker,
//! and a lost worker (silent past [`DEAD_AFTER`], a gap in the numbers) moves the sequence to another.
//! Health follows the workers' load messages; pins go to every worker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use futures::future::BoxFuture;
use nimmer_loras::BaseShape;
use nimmer_tiers::{
    Completion, EngineLimits, Event, FinishReason, GenerateRequest, Grammars, Prompt, TierError,
};
use tokio::sync::mpsc;

use super::{
    Accepted, Candidate, DEAD_AFTER, EngineViews, GenerateMsg, LoadMsg, LoraRef, PinMsg,
    RemoteError, StreamEvent, StreamMsg, generate_subject, load_subject, pin_subject, route,
    worker_subject,
};
use crate::error::GatewayError;
use crate::tier::{Events, Health, LlmTier};

pub use super::shape::{RemoteShape, Shape, ShapeOf};

/// A worker as this gateway last heard of it.
struct Heard {
    at: Instant,
    load: LoadMsg,
    /// Sequences this gateway sent it since that load message.
    sent: usize,
}

/// The tier's workers by their load messages; picks where a sequence goes.
#[derive(Default)]
pub struct Workers(Mutex<HashMap<String, Heard>>);

/// A worker heard of for the first time (or again after falling silent): it holds none of our pins yet.
pub type Arrivals = mpsc::UnboundedReceiver<String>;

impl Workers {
    /// Follows the load messages of `tier`'s workers (until the task is aborted).
    pub async fn follow(
        client: &async_nats::Client,
        tier: &str,
    ) -> Result<(Arc<Self>, Arrivals, tokio::task::JoinHandle<()>), GatewayError> {
        let mut loads =
            client
                .subscribe(load_subject(tier))
                .await
                .map_err(|e| GatewayError::Subscribe {
                    subject: load_subject(tier),
                    message: e.to_string(),
                })?;
        let workers: Arc<Self> = Default::default();
        let seen = workers.clone();
        let (arrived, arrivals) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Some(m) = loads.next().await {
                if let Ok(l) = serde_json::from_slice::<LoadMsg>(&m.payload) {
                    let name = l.worker.clone();
                    if seen.heard(l) {
                        let _ = arrived.send(name);
                    }
                }
            }
        });
        Ok((workers, arrivals, task))
    }

    /// Records a load message; true when the worker is new (or back after falling silent).
    fn heard(&self, mut load: LoadMsg) -> bool {
        let mut g = self.0.lock().expect("workers lock");
        // Views come every few load messages: keep the last.
        let old = g.remove(&load.worker);
        let new = old.as_ref().is_none_or(|h| h.at.elapsed() >= DEAD_AFTER);
        if load.views.is_none() {
            load.views = old.and_then(|h| h.load.views);
        }
        g.insert(
            load.worker.clone(),
            Heard {
                at: Instant::now(),
                load,
                sent: 0,
            },
        );
        new
    }

    /// The last engine views of each live worker.
    fn views(&self) -> Vec<EngineViews> {
        let now = Instant::now();
        self.0
            .lock()
            .expect("workers lock")
            .values()
            .filter(|h| now.duration_since(h.at) < DEAD_AFTER)
            .filter_map(|h| h.load.views.clone())
            .collect()
    }

    /// Workers heard from within [`DEAD_AFTER`], by name.
    pub fn live(&self) -> Vec<String> {
        let now = Instant::now();
        let mut w: Vec<String> = self
            .0
            .lock()
            .expect("workers lock")
            .iter()
            .filter(|(_, h)| now.duration_since(h.at) < DEAD_AFTER)
            .map(|(w, _)| w.clone())
            .collect();
        w.sort();
        w
    }

    /// The worker for a sequence with adapters `wanted` (digests), never `avoid`; counted as sent to it.
    fn pick(&self, wanted: &[&str], avoid: Option<&str>) -> Option<String> {
        let now = Instant::now();
        let mut g = self.0.lock().expect("workers lock");
        let live: Vec<Candidate> = g
            .iter()
            .filter(|(_, h)| now.duration_since(h.at) < DEAD_AFTER)
            .map(|(name, h)| Candidate {
                worker: name,
                load: h.load.in_flight + h.sent,
                adapters: &h.load.adapters,
            })
            .collect();
        let chosen = route(&live, wanted, avoid)?.to_string();
        if let Some(h) = g.get_mut(&chosen) {
            h.sent += 1;
        }
        Some(chosen)
    }

    /// The last load message of each live worker.
    pub fn loads(&self) -> Vec<LoadMsg> {
        let now = Instant::now();
        let mut v: Vec<LoadMsg> = self
            .0
            .lock()
            .expect("workers lock")
            .values()
            .filter(|h| now.duration_since(h.at) < DEAD_AFTER)
            .map(|h| h.load.clone())
            .collect();
        v.sort_by(|a, b| a.worker.cmp(&b.worker));
        v
    }
}

/// An LLM tier served by NATS tier workers.
pub struct NatsLlm {
    client: async_nats::Client,
    tier: String,
    shape: Arc<dyn Shape>,
    limits: Mutex<EngineLimits>,
    workers: Arc<Workers>,
    /// Names this gateway's sequences (unique per process and connection).
    prefix: String,
    next: AtomicU64,
    /// What this gateway pinned, replayed to a worker that arrives later.
    pins: Arc<Mutex<HashMap<u64, PinMsg>>>,
    load_task: tokio::task::JoinHandle<()>,
    replay_task: tokio::task::JoinHandle<()>,
}

impl Drop for NatsLlm {
    fn drop(&mut self) {
        self.load_task.abort();
        self.replay_task.abort();
    }
}

impl NatsLlm {
    /// Follows the tier's workers on `client` (their load messages).
    pub async fn connect(
        client: async_nats::Client,
        tier: &str,
        shape: Arc<dyn Shape>,
        limits: EngineLimits,
    ) -> Result<Arc<Self>, GatewayError> {
        let (workers, mut arrivals, load_task) = Workers::follow(&client, tier).await?;
        let pins: Arc<Mutex<HashMap<u64, PinMsg>>> = Default::default();
        // A worker that arrives after a pin holds none: the pins are sent again (by broadcast; a worker
        // that holds one already skips it).
        let replay_task = tokio::spawn({
            let (client, tier, pins) = (client.clone(), tier.to_string(), pins.clone());
            async move {
                while let Some(worker) = arrivals.recv().await {
                    let all: Vec<PinMsg> =
                        pins.lock().expect("pins lock").values().cloned().collect();
                    if !all.is_empty() {
                        tracing::info!(tier = %tier, worker = %worker, pins = all.len(), "pins sent to a new worker");
                    }
                    for msg in all {
                        // (not if unpinned meanwhile)
                        if pins.lock().expect("pins lock").contains_key(&msg.id) {
                            publish_pin(&client, &tier, "pin", &msg).await;
                        }
                    }
                }
            }
        });
        Ok(Arc::new(Self {
            prefix: client.new_inbox().replace("_INBOX.", ""),
            client,
            tier: tier.to_string(),
            shape,
            limits: Mutex::new(limits),
            workers,
            next: AtomicU64::new(0),
            pins,
            load_task,
            replay_task,
        }))
    }

    /// Workers heard from within [`DEAD_AFTER`].
    pub fn live_workers(&self) -> Vec<String> {
        self.workers.live()
    }

    /// The last load message of each live worker.
    pub fn worker_loads(&self) -> Vec<LoadMsg> {
        self.workers.loads()
    }

    fn publish_pin(&self, verb: &'static str, msg: PinMsg) {
        {
            let mut pins = self.pins.lock().expect("pins lock");
            if verb == "pin" {
                pins.insert(msg.id, msg.clone());
            } else {
                pins.remove(&msg.id);
            }
        }
        let (client, tier) = (self.client.clone(), self.tier.clone());
        tokio::spawn(async move { publish_pin(&client, &tier, verb, &msg).await });
    }
}

/// Sends a pin (or unpin) to every worker of `tier`.
async fn publish_pin(client: &async_nats::Client, tier: &str, verb: &str, msg: &PinMsg) {
    let body = serde_json::to_vec(msg).unwrap_or_default();
    if let Err(e) = client.publish(pin_subject(tier, verb), body.into()).await {
        tracing::warn!(error = %e, "sending a pin to the tier workers failed");
    }
}

impl LlmTier for NatsLlm {
    fn lora_base(&self) -> BaseShape {
        self.shape.lora_base()
    }

    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, TierError> {
        self.shape.tokenize(prompt)
    }

    fn grammars(&self) -> Result<Arc<Grammars>, TierError> {
        self.shape.grammars()
    }

    fn workers(&self) -> Vec<String> {
        self.live_workers()
    }

    fn submit(&self, req: GenerateRequest) -> BoxFuture<'static, Result<Events, TierError>> {
        let id = format!(
            "{}.{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let (client, tier) = (self.client.clone(), self.tier.clone());
        let prompt = self.shape.tokenize(&req.prompt);
        let workers = self.workers.clone();
        Box::pin(async move {
            let lora = req.lora.as_deref().map(LoraRef::of).unwrap_or_default();
            let now = Instant::now();
            let msg = GenerateMsg {
                id,
                prompt: prompt?,
                params: req.params,
                deadline_ms: req
                    .deadline
                    .map(|d| d.saturating_duration_since(now).as_millis() as u64),
                zone: req.share.zone.to_string(),
                class: req.share.class.to_string(),
                weight: req.share.weight,
                priority: req.share.priority,
                lora,
                stream_to: String::new(),
            };
            let to = workers.pick(&digests(&msg), None);
            let (msg, worker, sub) = send(&client, &tier, msg, to).await?;
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(follow(client, tier, workers, msg, worker, sub, tx));
            Ok(rx)
        })
    }

    fn limits(&self) -> EngineLimits {
        *self.limits.lock().expect("limits lock")
    }

    fn set_limits(&self, limits: EngineLimits) {
        // Each worker's engine follows its own budgets.toml (hot-reloaded: `reload::watch_budgets`); the
        // gateway keeps the value for its views.
        *self.limits.lock().expect("limits lock") = limits;
    }

    fn health(&self) -> Health {
        if self.live_workers().is_empty() {
            Health::Down {
                reason: format!(
                    "no {} worker reported within {} s",
                    self.tier,
                    DEAD_AFTER.as_secs()
                ),
            }
        } else {
            Health::Ready
        }
    }

    fn pin(
        &self,
        id: u64,
        prompt: Prompt,
        lora: Option<Arc<nimmer_loras::Blend>>,
    ) -> Result<(), TierError> {
        // Any worker may serve the NPC next: each pins it in its own prefix cache.
        let prompt = self.shape.tokenize(&prompt)?;
        let lora = lora.as_deref().map(LoraRef::of).unwrap_or_default();
        self.publish_pin(
            "pin",
            PinMsg {
                owner: self.prefix.clone(),
                id,
                prompt,
                lora,
            },
        );
        Ok(())
    }

    fn prefix_cache(&self) -> Option<nimmer_tiers::PrefixSnapshot> {
        EngineViews::prefix(self.workers.views().iter())
    }

    fn zone_service(&self) -> Vec<nimmer_tiers::ZoneServiceView> {
        EngineViews::zones(self.workers.views().iter())
    }

    fn unpin(&self, id: u64) {
        self.publish_pin(
            "unpin",
            PinMsg {
                owner: self.prefix.clone(),
                id,
                prompt: Vec::new(),
                lora: Vec::new(),
            },
        );
    }
}

/// The adapter digests a message asks for.
fn digests(msg: &GenerateMsg) -> Vec<&str> {
    msg.lora.iter().map(|l| l.digest.as_str()).collect()
}

/// Sends `msg` (with a fresh inbox) to worker `to`, or to any worker of the tier when none is named or the
/// named one is gone: the message as sent, the worker that took it and the subscription its stream arrives
/// on; or the tier's refusal.
async fn send(
    client: &async_nats::Client,
    tier: &str,
    mut msg: GenerateMsg,
    to: Option<String>,
) -> Result<(GenerateMsg, String, async_nats::Subscriber), TierError> {
    let down = |e: &dyn std::fmt::Display| {
        tracing::warn!(tier = %tier, error = %e, "remote tier request failed");
        TierError::EngineDown {
            tier: tier.to_string(),
        }
    };
    msg.stream_to = client.new_inbox();
    let sub = client
        .subscribe(msg.stream_to.clone())
        .await
        .map_err(|e| down(&e))?;
    let body: bytes::Bytes = serde_json::to_vec(&msg).map_err(|e| down(&e))?.into();
    // A worker accepts at once. The wait is bounded by the heartbeat deadline, not the client's request
    // timeout: in a cluster, a worker killed a moment ago may still have interest on a route, and a request
    // sent there is dropped without a "no responders" answer.
    let ask = |subject: String| {
        let (client, body) = (client.clone(), body.clone());
        async move {
            match tokio::time::timeout(DEAD_AFTER, client.request(subject, body)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {} s", DEAD_AFTER.as_secs())),
            }
        }
    };
    let direct = match &to {
        Some(w) => match ask(worker_subject(tier, w, "generate")).await {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::debug!(tier = %tier, worker = %w, error = %e, "worker did not answer; trying any worker");
                None
            }
        },
        None => None,
    };
    let reply = match direct {
        Some(r) => r,
        None => ask(generate_subject(tier)).await.map_err(|e| down(&e))?,
    };
    if let Some(refused) = RemoteError::of_reply(&reply) {
        return Err(refused.unwrap_or_else(|status| down(&status)));
    }
    let accepted: Accepted = serde_json::from_slice(&reply.payload).map_err(|e| down(&e))?;
    Ok((msg, accepted.worker, sub))
}

/// How many times one sequence moves to another worker after losing its own.
const MIGRATIONS: usize = 3;

/// Turns a worker's stream into events until it ends or the caller leaves (then cancels it on the worker).
/// When the worker is lost (silent past [`DEAD_AFTER`], its stream closed or broken), the sequence moves to
/// another worker with the prompt plus the tokens generated so far (as NVIDIA Dynamo's migration does), so
/// the caller sees one uninterrupted stream; greedy text is unchanged, since the engines are batch-invariant.
async fn follow(
    client: async_nats::Client,
    tier: String,
    workers: Arc<Workers>,
    mut msg: GenerateMsg,
    mut worker: String,
    mut sub: async_nats::Subscriber,
    tx: mpsc::UnboundedSender<Event>,
) {
    let mut expect = 0u64;
    // Tokens generated on earlier workers (their prompt is `msg.prompt` minus these).
    let mut carried: Vec<u32> = Vec::new();
    let mut generated: Vec<u32> = Vec::new();
    let mut migrations = 0;
    let id = msg.id.clone();
    loop {
        let next = tokio::select! {
            m = tokio::time::timeout(DEAD_AFTER, sub.next()) => m,
            _ = tx.closed() => {
                let subject = worker_subject(&tier, &worker, "cancel");
                if let Err(e) = client.publish(subject, msg.id.clone().into_bytes().into()).await {
                    tracing::warn!(error = %e, "sending a cancel to the tier worker failed");
                }
                return;
            }
        };
        let lost = match &next {
            Ok(Some(_)) => None,
            Ok(None) => Some(format!("the stream from {tier} worker {worker} closed")),
            Err(_) => Some(format!(
                "{tier} worker {worker} fell silent for {} s",
                DEAD_AFTER.as_secs()
            )),
        };
        let stream = match next {
            Ok(Some(m)) => serde_json::from_slice::<StreamMsg>(&m.payload).ok(),
            _ => None,
        };
        let lost = lost.or_else(|| match &stream {
            None => Some(format!("{tier} worker {worker} sent an unreadable message")),
            Some(m) if m.seq != expect => Some(format!(
                "{tier} worker {worker}'s stream lost messages ({} after {})",
                m.seq,
                expect.wrapping_sub(1)
            )),
            Some(_) => None,
        });
        if let Some(why) = lost {
            tracing::warn!(tier = %tier, worker = %worker, "{why}");
            if migrations == MIGRATIONS {
                let _ = tx.send(Event::Error(why));
                return;
            }
            migrations += 1;
            // The same sequence elsewhere: the prompt now ends with what it generated so far.
            msg.prompt.extend(&generated);
            msg.params.max_tokens -= generated.len();
            carried.append(&mut generated);
            if msg.params.max_tokens == 0 {
                // Lost after its last token, before its summary.
                let _ = tx.send(Event::Done(Completion {
                    finish_reason: FinishReason::Length,
                    prompt_tokens: msg.prompt.len() - carried.len(),
                    cached_tokens: 0,
                    completion_tokens: carried.len(),
                    queue_ms: 0.0,
                    ttft_ms: 0.0,
                    total_ms: 0.0,
                }));
                return;
            }
            // A worker that is alive behind a silent stream must not finish the sequence for nobody.
            let subject = worker_subject(&tier, &worker, "cancel");
            let _ = client
                .publish(subject, msg.id.clone().into_bytes().into())
                .await;
            // It started long ago: its deadline (admission) no longer applies.
            msg.deadline_ms = None;
            msg.id = format!("{id}.m{migrations}");
            let to = workers.pick(&digests(&msg), Some(&worker));
            match send(&client, &tier, msg.clone(), to).await {
                Ok((m, w, s)) => {
                    tracing::info!(tier = %tier, from = %worker, to = %w, carried = carried.len(), "sequence migrated to another worker");
                    (msg, worker, sub, expect) = (m, w, s, 0);
                    continue;
                }
                Err(e) => {
                    let _ = tx.send(Event::Error(format!(
                        "{why}; no other {tier} worker took the sequence: {e}"
                    )));
                    return;
                }
            }
        }
        let Some(stream) = stream else { return };
        expect += 1;
        let (event, last) = match stream.event {
            StreamEvent::Heartbeat => continue,
            StreamEvent::Token { id, text, logprobs } => {
                generated.push(id);
                (Event::Token { id, text, logprobs }, false)
            }
            StreamEvent::Done { mut completion } => {
                // As if one worker ran it all.
                completion.prompt_tokens -= carried.len();
                completion.completion_tokens += carried.len();
                (Event::Done(completion), true)
            }
            StreamEvent::Expired => (Event::Expired, true),
            StreamEvent::Error { message } => (Event::Error(message), true),
        };
        if tx.send(event).is_err() || last {
            if !last {
                let subject = worker_subject(&tier, &worker, "cancel");
                let _ = client
                    .publish(subject, msg.id.clone().into_bytes().into())
                    .await;
            }
            return;
        }
    }
}

//! LLM tiers across hosts (issue 14, first part): a tier worker serves one [`super::LlmTier`] over NATS as a
//! NATS service (`$SRV.PING|INFO|STATS` discovery for free), and [`client::NatsLlm`] is the gateway's
//! [`super::LlmTier`] that talks to such workers. This file is the protocol both sides share.
//!
//! - **Generate**: a JSON [`GenerateMsg`] request to `nimmer.tier.<tier>.generate` (any worker, queue group)
//!   or `nimmer.tier.<tier>.w.<worker>.generate` (that worker). The reply accepts it (`{"worker": id}`) or
//!   refuses it with the tier's error ([`RemoteError`], a service error with an HTTP-like code) before any
//!   token.
//! - **Stream**: the worker publishes [`StreamMsg`]s, numbered from 0, to the request's `stream_to` inbox:
//!   tokens, then `done`, `expired` or `error`; a `heartbeat` every [`HEARTBEAT`] while the sequence lives,
//!   so the caller notices a dead worker within [`DEAD_AFTER`] (a gap in the numbers is an error too).
//! - **Cancel**: `nimmer.tier.<tier>.w.<worker>.cancel` with the request id drops the sequence on the worker.
//! - **Load**: every [`LOAD_EVERY`] each worker publishes a [`LoadMsg`] on `nimmer.tier.<tier>.load` (core
//!   NATS, telemetry only: nothing correct depends on it). The gateway routes by it ([`route`]): the least
//!   loaded live worker, preferring one where the request's adapters are resident; with no load heard yet,
//!   the shared subject's queue group picks.
//! - **Adapters**: a request's trait-LoRA blend travels as [`LoraRef`]s (name, content digest, weight); a
//!   worker runs it with the adapters of its own registry, and only when their content matches.
//! - **Saturn** (`saturn.rs`): classification is one request/reply on `nimmer.tier.saturn.classify`.
//! - **Pins**: [`PinMsg`] on `nimmer.tier.<tier>.pin` / `.unpin` reach every worker (plain pub/sub): each
//!   pins the prompt in its own prefix cache. A worker that starts later holds no earlier pins.

pub mod client;
pub mod saturn;
pub mod shape;
pub mod worker;

use std::time::Duration;

use nimmer_tiers::{Completion, SamplingParams, TierError};
use serde::{Deserialize, Serialize};

/// How often a worker says a sequence is alive.
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// Silence after which the caller gives the worker up.
pub const DEAD_AFTER: Duration = Duration::from_secs(2);
/// How often a worker publishes its load.
pub const LOAD_EVERY: Duration = Duration::from_millis(250);

/// The NATS service a tier's workers form.
pub fn service_name(tier: &str) -> String {
    format!("nimmer-{tier}")
}

/// Any worker of the tier.
pub fn generate_subject(tier: &str) -> String {
    format!("nimmer.tier.{tier}.generate")
}

/// One worker.
pub fn worker_subject(tier: &str, worker: &str, verb: &str) -> String {
    format!("nimmer.tier.{tier}.w.{worker}.{verb}")
}

/// The tier's load telemetry.
pub fn load_subject(tier: &str) -> String {
    format!("nimmer.tier.{tier}.load")
}

/// Every worker's pins (`verb` = `pin` or `unpin`).
pub fn pin_subject(tier: &str, verb: &str) -> String {
    format!("nimmer.tier.{tier}.{verb}")
}

/// An adapter of a request's blend on the wire: the worker resolves `name` in its own registry and runs it
/// only when the adapter there has this content `digest` (hex of [`nimmer_loras::Adapter::content_hash`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraRef {
    pub name: String,
    pub digest: String,
    pub weight: f32,
}

impl LoraRef {
    /// The refs of a blend.
    pub fn of(blend: &nimmer_loras::Blend) -> Vec<Self> {
        blend
            .parts
            .iter()
            .map(|(a, w)| Self {
                name: a.name.clone(),
                digest: hex(&a.content_hash()),
                weight: *w,
            })
            .collect()
    }
}

/// Lower-case hex of a digest.
/// Waits until the server has processed everything this connection sent before (an unsubscribe): a message
/// to our own fresh inbox comes back only after it. (`flush` only writes the socket: a request another
/// connection sends a moment later could still find the old subscription.)
pub async fn barrier(client: &async_nats::Client) {
    let inbox = client.new_inbox();
    let Ok(mut sub) = client.subscribe(inbox.clone()).await else {
        return;
    };
    if client.publish(inbox, bytes::Bytes::new()).await.is_ok() {
        let _ = tokio::time::timeout(DEAD_AFTER, futures::StreamExt::next(&mut sub)).await;
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A pin (or, with an empty prompt, an unpin) for every worker of a tier. `owner` names the gateway (pin ids
/// are per gateway).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinMsg {
    pub owner: String,
    pub id: u64,
    #[serde(default)]
    pub prompt: Vec<u32>,
    #[serde(default)]
    pub lora: Vec<LoraRef>,
}

/// A generation as it travels to a worker: the prompt already tokenized by the gateway.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerateMsg {
    /// Names the sequence for cancellation (unique per caller).
    pub id: String,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Milliseconds left until the request's deadline when it was sent.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    pub zone: String,
    pub class: String,
    pub weight: f64,
    pub priority: i32,
    /// The trait-LoRA blend (empty: the base model).
    #[serde(default)]
    pub lora: Vec<LoraRef>,
    /// The inbox the stream goes to.
    pub stream_to: String,
}

/// The worker's answer to a generate request that it took.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Accepted {
    pub worker: String,
}

/// One message of a sequence's stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamMsg {
    /// 0, 1, 2, … per sequence.
    pub seq: u64,
    #[serde(flatten)]
    pub event: StreamEvent,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    Token {
        id: u32,
        text: String,
        /// When the request asked for them (older workers send none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        logprobs: Option<Box<nimmer_tiers::TokenLogprobs>>,
    },
    Done {
        completion: Completion,
    },
    Expired,
    Error {
        message: String,
    },
    Heartbeat,
}

/// A worker's load, published every [`LOAD_EVERY`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadMsg {
    pub worker: String,
    pub tier: String,
    /// Sequences it streams now (queued or resident in its engine).
    pub in_flight: usize,
    /// nimmer's version.
    pub version: String,
    /// The model it runs (GGUF file and precision).
    #[serde(default)]
    pub model: String,
    /// Running, resident and waiting sequences, KV used and budgeted.
    #[serde(default)]
    pub engine: Option<nimmer_tiers::EngineLoad>,
    /// Resident adapters: name and content digest (hex).
    #[serde(default)]
    pub adapters: Vec<(String, String)>,
    /// Every [`VIEWS_EVERY`] load messages: the engine's books for the ops views (the gateway keeps the last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub views: Option<EngineViews>,
}

/// Load messages between two that carry [`EngineViews`] (about 2 s).
pub const VIEWS_EVERY: u64 = 8;

/// A worker engine's books as a gateway's `/v1/zones` shows them, summed over the tier's workers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EngineViews {
    /// Tokens each zone was served against its weighted fair share.
    pub zones: Vec<nimmer_tiers::ZoneServiceView>,
    /// The prefix cache's figures.
    pub prefix: Option<nimmer_tiers::PrefixSnapshot>,
}

impl EngineViews {
    /// The tier's books: each zone's service summed over the workers' engines.
    pub fn zones<'a>(
        all: impl Iterator<Item = &'a EngineViews>,
    ) -> Vec<nimmer_tiers::ZoneServiceView> {
        let mut by: std::collections::BTreeMap<&str, nimmer_tiers::ZoneServiceView> =
            Default::default();
        for z in all.flat_map(|v| &v.zones) {
            let e = by
                .entry(&z.zone)
                .or_insert_with(|| nimmer_tiers::ZoneServiceView {
                    tokens_served: 0,
                    tokens_owed: 0.0,
                    share_ratio: None,
                    ..z.clone()
                });
            e.tokens_served += z.tokens_served;
            e.tokens_owed += z.tokens_owed;
        }
        by.into_values()
            .map(|mut z| {
                z.share_ratio =
                    (z.tokens_owed > 0.0).then(|| z.tokens_served as f64 / z.tokens_owed);
                z
            })
            .collect()
    }

    /// The tier's prefix caches added up (`None` when no worker reported one).
    pub fn prefix<'a>(
        all: impl Iterator<Item = &'a EngineViews>,
    ) -> Option<nimmer_tiers::PrefixSnapshot> {
        all.filter_map(|v| v.prefix).reduce(|a, b| {
            let prompt_tokens = a.prompt_tokens + b.prompt_tokens;
            let cached_tokens = a.cached_tokens + b.cached_tokens;
            nimmer_tiers::PrefixSnapshot {
                lookups: a.lookups + b.lookups,
                hits: a.hits + b.hits,
                prompt_tokens,
                cached_tokens,
                token_hit_rate: if prompt_tokens == 0 {
                    0.0
                } else {
                    cached_tokens as f64 / prompt_tokens as f64
                },
                inserted_blocks: a.inserted_blocks + b.inserted_blocks,
                evicted_blocks: a.evicted_blocks + b.evicted_blocks,
                blocks: a.blocks + b.blocks,
                pinned_blocks: a.pinned_blocks + b.pinned_blocks,
                bytes: a.bytes + b.bytes,
                budget_bytes: a.budget_bytes + b.budget_bytes,
                block_tokens: a.block_tokens.max(b.block_tokens),
            }
        })
    }
}

/// A worker as routing sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub worker: &'a str,
    /// Sequences it holds or was sent since it last reported.
    pub load: usize,
    /// Its resident adapters' digests.
    pub adapters: &'a [(String, String)],
}

/// What a missing adapter costs a worker in routing, in sequences: loading it from disk takes tens of
/// milliseconds and memory, so a worker holding it wins unless it has this many more sequences in flight.
pub const ADAPTER_MISS: usize = 4;

/// The worker to send a request with adapters `wanted` (digests) to: the lowest load plus
/// [`ADAPTER_MISS`] per adapter it does not hold, ties to the first name; never `avoid`. Pure.
pub fn route<'a>(
    workers: &[Candidate<'a>],
    wanted: &[&str],
    avoid: Option<&str>,
) -> Option<&'a str> {
    workers
        .iter()
        .filter(|c| Some(c.worker) != avoid)
        .min_by_key(|c| {
            let missing = wanted
                .iter()
                .filter(|d| !c.adapters.iter().any(|(_, h)| h == *d))
                .count();
            (c.load + ADAPTER_MISS * missing, c.worker)
        })
        .map(|c| c.worker)
}

/// A tier error as it crosses the wire (the variants a caller acts on keep their meaning).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RemoteError {
    Invalid {
        field: String,
        message: String,
    },
    ContextExceeded {
        tier: String,
        tokens: usize,
        max_tokens: usize,
        context: usize,
    },
    KvBudgetExceeded {
        tier: String,
        needed_mib: f64,
        budget_mib: usize,
    },
    QueueFull {
        tier: String,
        capacity: usize,
    },
    Down {
        tier: String,
        message: String,
    },
}

impl RemoteError {
    /// The HTTP-like status a NATS service error carries.
    pub fn code(&self) -> usize {
        match self {
            Self::Invalid { .. } | Self::ContextExceeded { .. } | Self::KvBudgetExceeded { .. } => {
                400
            }
            Self::QueueFull { .. } => 429,
            Self::Down { .. } => 503,
        }
    }

    /// As a NATS service error (its status carries the JSON, read back by [`RemoteError::of_reply`]).
    pub fn to_service(&self) -> async_nats::service::error::Error {
        async_nats::service::error::Error {
            status: serde_json::to_string(self).unwrap_or_default(),
            code: self.code(),
        }
    }

    /// The refusal a service reply carries, if it is one: `Ok` with the tier's error, `Err` with the raw
    /// status when it is not ours.
    pub fn of_reply(reply: &async_nats::Message) -> Option<Result<TierError, String>> {
        let status = reply.headers.as_ref()?.get("Nats-Service-Error")?;
        Some(
            serde_json::from_str::<RemoteError>(status.as_str())
                .map(RemoteError::into_tier)
                .map_err(|_| status.as_str().to_string()),
        )
    }

    pub fn from_tier(tier: &str, e: &TierError) -> Self {
        match e {
            TierError::InvalidRequest { field, message } => Self::Invalid {
                field: field.to_string(),
                message: message.clone(),
            },
            TierError::ContextExceeded {
                tier,
                tokens,
                max_tokens,
                context,
            } => Self::ContextExceeded {
                tier: tier.clone(),
                tokens: *tokens,
                max_tokens: *max_tokens,
                context: *context,
            },
            TierError::KvBudgetExceeded {
                tier,
                needed_mib,
                budget_mib,
            } => Self::KvBudgetExceeded {
                tier: tier.clone(),
                needed_mib: *needed_mib,
                budget_mib: *budget_mib,
            },
            TierError::QueueFull { tier, capacity } => Self::QueueFull {
                tier: tier.clone(),
                capacity: *capacity,
            },
            other => Self::Down {
                tier: tier.to_string(),
                message: other.to_string(),
            },
        }
    }

    pub fn into_tier(self) -> TierError {
        match self {
            Self::Invalid { field, message } => TierError::InvalidRequest {
                field: static_field(&field),
                message,
            },
            Self::ContextExceeded {
                tier,
                tokens,
                max_tokens,
                context,
            } => TierError::ContextExceeded {
                tier,
                tokens,
                max_tokens,
                context,
            },
            Self::KvBudgetExceeded {
                tier,
                needed_mib,
                budget_mib,
            } => TierError::KvBudgetExceeded {
                tier,
                needed_mib,
                budget_mib,
            },
            Self::QueueFull { tier, capacity } => TierError::QueueFull { tier, capacity },
            Self::Down { tier, message } => {
                tracing::warn!(tier = %tier, error = %message, "remote tier refused a request");
                TierError::EngineDown { tier }
            }
        }
    }
}

/// The request fields a tier validates, as the `&'static str` its errors name.
fn static_field(field: &str) -> &'static str {
    const FIELDS: &[&str] = &[
        "prompt",
        "messages",
        "weight",
        "max_tokens",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "stop",
        "sampling",
        "traits",
    ];
    FIELDS
        .iter()
        .find(|f| **f == field)
        .copied()
        .unwrap_or("request")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(digests: &[&str]) -> Vec<(String, String)> {
        digests
            .iter()
            .map(|d| (format!("a-{d}"), d.to_string()))
            .collect()
    }

    #[test]
    fn routing_takes_the_least_loaded_worker_and_prefers_resident_adapters() {
        let (none, sailor, both) = (held(&[]), held(&["s1"]), held(&["s1", "g1"]));
        let c = |worker, load, adapters| Candidate {
            worker,
            load,
            adapters,
        };
        let ws = [c("w1", 3, &none), c("w2", 1, &none), c("w3", 1, &none)];
        assert_eq!(
            route(&ws, &[], None),
            Some("w2"),
            "least loaded, ties by name"
        );
        assert_eq!(
            route(&ws, &[], Some("w2")),
            Some("w3"),
            "never the one avoided"
        );
        assert_eq!(route(&[], &[], None), None);
        // The adapter's holder wins despite a higher load...
        let ws = [c("w1", 0, &none), c("w2", 3, &sailor)];
        assert_eq!(route(&ws, &["s1"], None), Some("w2"));
        // ...unless it is busier by the cost of a load or more.
        let ws = [c("w1", 0, &none), c("w2", ADAPTER_MISS, &sailor)];
        assert_eq!(route(&ws, &["s1"], None), Some("w1"));
        // A blend: the worker holding more of it.
        let ws = [c("w1", 0, &sailor), c("w2", 0, &both)];
        assert_eq!(route(&ws, &["s1", "g1"], None), Some("w2"));
    }

    #[test]
    fn old_load_messages_still_parse() {
        let m: LoadMsg = serde_json::from_str(
            r#"{"worker":"w1","tier":"driver","in_flight":2,"version":"0.1.0"}"#,
        )
        .unwrap();
        assert_eq!(m.in_flight, 2);
        assert!(m.engine.is_none() && m.adapters.is_empty());
    }

    #[test]
    fn workers_books_add_up_per_zone_and_their_share_is_recomputed() {
        let z = |zone: &str, served: u64, owed: f64| nimmer_tiers::ZoneServiceView {
            zone: zone.into(),
            class: "street".into(),
            tokens_served: served,
            tokens_owed: owed,
            share_ratio: Some(served as f64 / owed),
        };
        let w1 = EngineViews {
            zones: vec![z("a", 10, 20.0), z("b", 30, 30.0)],
            prefix: None,
        };
        let w2 = EngineViews {
            zones: vec![z("a", 30, 20.0)],
            prefix: None,
        };
        let all = EngineViews::zones([&w1, &w2].into_iter());
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].tokens_served, all[0].tokens_owed), (40, 40.0));
        assert_eq!(all[0].share_ratio, Some(1.0));
        assert_eq!(all[1].zone, "b");
        assert!(EngineViews::prefix([&w1, &w2].into_iter()).is_none());
    }
}

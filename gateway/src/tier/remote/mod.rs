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
//!   NATS, telemetry only: nothing correct depends on it).

pub mod client;
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
    Token { id: u32, text: String },
    Done { completion: Completion },
    Expired,
    Error { message: String },
    Heartbeat,
}

/// A worker's load, published every [`LOAD_EVERY`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadMsg {
    pub worker: String,
    pub tier: String,
    /// Sequences it streams now (queued or resident in its engine).
    pub in_flight: usize,
    pub version: String,
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
    ];
    FIELDS
        .iter()
        .find(|f| **f == field)
        .copied()
        .unwrap_or("request")
}

//! `TierError`: the one error enum of the tiers crate. Variants carry the file, tensor or limit they are about,
//! so a caller can show a precise message (or, in the gateway, map the kind to a status code).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TierError {
    #[error("model file {path}: {message}")]
    ModelFile { path: PathBuf, message: String },
    #[error("model file {path}: sha256 is {actual}, config pins {expected}")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("fetching {url}: {message}")]
    Fetch { url: String, message: String },
    #[error("model file {path}: unsupported architecture `{arch}` (supported: {supported})")]
    UnsupportedArchitecture {
        path: PathBuf,
        arch: String,
        supported: &'static str,
    },
    #[error("model file {path}: tensor `{tensor}`: {message}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    #[error(
        "prompt is {tokens} tokens; with max_tokens {max_tokens} it exceeds the {tier} context of {context} tokens"
    )]
    ContextExceeded {
        tier: String,
        tokens: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("prompt needs {needed_mib:.1} MiB of KV cache; the {tier} budget is {budget_mib} MiB")]
    KvBudgetExceeded {
        tier: String,
        needed_mib: f64,
        budget_mib: usize,
    },
    #[error("invalid request: `{field}`: {message}")]
    InvalidRequest {
        field: &'static str,
        message: String,
    },
    #[error("unknown classifier `{name}` (known: {known})")]
    UnknownClassifier { name: String, known: String },
    #[error("the {tier} queue is full ({capacity} waiting)")]
    QueueFull { tier: String, capacity: usize },
    #[error("the {tier} engine is not running")]
    EngineDown { tier: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A structured-output grammar failed while decoding (a compile failure is an `InvalidRequest`).
    #[error("grammar: {0}")]
    Grammar(String),
    #[error("device: {0}")]
    Device(String),
    #[error("spawning {what}: {message}")]
    Spawn { what: String, message: String },
    #[error("merging a LoRA into the weights: {0}")]
    LoraMerge(String),
    #[error("the {tier} forward pass failed: {message}")]
    Forward { tier: String, message: String },
    #[error(transparent)]
    Config(#[from] nimmer_config::ConfigError),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = TierError> = std::result::Result<T, E>;

impl TierError {
    pub(crate) fn model_file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Self::ModelFile {
            path: path.into(),
            message: message.to_string(),
        }
    }
}

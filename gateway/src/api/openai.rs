//! The OpenAI request bodies (`/v1/chat/completions`, `/v1/completions`), parsed into a prompt and sampling
//! parameters; what is not supported is a 422 naming the field.

use nimmer_tiers::SamplingParams;
use serde::Deserialize;

use super::{Message, Sampling};
use crate::error::ApiError;
use crate::response_format::ResponseFormatInput;

/// `POST /v1/chat/completions` body (the OpenAI fields we support).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// `driver` or `theia`.
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub user: Option<String>,
    /// Accepted for clients that ask for the final usage chunk: a stream here always ends with one.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Keep generating past end-of-sequence (an extension vLLM and llama-server share; load tests).
    #[serde(default)]
    pub ignore_eos: bool,
    /// `json_object` or `json_schema`: the answer follows it (enforced while decoding).
    #[serde(default)]
    pub response_format: Option<ResponseFormatInput>,
    /// Report each token's log probability (`choices[].logprobs.content`).
    #[serde(default)]
    pub logprobs: bool,
    /// With `logprobs`: this many most likely alternatives per token (0 to 20).
    #[serde(default)]
    pub top_logprobs: Option<usize>,
}

/// `stream_options` of a chat request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// A string or a list of strings (`stop`, a completion's `prompt`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl ChatRequest {
    pub fn params(&self) -> Result<SamplingParams, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("n", "only n = 1 is supported"));
        }
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "must not be empty"));
        }
        let mut params = openai_params(
            self.temperature,
            self.top_p,
            self.seed,
            &self.stop,
            self.ignore_eos,
            self.max_completion_tokens.or(self.max_tokens),
        )?;
        params.response_format = match &self.response_format {
            Some(f) => f.parse()?,
            None => None,
        };
        if self.top_logprobs.is_some() && !self.logprobs {
            return Err(ApiError::invalid("top_logprobs", "needs `logprobs: true`"));
        }
        params.logprobs = self.logprobs.then(|| self.top_logprobs.unwrap_or(0));
        params.validate().map_err(ApiError::from)?;
        Ok(params)
    }
}

/// The sampling parameters of an OpenAI request (temperature 1 when not given, as OpenAI's default).
fn openai_params(
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: &Option<OneOrMany>,
    ignore_eos: bool,
    max_tokens: Option<usize>,
) -> Result<SamplingParams, ApiError> {
    let stop = match stop {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s.clone()],
        Some(OneOrMany::Many(v)) => v.clone(),
    };
    Sampling {
        temperature: Some(temperature.unwrap_or(1.0)),
        top_p,
        seed,
        stop,
        ignore_eos,
        ..Sampling::default()
    }
    .params(max_tokens)
}

/// `POST /v1/completions` (OpenAI's legacy completions: a raw prompt, no chat template).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    /// `driver` or `theia`.
    pub model: String,
    /// One text (a list holding one text is accepted too).
    pub prompt: OneOrMany,
    /// OpenAI's default is 16.
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub best_of: Option<u32>,
    #[serde(default)]
    pub echo: bool,
    #[serde(default)]
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub ignore_eos: bool,
}

impl CompletionRequest {
    /// The prompt text and the sampling parameters; what is not supported is a 422 naming the field.
    pub fn parts(&self) -> Result<(String, SamplingParams), ApiError> {
        if self.n.is_some_and(|n| n != 1) || self.best_of.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid(
                "n",
                "only n = 1 (and best_of = 1) is supported",
            ));
        }
        if self.echo {
            return Err(ApiError::invalid(
                "echo",
                "echoing the prompt is not supported",
            ));
        }
        if self.logprobs.is_some_and(|n| n > 20) {
            return Err(ApiError::invalid("logprobs", "at most 20"));
        }
        if self.suffix.is_some() {
            return Err(ApiError::invalid(
                "suffix",
                "insertion (suffix) is not supported",
            ));
        }
        let prompt = match &self.prompt {
            OneOrMany::One(p) => p.clone(),
            OneOrMany::Many(v) if v.len() == 1 => v[0].clone(),
            OneOrMany::Many(_) => {
                return Err(ApiError::invalid(
                    "prompt",
                    "give one prompt (a string, or a list of one)",
                ));
            }
        };
        if prompt.is_empty() {
            return Err(ApiError::invalid("prompt", "must not be empty"));
        }
        let params = openai_params(
            self.temperature,
            self.top_p,
            self.seed,
            &self.stop,
            self.ignore_eos,
            Some(self.max_tokens.unwrap_or(16)),
        )?;
        let params = SamplingParams {
            logprobs: self.logprobs.map(|n| n as usize),
            ..params
        };
        Ok((prompt, params))
    }
}

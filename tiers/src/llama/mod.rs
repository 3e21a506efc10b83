//! Llama-family decoder (llama, SmolLM, Mistral-style GQA) over a ragged batch.
//!
//! One [`Llama::forward`] call runs any mix of prefill chunks and single decode tokens from many sequences:
//! their rows are stacked so each linear layer is one matmul over all rows, while RoPE and attention use each
//! row's own sequence position and KV cache. The KV caches live outside the model ([`KvCache`], one per
//! sequence) and are owned by the engine.
//!
//! Weights come from a GGUF file or a Hugging Face model directory (`load.rs`).
//!
//! Numerics mirror `candle_transformers::models::quantized_llama` (interleaved RoPE as in GGML's llama,
//! RMSNorm as `x / sqrt(mean(x²) + eps) * w`, softmax with max subtraction) so greedy tokens match it.

//! The files: this one is the interface ([`LlamaConfig`], [`Chunk`], [`Decoder`]); `cpu.rs` our CPU model
//! ([`Llama`]) on the int8 kernels; `kv.rs` its per-sequence KV cache; `attn.rs` its attention; `ops.rs` its row
//! operations (RMSNorm, per-row LoRA terms); `candle.rs` and `candle_lora.rs` the candle (CUDA) decoder; `load.rs` weights
//! from GGUF or safetensors; [`train`] LoRA training.

use nimmer_loras::{BaseShape, Blend};

use crate::error::Result;

mod attn;
mod candle;
mod candle_kv;
mod candle_lora;
mod cpu;
mod kv;
mod load;
mod ops;
pub mod train;

pub use cpu::{Linear, Llama, Workspace};
pub use kv::KvCache;

pub use candle::CandleLlama;
pub use candle_kv::{CandleBlock, CandleKv};
pub use candle_lora::LoraTables;

pub use load::{ModelShape, hf_name};

/// Hyper-parameters read from GGUF metadata.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub n_layer: usize,
    pub dim: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub eps: f32,
    pub rope_base: f32,
    /// Context the model was trained for.
    pub train_context: usize,
    /// RoPE pairs `(i, i + d/2)` (Hugging Face weights) instead of `(2i, 2i + 1)` (GGUF llama).
    pub rope_neox: bool,
    /// Keys and values cached in f16 (quantized precisions of our decoder) rather than f32.
    pub kv_f16: bool,
}

impl LlamaConfig {
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
    /// The shape LoRA adapters must fit.
    pub fn lora_base(&self) -> BaseShape {
        BaseShape {
            n_layer: self.n_layer,
            dim: self.dim,
            n_head: self.n_head,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
            ffn: self.ffn,
            rope_interleaved: !self.rope_neox,
        }
    }

    /// KV-cache bytes one token takes (keys and values, every layer).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.n_layer * 2 * self.kv_dim() * if self.kv_f16 { 2 } else { 4 }
    }
}

/// One sequence's part of a batch: tokens at positions `kv.len()..`, appended to `kv`.
pub struct Chunk<'a, C = KvCache> {
    pub tokens: &'a [u32],
    pub kv: &'a mut C,
    /// Whether to compute logits for the chunk's last token.
    pub logits: bool,
    /// The trait-LoRA blend this sequence runs with.
    pub lora: Option<&'a Blend>,
}

/// What the engine batches: a model with its per-sequence cache and scratch types.
pub trait Decoder: Send + Sync + 'static {
    type Cache: Send;
    type Workspace: Default + Send;
    /// The keys and values of one prefix-cache block: a copy (our CPU model) or shared pool rows (candle).
    type Block: Send + Sync + 'static;
    fn config(&self) -> &LlamaConfig;
    /// A cache with room for `capacity` tokens.
    fn new_cache(&self, capacity: usize) -> Self::Cache;
    /// Runs every chunk, appending to its cache; logits for the chunks that ask, in order.
    fn forward(
        &self,
        chunks: &mut [Chunk<'_, Self::Cache>],
        ws: &mut Self::Workspace,
    ) -> Result<Vec<Vec<f32>>>;
    /// Positions `start..start + n` of `cache` as a block the prefix cache may keep and hand to other
    /// sequences; `None` where this cache cannot give that span away (the engine then just does not cache it).
    fn share_block(
        &self,
        cache: &mut Self::Cache,
        start: usize,
        n: usize,
    ) -> Result<Option<std::sync::Arc<Self::Block>>>;
    /// Fills an empty `cache` with the first `tokens` positions of `blocks` (consecutive blocks of one prefix).
    fn reuse_blocks(
        &self,
        cache: &mut Self::Cache,
        blocks: &[std::sync::Arc<Self::Block>],
        tokens: usize,
    ) -> Result<()>;
    fn weight_bytes(&self) -> usize;
    /// Which kernels run it, for logs and benchmarks.
    fn kernel(&self) -> String;
}

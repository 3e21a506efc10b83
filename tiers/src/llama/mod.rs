//! Llama-family decoder (llama, SmolLM, Mistral-style GQA) over a ragged batch.
//!
//! One [`Llama::forward`] call runs any mix of prefill chunks and single decode tokens from many sequences:
//! their rows are stacked so each linear layer is one matmul over all rows, while RoPE and attention use each
//! row's own sequence position and KV cache. The KV caches live outside the model ([`KvCache`], one per
//! sequence) and are owned by the engine.
//!
//! Weights come from a GGUF file or a Hugging Face model directory ([`load`]).
//!
//! Numerics mirror `candle_transformers::models::quantized_llama` (interleaved RoPE as in GGML's llama,
//! RMSNorm as `x / sqrt(mean(x²) + eps) * w`, softmax with max subtraction) so greedy tokens match it.

use candle_core::{Device, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use nimmer_loras::{Adapter, BaseShape, Blend, Module, dot};

use crate::error::{Result, TierError};
use crate::kernels::{self, QuantActs, TiledWeight};

mod candle;
mod candle_lora;
mod load;
pub mod train;

pub use candle::{CandleKv, CandleLlama};
pub use candle_lora::LoraTables;

pub use load::hf_name;

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

/// A linear layer `y = x · Wᵀ`, `W` `[n, k]`.
pub enum Linear {
    /// Int8 kernels over tiled quantized weights (activations quantized per row).
    Tiled(TiledWeight),
    /// Full precision through candle's gemm.
    F32 { w: Tensor, n: usize, k: usize },
}

impl Linear {
    pub fn n(&self) -> usize {
        match self {
            Linear::Tiled(t) => t.n(),
            Linear::F32 { n, .. } => *n,
        }
    }
    pub fn size_bytes(&self) -> usize {
        match self {
            Linear::Tiled(t) => t.size_bytes(),
            Linear::F32 { n, k, .. } => n * k * 4,
        }
    }

    /// `out[rows, n] = x[rows, k] · Wᵀ`.
    fn forward(
        &self,
        x: &[f32],
        rows: usize,
        qa: &mut QuantActs,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        out.resize(rows * self.n(), 0.0);
        match self {
            Linear::Tiled(w) => {
                qa.quantize(&x[..rows * w.k()], rows, w.k());
                kernels::matmul(qa, w, out);
            }
            Linear::F32 { w, k, .. } => {
                let xt = Tensor::from_slice(&x[..rows * k], (rows, *k), &Device::Cpu)?;
                let y = xt.matmul(&w.t()?)?;
                out.copy_from_slice(&y.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(())
    }

    fn row(&self, n: usize, out: &mut [f32]) -> Result<()> {
        match self {
            Linear::Tiled(w) => w.row(n, out),
            Linear::F32 { w, .. } => out.copy_from_slice(&w.get(n)?.to_vec1::<f32>()?),
        }
        Ok(())
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    /// q, k, v stacked: `[q_dim + 2·kv_dim, dim]`.
    qkv: Linear,
    o: Linear,
    ffn_norm: Vec<f32>,
    /// gate and up stacked: `[2·ffn, dim]`.
    gate_up: Linear,
    down: Linear,
}

/// The model: weights and RoPE tables; no per-sequence state.
pub struct Llama {
    pub cfg: LlamaConfig,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Linear,
    /// Separate embedding table when the output matrix is not tied to it.
    embed: Option<Linear>,
    /// `cos`/`sin` `[max_pos, head_dim/2]`.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    max_pos: usize,
}

/// Per-sequence KV cache, `[pos, kv_dim]` per layer for keys and values, in f32 or f16.
pub struct KvCache {
    data: KvData,
    len: usize,
}

enum KvData {
    F32 { k: Vec<Vec<f32>>, v: Vec<Vec<f32>> },
    F16 { k: Vec<Vec<f16>>, v: Vec<Vec<f16>> },
}

/// An element type of the KV cache.
trait KvElem: Copy + Send + Sync {
    fn store(dst: &mut Vec<Self>, src: &[f32]);
    /// Converts `src` into `dst` (same length).
    fn load(src: &[Self], dst: &mut [f32]);
}

impl KvElem for f32 {
    fn store(dst: &mut Vec<Self>, src: &[f32]) {
        dst.extend_from_slice(src);
    }
    fn load(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl KvElem for f16 {
    fn store(dst: &mut Vec<Self>, src: &[f32]) {
        let at = dst.len();
        dst.resize(at + src.len(), f16::ZERO);
        dst[at..].convert_from_f32_slice(src);
    }
    fn load(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

impl KvCache {
    /// A cache with room for `capacity` tokens reserved up front (no reallocation while decoding).
    pub fn new(cfg: &LlamaConfig, capacity: usize) -> Self {
        let per = capacity * cfg.kv_dim();
        fn bufs<T>(n: usize, per: usize) -> Vec<Vec<T>> {
            (0..n).map(|_| Vec::with_capacity(per)).collect()
        }
        let data = if cfg.kv_f16 {
            KvData::F16 {
                k: bufs(cfg.n_layer, per),
                v: bufs(cfg.n_layer, per),
            }
        } else {
            KvData::F32 {
                k: bufs(cfg.n_layer, per),
                v: bufs(cfg.n_layer, per),
            }
        };
        Self { data, len: 0 }
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        match &mut self.data {
            KvData::F32 { k: kc, v: vc } => {
                f32::store(&mut kc[layer], k);
                f32::store(&mut vc[layer], v);
            }
            KvData::F16 { k: kc, v: vc } => {
                f16::store(&mut kc[layer], k);
                f16::store(&mut vc[layer], v);
            }
        }
    }
    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
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
    fn config(&self) -> &LlamaConfig;
    /// A cache with room for `capacity` tokens.
    fn new_cache(&self, capacity: usize) -> Self::Cache;
    /// Runs every chunk, appending to its cache; logits for the chunks that ask, in order.
    fn forward(
        &self,
        chunks: &mut [Chunk<'_, Self::Cache>],
        ws: &mut Self::Workspace,
    ) -> Result<Vec<Vec<f32>>>;
    fn weight_bytes(&self) -> usize;
    /// Which kernels run it, for logs and benchmarks.
    fn kernel(&self) -> String;
}

impl Decoder for Llama {
    type Cache = KvCache;
    type Workspace = Workspace;
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }
    fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(&self.cfg, capacity)
    }
    fn forward(&self, chunks: &mut [Chunk<'_>], ws: &mut Workspace) -> Result<Vec<Vec<f32>>> {
        Llama::forward(self, chunks, ws)
    }
    fn weight_bytes(&self) -> usize {
        Llama::weight_bytes(self)
    }
    fn kernel(&self) -> String {
        format!("nimmer {:?}", kernels::level())
    }
}

/// Reusable buffers for [`Llama::forward`].
#[derive(Default)]
pub struct Workspace {
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gu: Vec<f32>,
    act: Vec<f32>,
    qa: QuantActs,
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let sum2: f32 = xr.iter().map(|v| v * v).sum();
        let m = (sum2 / n as f32 + eps).sqrt();
        for ((o, &v), &a) in or.iter_mut().zip(xr).zip(w) {
            *o = v / m * a;
        }
    }
}

/// Adds each row's LoRA blend to the output of one (possibly fused) projection: `targets` maps a module to
/// its columns of `out` (`[rows, out_w]`); `input` is the projection's input (`[rows, in_w]`). Rows without a
/// blend are untouched, so the base matmul stays shared by every row of the batch.
#[allow(clippy::too_many_arguments)]
fn add_lora(
    blends: &[Option<&Blend>],
    layer: usize,
    targets: &[(Module, std::ops::Range<usize>)],
    input: &[f32],
    in_w: usize,
    out: &mut [f32],
    out_w: usize,
) {
    let one = |((o, x), b): ((&mut [f32], &[f32]), &Option<&Blend>)| {
        if let Some(b) = b {
            let mut scratch = Vec::new();
            for (m, cols) in targets {
                b.apply_row(layer, *m, x, &mut o[cols.clone()], &mut scratch);
            }
        }
    };
    let rows = blends.len();
    let (out, input) = (&mut out[..rows * out_w], &input[..rows * in_w]);
    if blends.iter().filter(|b| b.is_some()).count() > 1 {
        out.par_chunks_mut(out_w)
            .zip(input.par_chunks(in_w))
            .zip(blends.par_iter())
            .for_each(one);
    } else {
        out.chunks_mut(out_w)
            .zip(input.chunks(in_w))
            .zip(blends.iter())
            .for_each(one);
    }
}

/// One row's attention over its sequence's first `n` positions: `out = softmax(q·Kᵀ/scale)·V` per head. Heads
/// sharing a KV head (GQA) are processed together so each key and value row is loaded (and converted) once.
fn attend_row<T: KvElem>(
    cfg: &LlamaConfig,
    q: &[f32],
    kc: &[T],
    vc: &[T],
    n: usize,
    scale: f32,
    out: &mut [f32],
) {
    let (hd, kvd) = (cfg.head_dim, cfg.kv_dim());
    let group = cfg.n_head / cfg.n_kv_head;
    let mut p = vec![0f32; group * n];
    let mut row = vec![0f32; hd];
    for g in 0..cfg.n_kv_head {
        let (h0, kv0) = (g * group, g * hd);
        for j in 0..n {
            T::load(&kc[j * kvd + kv0..j * kvd + kv0 + hd], &mut row);
            for i in 0..group {
                let h = h0 + i;
                p[i * n + j] = dot(&q[h * hd..(h + 1) * hd], &row) / scale;
            }
        }
        for ps in p.chunks_exact_mut(n) {
            let max = ps.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0f32;
            for v in ps.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            for v in ps.iter_mut() {
                *v /= sum;
            }
        }
        let o = &mut out[h0 * hd..(h0 + group) * hd];
        o.fill(0.0);
        for j in 0..n {
            T::load(&vc[j * kvd + kv0..j * kvd + kv0 + hd], &mut row);
            for (i, oh) in o.chunks_exact_mut(hd).enumerate() {
                let pj = p[i * n + j];
                for (oi, &vi) in oh.iter_mut().zip(&row) {
                    *oi = pj.mul_add(vi, *oi);
                }
            }
        }
    }
}

impl Llama {
    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| {
                l.qkv.size_bytes() + l.o.size_bytes() + l.gate_up.size_bytes() + l.down.size_bytes()
            })
            .sum();
        l + self.lm_head.size_bytes() + self.embed.as_ref().map_or(0, Linear::size_bytes)
    }

    /// Adds `weight · s·B·A` of `adapter` into the weights (f32 precision only): the merged model that
    /// unmerged application is checked against, and a way to export a fixed voice.
    pub fn merge_lora(&mut self, adapter: &Adapter, weight: f32) -> Result<()> {
        let base = self.cfg.lora_base();
        let (qd, kvd, ffn) = (self.cfg.q_dim(), self.cfg.kv_dim(), self.cfg.ffn);
        for (li, layer) in self.layers.iter_mut().enumerate() {
            for &m in &adapter.modules {
                let Some(delta) = adapter.delta(li, m, &base) else {
                    continue;
                };
                let (linear, row0) = match m {
                    Module::Q => (&mut layer.qkv, 0),
                    Module::K => (&mut layer.qkv, qd),
                    Module::V => (&mut layer.qkv, qd + kvd),
                    Module::O => (&mut layer.o, 0),
                    Module::Gate => (&mut layer.gate_up, 0),
                    Module::Up => (&mut layer.gate_up, ffn),
                    Module::Down => (&mut layer.down, 0),
                };
                let Linear::F32 { w, n, k } = linear else {
                    return Err(TierError::LoraMerge(
                        "the model must be loaded with precision = \"f32\"".into(),
                    ));
                };
                let mut v = w.flatten_all()?.to_vec1::<f32>()?;
                for (dst, d) in v[row0 * *k..].iter_mut().zip(&delta) {
                    *dst += weight * d;
                }
                *w = Tensor::from_vec(v, (*n, *k), &Device::Cpu)?;
            }
        }
        Ok(())
    }

    /// Longest position the RoPE table covers.
    pub fn max_positions(&self) -> usize {
        self.max_pos
    }

    fn rope(&self, x: &mut [f32], pos: usize) {
        let half = self.cfg.head_dim / 2;
        let (cos, sin) = (
            &self.rope_cos[pos * half..(pos + 1) * half],
            &self.rope_sin[pos * half..(pos + 1) * half],
        );
        let (step, off) = if self.cfg.rope_neox {
            (1, half)
        } else {
            (2, 1)
        };
        for head in x.chunks_exact_mut(self.cfg.head_dim) {
            for i in 0..half {
                let (ia, ib) = (i * step, i * step + off);
                let (a, b) = (head[ia], head[ib]);
                head[ia] = a * cos[i] - b * sin[i];
                head[ib] = a * sin[i] + b * cos[i];
            }
        }
    }

    /// Runs every chunk through the model, appending to each chunk's KV cache.
    /// Returns one logits vector per chunk that asked for logits, in chunk order.
    pub fn forward(&self, chunks: &mut [Chunk<'_>], ws: &mut Workspace) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.cfg;
        let (dim, qd, kvd, hd) = (cfg.dim, cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        // Row r → (chunk, position).
        let mut row_of: Vec<(usize, usize)> = Vec::new();
        for (c, ch) in chunks.iter().enumerate() {
            let start = ch.kv.len;
            if start + ch.tokens.len() > self.max_pos {
                return Err(TierError::InvalidRequest {
                    field: "tokens",
                    message: format!(
                        "position {} is past the model's {} positions",
                        start + ch.tokens.len(),
                        self.max_pos
                    ),
                });
            }
            row_of.extend((0..ch.tokens.len()).map(|i| (c, start + i)));
        }
        let rows = row_of.len();
        if rows == 0 {
            return Ok(Vec::new());
        }
        let blends: Vec<Option<&Blend>> = row_of
            .iter()
            .map(|&(c, _)| chunks[c].lora.filter(|b| !b.is_empty()))
            .collect();
        let lora = blends.iter().any(Option::is_some);
        let Workspace {
            x,
            h,
            qkv,
            attn,
            proj,
            gu,
            act,
            qa,
        } = ws;
        x.resize(rows * dim, 0.0);
        h.resize(rows * dim, 0.0);
        let mut r = 0;
        for ch in chunks.iter() {
            for &t in ch.tokens {
                if t as usize >= cfg.vocab {
                    return Err(TierError::InvalidRequest {
                        field: "tokens",
                        message: format!("token id {t} is outside the vocabulary of {}", cfg.vocab),
                    });
                }
                let dst = &mut x[r * dim..(r + 1) * dim];
                self.embed
                    .as_ref()
                    .unwrap_or(&self.lm_head)
                    .row(t as usize, dst)?;
                r += 1;
            }
        }
        let scale = (hd as f32).sqrt();
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm(x, &layer.attn_norm, cfg.eps, h);
            layer.qkv.forward(h, rows, qa, qkv)?;
            let w = qd + 2 * kvd;
            if lora {
                add_lora(
                    &blends,
                    li,
                    &[
                        (Module::Q, 0..qd),
                        (Module::K, qd..qd + kvd),
                        (Module::V, qd + kvd..w),
                    ],
                    h,
                    dim,
                    qkv,
                    w,
                );
            }
            // RoPE on q and k, then append k and v to each sequence's cache.
            for (r, &(c, pos)) in row_of.iter().enumerate() {
                let row = &mut qkv[r * w..(r + 1) * w];
                self.rope(&mut row[..qd + kvd], pos);
                let (k, v) = row[qd..].split_at(kvd);
                chunks[c].kv.append(li, k, v);
            }
            attn.resize(rows * qd, 0.0);
            let caches: Vec<&KvCache> = chunks.iter().map(|c| &*c.kv).collect();
            let qkv_ref: &[f32] = qkv;
            let row_ref = &row_of;
            // One row attends over its own sequence's positions 0..=pos. Heads sharing a KV head (GQA) are
            // processed together so each key and value row is loaded once per group.
            let attend = |(r, out): (usize, &mut [f32])| {
                let (c, pos) = row_ref[r];
                let q = &qkv_ref[r * w..r * w + qd];
                match &caches[c].data {
                    KvData::F32 { k, v } => attend_row(cfg, q, &k[li], &v[li], pos + 1, scale, out),
                    KvData::F16 { k, v } => attend_row(cfg, q, &k[li], &v[li], pos + 1, scale, out),
                }
            };
            if rows > 1 {
                attn.par_chunks_mut(qd).enumerate().for_each(attend);
            } else {
                attn.chunks_mut(qd).enumerate().for_each(attend);
            }
            layer.o.forward(attn, rows, qa, proj)?;
            if lora {
                add_lora(&blends, li, &[(Module::O, 0..dim)], attn, qd, proj, dim);
            }
            for (xi, pi) in x.iter_mut().zip(proj.iter()) {
                *xi += pi;
            }
            rms_norm(x, &layer.ffn_norm, cfg.eps, h);
            layer.gate_up.forward(h, rows, qa, gu)?;
            if lora {
                let f = cfg.ffn;
                add_lora(
                    &blends,
                    li,
                    &[(Module::Gate, 0..f), (Module::Up, f..2 * f)],
                    h,
                    dim,
                    gu,
                    2 * f,
                );
            }
            act.resize(rows * cfg.ffn, 0.0);
            for (a, g) in act
                .chunks_exact_mut(cfg.ffn)
                .zip(gu.chunks_exact(2 * cfg.ffn))
            {
                let (gate, up) = g.split_at(cfg.ffn);
                for ((ai, &gi), &ui) in a.iter_mut().zip(gate).zip(up) {
                    *ai = gi / (1.0 + (-gi).exp()) * ui;
                }
            }
            layer.down.forward(act, rows, qa, proj)?;
            if lora {
                add_lora(
                    &blends,
                    li,
                    &[(Module::Down, 0..dim)],
                    act,
                    cfg.ffn,
                    proj,
                    dim,
                );
            }
            for (xi, pi) in x.iter_mut().zip(proj.iter()) {
                *xi += pi;
            }
        }
        for ch in chunks.iter_mut() {
            ch.kv.len += ch.tokens.len();
        }
        // Final norm and LM head only for the rows that need logits.
        let mut last_rows = Vec::new();
        let mut r = 0;
        for ch in chunks.iter() {
            r += ch.tokens.len();
            if ch.logits && !ch.tokens.is_empty() {
                last_rows.push(r - 1);
            }
        }
        if last_rows.is_empty() {
            return Ok(Vec::new());
        }
        let n = last_rows.len();
        let mut sel = vec![0f32; n * dim];
        for (i, &r) in last_rows.iter().enumerate() {
            sel[i * dim..(i + 1) * dim].copy_from_slice(&x[r * dim..(r + 1) * dim]);
        }
        h.resize(n * dim, 0.0);
        rms_norm(&sel, &self.norm, cfg.eps, &mut h[..n * dim]);
        self.lm_head.forward(h, n, qa, proj)?;
        let v = self.lm_head.n();
        Ok((0..n)
            .map(|i| proj[i * v..i * v + cfg.vocab].to_vec())
            .collect())
    }
}

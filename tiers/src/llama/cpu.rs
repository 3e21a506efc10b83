//! Our CPU model: weights on the tiled int8 kernels (or f32), RoPE tables, and the batched forward pass over
//! a ragged batch of prefill chunks and decode tokens with per-row trait-LoRA terms.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use nimmer_loras::{Adapter, Blend, Module};

use super::attn;
use super::kv::KvCache;
use super::ops::{PAR_ROWS, add_in_place, add_lora, exp_in_place, rms_norm};
use super::{Chunk, Decoder, LlamaConfig};
use crate::error::{Result, TierError};
use crate::kernels::{self, QuantActs, TiledWeight};

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

pub(crate) struct Layer {
    pub(crate) attn_norm: Vec<f32>,
    /// q, k, v stacked: `[q_dim + 2·kv_dim, dim]`.
    pub(crate) qkv: Linear,
    pub(crate) o: Linear,
    pub(crate) ffn_norm: Vec<f32>,
    /// gate and up stacked: `[2·ffn, dim]`.
    pub(crate) gate_up: Linear,
    pub(crate) down: Linear,
}

/// The model: weights and RoPE tables; no per-sequence state.
pub struct Llama {
    pub cfg: LlamaConfig,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Vec<f32>,
    pub(crate) lm_head: Linear,
    /// Separate embedding table when the output matrix is not tied to it.
    pub(crate) embed: Option<Linear>,
    /// `cos`/`sin` `[max_pos, head_dim/2]`.
    pub(crate) rope_cos: Vec<f32>,
    pub(crate) rope_sin: Vec<f32>,
    pub(crate) max_pos: usize,
}

impl Decoder for Llama {
    type Cache = KvCache;
    type Workspace = Workspace;
    type Block = KvCache;
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }
    fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(&self.cfg, capacity)
    }
    fn forward(&self, chunks: &mut [Chunk<'_>], ws: &mut Workspace) -> Result<Vec<Vec<f32>>> {
        Llama::forward(self, chunks, ws)
    }
    fn share_block(
        &self,
        cache: &mut KvCache,
        start: usize,
        n: usize,
    ) -> Result<Option<std::sync::Arc<KvCache>>> {
        if start + n > cache.len {
            return Ok(None);
        }
        Ok(Some(std::sync::Arc::new(
            cache.copy_range(&self.cfg, start, n),
        )))
    }
    fn reuse_blocks(
        &self,
        cache: &mut KvCache,
        blocks: &[std::sync::Arc<KvCache>],
        tokens: usize,
    ) -> Result<()> {
        let mut left = tokens;
        for b in blocks {
            let n = left.min(b.len);
            cache.extend_from(&self.cfg, b, n);
            left -= n;
        }
        Ok(())
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
        // Chunk c: (its first row, its rows, the position of its first row).
        let mut spans = Vec::with_capacity(chunks.len());
        let mut at = 0;
        for ch in chunks.iter() {
            spans.push((at, ch.tokens.len(), ch.kv.len));
            at += ch.tokens.len();
        }
        let tasks = attn::tasks(&spans);
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
        // The rows that need logits: the last row of each chunk that asks for them, as one-row spans.
        let logit_spans: Vec<(usize, usize, usize)> = {
            let mut i = 0;
            spans
                .iter()
                .zip(chunks.iter())
                .map(|(&(_, n, pos0), ch)| {
                    let wanted = ch.logits && n > 0;
                    let span = (i, wanted as usize, pos0 + n.saturating_sub(1));
                    i += wanted as usize;
                    span
                })
                .collect()
        };
        let logit_rows: Vec<usize> = spans
            .iter()
            .zip(&logit_spans)
            .filter(|(_, l)| l.1 == 1)
            .map(|(&(row0, n, _), _)| row0 + n - 1)
            .collect();
        let (mut rows, mut tasks, mut blends) = (rows, tasks, blends);
        let scale = (hd as f32).sqrt();
        let last_layer = self.layers.len() - 1;
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm(&x[..rows * dim], &layer.attn_norm, cfg.eps, h);
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
            // RoPE on q and k (rows in parallel), then append k and v to each sequence's cache.
            let rope = |(row, &(_, pos)): (&mut [f32], &(usize, usize))| {
                self.rope(&mut row[..qd + kvd], pos)
            };
            if rows >= PAR_ROWS {
                qkv[..rows * w]
                    .par_chunks_mut(w)
                    .zip(row_of.par_iter())
                    .for_each(rope);
            } else {
                qkv[..rows * w]
                    .chunks_mut(w)
                    .zip(row_of.iter())
                    .for_each(rope);
            }
            for (r, &(c, _)) in row_of.iter().enumerate() {
                let (k, v) = qkv[r * w + qd..(r + 1) * w].split_at(kvd);
                chunks[c].kv.append(li, k, v);
            }
            if li == last_layer && logit_rows.len() < rows {
                // Past its keys and values, only the rows that need logits go on through the last layer
                // (every row's operations are its own, so their results are unchanged).
                for (i, &r) in logit_rows.iter().enumerate() {
                    x.copy_within(r * dim..(r + 1) * dim, i * dim);
                    qkv.copy_within(r * w..(r + 1) * w, i * w);
                }
                rows = logit_rows.len();
                blends = logit_rows.iter().map(|&r| blends[r]).collect();
                tasks = attn::tasks(&logit_spans);
                if rows == 0 {
                    break;
                }
            }
            attn.resize(rows * qd, 0.0);
            let caches: Vec<&KvCache> = chunks.iter().map(|c| &*c.kv).collect();
            attn::attend(cfg, li, &caches, &tasks, qkv, w, scale, attn);
            layer.o.forward(attn, rows, qa, proj)?;
            if lora {
                add_lora(&blends, li, &[(Module::O, 0..dim)], attn, qd, proj, dim);
            }
            add_in_place(&mut x[..rows * dim], proj, dim);
            rms_norm(&x[..rows * dim], &layer.ffn_norm, cfg.eps, h);
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
            let silu_mul = |(a, g): (&mut [f32], &[f32])| {
                let (gate, up) = g.split_at(cfg.ffn);
                for (ai, &gi) in a.iter_mut().zip(gate) {
                    *ai = -gi;
                }
                exp_in_place(a);
                for ((ai, &gi), &ui) in a.iter_mut().zip(gate).zip(up) {
                    *ai = gi / (1.0 + *ai) * ui;
                }
            };
            let gu_rows = &gu[..rows * 2 * cfg.ffn];
            if rows > 1 {
                act.par_chunks_mut(cfg.ffn)
                    .zip(gu_rows.par_chunks(2 * cfg.ffn))
                    .for_each(silu_mul);
            } else {
                act.chunks_mut(cfg.ffn)
                    .zip(gu_rows.chunks(2 * cfg.ffn))
                    .for_each(silu_mul);
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
            add_in_place(&mut x[..rows * dim], proj, dim);
        }
        for ch in chunks.iter_mut() {
            ch.kv.len += ch.tokens.len();
        }
        // Final norm and LM head for the rows that need logits (the first rows of `x` now, in order).
        let n = logit_rows.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        h.resize(n * dim, 0.0);
        rms_norm(&x[..n * dim], &self.norm, cfg.eps, &mut h[..n * dim]);
        self.lm_head.forward(h, n, qa, proj)?;
        let v = self.lm_head.n();
        Ok((0..n)
            .map(|i| proj[i * v..i * v + cfg.vocab].to_vec())
            .collect())
    }
}

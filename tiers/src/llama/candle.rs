//! The same llama decoder written with candle ops, device-generic: it is how LLM tiers run on CUDA. Its
//! arithmetic is `candle_transformers::models::quantized_llama`'s (quantized matmuls, interleaved `rope_i`,
//! softmax attention), batched for serving:
//! - rows of all sequences share each matmul, and RoPE runs over all rows at once (each at its position);
//! - keys and values live in one pool per layer, `[rows, kv_dim]`, of which each sequence owns rows in
//!   position order (pages of one token; row 0 stays zero for padding), written for a whole step with one
//!   scatter;
//! - every decoding sequence of a step attends in ONE batched attention (keys gathered from the pool and
//!   padded to the longest, padding masked), grouped-query heads without copying keys per head; prefill
//!   chunks attend one chunk at a time (causal mask).
//!
//! So a decode step costs the same few kernels per layer however many sequences it holds, which is what a
//! GPU needs. Trait-LoRA blends are gathered per row from device tables ([`super::candle_lora`]).

use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use nimmer_config::Precision;

use super::candle_kv::{CandleBlock, CandleKv, KvPool};
use super::candle_lora::{Group, LoraTables};
use super::{Chunk, Decoder, LlamaConfig};
use crate::error::{Result, TierError};
use crate::tokenizer::ChatTokenizer;

struct Layer {
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    w_gate: QMatMul,
    w_up: QMatMul,
    w_down: QMatMul,
    attn_norm: Tensor,
    ffn_norm: Tensor,
}

/// Llama decoder on candle tensors (GGUF only).
pub struct CandleLlama {
    cfg: LlamaConfig,
    layers: Vec<Layer>,
    embed: Tensor,
    norm: Tensor,
    lm_head: QMatMul,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    weight_bytes: usize,
    pool: Arc<Mutex<KvPool>>,
}

impl CandleLlama {
    /// Loads a llama GGUF onto `device`. `Precision::F32` dequantizes every weight; otherwise the file's
    /// quantization runs through candle's quantized matmul.
    pub fn load(
        path: &Path,
        precision: Precision,
        max_pos: usize,
        device: &Device,
    ) -> Result<(Self, ChatTokenizer)> {
        if path.is_dir() {
            return Err(TierError::model_file(
                path,
                "the candle backend reads GGUF files only",
            ));
        }
        let (ct, mut f, cfg, tokenizer) = super::Llama::read_gguf_header(path)?;
        let mut weight_bytes = 0;
        let mut qt = |name: &str| -> Result<std::sync::Arc<candle_core::quantized::QTensor>> {
            let t = ct
                .tensor(&mut f, name, device)
                .map_err(|e| TierError::Tensor {
                    path: path.into(),
                    tensor: name.into(),
                    message: e.to_string(),
                })?;
            weight_bytes += t.storage_size_in_bytes();
            Ok(std::sync::Arc::new(t))
        };
        let mm = |t: std::sync::Arc<candle_core::quantized::QTensor>| -> Result<QMatMul> {
            Ok(match precision {
                Precision::F32 => QMatMul::Tensor(t.dequantize(&t.device())?),
                _ => QMatMul::from_arc(t)?,
            })
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let mut w = |s: &str| qt(&format!("blk.{i}.{s}.weight"));
            let (q, k, v, o) = (w("attn_q")?, w("attn_k")?, w("attn_v")?, w("attn_output")?);
            let (g, u, d) = (w("ffn_gate")?, w("ffn_up")?, w("ffn_down")?);
            let (an, fnn) = (w("attn_norm")?, w("ffn_norm")?);
            layers.push(Layer {
                wq: mm(q)?,
                wk: mm(k)?,
                wv: mm(v)?,
                wo: mm(o)?,
                w_gate: mm(g)?,
                w_up: mm(u)?,
                w_down: mm(d)?,
                attn_norm: an.dequantize(device)?,
                ffn_norm: fnn.dequantize(device)?,
            });
        }
        let embd = qt("token_embd.weight")?;
        let embed = embd.dequantize(device)?;
        let lm_head = match ct.tensor_infos.contains_key("output.weight") {
            true => mm(qt("output.weight")?)?,
            false => mm(embd)?,
        };
        let norm = qt("output_norm.weight")?.dequantize(device)?;
        let (cos, sin) = rope_tables(&cfg, max_pos, device)?;
        let model = Self {
            cos,
            sin,
            cfg,
            layers,
            embed,
            norm,
            lm_head,
            device: device.clone(),
            weight_bytes,
            pool: Arc::new(Mutex::new(KvPool::default())),
        };
        Ok((model, tokenizer))
    }

    /// Makes the device's CUDA context current on this thread before the step touches any device memory.
    /// Steps run on whichever worker of the engine's pool is free, and cudarc binds the context in its
    /// operations but not when it frees memory: a tensor of an earlier step dropped first thing on a worker
    /// that never bound it fails the free (`CUDA_ERROR_INVALID_CONTEXT`), and cudarc reports that error at
    /// the next operation (seen once on an H200, in `lora-bench`).
    fn bind_thread(&self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = &self.device {
            d.cuda_stream()
                .context()
                .bind_to_thread()
                .map_err(|e| TierError::Device(format!("binding the CUDA context: {e}")))?;
        }
        Ok(())
    }

    /// The gather index and causal mask of one prefill chunk of `t` tokens over its sequence's pool `rows`
    /// (the same for every layer, so built once per step).
    fn chunk_plan(&self, t: usize, rows: &[u32]) -> Result<(Tensor, Tensor)> {
        let (total, group) = (rows.len(), self.cfg.n_head / self.cfg.n_kv_head);
        let pos = total - t;
        let mask: Vec<f32> = (0..group * t)
            .flat_map(|gi| {
                let i = gi % t;
                (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 })
            })
            .collect();
        Ok((
            Tensor::new(rows, &self.device)?,
            Tensor::from_vec(mask, (1, group * t, total), &self.device)?,
        ))
    }

    /// Attention of one prefill chunk: `q` `[t, q_dim]` (after RoPE) over the sequence's keys and values
    /// (the pool rows `idx`), causal by `mask` (from [`Self::chunk_plan`]).
    fn attend_chunk(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        idx: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (t, total) = (q.dim(0)?, idx.dim(0)?);
        let (nkv, hd) = (cfg.n_kv_head, cfg.head_dim);
        let group = cfg.n_head / nkv;
        let kv_heads = |pool: &Tensor| -> Result<Tensor> {
            Ok(pool
                .index_select(idx, 0)?
                .reshape((total, nkv, hd))?
                .transpose(0, 1)?
                .contiguous()?)
        };
        let (k, v) = (kv_heads(k)?, kv_heads(v)?);
        // Query heads grouped by their key head: [nkv, group * t, hd].
        let q = q
            .reshape((t, nkv, group, hd))?
            .permute((1, 2, 0, 3))?
            .contiguous()?
            .reshape((nkv, group * t, hd))?;
        let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let att = candle_nn::ops::softmax_last_dim(&att.broadcast_add(mask)?)?;
        Ok(att
            .matmul(&v)?
            .reshape((nkv, group, t, hd))?
            .permute((2, 0, 1, 3))?
            .contiguous()?
            .reshape((t, cfg.q_dim()))?)
    }

    /// One batched attention for `b` decoding sequences: `q` `[b, q_dim]`, keys and values gathered by
    /// `idx` (`b × longest` pool rows, padded with row 0) and masked by `mask` (`[b, 1, 1, longest]`).
    fn attend_decode(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        idx: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (nkv, hd) = (cfg.n_kv_head, cfg.head_dim);
        let group = cfg.n_head / nkv;
        let b = q.dim(0)?;
        let longest = idx.dim(0)? / b;
        let kv_heads = |pool: &Tensor| -> Result<Tensor> {
            Ok(pool
                .index_select(idx, 0)?
                .reshape((b, longest, nkv, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (k, v) = (kv_heads(k)?, kv_heads(v)?);
        let q = q.reshape((b, nkv, group, hd))?;
        let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let att = candle_nn::ops::softmax_last_dim(&att.broadcast_add(mask)?)?;
        Ok(att.matmul(&v)?.reshape((b, cfg.q_dim()))?)
    }
}

/// RoPE `cos` and `sin` tables `[max_pos, head_dim / 2]` of `cfg` on `device`.
pub(super) fn rope_tables(
    cfg: &LlamaConfig,
    max_pos: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let theta: Vec<f32> = (0..cfg.head_dim)
        .step_by(2)
        .map(|i| 1f32 / cfg.rope_base.powf(i as f32 / cfg.head_dim as f32))
        .collect();
    let theta = Tensor::new(theta.as_slice(), device)?;
    let idx = Tensor::arange(0, max_pos as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((max_pos, 1))?
        .matmul(&theta.reshape((1, half))?)?;
    Ok((idx.cos()?, idx.sin()?))
}

impl Decoder for CandleLlama {
    type Cache = CandleKv;
    type Workspace = LoraTables;
    type Block = CandleBlock;

    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    fn new_cache(&self, capacity: usize) -> CandleKv {
        CandleKv::new(self.pool.clone(), capacity)
    }

    fn share_block(
        &self,
        kv: &mut CandleKv,
        start: usize,
        n: usize,
    ) -> Result<Option<Arc<CandleBlock>>> {
        Ok(kv.share(start, n))
    }

    fn reuse_blocks(
        &self,
        kv: &mut CandleKv,
        blocks: &[Arc<CandleBlock>],
        tokens: usize,
    ) -> Result<()> {
        kv.reuse(blocks, tokens)
    }

    fn forward(
        &self,
        chunks: &mut [Chunk<'_, CandleKv>],
        lora: &mut LoraTables,
    ) -> Result<Vec<Vec<f32>>> {
        let ids: Vec<u32> = chunks
            .iter()
            .flat_map(|c| c.tokens.iter().copied())
            .collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(c) = chunks
            .iter()
            .find(|c| c.kv.len + c.tokens.len() > self.cos.dim(0).unwrap_or(0))
        {
            return Err(TierError::InvalidRequest {
                field: "tokens",
                message: format!(
                    "position {} is past the model's positions",
                    c.kv.len + c.tokens.len()
                ),
            });
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.cfg.vocab) {
            return Err(TierError::InvalidRequest {
                field: "tokens",
                message: format!(
                    "token id {bad} is outside the vocabulary of {}",
                    self.cfg.vocab
                ),
            });
        }
        self.bind_thread()?;
        lora.prepare(chunks, &self.cfg.lora_base(), &self.device)?;
        let dev = &self.device;
        let cfg = &self.cfg;

        // Pool rows for this step's tokens (a failed earlier step may have left rows past `len`).
        let (mut positions, mut written) = (Vec::with_capacity(ids.len()), Vec::new());
        {
            let mut pool = self.pool.lock().expect("kv pool lock");
            for c in chunks.iter_mut() {
                let extra = c.kv.rows.split_off(c.kv.len.min(c.kv.rows.len()));
                pool.free.extend(extra);
            }
            pool.reserve(ids.len(), cfg, dev)?;
            for c in chunks.iter_mut() {
                for i in 0..c.tokens.len() {
                    let r = pool.free.pop().ok_or_else(|| {
                        TierError::Device("the KV pool has fewer free rows than it reserved".into())
                    })?;
                    c.kv.rows.push(r);
                    written.push(r);
                    positions.push((c.kv.len + i) as u32);
                }
            }
        }
        let n = ids.len();
        let write_idx = Tensor::from_vec(written, (n, 1), dev)?
            .broadcast_as((n, cfg.kv_dim()))?
            .contiguous()?;
        let pos = Tensor::from_vec(positions, n, dev)?;
        let hd = cfg.head_dim;
        let cos = self.cos.index_select(&pos, 0)?.reshape((n, 1, hd / 2))?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((n, 1, hd / 2))?;
        // Each row is its own batch entry of `rope_i`, at its own position.
        let rope = |x: &Tensor, heads: usize| -> Result<Tensor> {
            Ok(
                candle_nn::rotary_emb::rope_i(&x.reshape((n, heads, 1, hd))?, &cos, &sin)?
                    .reshape((n, heads * hd))?,
            )
        };

        // The step's attention plan: decoding sequences batched, prefill chunks one by one; `order` puts
        // the outputs (decode rows first, then each chunk's) back into row order.
        let (mut dec_rows, mut dec_seqs, mut chunks_at) = (Vec::new(), Vec::new(), Vec::new());
        let mut r0 = 0usize;
        for (ci, c) in chunks.iter().enumerate() {
            match c.tokens.len() {
                0 => {}
                1 => {
                    dec_rows.push(r0 as u32);
                    dec_seqs.push(ci);
                }
                t => chunks_at.push((ci, r0, t)),
            }
            r0 += c.tokens.len();
        }
        let mut out_pos = vec![0u32; n];
        for (i, &r) in dec_rows.iter().enumerate() {
            out_pos[r as usize] = i as u32;
        }
        let mut at = dec_rows.len();
        for &(_, r0, t) in &chunks_at {
            for i in 0..t {
                out_pos[r0 + i] = (at + i) as u32;
            }
            at += t;
        }
        let order = Tensor::from_vec(out_pos, n, dev)?;
        let prefill: Vec<(usize, usize, Tensor, Tensor)> = chunks_at
            .iter()
            .map(|&(ci, r0, t)| {
                let (idx, mask) = self.chunk_plan(t, &chunks[ci].kv.rows)?;
                Ok((r0, t, idx, mask))
            })
            .collect::<Result<_>>()?;
        let decode = if dec_rows.is_empty() {
            None
        } else {
            let longest = dec_seqs
                .iter()
                .map(|&ci| chunks[ci].kv.rows.len())
                .max()
                .unwrap_or(1);
            let (mut idx, mut mask) = (Vec::new(), Vec::new());
            for &ci in &dec_seqs {
                let rows = &chunks[ci].kv.rows;
                idx.extend(
                    rows.iter()
                        .copied()
                        .chain(std::iter::repeat_n(0, longest - rows.len())),
                );
                mask.extend((0..longest).map(|j| {
                    if j < rows.len() {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                }));
            }
            let b = dec_rows.len();
            Some((
                Tensor::from_vec(dec_rows, b, dev)?,
                Tensor::from_vec(idx, b * longest, dev)?,
                Tensor::from_vec(mask, (b, 1, 1, longest), dev)?,
            ))
        };

        let eps = cfg.eps;
        let mut x = self
            .embed
            .index_select(&Tensor::new(ids.as_slice(), dev)?, 0)?;
        for (li, l) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &l.attn_norm, eps)?;
            let [q, k, v]: [Tensor; 3] = lora
                .apply(
                    li,
                    Group::Qkv,
                    &h,
                    vec![l.wq.forward(&h)?, l.wk.forward(&h)?, l.wv.forward(&h)?],
                )?
                .try_into()
                .expect("three outputs");
            let (q, k) = (rope(&q, cfg.n_head)?, rope(&k, cfg.n_kv_head)?);
            let (pk, pv) = {
                let pool = self.pool.lock().expect("kv pool lock");
                (pool.k[li].clone(), pool.v[li].clone())
            };
            pk.scatter_set(&write_idx, &k, 0)?;
            pv.scatter_set(&write_idx, &v.contiguous()?, 0)?;
            let mut ys = Vec::with_capacity(chunks_at.len() + 1);
            if let Some((rows, idx, mask)) = &decode {
                ys.push(self.attend_decode(&q.index_select(rows, 0)?, &pk, &pv, idx, mask)?);
            }
            for (r0, t, idx, mask) in &prefill {
                ys.push(self.attend_chunk(&q.narrow(0, *r0, *t)?, &pk, &pv, idx, mask)?);
            }
            let y = match ys.len() {
                1 => ys.remove(0),
                _ => Tensor::cat(&ys, 0)?.index_select(&order, 0)?,
            };
            let one = |g: Group, w: &QMatMul, x: &Tensor| -> Result<Tensor> {
                Ok(lora.apply(li, g, x, vec![w.forward(x)?])?.remove(0))
            };
            x = (one(Group::O, &l.wo, &y)? + &x)?;
            let h = candle_nn::ops::rms_norm(&x, &l.ffn_norm, eps)?;
            let [gate, up]: [Tensor; 2] = lora
                .apply(
                    li,
                    Group::GateUp,
                    &h,
                    vec![l.w_gate.forward(&h)?, l.w_up.forward(&h)?],
                )?
                .try_into()
                .expect("two outputs");
            let gated = (candle_nn::ops::silu(&gate)? * up)?;
            x = (one(Group::Down, &l.w_down, &gated)? + &x)?;
        }
        let mut last = Vec::new();
        let mut r = 0;
        for c in chunks.iter_mut() {
            r += c.tokens.len();
            c.kv.len += c.tokens.len();
            if c.logits && !c.tokens.is_empty() {
                last.push(r as u32 - 1);
            }
        }
        if last.is_empty() {
            return Ok(Vec::new());
        }
        let sel = x.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?;
        let h = candle_nn::ops::rms_norm(&sel, &self.norm, eps)?;
        let logits = self
            .lm_head
            .forward(&h)?
            .i((.., ..self.cfg.vocab))?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?;
        Ok(logits.to_vec2::<f32>()?)
    }

    fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    fn kernel(&self) -> String {
        format!("candle on {:?}", self.device)
    }
}

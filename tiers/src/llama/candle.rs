//! The same llama decoder written with candle ops, device-generic: it is how LLM tiers run on CUDA, and on
//! the CPU it performs exactly the operations of `candle_transformers::models::quantized_llama` (quantized
//! matmuls, `rope_i`, repeat-kv attention, softmax), so its tokens match the library's model bit for bit.
//! Rows of all sequences share each matmul; attention runs per sequence on its own cache. Trait-LoRA blends
//! are gathered per row from device tables ([`super::candle_lora`]).

use std::path::Path;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use nimmer_config::Precision;

use nimmer_loras::Module as Proj;

use super::candle_lora::LoraTables;
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
}

/// Per-sequence cache: keys and values `[1, kv_heads, len, head_dim]` per layer.
pub struct CandleKv {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
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
        };
        Ok((model, tokenizer))
    }

    fn attend(
        &self,
        li: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        kv: &mut CandleKv,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (t, pos) = (q.dim(0)?, kv.len);
        let heads = |x: &Tensor, n: usize| -> Result<Tensor> {
            Ok(x.reshape((1, t, n, cfg.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (cos, sin) = (self.cos.narrow(0, pos, t)?, self.sin.narrow(0, pos, t)?);
        let q = candle_nn::rotary_emb::rope_i(&heads(q, cfg.n_head)?, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope_i(&heads(k, cfg.n_kv_head)?, &cos, &sin)?;
        let v = heads(v, cfg.n_kv_head)?;
        let (k, v) = match kv.layers[li].take() {
            Some((kp, vp)) if pos > 0 => (Tensor::cat(&[&kp, &k], 2)?, Tensor::cat(&[&vp, &v], 2)?),
            _ => (k, v),
        };
        kv.layers[li] = Some((k.clone(), v.clone()));
        let group = cfg.n_head / cfg.n_kv_head;
        let k = candle_transformers::utils::repeat_kv(k, group)?;
        let v = candle_transformers::utils::repeat_kv(v, group)?;
        let att = (q.matmul(&k.t()?)? / (cfg.head_dim as f64).sqrt())?;
        let att = if t > 1 {
            let mask: Vec<u8> = (0..t)
                .flat_map(|i| (0..pos + t).map(move |j| u8::from(j > i + pos)))
                .collect();
            let mask =
                Tensor::from_slice(&mask, (t, pos + t), &self.device)?.broadcast_as(att.shape())?;
            let neg =
                Tensor::new(f32::NEG_INFINITY, &self.device)?.broadcast_as(att.shape().dims())?;
            mask.where_cond(&neg, &att)?
        } else {
            att
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v.contiguous()?)?;
        Ok(y.transpose(1, 2)?.reshape((t, cfg.q_dim()))?)
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

    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    fn new_cache(&self, _capacity: usize) -> CandleKv {
        CandleKv {
            layers: (0..self.cfg.n_layer).map(|_| None).collect(),
            len: 0,
        }
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
        lora.prepare(chunks, &self.cfg.lora_base(), &self.device)?;
        let eps = self.cfg.eps;
        let mut x = self
            .embed
            .index_select(&Tensor::new(ids.as_slice(), &self.device)?, 0)?;
        for (li, l) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &l.attn_norm, eps)?;
            let proj = |w: &QMatMul, m: Proj, x: &Tensor| lora.apply(li, m, x, w.forward(x)?);
            let (q, k, v) = (
                proj(&l.wq, Proj::Q, &h)?,
                proj(&l.wk, Proj::K, &h)?,
                proj(&l.wv, Proj::V, &h)?,
            );
            let mut ys = Vec::with_capacity(chunks.len());
            let mut r0 = 0;
            for c in chunks.iter_mut() {
                let t = c.tokens.len();
                if t == 0 {
                    continue;
                }
                ys.push(self.attend(
                    li,
                    &q.narrow(0, r0, t)?,
                    &k.narrow(0, r0, t)?,
                    &v.narrow(0, r0, t)?,
                    c.kv,
                )?);
                r0 += t;
            }
            let y = Tensor::cat(&ys, 0)?;
            x = (proj(&l.wo, Proj::O, &y)? + &x)?;
            let h = candle_nn::ops::rms_norm(&x, &l.ffn_norm, eps)?;
            let gated = (candle_nn::ops::silu(&proj(&l.w_gate, Proj::Gate, &h)?)?
                * proj(&l.w_up, Proj::Up, &h)?)?;
            x = (proj(&l.w_down, Proj::Down, &gated)? + &x)?;
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

    fn supports_lora(&self) -> bool {
        true
    }
}

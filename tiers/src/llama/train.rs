//! LoRA training for the Driver's base model with candle's autograd: the base weights are dequantized to f32
//! and frozen, each targeted projection gets a trainable pair (`A` Kaiming-uniform, `B` zero, as PEFT
//! initializes them), and AdamW minimizes the cross-entropy of the reply tokens of chat examples (the
//! prompt tokens are context only). The result is an [`Adapter`] in the base's row order, ready for
//! [`nimmer_loras::peft::save_peft`]. `nimmer loras train` drives it.

use std::path::Path;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use nimmer_loras::{Adapter, LoraPair, Module};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::LlamaConfig;
use crate::error::{Result, TierError};
use crate::tokenizer::{ChatTokenizer, Message};

/// One training example: a chat turn and the reply the adapter should give.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Example {
    #[serde(default)]
    pub system: Option<String>,
    pub user: String,
    pub reply: String,
}

/// Reads examples from a JSON Lines file (`{"system"?, "user", "reply"}` per line; blank lines skipped).
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| TierError::model_file(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let ex: Example = serde_json::from_str(line)
            .map_err(|e| TierError::model_file(path, format!("line {}: {e}", i + 1)))?;
        out.push(ex);
    }
    if out.is_empty() {
        return Err(TierError::model_file(path, "holds no examples"));
    }
    Ok(out)
}

/// Training hyper-parameters.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub rank: usize,
    pub alpha: f32,
    pub modules: Vec<Module>,
    pub steps: usize,
    /// Examples per optimizer step.
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
}

/// Progress of one optimizer step.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    pub step: usize,
    pub loss: f32,
    pub tokens: usize,
}

struct Frozen {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    /// Per module (in [`Module::ALL`] order), `[out, in]`.
    w: Vec<Tensor>,
}

/// The frozen base model in f32 plus the trainable pairs.
pub struct Trainer {
    cfg: LlamaConfig,
    tok: ChatTokenizer,
    embed: Tensor,
    norm: Tensor,
    layers: Vec<Frozen>,
    cos: Tensor,
    sin: Tensor,
    /// Per layer, per module in [`Module::ALL`] order: `(A [r, in], B [out, r])` where targeted.
    pairs: Vec<Vec<Option<(Var, Var)>>>,
    opts: TrainOptions,
    end_id: u32,
}

/// A tokenized example: the ids and the index from which ids are reply tokens.
struct Seq {
    ids: Vec<u32>,
    reply_from: usize,
}

impl Trainer {
    /// Loads the GGUF at `path` (dequantized to f32 on the CPU) and initializes the adapter.
    pub fn new(path: &Path, opts: TrainOptions) -> Result<Self> {
        let bad = |m: String| TierError::InvalidRequest {
            field: "train",
            message: m,
        };
        if opts.rank == 0 || opts.rank > nimmer_loras::MAX_RANK {
            return Err(bad(format!("rank {} is outside 1..=64", opts.rank)));
        }
        if opts.modules.is_empty() || opts.steps == 0 || opts.batch == 0 {
            return Err(bad("modules, steps and batch must be non-empty".into()));
        }
        let dev = Device::Cpu;
        let (ct, mut f, cfg, tok) = super::Llama::read_gguf_header(path)?;
        let mut t = |name: &str| -> Result<Tensor> {
            let q = ct
                .tensor(&mut f, name, &dev)
                .map_err(|e| TierError::Tensor {
                    path: path.into(),
                    tensor: name.into(),
                    message: e.to_string(),
                })?;
            Ok(q.dequantize(&dev)?)
        };
        let gguf_name = |m: Module| match m {
            Module::Q => "attn_q",
            Module::K => "attn_k",
            Module::V => "attn_v",
            Module::O => "attn_output",
            Module::Gate => "ffn_gate",
            Module::Up => "ffn_up",
            Module::Down => "ffn_down",
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let mut w = Vec::with_capacity(7);
            for m in Module::ALL {
                w.push(t(&format!("blk.{i}.{}.weight", gguf_name(m)))?);
            }
            layers.push(Frozen {
                attn_norm: t(&format!("blk.{i}.attn_norm.weight"))?,
                ffn_norm: t(&format!("blk.{i}.ffn_norm.weight"))?,
                w,
            });
        }
        let embed = t("token_embd.weight")?;
        let norm = t("output_norm.weight")?;
        let (cos, sin) = super::candle::rope_tables(&cfg, 1024, &dev)?;
        let base = cfg.lora_base();
        let mut rng = StdRng::seed_from_u64(opts.seed);
        let mut pairs = Vec::with_capacity(cfg.n_layer);
        for _ in 0..cfg.n_layer {
            let mut row = Vec::with_capacity(7);
            for m in Module::ALL {
                if !opts.modules.contains(&m) {
                    row.push(None);
                    continue;
                }
                let (inp, out) = m.dims(&base);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..opts.rank * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (opts.rank, inp), &dev)?)?;
                let b = Var::zeros((out, opts.rank), DType::F32, &dev)?;
                row.push(Some((a, b)));
            }
            pairs.push(row);
        }
        let end = tok.encode("<|im_end|>")?;
        let end_id = match (end.as_slice(), tok.eos_ids.first()) {
            ([id], _) => *id,
            (_, Some(id)) => *id,
            _ => return Err(bad("the model has no end-of-turn token".into())),
        };
        Ok(Self {
            cos,
            sin,
            cfg,
            tok,
            embed,
            norm,
            layers,
            pairs,
            opts,
            end_id,
        })
    }

    fn tokenize(&self, ex: &Example) -> Result<Seq> {
        let mut msgs = Vec::new();
        if let Some(s) = &ex.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", &ex.user));
        let mut ids = self.tok.encode(&self.tok.render_chat(&msgs)?)?;
        let reply_from = ids.len();
        ids.extend(self.tok.encode(&ex.reply)?);
        ids.push(self.end_id);
        if ids.len() > self.cos.dim(0)? {
            return Err(TierError::InvalidRequest {
                field: "train",
                message: format!(
                    "an example has {} tokens, more than the trainer's {}",
                    ids.len(),
                    self.cos.dim(0)?
                ),
            });
        }
        Ok(Seq { ids, reply_from })
    }

    /// `x · Wᵀ + s·(x · Aᵀ) · Bᵀ` for module `mi` of layer `li`.
    fn linear(&self, li: usize, mi: usize, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.layers[li].w[mi].t()?)?;
        Ok(match &self.pairs[li][mi] {
            Some((a, b)) => {
                let scale = f64::from(self.opts.alpha / self.opts.rank as f32);
                let d = x.matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)?;
                (y + (d * scale)?)?
            }
            None => y,
        })
    }

    /// Mean cross-entropy of the reply tokens of `batch` (right-padded into one `[B·T, dim]` pass).
    fn loss(&self, batch: &[&Seq]) -> Result<(Tensor, usize)> {
        let cfg = &self.cfg;
        let dev = Device::Cpu;
        let (b, t) = (
            batch.len(),
            batch.iter().map(|s| s.ids.len()).max().unwrap_or(0),
        );
        let mut ids = Vec::with_capacity(b * t);
        let (mut pos, mut targets) = (Vec::new(), Vec::new());
        for (bi, s) in batch.iter().enumerate() {
            ids.extend_from_slice(&s.ids);
            ids.resize((bi + 1) * t, self.end_id);
            for p in s.reply_from..s.ids.len() {
                pos.push((bi * t + p - 1) as u32);
                targets.push(s.ids[p]);
            }
        }
        let mut x = self
            .embed
            .index_select(&Tensor::new(ids.as_slice(), &dev)?, 0)?;
        // Right padding: causal masking alone keeps real rows off the padding.
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { -1e9 } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &dev)?;
        let (cos, sin) = (self.cos.narrow(0, 0, t)?, self.sin.narrow(0, 0, t)?);
        let group = cfg.n_head / cfg.n_kv_head;
        let heads = |x: &Tensor, n: usize| -> Result<Tensor> {
            Ok(x.reshape((b, t, n, cfg.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        for (li, l) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm_slow(&x, &l.attn_norm, cfg.eps)?;
            let q = heads(&self.linear(li, 0, &h)?, cfg.n_head)?;
            let k = heads(&self.linear(li, 1, &h)?, cfg.n_kv_head)?;
            let v = heads(&self.linear(li, 2, &h)?, cfg.n_kv_head)?;
            let q = candle_nn::rotary_emb::rope_i_slow(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_i_slow(&k, &cos, &sin)?;
            let k = candle_transformers::utils::repeat_kv(k, group)?.contiguous()?;
            let v = candle_transformers::utils::repeat_kv(v, group)?.contiguous()?;
            let att = (q.matmul(&k.t()?)? / (cfg.head_dim as f64).sqrt())?;
            let att = candle_nn::ops::softmax(&att.broadcast_add(&mask)?, D::Minus1)?;
            let y = att
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b * t, cfg.q_dim()))?;
            x = (self.linear(li, 3, &y)? + &x)?;
            let h = candle_nn::ops::rms_norm_slow(&x, &l.ffn_norm, cfg.eps)?;
            let g = candle_nn::ops::silu(&self.linear(li, 4, &h)?)?;
            let m = self.linear(li, 6, &(g * self.linear(li, 5, &h)?)?)?;
            x = (m + &x)?;
        }
        let n = targets.len();
        let sel = x.index_select(&Tensor::new(pos.as_slice(), &dev)?, 0)?;
        let h = candle_nn::ops::rms_norm_slow(&sel, &self.norm, cfg.eps)?;
        let logits = h.matmul(&self.embed.t()?)?;
        let loss =
            candle_nn::loss::cross_entropy(&logits, &Tensor::new(targets.as_slice(), &dev)?)?;
        Ok((loss, n))
    }

    /// Runs the optimizer for `opts.steps` steps over `examples` (shuffled each epoch, seeded), calling
    /// `report` after each step.
    pub fn train(
        &mut self,
        examples: &[Example],
        mut report: impl FnMut(StepReport),
    ) -> Result<()> {
        let seqs = examples
            .iter()
            .map(|e| self.tokenize(e))
            .collect::<Result<Vec<_>>>()?;
        let vars: Vec<Var> = self
            .pairs
            .iter()
            .flatten()
            .flatten()
            .flat_map(|(a, b)| [a.clone(), b.clone()])
            .collect();
        let mut opt = AdamW::new(
            vars,
            ParamsAdamW {
                lr: self.opts.lr,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        let mut rng = StdRng::seed_from_u64(self.opts.seed ^ 0x5eed);
        let mut order: Vec<usize> = Vec::new();
        let steps = self.opts.steps;
        let warmup = (steps / 10).max(1);
        for step in 0..steps {
            let mut batch = Vec::with_capacity(self.opts.batch);
            while batch.len() < self.opts.batch.min(seqs.len()) {
                if order.is_empty() {
                    order = (0..seqs.len()).collect();
                    order.shuffle(&mut rng);
                }
                batch.push(&seqs[order.pop().expect("refilled")]);
            }
            // Linear warm-up, then cosine decay to a tenth.
            let lr = if step < warmup {
                self.opts.lr * (step + 1) as f64 / warmup as f64
            } else {
                let p = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
                self.opts.lr * (0.1 + 0.45 * (1.0 + (std::f64::consts::PI * p).cos()))
            };
            opt.set_learning_rate(lr);
            let (loss, tokens) = self.loss(&batch)?;
            opt.backward_step(&loss)?;
            report(StepReport {
                step: step + 1,
                loss: loss.to_scalar::<f32>()?,
                tokens,
            });
        }
        Ok(())
    }

    /// The trained adapter (f32, the base's row order).
    pub fn adapter(&self, name: &str) -> Result<Adapter> {
        let modules: Vec<Module> = Module::ALL
            .into_iter()
            .filter(|m| self.opts.modules.contains(m))
            .collect();
        let mut layers = Vec::with_capacity(self.pairs.len());
        let mut size_bytes = 0;
        for row in &self.pairs {
            let mut out = Vec::with_capacity(modules.len());
            for (a, b) in row.iter().flatten() {
                let a = a.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                let b = b.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                size_bytes += (a.len() + b.len()) * 4;
                out.push(Some(LoraPair { a, b }));
            }
            layers.push(out);
        }
        Ok(Adapter {
            name: name.into(),
            rank: self.opts.rank,
            alpha: self.opts.alpha,
            scale: self.opts.alpha / self.opts.rank as f32,
            modules,
            layers,
            size_bytes,
            digest: Default::default(),
        })
    }

    /// The shape adapters of this base must fit.
    pub fn base(&self) -> nimmer_loras::BaseShape {
        self.cfg.lora_base()
    }
}

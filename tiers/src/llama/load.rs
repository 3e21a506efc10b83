//! Loading a [`Llama`] from a GGUF file (weights, tokenizer and chat template inside) or from a Hugging Face
//! model directory (`config.json`, `*.safetensors`, `tokenizer.json`, `tokenizer_config.json`). Both feed the
//! same builder through a tensor source keyed by GGUF tensor names; linear layers are stacked (q/k/v,
//! gate/up) and converted to the tier's precision.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use nimmer_config::Precision;

use super::LlamaConfig;
use super::cpu::{Layer, Linear, Llama};
use crate::error::{Result, TierError};
use crate::kernels::{self, TiledWeight};
use crate::tokenizer::ChatTokenizer;

fn tensor_err(path: &Path, name: &str, message: impl Into<String>) -> TierError {
    TierError::Tensor {
        path: path.into(),
        tensor: name.into(),
        message: message.into(),
    }
}

/// Builds one linear layer from GGUF tensors stacked along the output dimension.
fn linear(
    parts: &[(&str, QTensor)],
    k: usize,
    precision: Precision,
    path: &Path,
) -> Result<Linear> {
    let mut n = 0;
    for (name, t) in parts {
        let (tn, tk) = t
            .shape()
            .dims2()
            .map_err(|e| tensor_err(path, name, e.to_string()))?;
        if tk != k {
            return Err(tensor_err(
                path,
                name,
                format!("shape [{tn}, {tk}]: expected {k} input features"),
            ));
        }
        if tk % kernels::QK != 0 {
            return Err(tensor_err(
                path,
                name,
                format!("{tk} input features is not a multiple of {}", kernels::QK),
            ));
        }
        n += tn;
    }
    let all = |d: GgmlDType| parts.iter().all(|(_, t)| t.dtype() == d);
    let raw = || -> Result<Vec<u8>> {
        let mut v = Vec::new();
        for (_, t) in parts {
            v.extend_from_slice(&t.data()?);
        }
        Ok(v)
    };
    let dense = || -> Result<Vec<f32>> {
        let mut v = Vec::with_capacity(n * k);
        for (_, t) in parts {
            v.extend(
                t.dequantize(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
        Ok(v)
    };
    Ok(match precision {
        Precision::F32 => {
            let w = Tensor::from_vec(dense()?, (n, k), &Device::Cpu)?;
            Linear::F32 { w, n, k }
        }
        Precision::Native if all(GgmlDType::Q4_1) => {
            Linear::Tiled(TiledWeight::from_q4_1(&raw()?, n, k))
        }
        _ if all(GgmlDType::Q8_0) => Linear::Tiled(TiledWeight::from_q8_0(&raw()?, n, k)),
        _ => Linear::Tiled(TiledWeight::from_f32(&dense()?, n, k)),
    })
}

/// Hugging Face name of a GGUF llama tensor name.
pub fn hf_name(gguf: &str) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.").unwrap_or(gguf);
    let (layer, name) = rest.split_once('.').unwrap_or((rest, ""));
    let hf = match name {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        other => other,
    };
    format!("model.layers.{layer}.{hf}")
}

/// What a caller that does not run a model needs of it: its tokenizer and configuration (a gateway whose
/// tier runs on remote workers).
pub struct ModelShape {
    pub tokenizer: ChatTokenizer,
    pub config: LlamaConfig,
}

impl ModelShape {
    /// Reads a GGUF's header only (no tensors); a Hugging Face directory is loaded whole.
    pub fn read(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let (model, tokenizer) = Llama::load(path, Precision::F32, 16)?;
            return Ok(Self {
                tokenizer,
                config: super::Decoder::config(&model).clone(),
            });
        }
        let (_, _, config, tokenizer) = Llama::read_gguf_header(path)?;
        Ok(Self { tokenizer, config })
    }
}

impl Llama {
    /// Loads a llama-family model: a GGUF file, or a Hugging Face model directory.
    /// `max_pos` bounds the RoPE table (the tier's context).
    pub fn load(
        path: &Path,
        precision: Precision,
        max_pos: usize,
    ) -> Result<(Self, ChatTokenizer)> {
        if path.is_dir() {
            Self::load_hf(path, precision, max_pos)
        } else {
            Self::load_gguf(path, precision, max_pos)
        }
    }

    /// Opens a llama GGUF and reads its configuration and tokenizer; the reader is left for the tensors.
    pub(super) fn read_gguf_header(
        path: &Path,
    ) -> Result<(Content, BufReader<File>, LlamaConfig, ChatTokenizer)> {
        let file = File::open(path).map_err(|e| TierError::model_file(path, e))?;
        let mut reader = BufReader::new(file);
        let ct = Content::read(&mut reader)
            .map_err(|e| TierError::model_file(path, format!("not a readable GGUF file: {e}")))?;
        let arch = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if !matches!(arch.as_str(), "llama" | "mistral") {
            return Err(TierError::UnsupportedArchitecture {
                path: path.into(),
                arch,
                supported: "llama, mistral",
            });
        }
        let md = |key: &str| -> Result<&candle_core::quantized::gguf_file::Value> {
            ct.metadata.get(&format!("{arch}.{key}")).ok_or_else(|| {
                TierError::model_file(path, format!("missing metadata `{arch}.{key}`"))
            })
        };
        let num = |key: &str| -> Result<usize> {
            md(key)?
                .to_u32()
                .map(|v| v as usize)
                .map_err(|e| TierError::model_file(path, format!("`{arch}.{key}`: {e}")))
        };
        let float = |key: &str, default: f32| {
            md(key)
                .and_then(|v| v.to_f32().map_err(|e| TierError::model_file(path, e)))
                .unwrap_or(default)
        };
        let n_head = num("attention.head_count")?;
        let dim = num("embedding_length")?;
        let tokenizer = ChatTokenizer::from_gguf(&ct, path)?;
        let cfg = LlamaConfig {
            n_layer: num("block_count")?,
            dim,
            n_head,
            n_kv_head: num("attention.head_count_kv").unwrap_or(n_head),
            head_dim: num("rope.dimension_count").unwrap_or(dim / n_head),
            ffn: num("feed_forward_length")?,
            vocab: tokenizer.vocab_size(),
            eps: float("attention.layer_norm_rms_epsilon", 1e-5),
            rope_base: float("rope.freq_base", 10_000.0),
            train_context: num("context_length").unwrap_or(2048),
            rope_neox: false,
            kv_f16: false,
        };
        Ok((ct, reader, cfg, tokenizer))
    }

    fn load_gguf(
        path: &Path,
        precision: Precision,
        max_pos: usize,
    ) -> Result<(Self, ChatTokenizer)> {
        let (ct, mut reader, cfg, tokenizer) = Self::read_gguf_header(path)?;
        let has_output = ct.tensor_infos.contains_key("output.weight");
        let source = |name: &str| {
            ct.tensor(&mut reader, name, &Device::Cpu)
                .map_err(|e| TierError::Tensor {
                    path: path.into(),
                    tensor: name.into(),
                    message: e.to_string(),
                })
        };
        let model = Self::build(cfg, source, has_output, precision, max_pos, path)?;
        Ok((model, tokenizer))
    }

    fn load_hf(dir: &Path, precision: Precision, max_pos: usize) -> Result<(Self, ChatTokenizer)> {
        let cfg_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&cfg_path).map_err(|e| TierError::model_file(&cfg_path, e))?;
        let c: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| TierError::model_file(&cfg_path, e))?;
        let arch = c["model_type"].as_str().unwrap_or_default().to_string();
        if !matches!(arch.as_str(), "llama" | "mistral") {
            return Err(TierError::UnsupportedArchitecture {
                path: cfg_path,
                arch,
                supported: "llama, mistral",
            });
        }
        let num = |key: &str| -> Result<usize> {
            c[key]
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| TierError::model_file(&cfg_path, format!("missing integer `{key}`")))
        };
        let tokenizer = ChatTokenizer::from_hf_dir(dir)?;
        let (dim, n_head) = (num("hidden_size")?, num("num_attention_heads")?);
        let cfg = LlamaConfig {
            n_layer: num("num_hidden_layers")?,
            dim,
            n_head,
            n_kv_head: num("num_key_value_heads").unwrap_or(n_head),
            head_dim: num("head_dim").unwrap_or(dim / n_head),
            ffn: num("intermediate_size")?,
            vocab: tokenizer.vocab_size(),
            eps: c["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32,
            rope_base: c["rope_theta"].as_f64().unwrap_or(10_000.0) as f32,
            train_context: num("max_position_embeddings").unwrap_or(2048),
            rope_neox: true,
            kv_f16: false,
        };
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| TierError::model_file(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(TierError::model_file(dir, "no *.safetensors files"));
        }
        // SAFETY: model files are not modified while mapped.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
            .map_err(|e| TierError::model_file(dir, e))?;
        let has_output = st.get("lm_head.weight").is_ok()
            && !c["tie_word_embeddings"].as_bool().unwrap_or(false);
        let source = |name: &str| -> Result<QTensor> {
            let hf = hf_name(name);
            let err = |e: candle_core::Error| TierError::Tensor {
                path: dir.into(),
                tensor: hf.clone(),
                message: e.to_string(),
            };
            let t = st
                .load(&hf, &Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(err)?;
            QTensor::quantize(&t, GgmlDType::F32).map_err(err)
        };
        let model = Self::build(cfg, source, has_output, precision, max_pos, dir)?;
        Ok((model, tokenizer))
    }

    /// Assembles the model from tensors named as in GGUF.
    fn build(
        cfg: LlamaConfig,
        mut rd: impl FnMut(&str) -> Result<QTensor>,
        has_output: bool,
        precision: Precision,
        max_pos: usize,
        path: &Path,
    ) -> Result<Self> {
        let dim = cfg.dim;
        if cfg.head_dim * cfg.n_head != dim
            || !cfg.n_head.is_multiple_of(cfg.n_kv_head)
            || !cfg.head_dim.is_multiple_of(2)
        {
            return Err(TierError::model_file(
                path,
                format!(
                    "inconsistent attention shape: {} heads x {} dims for width {dim}",
                    cfg.n_head, cfg.head_dim
                ),
            ));
        }
        let vec_f32 = |t: QTensor, name: &str, len: usize| -> Result<Vec<f32>> {
            let v = t
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            if v.len() != len {
                return Err(tensor_err(
                    path,
                    name,
                    format!("has {} values, expected {len}", v.len()),
                ));
            }
            Ok(v)
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            let names = [p("attn_q"), p("attn_k"), p("attn_v")];
            let qkv_parts = vec![
                (names[0].as_str(), rd(&names[0])?),
                (names[1].as_str(), rd(&names[1])?),
                (names[2].as_str(), rd(&names[2])?),
            ];
            let qkv = linear(&qkv_parts, dim, precision, path)?;
            if qkv.n() != cfg.q_dim() + 2 * cfg.kv_dim() {
                return Err(tensor_err(
                    path,
                    &names[0],
                    format!(
                        "q/k/v give {} outputs, expected {}",
                        qkv.n(),
                        cfg.q_dim() + 2 * cfg.kv_dim()
                    ),
                ));
            }
            let on = p("attn_output");
            let o = linear(&[(on.as_str(), rd(&on)?)], cfg.q_dim(), precision, path)?;
            let (gn, un, dn) = (p("ffn_gate"), p("ffn_up"), p("ffn_down"));
            let gate_up = linear(
                &[(gn.as_str(), rd(&gn)?), (un.as_str(), rd(&un)?)],
                dim,
                precision,
                path,
            )?;
            if gate_up.n() != 2 * cfg.ffn {
                return Err(tensor_err(
                    path,
                    &gn,
                    format!(
                        "gate/up give {} outputs, expected {}",
                        gate_up.n(),
                        2 * cfg.ffn
                    ),
                ));
            }
            let down = linear(&[(dn.as_str(), rd(&dn)?)], cfg.ffn, precision, path)?;
            if o.n() != dim || down.n() != dim {
                return Err(tensor_err(path, &dn, format!("expected {dim} outputs")));
            }
            let an = p("attn_norm");
            let fnn = p("ffn_norm");
            layers.push(Layer {
                attn_norm: vec_f32(rd(&an)?, &an, dim)?,
                qkv,
                o,
                ffn_norm: vec_f32(rd(&fnn)?, &fnn, dim)?,
                gate_up,
                down,
            });
        }
        let norm = vec_f32(rd("output_norm.weight")?, "output_norm.weight", dim)?;
        let embd = rd("token_embd.weight")?;
        let (lm_head, embed) = if has_output {
            let out = rd("output.weight")?;
            (
                linear(&[("output.weight", out)], dim, precision, path)?,
                Some(linear(
                    &[("token_embd.weight", embd)],
                    dim,
                    precision,
                    path,
                )?),
            )
        } else {
            (
                linear(&[("token_embd.weight", embd)], dim, precision, path)?,
                None,
            )
        };
        if lm_head.n() < cfg.vocab {
            return Err(tensor_err(
                path,
                "output.weight",
                format!("{} rows for a vocabulary of {}", lm_head.n(), cfg.vocab),
            ));
        }
        let half = cfg.head_dim / 2;
        let theta: Vec<f32> = (0..half)
            .map(|i| 1f32 / cfg.rope_base.powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        let mut rope_cos = Vec::with_capacity(max_pos * half);
        let mut rope_sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for &t in &theta {
                let a = p as f32 * t;
                rope_cos.push(a.cos());
                rope_sin.push(a.sin());
            }
        }
        let mut cfg = cfg;
        // Quantized tiers keep keys and values in f16 (as llama.cpp does by default): half the attention
        // traffic. Full precision keeps f32, so it stays equal to the f32 reference.
        cfg.kv_f16 = precision != Precision::F32;
        let model = Self {
            cfg,
            layers,
            norm,
            lm_head,
            embed,
            rope_cos,
            rope_sin,
            max_pos,
        };
        Ok(model)
    }
}

//! PEFT adapters on disk: `adapter_config.json` (`r`, `lora_alpha`, `target_modules`, ...) and
//! `adapter_model.safetensors` with `base_model.model.model.layers.{i}.{self_attn|mlp}.{q..down}_proj.lora_{A,B}.weight`.
//! [`load_peft`] checks every tensor against the base model (layer range, module, shape, rank, finite values)
//! and names the tensor in its error; it also writes adapters ([`save_peft`]) for `nimmer loras train`.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::{Adapter, BaseShape, LoraError, LoraPair, MAX_RANK, Module};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The keys of `adapter_config.json` we read (PEFT writes more; they are ignored).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    #[serde(default)]
    pub peft_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f32,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default)]
    pub layers_to_transform: Option<LayersToTransform>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    One(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersToTransform {
    List(Vec<usize>),
    One(usize),
}

/// Loads and validates the PEFT adapter in `dir` against `base`.
pub fn load_peft(dir: &Path, name: &str, base: &BaseShape) -> Result<Adapter, LoraError> {
    let cfg_path = dir.join(CONFIG_FILE);
    let cfg_file = cfg_path.display().to_string();
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| LoraError::Io {
        file: cfg_file.clone(),
        source,
    })?;
    let cfg: AdapterConfig = serde_json::from_str(&text).map_err(|e| LoraError::Corrupt {
        file: cfg_file.clone(),
        reason: e.to_string(),
    })?;
    let bad = |key: &str, rule: String| LoraError::Config {
        file: cfg_file.clone(),
        key: key.into(),
        rule,
    };
    if let Some(t) = &cfg.peft_type
        && t != "LORA"
    {
        return Err(bad("peft_type", format!("`{t}` is not supported (LORA)")));
    }
    if cfg.r == 0 || cfg.r > MAX_RANK {
        return Err(bad(
            "r",
            format!("rank {} is outside 1..={MAX_RANK}", cfg.r),
        ));
    }
    if !(cfg.lora_alpha.is_finite() && cfg.lora_alpha > 0.0) {
        return Err(bad("lora_alpha", "must be a positive number".into()));
    }
    if cfg.fan_in_fan_out {
        return Err(bad(
            "fan_in_fan_out",
            "must be false for llama projections".into(),
        ));
    }
    if let Some(b) = &cfg.bias
        && b != "none"
    {
        return Err(bad("bias", format!("`{b}` is not supported (none)")));
    }
    let names = match &cfg.target_modules {
        TargetModules::List(v) => v.clone(),
        TargetModules::One(s) => vec![s.clone()],
    };
    let mut modules = Vec::new();
    for n in &names {
        let m = Module::from_peft_name(n).ok_or_else(|| {
            bad(
                "target_modules",
                format!(
                    "`{n}` is not a llama projection (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                ),
            )
        })?;
        if !modules.contains(&m) {
            modules.push(m);
        }
    }
    if modules.is_empty() {
        return Err(bad("target_modules", "names no module".into()));
    }
    let layers: Vec<usize> = match &cfg.layers_to_transform {
        None => (0..base.n_layer).collect(),
        Some(LayersToTransform::One(l)) => vec![*l],
        Some(LayersToTransform::List(v)) => v.clone(),
    };
    if let Some(l) = layers.iter().find(|&&l| l >= base.n_layer) {
        return Err(bad(
            "layers_to_transform",
            format!("layer {l} is past the base model's {} layers", base.n_layer),
        ));
    }

    let w_path = dir.join(WEIGHTS_FILE);
    let w_file = w_path.display().to_string();
    let bytes = std::fs::read(&w_path).map_err(|source| LoraError::Io {
        file: w_file.clone(),
        source,
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| LoraError::Corrupt {
        file: w_file.clone(),
        reason: e.to_string(),
    })?;
    // Index the file's tensors by (layer, module, A|B).
    let mut found: BTreeMap<(usize, Module, bool), String> = BTreeMap::new();
    for name in st.names() {
        let tensor_err = |reason: String| LoraError::Tensor {
            file: w_file.clone(),
            tensor: name.to_string(),
            reason,
        };
        let (layer, module, is_a) = parse_name(name).ok_or_else(|| {
            tensor_err("not a LoRA tensor of a llama layer (…layers.N.self_attn|mlp.X_proj.lora_A|lora_B.weight)".into())
        })?;
        if layer >= base.n_layer {
            return Err(tensor_err(format!(
                "layer {layer} is past the base model's {} layers",
                base.n_layer
            )));
        }
        if !modules.contains(&module) || !layers.contains(&layer) {
            return Err(tensor_err(
                "its module or layer is not in adapter_config.json's target_modules / layers_to_transform"
                    .into(),
            ));
        }
        found.insert((layer, module, is_a), name.to_string());
    }
    let r = cfg.r;
    let mut out_layers: Vec<Vec<Option<LoraPair>>> = vec![vec![None; modules.len()]; base.n_layer];
    let mut size_bytes = 0;
    for &layer in &layers {
        for (mi, &module) in modules.iter().enumerate() {
            let (inp, out) = module.dims(base);
            let read = |is_a: bool, want: [usize; 2]| -> Result<Vec<f32>, LoraError> {
                let expected = tensor_name(layer, module, is_a);
                let name =
                    found
                        .get(&(layer, module, is_a))
                        .ok_or_else(|| LoraError::MissingTensor {
                            file: w_file.clone(),
                            tensor: expected.clone(),
                        })?;
                let view = st.tensor(name).map_err(|e| LoraError::Corrupt {
                    file: w_file.clone(),
                    reason: e.to_string(),
                })?;
                if view.shape() != want {
                    return Err(LoraError::Shape {
                        file: w_file.clone(),
                        tensor: name.clone(),
                        got: view.shape().to_vec(),
                        want: want.to_vec(),
                    });
                }
                let values =
                    to_f32(view.dtype(), view.data()).map_err(|reason| LoraError::Tensor {
                        file: w_file.clone(),
                        tensor: name.clone(),
                        reason,
                    })?;
                if values.iter().any(|v| !v.is_finite()) {
                    return Err(LoraError::Tensor {
                        file: w_file.clone(),
                        tensor: name.clone(),
                        reason: "contains NaN or infinite values".into(),
                    });
                }
                Ok(values)
            };
            let a = read(true, [r, inp])?;
            let mut b = read(false, [out, r])?;
            if base.rope_interleaved {
                match module {
                    Module::Q => b = to_interleaved_rows(&b, base.n_head, base.head_dim, r),
                    Module::K => b = to_interleaved_rows(&b, base.n_kv_head, base.head_dim, r),
                    _ => {}
                }
            }
            size_bytes += (a.len() + b.len()) * 4;
            out_layers[layer][mi] = Some(LoraPair { a, b });
        }
    }
    let scale = if cfg.use_rslora {
        cfg.lora_alpha / (r as f32).sqrt()
    } else {
        cfg.lora_alpha / r as f32
    };
    Ok(Adapter {
        name: name.to_string(),
        rank: r,
        alpha: cfg.lora_alpha,
        scale,
        modules,
        layers: out_layers,
        size_bytes,
        digest: Default::default(),
    })
}

/// `…layers.{i}.{self_attn|mlp}.{x}_proj.lora_{A|B}[.weight]` → (layer, module, is_a).
fn parse_name(name: &str) -> Option<(usize, Module, bool)> {
    let rest = name.strip_suffix(".weight").unwrap_or(name);
    let at = rest.find("layers.")?;
    let mut parts = rest[at + "layers.".len()..].split('.');
    let layer: usize = parts.next()?.parse().ok()?;
    let block = parts.next()?;
    let module = Module::from_peft_name(parts.next()?)?;
    let which = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let attn = matches!(module, Module::Q | Module::K | Module::V | Module::O);
    if (attn && block != "self_attn") || (!attn && block != "mlp") {
        return None;
    }
    match which {
        "lora_A" => Some((layer, module, true)),
        "lora_B" => Some((layer, module, false)),
        _ => None,
    }
}

/// The PEFT tensor name of a layer's module.
pub fn tensor_name(layer: usize, module: Module, is_a: bool) -> String {
    let block = match module {
        Module::Q | Module::K | Module::V | Module::O => "self_attn",
        _ => "mlp",
    };
    format!(
        "base_model.model.model.layers.{layer}.{block}.{}.lora_{}.weight",
        module.peft_name(),
        if is_a { "A" } else { "B" }
    )
}

fn to_f32(dtype: Dtype, data: &[u8]) -> Result<Vec<f32>, String> {
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => return Err(format!("dtype {other:?} is not supported (F32, F16, BF16)")),
    })
}

/// Reorders the output rows of a Q or K `B` matrix `[heads·hd, r]` from Hugging Face's RoPE order to GGUF's
/// interleaved order: within a head, row `s·hd/2 + i` moves to `2i + s`.
fn to_interleaved_rows(b: &[f32], heads: usize, hd: usize, r: usize) -> Vec<f32> {
    let mut out = vec![0f32; b.len()];
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..hd / 2 {
                let src = h * hd + s * (hd / 2) + i;
                let dst = h * hd + 2 * i + s;
                out[dst * r..(dst + 1) * r].copy_from_slice(&b[src * r..(src + 1) * r]);
            }
        }
    }
    out
}

/// The inverse of [`to_interleaved_rows`].
fn from_interleaved_rows(b: &[f32], heads: usize, hd: usize, r: usize) -> Vec<f32> {
    let mut out = vec![0f32; b.len()];
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..hd / 2 {
                let src = h * hd + 2 * i + s;
                let dst = h * hd + s * (hd / 2) + i;
                out[dst * r..(dst + 1) * r].copy_from_slice(&b[src * r..(src + 1) * r]);
            }
        }
    }
    out
}

/// The dtype [`save_peft_as`] stores tensors in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreAs {
    F32,
    /// Half the size; adapters are read back into f32.
    F16,
}

/// Writes `adapter` as a PEFT adapter into `dir` (f32 tensors, Hugging Face row order).
pub fn save_peft(adapter: &Adapter, base: &BaseShape, dir: &Path) -> Result<(), LoraError> {
    save_peft_as(adapter, base, dir, StoreAs::F32)
}

/// Writes `adapter` as a PEFT adapter into `dir` with tensors stored as `dtype` (Hugging Face row order).
pub fn save_peft_as(
    adapter: &Adapter,
    base: &BaseShape,
    dir: &Path,
    dtype: StoreAs,
) -> Result<(), LoraError> {
    let io = |file: &Path| {
        let file = file.display().to_string();
        move |source| LoraError::Io { file, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let cfg = AdapterConfig {
        peft_type: Some("LORA".into()),
        r: adapter.rank,
        lora_alpha: adapter.alpha,
        target_modules: TargetModules::List(
            adapter
                .modules
                .iter()
                .map(|m| m.peft_name().to_string())
                .collect(),
        ),
        use_rslora: false,
        fan_in_fan_out: false,
        bias: Some("none".into()),
        layers_to_transform: None,
        base_model_name_or_path: Some("HuggingFaceTB/SmolLM2-135M-Instruct".into()),
    };
    let cfg_path = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&cfg).expect("config serializes");
    std::fs::write(&cfg_path, text).map_err(io(&cfg_path))?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let r = adapter.rank;
    for (layer, mods) in adapter.layers.iter().enumerate() {
        for (mi, pair) in mods.iter().enumerate() {
            let Some(p) = pair else { continue };
            let module = adapter.modules[mi];
            let (inp, out) = module.dims(base);
            let b = match (base.rope_interleaved, module) {
                (true, Module::Q) => from_interleaved_rows(&p.b, base.n_head, base.head_dim, r),
                (true, Module::K) => from_interleaved_rows(&p.b, base.n_kv_head, base.head_dim, r),
                _ => p.b.clone(),
            };
            let bytes = |v: &[f32]| -> Vec<u8> {
                match dtype {
                    StoreAs::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    StoreAs::F16 => v
                        .iter()
                        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                        .collect(),
                }
            };
            tensors.push((tensor_name(layer, module, true), vec![r, inp], bytes(&p.a)));
            tensors.push((tensor_name(layer, module, false), vec![out, r], bytes(&b)));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, data)| {
            let dt = match dtype {
                StoreAs::F32 => Dtype::F32,
                StoreAs::F16 => Dtype::F16,
            };
            let v = safetensors::tensor::TensorView::new(dt, shape.clone(), data)
                .expect("shape matches data");
            (n.clone(), v)
        })
        .collect();
    let w_path = dir.join(WEIGHTS_FILE);
    let data = safetensors::serialize(views, None).map_err(|e| LoraError::Corrupt {
        file: w_path.display().to_string(),
        reason: e.to_string(),
    })?;
    std::fs::write(&w_path, data).map_err(io(&w_path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: BaseShape = BaseShape {
        n_layer: 2,
        dim: 8,
        n_head: 2,
        n_kv_head: 1,
        head_dim: 4,
        ffn: 12,
        rope_interleaved: true,
    };

    fn adapter(rank: usize, modules: &[Module]) -> Adapter {
        let mut seed = 1u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let layers = (0..BASE.n_layer)
            .map(|_| {
                modules
                    .iter()
                    .map(|m| {
                        let (i, o) = m.dims(&BASE);
                        Some(LoraPair {
                            a: (0..rank * i).map(|_| rnd()).collect(),
                            b: (0..o * rank).map(|_| rnd()).collect(),
                        })
                    })
                    .collect()
            })
            .collect();
        Adapter {
            name: "t".into(),
            rank,
            alpha: 2.0 * rank as f32,
            scale: 2.0,
            modules: modules.to_vec(),
            layers,
            size_bytes: 0,
            digest: Default::default(),
        }
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let a = adapter(4, &[Module::Q, Module::K, Module::Down]);
        save_peft(&a, &BASE, dir.path()).unwrap();
        let b = load_peft(dir.path(), "t", &BASE).unwrap();
        assert_eq!(b.rank, 4);
        assert_eq!(b.scale, 2.0);
        assert_eq!(b.modules, a.modules);
        assert_eq!(b.layers, a.layers);
    }

    #[test]
    fn interleaving_is_a_permutation_and_its_inverse_undoes_it() {
        let b: Vec<f32> = (0..8 * 3).map(|v| v as f32).collect();
        let i = to_interleaved_rows(&b, 2, 4, 3);
        assert_ne!(i, b);
        // Head 0, HF rows 0,1 (first half) and 2,3 (second half) → GGUF rows 0,2 and 1,3.
        assert_eq!(&i[3..6], &b[6..9]);
        assert_eq!(from_interleaved_rows(&i, 2, 4, 3), b);
    }

    fn rejects(edit: impl FnOnce(&Path), want: &str) {
        let dir = tempfile::tempdir().unwrap();
        save_peft(&adapter(4, &[Module::Q, Module::V]), &BASE, dir.path()).unwrap();
        edit(dir.path());
        let e = load_peft(dir.path(), "t", &BASE).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }

    #[test]
    fn bad_adapters_are_rejected_naming_the_tensor_or_key() {
        // Wrong shapes: saved against a base with a wider model.
        let dir = tempfile::tempdir().unwrap();
        let wide = BaseShape { dim: 16, ..BASE };
        let mut a = adapter(4, &[Module::V]);
        for l in &mut a.layers {
            let p = l[0].as_mut().unwrap();
            p.a = vec![0.1; 4 * 16];
        }
        save_peft(&a, &wide, dir.path()).unwrap();
        let e = load_peft(dir.path(), "t", &BASE).unwrap_err().to_string();
        assert!(
            e.contains("layers.0.self_attn.v_proj.lora_A.weight") && e.contains("[4, 16]"),
            "{e}"
        );
        // A missing tensor: config says q and v, file has v only.
        rejects(
            |d| {
                let cfg = std::fs::read_to_string(d.join(CONFIG_FILE)).unwrap();
                std::fs::write(
                    d.join(CONFIG_FILE),
                    cfg.replace("\"v_proj\"", "\"v_proj\", \"o_proj\""),
                )
                .unwrap();
            },
            "layers.0.self_attn.o_proj.lora_A.weight` is missing",
        );
        // A corrupt weights file.
        rejects(
            |d| {
                let w = d.join(WEIGHTS_FILE);
                let bytes = std::fs::read(&w).unwrap();
                std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
            },
            "not a valid adapter file",
        );
        // Rank too large, unknown module.
        rejects(
            |d| {
                let cfg = std::fs::read_to_string(d.join(CONFIG_FILE)).unwrap();
                std::fs::write(d.join(CONFIG_FILE), cfg.replace("\"r\": 4", "\"r\": 128")).unwrap();
            },
            "`r`: rank 128",
        );
        rejects(
            |d| {
                let cfg = std::fs::read_to_string(d.join(CONFIG_FILE)).unwrap();
                std::fs::write(
                    d.join(CONFIG_FILE),
                    cfg.replace("\"v_proj\"", "\"lm_head\""),
                )
                .unwrap();
            },
            "`lm_head` is not a llama projection",
        );
        rejects(
            |d| std::fs::remove_file(d.join(CONFIG_FILE)).unwrap(),
            "adapter_config.json: cannot read",
        );
    }

    #[test]
    fn a_blend_adds_weighted_deltas() {
        let a = std::sync::Arc::new(adapter(4, &[Module::Q]));
        let x: Vec<f32> = (0..BASE.dim).map(|v| v as f32 * 0.1).collect();
        let (_, out) = Module::Q.dims(&BASE);
        let mut y = vec![0f32; out];
        let blend = crate::Blend {
            parts: vec![(a.clone(), 0.5), (a.clone(), 0.25)],
        };
        blend.apply_row(1, Module::Q, &x, &mut y, &mut Vec::new());
        let d = a.delta(1, Module::Q, &BASE).unwrap();
        for o in 0..out {
            let want: f32 = 0.75 * crate::dot(&d[o * BASE.dim..(o + 1) * BASE.dim], &x);
            assert!((y[o] - want).abs() < 1e-4, "{o}: {} vs {want}", y[o]);
        }
    }
}

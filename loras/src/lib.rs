//! Trait-LoRA adapters for the Driver: the PEFT format on disk ([`peft`]), validated against the base model's
//! shape, held as f32 `A` and `B` matrices per layer and module, and combined into per-request blends
//! ([`Blend`]: `y = Wx + Σ wᵢ·sᵢ·Bᵢ(Aᵢx)`) that the engine applies next to its base matmuls.

mod error;
pub mod peft;
pub mod registry;

pub use error::LoraError;
pub use peft::{StoreAs, load_peft, save_peft, save_peft_as};
pub use registry::{AdapterInfo, Registry, RegistryStats};

use std::sync::{Arc, OnceLock};

use sha2::{Digest, Sha256};

/// Most rank an adapter may have.
pub const MAX_RANK: usize = 64;

/// A projection a LoRA may target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Module {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Module {
    pub const ALL: [Module; 7] = [
        Module::Q,
        Module::K,
        Module::V,
        Module::O,
        Module::Gate,
        Module::Up,
        Module::Down,
    ];

    /// The PEFT (Hugging Face) name: `q_proj`, ...
    pub fn peft_name(self) -> &'static str {
        match self {
            Module::Q => "q_proj",
            Module::K => "k_proj",
            Module::V => "v_proj",
            Module::O => "o_proj",
            Module::Gate => "gate_proj",
            Module::Up => "up_proj",
            Module::Down => "down_proj",
        }
    }

    pub fn from_peft_name(s: &str) -> Option<Self> {
        Module::ALL.into_iter().find(|m| m.peft_name() == s)
    }

    /// `(in, out)` features of this projection in the base model.
    pub fn dims(self, b: &BaseShape) -> (usize, usize) {
        let (q, kv) = (b.n_head * b.head_dim, b.n_kv_head * b.head_dim);
        match self {
            Module::Q => (b.dim, q),
            Module::K | Module::V => (b.dim, kv),
            Module::O => (q, b.dim),
            Module::Gate | Module::Up => (b.dim, b.ffn),
            Module::Down => (b.ffn, b.dim),
        }
    }
}

/// What an adapter must fit: the base model's layer count and projection sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseShape {
    pub n_layer: usize,
    pub dim: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub ffn: usize,
    /// The base stores Q and K rows in GGUF's interleaved RoPE order (pairs `(2i, 2i+1)` per head) while PEFT
    /// adapters are trained on Hugging Face's order (pairs `(i, i + d/2)`): their `B` rows for Q and K are
    /// permuted on load to match.
    pub rope_interleaved: bool,
}

/// One module's low-rank pair: `A` `[rank, in]`, `B` `[out, rank]`, row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// A validated adapter.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub name: String,
    pub rank: usize,
    pub alpha: f32,
    /// `alpha / rank` (or `alpha / √rank` with rsLoRA).
    pub scale: f32,
    pub modules: Vec<Module>,
    /// Per layer, per targeted module (in `modules` order); `None` where a layer is not transformed.
    pub layers: Vec<Vec<Option<LoraPair>>>,
    /// Bytes of `A` and `B` held.
    pub size_bytes: usize,
    /// The content digest, computed on first use by [`Adapter::content_hash`] (build with `Default`).
    pub digest: OnceLock<[u8; 16]>,
}

impl Adapter {
    /// A digest of what the adapter computes (rank, scale, modules and every `A`/`B` value), not of its name:
    /// an adapter replaced under the same name gets another digest, so KV computed with the old weights is
    /// never taken for the new ones. Computed once (a few ms for a rank-16 adapter), then cached.
    pub fn content_hash(&self) -> [u8; 16] {
        *self.digest.get_or_init(|| {
            let mut h = Sha256::new();
            h.update(b"nimmer-lora-v1");
            h.update((self.rank as u64).to_le_bytes());
            h.update(self.scale.to_le_bytes());
            for m in &self.modules {
                h.update([*m as u8]);
            }
            for (li, layer) in self.layers.iter().enumerate() {
                for (mi, p) in layer.iter().enumerate() {
                    let Some(p) = p else { continue };
                    h.update((li as u64).to_le_bytes());
                    h.update((mi as u64).to_le_bytes());
                    for v in p.a.iter().chain(&p.b) {
                        h.update(v.to_le_bytes());
                    }
                }
            }
            h.finalize()[..16].try_into().expect("16 bytes")
        })
    }

    /// The pair of `module` in `layer`, if the adapter has one.
    pub fn pair(&self, layer: usize, module: Module) -> Option<&LoraPair> {
        let i = self.modules.iter().position(|m| *m == module)?;
        self.layers.get(layer)?.get(i)?.as_ref()
    }

    /// The delta `s·B·A` of one module as a dense `[out, in]` matrix (tests and merging).
    pub fn delta(&self, layer: usize, module: Module, base: &BaseShape) -> Option<Vec<f32>> {
        let p = self.pair(layer, module)?;
        let (inp, out) = module.dims(base);
        let r = self.rank;
        let mut d = vec![0f32; out * inp];
        for o in 0..out {
            for k in 0..r {
                let bk = p.b[o * r + k] * self.scale;
                if bk == 0.0 {
                    continue;
                }
                for (dst, &a) in d[o * inp..(o + 1) * inp]
                    .iter_mut()
                    .zip(&p.a[k * inp..(k + 1) * inp])
                {
                    *dst += bk * a;
                }
            }
        }
        Some(d)
    }
}

/// The adapters one request runs with, and their weights (a blend of traits; one entry for a single adapter).
#[derive(Debug, Clone, Default)]
pub struct Blend {
    pub parts: Vec<(Arc<Adapter>, f32)>,
}

impl Blend {
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Adds `Σ wᵢ·sᵢ·Bᵢ(Aᵢx)` of `module` in `layer` to `out` for one row `x` (`scratch` holds `rank` values).
    pub fn apply_row(
        &self,
        layer: usize,
        module: Module,
        x: &[f32],
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        for (adapter, w) in &self.parts {
            let Some(p) = adapter.pair(layer, module) else {
                continue;
            };
            let r = adapter.rank;
            let inp = x.len();
            scratch.clear();
            scratch.extend(p.a.chunks_exact(inp).map(|a| dot(a, x)));
            let s = adapter.scale * w;
            for (o, b) in out.iter_mut().zip(p.b.chunks_exact(r)) {
                *o += s * dot(b, scratch);
            }
        }
    }
}

/// A dot product the compiler vectorizes (16 independent accumulators); also the decoder's attention dot.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

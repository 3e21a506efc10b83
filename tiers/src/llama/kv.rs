//! The CPU model's per-sequence KV cache: keys and values per layer, `[pos, kv_dim]`, stored as f32 or f16.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::LlamaConfig;

/// Per-sequence KV cache, `[pos, kv_dim]` per layer for keys and values, in f32 or f16.
pub struct KvCache {
    pub(crate) data: KvData,
    pub(crate) len: usize,
}

pub(crate) enum KvData {
    F32 { k: Vec<Vec<f32>>, v: Vec<Vec<f32>> },
    F16 { k: Vec<Vec<f16>>, v: Vec<Vec<f16>> },
}

/// An element type of the KV cache.
pub(crate) trait KvElem: Copy + Send + Sync {
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

    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
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
    /// A copy of positions `start..start + n` (one block for the engine's prefix cache), exactly as stored.
    pub(crate) fn copy_range(&self, cfg: &LlamaConfig, start: usize, n: usize) -> KvCache {
        let span = start * cfg.kv_dim()..(start + n) * cfg.kv_dim();
        fn copy<T: Copy>(layers: &[Vec<T>], span: &std::ops::Range<usize>) -> Vec<Vec<T>> {
            layers.iter().map(|l| l[span.clone()].to_vec()).collect()
        }
        let data = match &self.data {
            KvData::F32 { k, v } => KvData::F32 {
                k: copy(k, &span),
                v: copy(v, &span),
            },
            KvData::F16 { k, v } => KvData::F16 {
                k: copy(k, &span),
                v: copy(v, &span),
            },
        };
        KvCache { data, len: n }
    }

    /// Appends the first `n` positions of `block` (a copy made by [`KvCache::copy_range`] of the same model).
    pub(crate) fn extend_from(&mut self, cfg: &LlamaConfig, block: &KvCache, n: usize) {
        let n = n.min(block.len);
        let end = n * cfg.kv_dim();
        fn extend<T: Copy>(dst: &mut [Vec<T>], src: &[Vec<T>], end: usize) {
            for (d, s) in dst.iter_mut().zip(src) {
                d.extend_from_slice(&s[..end]);
            }
        }
        match (&mut self.data, &block.data) {
            (KvData::F32 { k, v }, KvData::F32 { k: bk, v: bv }) => {
                extend(k, bk, end);
                extend(v, bv, end);
            }
            (KvData::F16 { k, v }, KvData::F16 { k: bk, v: bv }) => {
                extend(k, bk, end);
                extend(v, bv, end);
            }
            _ => unreachable!("a model's caches and blocks share one element type"),
        }
        self.len += n;
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

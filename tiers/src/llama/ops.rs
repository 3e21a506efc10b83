//! Row operations of the CPU model: RMSNorm, a row's trait-LoRA terms, and one row's attention over its
//! sequence's KV cache.

use nimmer_loras::{Blend, Module, dot};
use rayon::prelude::*;

use super::LlamaConfig;
use super::kv::KvElem;

pub(super) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
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
pub(super) fn add_lora(
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
pub(super) fn attend_row<T: KvElem>(
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

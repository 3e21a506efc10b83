//! Causal attention of the CPU model over each sequence's KV cache, for a whole ragged batch.
//!
//! The batch is cut into tasks of up to [`ROWS_PER_TASK`] consecutive positions of one sequence (a piece of a
//! prefill chunk, or one decode token). A task converts its sequence's keys and values to f32 once per KV
//! head (keys transposed in blocks of 8 positions) and reuses them for every query row and every head of the
//! GQA group: prefill is a small matrix-matrix product per task instead of one pass over the cache per row.
//!
//! Every output element is computed by the same sequence of float operations whatever the task it falls in
//! (a score is one FMA chain over the head dimension, the softmax sum runs in 8 fixed lanes, the value sum is
//! one FMA chain over positions), so a row gets bit-identical results alone, in a batch, or in any prefill
//! chunking: batch invariance, which the prefix cache's token-exact tests rely on.

use std::cell::RefCell;

use rayon::prelude::*;

use super::LlamaConfig;
use super::kv::{KvCache, KvData, KvElem};
use super::ops::exp_in_place;

/// Query rows per task: enough to amortize the conversion of the cache, small enough to balance threads.
const ROWS_PER_TASK: usize = 32;
/// Positions per transposed key block (one 256-bit vector of f32).
const L: usize = 8;
/// Query vectors scored together against a key block (independent FMA chains).
const QV: usize = 4;

/// Buffers of one thread's tasks, reused across tasks and steps.
#[derive(Default)]
struct Scratch {
    /// Keys of one KV head, `[block][d][L]`, zero-padded to whole blocks.
    kt: Vec<f32>,
    /// Values of one KV head, `[pos][d]`.
    v: Vec<f32>,
    /// Scores, then exp'd scores, `[query vector][padded positions]`.
    s: Vec<f32>,
    /// `L` keys of one head, `[L][d]`, before transposition.
    row: Vec<f32>,
    /// Softmax sums, one per query vector.
    sums: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// A piece of the batch: `rows` consecutive positions from `pos0` of chunk `chunk`, rows `row0..` of the batch.
#[derive(Clone, Copy, Debug)]
pub(super) struct Task {
    chunk: usize,
    row0: usize,
    rows: usize,
    pos0: usize,
}

/// The tasks of a batch (the same for every layer), in row order. `spans[c] = (first row of chunk c, rows,
/// position of its first row)`, chunks in row order and contiguous.
pub(super) fn tasks(spans: &[(usize, usize, usize)]) -> Vec<Task> {
    let mut tasks = Vec::new();
    for (chunk, &(row0, rows, pos0)) in spans.iter().enumerate() {
        let mut i = 0;
        while i < rows {
            let n = (rows - i).min(ROWS_PER_TASK);
            tasks.push(Task {
                chunk,
                row0: row0 + i,
                rows: n,
                pos0: pos0 + i,
            });
            i += n;
        }
    }
    tasks
}

/// `out[r] = softmax(q[r] · Kᵀ / scale) · V` per head over positions `0..=pos(r)` of layer `layer`, for the
/// batch cut into `tasks` (from [`tasks`]).
///
/// `qkv` holds `q` at the start of each row of width `q_stride`; `out` is `[rows, q_dim]`. Each chunk's keys
/// and values for its rows must already be in its cache.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend(
    cfg: &LlamaConfig,
    layer: usize,
    caches: &[&KvCache],
    tasks: &[Task],
    qkv: &[f32],
    q_stride: usize,
    scale: f32,
    out: &mut [f32],
) {
    let qd = cfg.q_dim();
    // Each task owns the output rows it computes: split `out` along the tasks (consecutive rows).
    let mut pieces: Vec<(Task, &mut [f32])> = Vec::with_capacity(tasks.len());
    let mut rest = out;
    for &t in tasks {
        let (mine, tail) = rest.split_at_mut(t.rows * qd);
        pieces.push((t, mine));
        rest = tail;
    }
    let run = |(t, o): (Task, &mut [f32])| {
        let q = &qkv[t.row0 * q_stride..];
        SCRATCH.with_borrow_mut(|sc| match &caches[t.chunk].data {
            KvData::F32 { k, v } => task(cfg, &k[layer], &v[layer], t, q, q_stride, scale, o, sc),
            KvData::F16 { k, v } => task(cfg, &k[layer], &v[layer], t, q, q_stride, scale, o, sc),
        });
    };
    if pieces.len() > 1 {
        pieces.into_par_iter().for_each(run);
    } else {
        pieces.into_iter().for_each(run);
    }
}

/// One task: every KV head, every head of its group, every row.
#[allow(clippy::too_many_arguments)]
fn task<T: KvElem>(
    cfg: &LlamaConfig,
    kc: &[T],
    vc: &[T],
    t: Task,
    q: &[f32],
    q_stride: usize,
    scale: f32,
    out: &mut [f32],
    sc: &mut Scratch,
) {
    let (hd, kvd, qd) = (cfg.head_dim, cfg.kv_dim(), cfg.q_dim());
    let group = cfg.n_head / cfg.n_kv_head;
    let n = t.pos0 + t.rows;
    let blocks = n.div_ceil(L);
    let Scratch {
        kt,
        v,
        s,
        row,
        sums,
    } = sc;
    kt.resize(blocks * hd * L, 0.0);
    v.resize(n * hd, 0.0);
    row.resize(L * hd, 0.0);
    let nq = t.rows * group;
    let width = blocks * L;
    s.resize(nq.next_multiple_of(QV) * width, 0.0);
    for g in 0..cfg.n_kv_head {
        let kv0 = g * hd;
        // Keys transposed per block of L positions; the tail of the last block is zero.
        for blk in 0..blocks {
            for l in 0..L {
                let j = blk * L + l;
                let dst = &mut row[l * hd..(l + 1) * hd];
                if j < n {
                    T::load(&kc[j * kvd + kv0..j * kvd + kv0 + hd], dst);
                } else {
                    dst.fill(0.0);
                }
            }
            transpose_block(
                &row[..L * hd],
                hd,
                &mut kt[blk * hd * L..(blk + 1) * hd * L],
            );
        }
        for j in 0..n {
            T::load(
                &vc[j * kvd + kv0..j * kvd + kv0 + hd],
                &mut v[j * hd..(j + 1) * hd],
            );
        }
        // Query vector `i` is row `i / group`, head `g·group + i % group`; it sees `pos0 + row + 1` positions.
        let qv = |i: usize| {
            let i = i.min(nq - 1);
            let (r, h) = (i / group, g * group + i % group);
            &q[r * q_stride + h * hd..r * q_stride + (h + 1) * hd]
        };
        let seen = |i: usize| t.pos0 + i / group + 1;
        let mut i = 0;
        while i < nq {
            let qs: [&[f32]; QV] = std::array::from_fn(|k| qv(i + k));
            let last = seen((i + QV - 1).min(nq - 1));
            let (dst, _) = s[i * width..].split_at_mut(QV * width);
            let mut b = 0;
            while b < last.div_ceil(L) {
                // Two key blocks at a time (the second may be the zero padding past `n`: it is never read).
                let two = b + 1 < blocks;
                score_blocks(&qs, &kt[b * hd * L..], hd, two, scale, dst, width, b * L);
                b += 2;
            }
            i += QV;
        }
        sums.clear();
        for i in 0..nq {
            let m = seen(i);
            sums.push(softmax_unnormalized(&mut s[i * width..i * width + m]));
        }
        // The group's heads of one row see the same positions: their value sums share each load.
        for r in 0..t.rows {
            let m = seen(r * group);
            let o = &mut out[r * qd + g * group * hd..r * qd + (g + 1) * group * hd];
            let e = |k: usize| &s[(r * group + k) * width..(r * group + k) * width + m];
            weighted_values_group(group, e, v, hd, o);
            for (k, oh) in o.chunks_exact_mut(hd).enumerate() {
                let sum = sums[r * group + k];
                for oi in oh.iter_mut() {
                    *oi /= sum;
                }
            }
        }
    }
}

/// Scores of `QV` query vectors against the `L` keys of one transposed block (two blocks when `two`): per
/// (query, key) one FMA chain over the head dimension from zero, divided by `scale`, stored at
/// `dst[query · width + col ..]`.
#[allow(clippy::too_many_arguments)]
#[inline]
fn score_blocks(
    qs: &[&[f32]; QV],
    kt: &[f32],
    hd: usize,
    two: bool,
    scale: f32,
    dst: &mut [f32],
    width: usize,
    col: usize,
) {
    let nb = 1 + two as usize;
    assert!(kt.len() >= nb * hd * L && dst.len() >= (QV - 1) * width + col + nb * L);
    assert!(qs.iter().all(|q| q.len() >= hd));
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::level() >= crate::kernels::KernelLevel::Avx2 {
        // SAFETY: AVX2 and FMA are present (the kernel level checks them); slices are checked above.
        return unsafe { score_blocks_avx2(qs, kt, hd, two, scale, dst, width, col) };
    }
    for bb in 0..nb {
        let kb = &kt[bb * hd * L..(bb + 1) * hd * L];
        for (k, q) in qs.iter().enumerate() {
            let mut a = [0f32; L];
            for (d, kd) in kb.chunks_exact(L).enumerate() {
                for l in 0..L {
                    a[l] = q[d].mul_add(kd[l], a[l]);
                }
            }
            for (l, x) in a.iter().enumerate() {
                dst[k * width + col + bb * L + l] = x / scale;
            }
        }
    }
}

/// [`score_blocks`] on AVX2: the same FMA chains, eight keys per register, 4 queries x 2 blocks in flight.
///
/// # Safety
/// AVX2 and FMA must be present and the slices as [`score_blocks`] checks them.
#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn score_blocks_avx2(
    qs: &[&[f32]; QV],
    kt: &[f32],
    hd: usize,
    two: bool,
    scale: f32,
    dst: &mut [f32],
    width: usize,
    col: usize,
) {
    use std::arch::x86_64::*;
    // SAFETY: every load is within `kt[..nb · hd · L]` or `q[..hd]`, every store within `dst` (checked by
    // the caller).
    unsafe {
        let k0 = kt.as_ptr();
        let k1 = if two { k0.add(hd * L) } else { k0 };
        let q: [*const f32; QV] = std::array::from_fn(|i| qs[i].as_ptr());
        let mut a0 = [_mm256_setzero_ps(); QV];
        let mut a1 = [_mm256_setzero_ps(); QV];
        for d in 0..hd {
            let x0 = _mm256_loadu_ps(k0.add(d * L));
            let x1 = _mm256_loadu_ps(k1.add(d * L));
            for i in 0..QV {
                let qd = _mm256_broadcast_ss(&*q[i].add(d));
                a0[i] = _mm256_fmadd_ps(qd, x0, a0[i]);
                a1[i] = _mm256_fmadd_ps(qd, x1, a1[i]);
            }
        }
        let sc = _mm256_set1_ps(scale);
        for i in 0..QV {
            let p = dst.as_mut_ptr().add(i * width + col);
            _mm256_storeu_ps(p, _mm256_div_ps(a0[i], sc));
            if two {
                _mm256_storeu_ps(p.add(L), _mm256_div_ps(a1[i], sc));
            }
        }
    }
}

/// `kt[d][l] = rows[l][d]` for `L` rows of `hd` values (exact: a permutation).
fn transpose_block(rows: &[f32], hd: usize, kt: &mut [f32]) {
    assert!(rows.len() >= L * hd && kt.len() >= L * hd);
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(L) && crate::kernels::level() >= crate::kernels::KernelLevel::Avx2 {
        for d0 in (0..hd).step_by(L) {
            // SAFETY: AVX2 is present; the 8x8 tile at column `d0` is inside both slices (checked above).
            unsafe {
                crate::kernels::transpose8(rows.as_ptr().add(d0), hd, kt.as_mut_ptr().add(d0 * L))
            };
        }
        return;
    }
    for l in 0..L {
        for d in 0..hd {
            kt[d * L + l] = rows[l * hd + d];
        }
    }
}

/// [`weighted_values`] for the `group` query vectors `e(0..group)` (same length) into `o` (`[group, hd]`). With
/// AVX-512 (and `hd` a multiple of 64) the vectors share every load of `v`; each output element is the same
/// FMA chain as [`weighted_values`] computes.
fn weighted_values_group<'a>(
    group: usize,
    e: impl Fn(usize) -> &'a [f32],
    v: &[f32],
    hd: usize,
    o: &mut [f32],
) {
    assert!(o.len() == group * hd);
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(64) && crate::kernels::level() >= crate::kernels::KernelLevel::Avx512Vnni {
        let mut k = 0;
        while k < group {
            let n = (group - k).min(4);
            let o = &mut o[k * hd..(k + n) * hd];
            // SAFETY: AVX-512 F is present (the kernel level checks it); the callee checks its slices.
            unsafe {
                match n {
                    4 => {
                        weighted_values_avx512::<4>([e(k), e(k + 1), e(k + 2), e(k + 3)], v, hd, o)
                    }
                    3 => weighted_values_avx512::<3>([e(k), e(k + 1), e(k + 2)], v, hd, o),
                    2 => weighted_values_avx512::<2>([e(k), e(k + 1)], v, hd, o),
                    _ => weighted_values_avx512::<1>([e(k)], v, hd, o),
                }
            }
            k += n;
        }
        return;
    }
    for (k, oh) in o.chunks_exact_mut(hd).enumerate() {
        weighted_values(e(k), v, hd, oh);
    }
}

/// [`weighted_values_group`] on AVX-512 for `G` vectors: 64 output values per vector in registers, each
/// value vector loaded once for all `G`.
///
/// # Safety
/// AVX-512 F must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_values_avx512<const G: usize>(
    e: [&[f32]; G],
    v: &[f32],
    hd: usize,
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n = e[0].len();
    assert!(e.iter().all(|x| x.len() == n) && v.len() >= n * hd && o.len() >= G * hd);
    assert!(hd.is_multiple_of(64));
    // SAFETY: loads stay within `v[..n · hd]` and `e[g][..n]`, stores within `o[..G · hd]` (asserted above).
    unsafe {
        for d0 in (0..hd).step_by(64) {
            let mut acc = [[_mm512_setzero_ps(); 4]; G];
            for j in 0..n {
                let p = v.as_ptr().add(j * hd + d0);
                let x: [__m512; 4] = std::array::from_fn(|r| _mm512_loadu_ps(p.add(16 * r)));
                for (g, a) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*e[g].as_ptr().add(j));
                    for (r, ar) in a.iter_mut().enumerate() {
                        *ar = _mm512_fmadd_ps(w, x[r], *ar);
                    }
                }
            }
            for (g, a) in acc.iter().enumerate() {
                for (r, ar) in a.iter().enumerate() {
                    _mm512_storeu_ps(o.as_mut_ptr().add(g * hd + d0 + 16 * r), *ar);
                }
            }
        }
    }
}

/// `o = Σ_j e[j] · v[j]`: per output element one FMA chain over positions, starting from zero.
fn weighted_values(e: &[f32], v: &[f32], hd: usize, o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if hd.is_multiple_of(L) && crate::kernels::level() >= crate::kernels::KernelLevel::Avx2 {
        let mut d0 = 0;
        while d0 < hd {
            let regs = ((hd - d0) / L).min(8);
            // SAFETY: AVX2 and FMA are present; the callee checks its slices.
            unsafe {
                match regs {
                    8 => weighted_values_avx2::<8>(e, v, hd, d0, o),
                    4..=7 => weighted_values_avx2::<4>(e, v, hd, d0, o),
                    _ => weighted_values_avx2::<1>(e, v, hd, d0, o),
                }
            }
            d0 += match regs {
                8 => 8 * L,
                4..=7 => 4 * L,
                _ => L,
            };
        }
        return;
    }
    o.fill(0.0);
    for (j, &ej) in e.iter().enumerate() {
        for (oi, &vi) in o.iter_mut().zip(&v[j * hd..(j + 1) * hd]) {
            *oi = ej.mul_add(vi, *oi);
        }
    }
}

/// [`weighted_values`] for `R` registers of output (`o[d0..d0 + 8R]`), kept in registers over all positions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_values_avx2<const R: usize>(
    e: &[f32],
    v: &[f32],
    hd: usize,
    d0: usize,
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    assert!(d0 + R * L <= hd && o.len() >= hd && v.len() >= e.len() * hd);
    // SAFETY: loads stay within `v[..e.len() * hd]`, stores within `o[..hd]` (asserted above).
    unsafe {
        let mut acc = [_mm256_setzero_ps(); R];
        for (j, &ej) in e.iter().enumerate() {
            let p = v.as_ptr().add(j * hd + d0);
            let w = _mm256_set1_ps(ej);
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(p.add(r * L)), *a);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(o.as_mut_ptr().add(d0 + r * L), *a);
        }
    }
}

/// Replaces scores by `exp(s - max)` and returns their sum (accumulated in `L` lanes, then added in a fixed
/// order).
fn softmax_unnormalized(s: &mut [f32]) -> f32 {
    // The maximum in `L` lanes (vectorizes; the maximum of finite scores does not depend on the order).
    let mut top = [f32::NEG_INFINITY; L];
    for c in s.chunks(L) {
        for (x, t) in c.iter().zip(top.iter_mut()) {
            *t = t.max(*x);
        }
    }
    let max = top.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for x in s.iter_mut() {
        *x -= max;
    }
    exp_in_place(s);
    let mut lanes = [0f32; L];
    for c in s.chunks(L) {
        for (x, lane) in c.iter().zip(lanes.iter_mut()) {
            *lane += *x;
        }
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

#[cfg(test)]
#[path = "attn_tests.rs"]
mod tests;

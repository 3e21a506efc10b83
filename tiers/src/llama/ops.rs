//! Row operations of the CPU model: RMSNorm and a row's trait-LoRA terms.

use nimmer_loras::{Blend, Module};
use rayon::prelude::*;

pub(super) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    let one = |(xr, or): (&[f32], &mut [f32])| {
        let sum2: f32 = xr.iter().map(|v| v * v).sum();
        let m = (sum2 / n as f32 + eps).sqrt();
        for ((o, &v), &a) in or.iter_mut().zip(xr).zip(w) {
            *o = v / m * a;
        }
    };
    // Rows are independent and each keeps its own order of operations: in parallel for a prefill chunk.
    if x.len() >= PAR_ROWS * n {
        x.par_chunks_exact(n)
            .zip(out.par_chunks_exact_mut(n))
            .with_min_len(PAR_ROWS / 2)
            .for_each(one);
    } else {
        x.chunks_exact(n).zip(out.chunks_exact_mut(n)).for_each(one);
    }
}

/// Rows from which a row-wise operation is split across the kernel threads.
pub(super) const PAR_ROWS: usize = 16;

/// `x[i] += y[i]` over `x`'s length (the residual add), row chunks of `width` in parallel for many rows.
pub(super) fn add_in_place(x: &mut [f32], y: &[f32], width: usize) {
    let add = |(a, b): (&mut [f32], &[f32])| {
        for (ai, bi) in a.iter_mut().zip(b) {
            *ai += bi;
        }
    };
    if x.len() >= PAR_ROWS * width {
        x.par_chunks_mut(PAR_ROWS / 2 * width)
            .zip(y.par_chunks(PAR_ROWS / 2 * width))
            .for_each(add);
    } else {
        add((x, y));
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

/// `x[i] = exp(x[i])`, computed in f64 (`x = n·ln 2 + r`, a degree-10 Taylor polynomial in `r`) and rounded
/// once to f32: within one ulp of libm's `expf` and equal to it but about once in 1,500 (a cruder f32
/// polynomial moved greedy choices at near-ties against candle's reference). AVX2 and portable code run the
/// same operations, so results do not depend on the kernel level. Inputs are clamped to [-87.3, 88.3].
pub(super) fn exp_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::level() >= crate::kernels::KernelLevel::Avx2 {
        // SAFETY: AVX2 and FMA are present (the kernel level checks them).
        unsafe { exp_avx2(x) };
        return;
    }
    x.iter_mut().for_each(|v| *v = exp1(*v));
}

const EXP_LO: f32 = -87.3;
const EXP_HI: f32 = 88.3;
const LOG2E: f64 = std::f64::consts::LOG2_E;
/// ln 2 in two parts (fdlibm's): `n · LN2_HI` is exact for the `n` that occur.
const LN2_HI: f64 = 6.931_471_803_691_238e-1;
const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
/// 1/k! for k = 10 down to 0.
const EXP_P: [f64; 11] = [
    1.0 / 3_628_800.0,
    1.0 / 362_880.0,
    1.0 / 40_320.0,
    1.0 / 5_040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// One lane of [`exp_in_place`].
fn exp1(x: f32) -> f32 {
    let x = x.clamp(EXP_LO, EXP_HI) as f64;
    let n = (x * LOG2E).round_ties_even();
    let r = (-n).mul_add(LN2_HI, x);
    let r = (-n).mul_add(LN2_LO, r);
    let mut p = EXP_P[0];
    for &c in &EXP_P[1..] {
        p = p.mul_add(r, c);
    }
    (p * f64::from_bits(((n as i64 + 1023) as u64) << 52)) as f32
}

/// [`exp_in_place`] on AVX2: 16 lanes per iteration as four independent polynomial chains (one chain is
/// latency-bound), then four at a time, then [`exp1`]; every lane runs the same operations.
///
/// # Safety
/// AVX2 and FMA must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(x: &mut [f32]) {
    use std::arch::x86_64::*;
    #[inline(always)]
    unsafe fn lanes<const V: usize>(v: &mut [f32]) {
        assert_eq!(v.len(), 4 * V);
        // SAFETY: `v` holds 4·V floats (asserted); the caller has AVX2 and FMA.
        unsafe {
            let x: [__m256d; V] = std::array::from_fn(|i| {
                let x = _mm_loadu_ps(v.as_ptr().add(4 * i));
                let x = _mm_min_ps(_mm_max_ps(x, _mm_set1_ps(EXP_LO)), _mm_set1_ps(EXP_HI));
                _mm256_cvtps_pd(x)
            });
            let n: [__m256d; V] = std::array::from_fn(|i| {
                _mm256_round_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_pd(
                    x[i],
                    _mm256_set1_pd(LOG2E),
                ))
            });
            let r: [__m256d; V] = std::array::from_fn(|i| {
                let r = _mm256_fnmadd_pd(n[i], _mm256_set1_pd(LN2_HI), x[i]);
                _mm256_fnmadd_pd(n[i], _mm256_set1_pd(LN2_LO), r)
            });
            let mut p = [_mm256_set1_pd(EXP_P[0]); V];
            for &c in &EXP_P[1..] {
                for i in 0..V {
                    p[i] = _mm256_fmadd_pd(p[i], r[i], _mm256_set1_pd(c));
                }
            }
            for i in 0..V {
                let e = _mm256_add_epi64(
                    _mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n[i])),
                    _mm256_set1_epi64x(1023),
                );
                let pow2 = _mm256_castsi256_pd(_mm256_slli_epi64::<52>(e));
                _mm_storeu_ps(
                    v.as_mut_ptr().add(4 * i),
                    _mm256_cvtpd_ps(_mm256_mul_pd(p[i], pow2)),
                );
            }
        }
    }
    let mut c16 = x.chunks_exact_mut(16);
    for v in c16.by_ref() {
        // SAFETY: AVX2 and FMA are present (this function's contract); `v` is 16 floats.
        unsafe { lanes::<4>(v) };
    }
    let mut c4 = c16.into_remainder().chunks_exact_mut(4);
    for v in c4.by_ref() {
        // SAFETY: as above; `v` is 4 floats.
        unsafe { lanes::<1>(v) };
    }
    c4.into_remainder().iter_mut().for_each(|v| *v = exp1(*v));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_rounds_like_libm_and_is_the_same_in_every_lane_path() {
        let xs: Vec<f32> = (0..200_000).map(|i| -90.0 + i as f32 * 0.000_91).collect();
        let mut v = xs.clone();
        exp_in_place(&mut v);
        let mut differ = 0;
        for (&x, &y) in xs.iter().zip(&v) {
            let want = x.clamp(EXP_LO, EXP_HI).exp();
            let ulps = (y.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulps <= 1, "exp({x}) = {y}, libm {want}");
            differ += usize::from(ulps != 0);
            assert_eq!(
                y.to_bits(),
                exp1(x).to_bits(),
                "exp({x}): SIMD and scalar lanes differ"
            );
        }
        // Measured: 129 of 200,000 one ulp apart (libm itself is not correctly rounded everywhere).
        assert!(
            differ < xs.len() / 1_000,
            "{differ} of {} differ from libm",
            xs.len()
        );
    }
}

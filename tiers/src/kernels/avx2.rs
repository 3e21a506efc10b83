//! AVX2 kernel over the tiled layout, for x86-64 CPUs without AVX-512 VNNI.
//!
//! Each 64-byte group (16 weight rows x 4 bytes) is two 256-bit halves of 8 rows. `maddubs` multiplies the
//! unsigned weight bytes with a broadcast activation dword into saturating i16 pairs, `madd` with ones sums the
//! pairs into one i32 per row. 4-bit weights (at most 15·127·2 per pair) never saturate; 8-bit weights are split
//! into their two nibbles, the high one weighted by 16. Integer sums are exact and the float work (one convert,
//! two FMAs per block) follows the portable kernel's order, so results are bit-identical to it.

use std::arch::x86_64::*;

use super::{MAX_ROWS_PER_PASS, QFormat, QK, QuantActs, TILE, TiledWeight};

pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C (checked by [`available`] before this level is chosen).
pub(super) unsafe fn tile_rows(
    w: &TiledWeight,
    t: usize,
    x: &QuantActs,
    r0: usize,
    nr: usize,
    out: &mut [[f32; TILE]; MAX_ROWS_PER_PASS],
) {
    // SAFETY: forwarded contract.
    unsafe {
        for half in 0..2 {
            match nr {
                1 => half_rows::<1>(w, t, half, x, r0, out),
                2 => half_rows::<2>(w, t, half, x, r0, out),
                3 => half_rows::<3>(w, t, half, x, r0, out),
                4 => half_rows::<4>(w, t, half, x, r0, out),
                _ => unreachable!("at most MAX_ROWS_PER_PASS rows"),
            }
        }
    }
}

/// Weight rows `8·half .. 8·half + 8` of tile `t` for activation rows `r0 .. r0 + NR`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half_rows<const NR: usize>(
    w: &TiledWeight,
    t: usize,
    half: usize,
    x: &QuantActs,
    r0: usize,
    out: &mut [[f32; TILE]; MAX_ROWS_PER_PASS],
) {
    let mut facc = [_mm256_setzero_ps(); NR];
    let rows: [&[i8]; NR] = std::array::from_fn(|i| x.row_q(r0 + i));
    let nib = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let sixteens = _mm256_set1_epi16(16);
    for b in 0..w.blocks() {
        let blk = w.block_ptr(t, b).as_ptr();
        // SAFETY: a block is 64 bytes of scales followed by the quants (QFormat::block_bytes); rows hold k bytes.
        unsafe {
            let d = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(half * 16) as *const __m128i));
            let m = _mm256_cvtph_ps(_mm_loadu_si128(
                blk.add(TILE * 2 + half * 16) as *const __m128i
            ));
            let qs = blk.add(TILE * 4 + half * 32);
            let mut iacc = [_mm256_setzero_si256(); NR];
            match w.format {
                QFormat::Q4 => {
                    for g in 0..QK / 8 {
                        let raw = _mm256_loadu_si256(qs.add(g * 64) as *const __m256i);
                        let lo = _mm256_and_si256(raw, nib);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), nib);
                        for i in 0..NR {
                            let a = rows[i].as_ptr().add(b * QK + 8 * g);
                            let alo = _mm256_set1_epi32(std::ptr::read_unaligned(a as *const i32));
                            let ahi =
                                _mm256_set1_epi32(std::ptr::read_unaligned(a.add(4) as *const i32));
                            let pairs = _mm256_add_epi16(
                                _mm256_maddubs_epi16(lo, alo),
                                _mm256_maddubs_epi16(hi, ahi),
                            );
                            iacc[i] = _mm256_add_epi32(iacc[i], _mm256_madd_epi16(pairs, ones));
                        }
                    }
                    for i in 0..NR {
                        let (ds, ss) = x.row_scales(r0 + i);
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(ds[b]));
                        facc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[i]), scale, facc[i]);
                        facc[i] = _mm256_fmadd_ps(m, _mm256_set1_ps(ss[b]), facc[i]);
                    }
                }
                QFormat::U8 => {
                    for g in 0..QK / 4 {
                        let raw = _mm256_loadu_si256(qs.add(g * 64) as *const __m256i);
                        let lo = _mm256_and_si256(raw, nib);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), nib);
                        for i in 0..NR {
                            let a = rows[i].as_ptr().add(b * QK + 4 * g);
                            let av = _mm256_set1_epi32(std::ptr::read_unaligned(a as *const i32));
                            let l = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, av), ones);
                            let h = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, av), sixteens);
                            iacc[i] = _mm256_add_epi32(iacc[i], _mm256_add_epi32(l, h));
                        }
                    }
                    for i in 0..NR {
                        let (ds, ss) = x.row_scales_exact(r0 + i);
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(ds[b]));
                        facc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[i]), scale, facc[i]);
                        facc[i] = _mm256_fmadd_ps(m, _mm256_set1_ps(ss[b]), facc[i]);
                    }
                }
            }
        }
    }
    for i in 0..NR {
        // SAFETY: out[i] is 16 f32; this half writes lanes 8·half .. 8·half + 8.
        unsafe { _mm256_storeu_ps(out[i].as_mut_ptr().add(half * 8), facc[i]) };
    }
}

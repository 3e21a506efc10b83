//! AVX2 kernel over the tiled layout, for x86-64 CPUs without AVX-512 VNNI.
//!
//! Each 64-byte group (16 weight rows x 4 bytes) is two 256-bit halves of 8 rows. `maddubs` multiplies the
//! unsigned weight bytes with a broadcast activation dword into saturating i16 pairs, `madd` with ones sums the
//! pairs into one i32 per row. 4-bit weights (at most 15·127·2 per pair) never saturate; 8-bit weights are split
//! into their two nibbles, the high one weighted by 16. Integer sums are exact and the float work (one convert,
//! two FMAs per block) follows the portable kernel's order, so results are bit-identical to it.
//!
//! Prefill chunks (8 rows or more, Q4 weights) take [`q4_panel`], which reads the activations from the
//! panel layout of [`QuantActs`] and sums a block's products in 16 bits; fewer rows take [`tile_rows`].
//! Activation quantization ([`quantize_block`]) lives here too.

use std::arch::x86_64::*;

use super::{MAX_ROWS_PER_PASS, PANEL, QFormat, QK, QuantActs, TILE, TiledWeight};

pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// One panel of [`PANEL`] activation rows against Q4 tile `t`: the prefill (matrix-matrix) kernel.
///
/// Per 8-row half of the tile, a block's products are summed in 16 bits (16 products of at most 15·127 each
/// fit in an i16) before one widening `madd`, and the float accumulators live in `out` (one load and store
/// per block), which leaves the registers to eight activation rows per pass over the weights; the panel
/// layout puts the eight rows' quants and scales behind one pointer each. Integer sums are exact and the
/// float work per block is that of [`tile_rows`], so results are bit-identical to it.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` must be Q4 and panel `panel` must exist in `x`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4_panel(
    w: &TiledWeight,
    t: usize,
    x: &QuantActs,
    panel: usize,
    out: &mut [[f32; TILE]; MAX_ROWS_PER_PASS],
) {
    const NR: usize = PANEL;
    let nb = w.blocks();
    let bb = QFormat::Q4.block_bytes();
    assert!(w.format == QFormat::Q4 && t < w.tiles() && panel < x.panels);
    assert!(
        x.panel_q.len() >= (panel + 1) * NR * x.k && x.panel_ds.len() >= (panel + 1) * nb * 2 * NR
    );
    for o in out.iter_mut().take(NR) {
        *o = [0.0; TILE];
    }
    // SAFETY: tile `t` spans `nb · bb` bytes of `w.data`; the panel spans `NR · k` quants and `2 · NR · nb`
    // scales (asserted above); `out` rows are 16 f32.
    unsafe {
        let wbase = w.data.as_ptr().add(t * nb * bb);
        let pq = x.panel_q.as_ptr().add(panel * NR * x.k);
        let pds = x.panel_ds.as_ptr().add(panel * nb * 2 * NR);
        let o = out.as_mut_ptr() as *mut f32;
        let nib = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        for half in 0..2 {
            for b in 0..nb {
                let blk = wbase.add(b * bb);
                let qs = blk.add(TILE * 4 + half * 32);
                let aq = pq.add(b * QK * NR);
                let mut acc = [_mm256_setzero_si256(); NR];
                for g in 0..QK / 8 {
                    let raw = _mm256_loadu_si256(qs.add(g * 64) as *const __m256i);
                    let lo = _mm256_and_si256(raw, nib);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), nib);
                    // Dwords 2g (k = 8g..8g+4) and 2g + 1 (8g+4..8g+8) of every row.
                    let alo = aq.add(2 * g * NR * 4) as *const i32;
                    let ahi = aq.add((2 * g + 1) * NR * 4) as *const i32;
                    for (i, a) in acc.iter_mut().enumerate() {
                        let al = _mm256_set1_epi32(std::ptr::read_unaligned(alo.add(i)));
                        let ah = _mm256_set1_epi32(std::ptr::read_unaligned(ahi.add(i)));
                        *a = _mm256_add_epi16(*a, _mm256_maddubs_epi16(lo, al));
                        *a = _mm256_add_epi16(*a, _mm256_maddubs_epi16(hi, ah));
                    }
                }
                let d = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(half * 16) as *const __m128i));
                let m = _mm256_cvtph_ps(_mm_loadu_si128(
                    blk.add(TILE * 2 + half * 16) as *const __m128i
                ));
                let scales = pds.add(b * 2 * NR);
                for (i, a) in acc.iter().enumerate() {
                    let sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(*a, ones));
                    let p = o.add(i * TILE + 8 * half);
                    let mut f = _mm256_loadu_ps(p);
                    f = _mm256_fmadd_ps(sum, _mm256_mul_ps(d, _mm256_set1_ps(*scales.add(i))), f);
                    f = _mm256_fmadd_ps(m, _mm256_set1_ps(*scales.add(NR + i)), f);
                    _mm256_storeu_ps(p, f);
                }
            }
        }
    }
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

/// [`super::transpose_dwords`] on AVX2: the 8x8 dword transpose of one block of a panel's rows.
///
/// # Safety
/// The CPU must support AVX2; `src` must be readable for 8 rows of 32 bytes at `stride` (bytes, a multiple of
/// 4), `dst` writable for 256 bytes.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn transpose_dwords(src: *const i8, stride: usize, dst: *mut i8) {
    // SAFETY: forwarded contract; dwords move as f32 bit patterns (shuffles never change bits).
    unsafe { transpose8(src as *const f32, stride / 4, dst as *mut f32) }
}

/// Transposes the 8x8 tile of 32-bit values at `src` (row stride `stride` values) into 64 consecutive values
/// at `dst` (exact: a permutation of bits).
///
/// # Safety
/// AVX must be present; `src` must be readable for 8 rows of 8 at `stride`, `dst` writable for 64 values.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn transpose8(src: *const f32, stride: usize, dst: *mut f32) {
    // SAFETY: forwarded contract.
    unsafe {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * stride)));
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let out = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (i, o) in out.iter().enumerate() {
            _mm256_storeu_ps(dst.add(i * 8), *o);
        }
    }
}

/// [`super::scalar::quantize_block`] on AVX2, bit-identical to it: the same `amax`, `1/d` and products, and
/// rounding half away from zero built from truncation (`x - trunc(x)` is exact).
///
/// # Safety
/// The CPU must support AVX2; `xs` and `q` must hold 32 values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_block(xs: &[f32], q: &mut [i8]) -> (f32, i32) {
    assert!(xs.len() == QK && q.len() == QK);
    // SAFETY: 32 floats are read and 32 bytes written (asserted above).
    unsafe {
        let sign = _mm256_set1_ps(-0.0);
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(xs.as_ptr().add(8 * i)));
        let mut m = _mm256_andnot_ps(sign, v[0]);
        for x in &v[1..] {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *x));
        }
        // Horizontal maximum in registers (exact whatever the order).
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m1 = _mm_max_ss(m2, _mm_movehdup_ps(m2));
        let amax = _mm_cvtss_f32(m1).max(0.0);
        let dd = amax / 127.0;
        let id = _mm256_set1_ps(if dd != 0.0 { 1.0 / dd } else { 0.0 });
        let half = _mm256_set1_ps(0.5);
        let one = _mm256_set1_ps(1.0);
        let ints: [__m256i; 4] = std::array::from_fn(|i| {
            let t = _mm256_mul_ps(v[i], id);
            let tr = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(t);
            let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(t, tr));
            let up = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, half);
            let step = _mm256_and_ps(up, _mm256_or_ps(_mm256_and_ps(t, sign), one));
            _mm256_cvttps_epi32(_mm256_add_ps(tr, step))
        });
        // i32 -> i16 -> i8 with saturation; packs interleave 128-bit lanes, the permute restores order.
        let w01 = _mm256_packs_epi32(ints[0], ints[1]);
        let w23 = _mm256_packs_epi32(ints[2], ints[3]);
        let b = _mm256_packs_epi16(w01, w23);
        let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, b);
        let total = _mm256_add_epi32(
            _mm256_add_epi32(ints[0], ints[1]),
            _mm256_add_epi32(ints[2], ints[3]),
        );
        // Horizontal integer sum in registers (exact).
        let t4 = _mm_add_epi32(
            _mm256_castsi256_si128(total),
            _mm256_extracti128_si256::<1>(total),
        );
        let t2 = _mm_add_epi32(t4, _mm_unpackhi_epi64(t4, t4));
        let t1 = _mm_add_epi32(t2, _mm_shuffle_epi32::<0b01>(t2));
        (dd, _mm_cvtsi128_si32(t1))
    }
}

//! AVX-512 VNNI kernels over the tiled layout: per (tile, block) one 64-byte load feeds `vpdpbusd` for up to
//! eight activation rows, whose four-byte groups are broadcast to all 16 lanes (one lane per weight row).
//! Float work per block and row is one convert and two FMAs, in the same order as the portable kernel.
//! [`tile_rows`] reads rows from the row-major quants (decode, tails, 8-bit weights); [`q4_panel`] reads a
//! panel of eight rows (prefill against Q4 weights).

use std::arch::x86_64::*;

use super::{MAX_ROWS_PER_PASS, PANEL, QFormat, QK, QuantActs, TILE, TiledWeight};

pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI (checked by [`available`] before this level is chosen).
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
        match nr {
            1 => tile_rows_n::<1>(w, t, x, r0, out),
            2 => tile_rows_n::<2>(w, t, x, r0, out),
            3 => tile_rows_n::<3>(w, t, x, r0, out),
            4 => tile_rows_n::<4>(w, t, x, r0, out),
            5 => tile_rows_n::<5>(w, t, x, r0, out),
            6 => tile_rows_n::<6>(w, t, x, r0, out),
            7 => tile_rows_n::<7>(w, t, x, r0, out),
            8 => tile_rows_n::<8>(w, t, x, r0, out),
            _ => unreachable!("at most MAX_ROWS_PER_PASS rows"),
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_rows_n<const NR: usize>(
    w: &TiledWeight,
    t: usize,
    x: &QuantActs,
    r0: usize,
    out: &mut [[f32; TILE]; MAX_ROWS_PER_PASS],
) {
    let mut facc = [_mm512_setzero_ps(); NR];
    let rows: [&[i8]; NR] = std::array::from_fn(|i| x.row_q(r0 + i));
    let mask = _mm512_set1_epi8(0x0F);
    for b in 0..w.blocks() {
        let blk = w.block_ptr(t, b).as_ptr();
        // SAFETY: a block is 64 bytes of scales followed by the quants (QFormat::block_bytes); rows hold k bytes.
        unsafe {
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
            let m = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(TILE * 2) as *const __m256i));
            let qs = blk.add(TILE * 4);
            let mut iacc = [_mm512_setzero_si512(); NR];
            match w.format {
                QFormat::Q4 => {
                    for g in 0..QK / 8 {
                        let raw = _mm512_loadu_si512(qs.add(g * 64) as *const __m512i);
                        let lo = _mm512_and_si512(raw, mask);
                        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), mask);
                        for i in 0..NR {
                            let a = rows[i].as_ptr().add(b * QK + 8 * g);
                            let alo = _mm512_set1_epi32(std::ptr::read_unaligned(a as *const i32));
                            let ahi =
                                _mm512_set1_epi32(std::ptr::read_unaligned(a.add(4) as *const i32));
                            iacc[i] = _mm512_dpbusd_epi32(iacc[i], lo, alo);
                            iacc[i] = _mm512_dpbusd_epi32(iacc[i], hi, ahi);
                        }
                    }
                    for i in 0..NR {
                        let (ds, ss) = x.row_scales(r0 + i);
                        let scale = _mm512_mul_ps(d, _mm512_set1_ps(ds[b]));
                        facc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[i]), scale, facc[i]);
                        facc[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(ss[b]), facc[i]);
                    }
                }
                QFormat::U8 => {
                    for g in 0..QK / 4 {
                        let raw = _mm512_loadu_si512(qs.add(g * 64) as *const __m512i);
                        for i in 0..NR {
                            let a = rows[i].as_ptr().add(b * QK + 4 * g);
                            let av = _mm512_set1_epi32(std::ptr::read_unaligned(a as *const i32));
                            iacc[i] = _mm512_dpbusd_epi32(iacc[i], raw, av);
                        }
                    }
                    for i in 0..NR {
                        let (ds, ss) = x.row_scales_exact(r0 + i);
                        let scale = _mm512_mul_ps(d, _mm512_set1_ps(ds[b]));
                        facc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[i]), scale, facc[i]);
                        facc[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(ss[b]), facc[i]);
                    }
                }
            }
        }
    }
    for i in 0..NR {
        // SAFETY: out[i] is 16 f32.
        unsafe { _mm512_storeu_ps(out[i].as_mut_ptr(), facc[i]) };
    }
}

/// One panel of [`PANEL`] activation rows against Q4 tile `t`: the prefill (matrix-matrix) kernel.
///
/// The panel layout puts the eight rows' quants and scales behind one pointer each, so every activation
/// dword is an embedded broadcast of `vpdpbusd` and no general register is spent per row. Integer sums are
/// exact and the float work per block is that of [`tile_rows`], so results are bit-identical to it.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VNNI; `w` must be Q4 and panel `panel` must exist in `x`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
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
    // SAFETY: tile `t` spans `nb · bb` bytes of `w.data`; the panel spans `NR · k` quants and `2 · NR · nb`
    // scales (asserted above); `out` rows are 16 f32.
    unsafe {
        let wbase = w.data.as_ptr().add(t * nb * bb);
        let pq = x.panel_q.as_ptr().add(panel * NR * x.k);
        let pds = x.panel_ds.as_ptr().add(panel * nb * 2 * NR);
        let mask = _mm512_set1_epi8(0x0F);
        let mut facc = [_mm512_setzero_ps(); NR];
        for b in 0..nb {
            let blk = wbase.add(b * bb);
            let qs = blk.add(TILE * 4);
            let aq = pq.add(b * QK * NR) as *const i32;
            let mut iacc = [_mm512_setzero_si512(); NR];
            for g in 0..QK / 8 {
                let raw = _mm512_loadu_si512(qs.add(g * 64) as *const __m512i);
                let lo = _mm512_and_si512(raw, mask);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), mask);
                // Dwords 2g (k = 8g..8g+4) and 2g + 1 (8g+4..8g+8) of every row.
                let alo = aq.add(2 * g * NR);
                let ahi = aq.add((2 * g + 1) * NR);
                for (i, a) in iacc.iter_mut().enumerate() {
                    *a = _mm512_dpbusd_epi32(*a, lo, _mm512_set1_epi32(*alo.add(i)));
                    *a = _mm512_dpbusd_epi32(*a, hi, _mm512_set1_epi32(*ahi.add(i)));
                }
            }
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
            let m = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(TILE * 2) as *const __m256i));
            let scales = pds.add(b * 2 * NR);
            for (i, f) in facc.iter_mut().enumerate() {
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(*scales.add(i)));
                *f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[i]), scale, *f);
                *f = _mm512_fmadd_ps(m, _mm512_set1_ps(*scales.add(NR + i)), *f);
            }
        }
        for (o, f) in out.iter_mut().zip(facc) {
            _mm512_storeu_ps(o.as_mut_ptr(), f);
        }
    }
}

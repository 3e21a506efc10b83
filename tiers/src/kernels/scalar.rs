//! Portable kernel over the tiled layout: the reference the SIMD kernels are tested against, and the
//! fallback on CPUs without AVX-512 VNNI (written so the compiler vectorizes the 16-lane loops).

use half::f16;

use super::{MAX_ROWS_PER_PASS, QFormat, QK, QuantActs, TILE, TiledWeight};

/// Computes tile `t` (16 output columns) for activation rows `r0..r0+nr` into `out[0..nr]`.
pub(super) fn tile_rows(
    w: &TiledWeight,
    t: usize,
    x: &QuantActs,
    r0: usize,
    nr: usize,
    out: &mut [[f32; TILE]; MAX_ROWS_PER_PASS],
) {
    for o in out.iter_mut().take(nr) {
        *o = [0.0; TILE];
    }
    for b in 0..w.blocks() {
        let blk = w.block_ptr(t, b);
        let mut d = [0f32; TILE];
        let mut m = [0f32; TILE];
        for l in 0..TILE {
            d[l] = f16::from_le_bytes([blk[2 * l], blk[2 * l + 1]]).to_f32();
            m[l] = f16::from_le_bytes([blk[TILE * 2 + 2 * l], blk[TILE * 2 + 2 * l + 1]]).to_f32();
        }
        let qs = &blk[TILE * 4..];
        for (i, o) in out.iter_mut().enumerate().take(nr) {
            let r = r0 + i;
            let a = &x.row_q(r)[b * QK..(b + 1) * QK];
            let mut isum = [0i32; TILE];
            let (dx, sx) = match w.format {
                QFormat::Q4 => {
                    for g in 0..QK / 8 {
                        for (l, acc) in isum.iter_mut().enumerate() {
                            let p = &qs[(g * TILE + l) * 4..][..4];
                            for j in 0..4 {
                                *acc += (p[j] & 0x0F) as i32 * a[8 * g + j] as i32;
                                *acc += (p[j] >> 4) as i32 * a[8 * g + 4 + j] as i32;
                            }
                        }
                    }
                    let (ds, ss) = x.row_scales(r);
                    (ds[b], ss[b])
                }
                QFormat::U8 => {
                    for g in 0..QK / 4 {
                        for (l, acc) in isum.iter_mut().enumerate() {
                            let p = &qs[(g * TILE + l) * 4..][..4];
                            for j in 0..4 {
                                *acc += p[j] as i32 * a[4 * g + j] as i32;
                            }
                        }
                    }
                    let (ds, ss) = x.row_scales_exact(r);
                    (ds[b], ss[b])
                }
            };
            for l in 0..TILE {
                o[l] = (isum[l] as f32).mul_add(d[l] * dx, o[l]);
                o[l] = m[l].mul_add(sx, o[l]);
            }
        }
    }
}

/// Quantizes 32 activations to int8 (ggml's Q8_1: `d = amax/127`, `q = round(x/d)` half away from zero);
/// returns `d` (unrounded) and `Σq`.
pub(super) fn quantize_block(xs: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let dd = amax / 127.0;
    let id = if dd != 0.0 { 1.0 / dd } else { 0.0 };
    let mut sum = 0i32;
    for (qj, &v) in q.iter_mut().zip(xs) {
        *qj = (v * id).round() as i8;
        sum += *qj as i32;
    }
    (dd, sum)
}

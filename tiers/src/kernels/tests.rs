//! Kernel tests: tiled formats against a plain f32 reference, SIMD against portable, batch invariance.

use super::*;

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n).map(|_| lcg(&mut s)).collect()
}

/// Q4_1-encodes `w` `[n, k]` the way ggml does, returning raw GGUF blocks.
fn encode_q4_1(w: &[f32], n: usize, k: usize) -> Vec<u8> {
    let mut raw = Vec::new();
    for r in 0..n {
        for b in 0..k / QK {
            let x = &w[r * k + b * QK..][..QK];
            let lo = x.iter().cloned().fold(f32::INFINITY, f32::min);
            let hi = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let d = (hi - lo) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            raw.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            raw.extend_from_slice(&f16::from_f32(lo).to_le_bytes());
            for j in 0..16 {
                let q0 = (((x[j] - lo) * id + 0.5) as u8).min(15);
                let q1 = (((x[j + 16] - lo) * id + 0.5) as u8).min(15);
                raw.push(q0 | (q1 << 4));
            }
        }
    }
    raw
}

fn encode_q8_0(w: &[f32], n: usize, k: usize) -> Vec<u8> {
    let mut raw = Vec::new();
    for r in 0..n {
        for b in 0..k / QK {
            let x = &w[r * k + b * QK..][..QK];
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            raw.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            for &v in x {
                raw.push((v * id).round() as i8 as u8);
            }
        }
    }
    raw
}

fn dequant_all(w: &TiledWeight) -> Vec<f32> {
    let mut out = vec![0f32; w.n() * w.k()];
    for r in 0..w.n() {
        w.row(r, &mut out[r * w.k()..(r + 1) * w.k()]);
    }
    out
}

fn reference(x: &[f32], rows: usize, wd: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    for r in 0..rows {
        for c in 0..n {
            out[r * n + c] = (0..k).map(|i| x[r * k + i] * wd[c * k + i]).sum();
        }
    }
    out
}

fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn weights() -> Vec<(&'static str, TiledWeight, usize, usize)> {
    let (n, k) = (40, 96); // n not a multiple of 16: exercises the padded tile
    let w = random(n * k, 7);
    vec![
        (
            "q4_1",
            TiledWeight::from_q4_1(&encode_q4_1(&w, n, k), n, k),
            n,
            k,
        ),
        (
            "q8_0",
            TiledWeight::from_q8_0(&encode_q8_0(&w, n, k), n, k),
            n,
            k,
        ),
        ("f32->u8", TiledWeight::from_f32(&w, n, k), n, k),
    ]
}

#[test]
fn every_format_matches_an_f32_matmul_over_its_dequantized_weights() {
    for (name, w, n, k) in weights() {
        let rows = 7;
        let x = random(rows * k, 11);
        let mut qa = QuantActs::default();
        qa.quantize(&x, rows, k);
        let mut out = vec![0f32; rows * n];
        matmul_with(KernelLevel::Portable, &qa, &w, &mut out);
        let want = reference(&x, rows, &dequant_all(&w), n, k);
        let err = max_rel_err(&out, &want);
        assert!(err < 0.02, "{name}: relative error {err}");
    }
}

#[test]
fn every_simd_kernel_equals_the_portable_kernel_bit_for_bit() {
    let levels = available_levels();
    eprintln!("kernel levels on this CPU: {levels:?}");
    for (name, w, n, k) in weights() {
        for rows in [1, 3, 4, 5, 8, 9, 13, 16, 24, 37] {
            let x = random(rows * k, rows as u64);
            let mut qa = QuantActs::default();
            qa.quantize(&x, rows, k);
            // Panels whatever the best level here, so the AVX2 panel kernel is checked on every CPU.
            qa.interleave();
            let mut want = vec![0f32; rows * n];
            matmul_with(KernelLevel::Portable, &qa, &w, &mut want);
            for &l in &levels[1..] {
                let mut got = vec![0f32; rows * n];
                matmul_with(l, &qa, &w, &mut got);
                assert_eq!(got, want, "{name} {l:?} rows={rows}");
            }
        }
    }
}

#[test]
fn extreme_u8_weights_do_not_saturate() {
    // Every 8-bit quant at 255 and every activation at ±127: the AVX2 path must split nibbles to stay exact.
    let (n, k) = (16, 64);
    let raw: Vec<u8> = (0..n * k / QK)
        .flat_map(|_| {
            let mut b = f16::from_f32(0.01).to_le_bytes().to_vec();
            b.extend(std::iter::repeat_n(127u8, QK));
            b
        })
        .collect();
    let w = TiledWeight::from_q8_0(&raw, n, k);
    let x: Vec<f32> = (0..k)
        .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
        .collect();
    let mut qa = QuantActs::default();
    qa.quantize(&x, 1, k);
    let mut want = vec![0f32; n];
    matmul_with(KernelLevel::Portable, &qa, &w, &mut want);
    for &l in &available_levels()[1..] {
        let mut got = vec![0f32; n];
        matmul_with(l, &qa, &w, &mut got);
        assert_eq!(got, want, "{l:?}");
    }
}

#[test]
fn extreme_q4_weights_do_not_overflow_the_prefill_kernel() {
    // Every 4-bit quant at 15 and every activation at +127 (or -127): a block's 16-bit partial sums reach
    // ±30480, the most the panel kernel's 16-bit accumulation must hold.
    let (n, k) = (32, 96);
    let raw: Vec<u8> = (0..n * k / QK)
        .flat_map(|_| {
            let mut b = f16::from_f32(0.01).to_le_bytes().to_vec();
            b.extend(f16::from_f32(-0.5).to_le_bytes());
            b.extend(std::iter::repeat_n(0xFFu8, QK / 2));
            b
        })
        .collect();
    let w = TiledWeight::from_q4_1(&raw, n, k);
    let rows = 16;
    let x: Vec<f32> = (0..rows * k)
        .map(|i| if (i / k) % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let mut qa = QuantActs::default();
    qa.quantize(&x, rows, k);
    qa.interleave();
    let mut want = vec![0f32; rows * n];
    matmul_with(KernelLevel::Portable, &qa, &w, &mut want);
    let exact = 0.01 * 15.0 * k as f32 - 0.5 * k as f32;
    assert!((want[0] - exact).abs() < 0.05, "{} vs {exact}", want[0]);
    for &l in &available_levels()[1..] {
        let mut got = vec![0f32; rows * n];
        matmul_with(l, &qa, &w, &mut got);
        assert_eq!(got, want, "{l:?}");
    }
}

#[test]
fn a_row_gets_the_same_bits_alone_or_in_a_batch() {
    for (name, w, n, k) in weights() {
        let rows = 9;
        let x = random(rows * k, 3);
        let mut qa = QuantActs::default();
        qa.quantize(&x, rows, k);
        let mut all = vec![0f32; rows * n];
        matmul(&qa, &w, &mut all);
        for r in 0..rows {
            let mut one = QuantActs::default();
            one.quantize(&x[r * k..(r + 1) * k], 1, k);
            let mut o = vec![0f32; n];
            matmul(&one, &w, &mut o);
            assert_eq!(&all[r * n..(r + 1) * n], &o[..], "{name} row {r}");
        }
    }
}

#[test]
#[cfg(target_arch = "x86_64")]
fn simd_activation_quantization_is_bit_identical() {
    if !avx2::available() {
        return;
    }
    let mut blocks: Vec<Vec<f32>> = (0..200).map(|i| random(QK, 900 + i)).collect();
    // Ties: with amax = 127 every x.5 lands exactly on a half; plus zeros and one huge outlier.
    blocks.push(
        (0..QK)
            .map(|i| i as f32 - 15.5)
            .chain([127.0])
            .skip(1)
            .collect(),
    );
    blocks.push(
        (0..QK)
            .map(|i| {
                if i == 0 {
                    -127.0
                } else {
                    i as f32 * 2.5 - 40.5
                }
            })
            .collect(),
    );
    blocks.push(vec![0.0; QK]);
    blocks.push((0..QK).map(|i| if i == 3 { 1e30 } else { 1.0 }).collect());
    for xs in &blocks {
        let (mut a, mut b) = ([0i8; QK], [0i8; QK]);
        let want = scalar::quantize_block(xs, &mut a);
        // SAFETY: AVX2 checked above; 32 values each.
        let got = unsafe { avx2::quantize_block(xs, &mut b) };
        assert_eq!(a, b, "quants of {xs:?}");
        assert_eq!(want.0.to_bits(), got.0.to_bits());
        assert_eq!(want.1, got.1);
    }
}

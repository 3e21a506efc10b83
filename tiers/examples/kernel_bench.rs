//! Micro-benchmark of the int8 matmul kernels on the Driver's shapes: GMAC/s per kernel level and row count.
//!
//! `cargo run --release -p nimmer-tiers --example kernel_bench [-- ROWS...]`

use std::time::Instant;

use half::f16;
use nimmer_tiers::kernels::{self, QuantActs, TiledWeight};

fn main() {
    let rows: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rows = if rows.is_empty() {
        vec![1, 16, 256]
    } else {
        rows
    };
    // SmolLM2-135M: qkv, o, gate_up, down.
    let shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)];
    let mut seed = 1u64;
    let mut rnd = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    };
    let weights: Vec<TiledWeight> = shapes
        .iter()
        .map(|&(n, k)| {
            let mut raw = Vec::new();
            for _ in 0..n * k / 32 {
                raw.extend_from_slice(&f16::from_f32(0.01).to_le_bytes());
                raw.extend_from_slice(&f16::from_f32(-0.08).to_le_bytes());
                for _ in 0..16 {
                    raw.push(((rnd() + 1.0) * 127.9) as u8);
                }
            }
            TiledWeight::from_q4_1(&raw, n, k)
        })
        .collect();
    for level in kernels::available_levels() {
        for &r in &rows {
            let acts: Vec<(QuantActs, Vec<f32>)> = shapes
                .iter()
                .map(|&(n, k)| {
                    let x: Vec<f32> = (0..r * k).map(|_| rnd()).collect();
                    let mut qa = QuantActs::default();
                    qa.quantize(&x, r, k);
                    (qa, vec![0f32; r * n])
                })
                .collect();
            let macs: usize = shapes.iter().map(|&(n, k)| n * k * r).sum();
            let reps = (2_000_000_000 / macs).max(1);
            let mut acts = acts;
            let t = Instant::now();
            for _ in 0..reps {
                for (w, (qa, out)) in weights.iter().zip(acts.iter_mut()) {
                    kernels::matmul_with(level, qa, w, out);
                }
            }
            let s = t.elapsed().as_secs_f64();
            println!(
                "{level:?} rows {r:>4}: {:6.1} GMAC/s ({:.2} ms per layer)",
                (macs * reps) as f64 / s / 1e9,
                s / reps as f64 * 1e3
            );
        }
    }
}

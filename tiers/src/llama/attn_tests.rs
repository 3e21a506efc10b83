//! Attention tests: a naive reference, batch invariance, a GQA group's shared value loads.
use super::*;

/// The reference: one row at a time, plain loops, f32 keys.
fn naive(q: &[f32], k: &[f32], v: &[f32], n: usize, hd: usize, scale: f32) -> Vec<f32> {
    let s: Vec<f32> = (0..n)
        .map(|j| (0..hd).map(|d| q[d] * k[j * hd + d]).sum::<f32>() / scale)
        .collect();
    let max = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = s.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    (0..hd)
        .map(|d| (0..n).map(|j| e[j] * v[j * hd + d]).sum::<f32>() / sum)
        .collect()
}

fn cfg() -> LlamaConfig {
    LlamaConfig {
        n_layer: 2,
        dim: 96,
        n_head: 6,
        n_kv_head: 2,
        head_dim: 16,
        ffn: 128,
        vocab: 100,
        eps: 1e-5,
        rope_base: 10000.0,
        train_context: 128,
        rope_neox: false,
        kv_f16: false,
    }
}

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
}

/// A cache of `n` random positions and `n` random query rows.
fn setup(cfg: &LlamaConfig, n: usize, seed: u64) -> (KvCache, Vec<f32>) {
    let mut s = seed;
    let mut cache = KvCache::new(cfg, n);
    for _ in 0..n {
        for layer in 0..cfg.n_layer {
            let k: Vec<f32> = (0..cfg.kv_dim()).map(|_| lcg(&mut s)).collect();
            let v: Vec<f32> = (0..cfg.kv_dim()).map(|_| lcg(&mut s)).collect();
            cache.append(layer, &k, &v);
        }
    }
    cache.len = n;
    let q = (0..n * cfg.q_dim()).map(|_| 2.0 * lcg(&mut s)).collect();
    (cache, q)
}

#[test]
fn a_groups_value_sums_equal_one_vector_at_a_time() {
    // hd 64 and 128 take the shared-load path where the CPU has AVX-512.
    let mut seed = 5u64;
    for hd in [16, 64, 128] {
        for group in 1..=5 {
            let n = 37;
            let v: Vec<f32> = (0..n * hd).map(|_| lcg(&mut seed)).collect();
            let e: Vec<Vec<f32>> = (0..group)
                .map(|_| (0..n).map(|_| lcg(&mut seed).abs()).collect())
                .collect();
            let mut got = vec![0f32; group * hd];
            weighted_values_group(group, |k| &e[k], &v, hd, &mut got);
            for (k, ek) in e.iter().enumerate() {
                let mut want = vec![0f32; hd];
                weighted_values(ek, &v, hd, &mut want);
                assert_eq!(
                    &got[k * hd..(k + 1) * hd],
                    &want[..],
                    "hd {hd} group {group}"
                );
            }
        }
    }
}

#[test]
fn matches_a_naive_reference() {
    let cfg = cfg();
    let n = 45;
    let (cache, q) = setup(&cfg, n, 7);
    let qd = cfg.q_dim();
    let mut out = vec![0f32; n * qd];
    attend(
        &cfg,
        0,
        &[&cache],
        &tasks(&[(0, n, 0)]),
        &q,
        qd,
        4.0,
        &mut out,
    );
    let KvData::F32 { k, v } = &cache.data else {
        panic!("f32 cache")
    };
    let (hd, kvd, group) = (cfg.head_dim, cfg.kv_dim(), cfg.n_head / cfg.n_kv_head);
    for r in 0..n {
        for h in 0..cfg.n_head {
            let g = h / group;
            let kh: Vec<f32> = (0..=r)
                .flat_map(|j| k[0][j * kvd + g * hd..j * kvd + (g + 1) * hd].to_vec())
                .collect();
            let vh: Vec<f32> = (0..=r)
                .flat_map(|j| v[0][j * kvd + g * hd..j * kvd + (g + 1) * hd].to_vec())
                .collect();
            let want = naive(&q[r * qd + h * hd..][..hd], &kh, &vh, r + 1, hd, 4.0);
            let got = &out[r * qd + h * hd..][..hd];
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "row {r} head {h}: {a} vs {b}");
            }
        }
    }
}

/// A row's output is bit-identical whether it is attended alone (decode), in a chunk of any length
/// starting anywhere (prefill), or next to other sequences.
#[test]
fn batch_invariant() {
    let cfg = cfg();
    let n = 53;
    let (cache, q) = setup(&cfg, n, 11);
    let (other, q2) = setup(&cfg, 20, 13);
    let qd = cfg.q_dim();
    let mut whole = vec![0f32; n * qd];
    attend(
        &cfg,
        1,
        &[&cache],
        &tasks(&[(0, n, 0)]),
        &q,
        qd,
        3.0,
        &mut whole,
    );
    for split in [1, 7, 16, 17, 40, 52] {
        // Rows split..n as one chunk, preceded by another sequence's 20 rows.
        let rows = n - split;
        let mut qq = q2.clone();
        qq.extend_from_slice(&q[split * qd..]);
        let mut out = vec![0f32; (20 + rows) * qd];
        attend(
            &cfg,
            1,
            &[&other, &cache],
            &tasks(&[(0, 20, 0), (20, rows, split)]),
            &qq,
            qd,
            3.0,
            &mut out,
        );
        assert_eq!(&out[20 * qd..], &whole[split * qd..], "chunk from {split}");
    }
    for r in [0, 15, 16, 52] {
        let mut one = vec![0f32; qd];
        attend(
            &cfg,
            1,
            &[&cache],
            &tasks(&[(0, 1, r)]),
            &q[r * qd..],
            qd,
            3.0,
            &mut one,
        );
        assert_eq!(one, whole[r * qd..(r + 1) * qd], "row {r} alone");
    }
}

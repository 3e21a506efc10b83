//! Trait-LoRAs on the real Driver model: unmerged application (the base matmul shared by the batch, each row
//! adding its own `Σ wᵢ·sᵢ·Bᵢ(Aᵢx)`) equals a model whose f32 weights were merged (`W + s·B·A`), for one adapter
//! and for a blend; rows with different adapters in one batch get exactly the logits they get alone. The
//! adapters go through the PEFT format on disk (written, then loaded and validated).

use std::sync::Arc;

use nimmer_config::Precision;
use nimmer_loras::{Adapter, Blend, LoraPair, Module, load_peft, peft::save_peft};
use nimmer_tiers::llama::{Chunk, KvCache, Llama, Workspace};

const SYSTEM: &str = "You are a helpful assistant.";

/// A random rank-`r` adapter over every projection, written as PEFT and loaded back.
fn adapter(model: &Llama, r: usize, seed: u32, dir: &std::path::Path) -> Arc<Adapter> {
    let base = model.cfg.lora_base();
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    let mut rnd = |amp: f32| {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 2.0 * amp
    };
    let layers = (0..base.n_layer)
        .map(|_| {
            Module::ALL
                .iter()
                .map(|m| {
                    let (i, o) = m.dims(&base);
                    Some(LoraPair {
                        a: (0..r * i).map(|_| rnd(0.05)).collect(),
                        b: (0..o * r).map(|_| rnd(0.05)).collect(),
                    })
                })
                .collect()
        })
        .collect();
    let a = Adapter {
        name: format!("a{seed}"),
        rank: r,
        alpha: 2.0 * r as f32,
        scale: 2.0,
        modules: Module::ALL.to_vec(),
        layers,
        size_bytes: 0,
        digest: Default::default(),
    };
    let d = dir.join(&a.name);
    save_peft(&a, &base, &d).unwrap();
    Arc::new(load_peft(&d, &a.name, &base).unwrap())
}

fn load(precision: Precision) -> Llama {
    Llama::load(&nimmer_e2e::driver_gguf(), precision, 512)
        .expect("driver loads")
        .0
}

fn logits(model: &Llama, tokens: &[u32], blend: Option<&Blend>) -> Vec<f32> {
    let mut kv = KvCache::new(&model.cfg, tokens.len());
    let mut ws = Workspace::default();
    let mut chunk = [Chunk {
        tokens,
        kv: &mut kv,
        logits: true,
        lora: blend,
    }];
    model.forward(&mut chunk, &mut ws).unwrap().remove(0)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Nine rows: seven distinct adapters (the first seven of `adapters`), a blend of the eighth and the first,
/// and one row without any adapter; each with its prompt.
fn nine_rows(
    adapters: &[Arc<Adapter>],
    tok: &nimmer_tiers::tokenizer::ChatTokenizer,
) -> (Vec<Option<Blend>>, Vec<Vec<u32>>) {
    let mut blends: Vec<Option<Blend>> = adapters[..7]
        .iter()
        .map(|a| {
            Some(Blend {
                parts: vec![(a.clone(), 1.0)],
            })
        })
        .collect();
    blends.push(Some(Blend {
        parts: vec![(adapters[7].clone(), 0.5), (adapters[0].clone(), 0.5)],
    }));
    blends.push(None);
    let users = [
        "Tell me about the harbour.",
        "Where is the market?",
        "Who guards the gate?",
    ];
    let prompts = (0..blends.len())
        .map(|i| nimmer_e2e::chat_ids(tok, SYSTEM, users[i % users.len()]))
        .collect();
    (blends, prompts)
}

/// Tolerance: f32 summation order differs between `(W + ΔW)x` and `Wx + B(Ax)`; logits are O(10).
const TOL: f32 = 2e-3;

#[test]
fn unmerged_lora_equals_merged_weights_for_one_adapter_and_a_blend() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(Precision::F32);
    let (_, tok) = Llama::load(&nimmer_e2e::driver_gguf(), Precision::F32, 16).unwrap();
    let ids = nimmer_e2e::chat_ids(&tok, SYSTEM, "Tell me about the harbour.");
    let (a1, a2) = (
        adapter(&model, 8, 1, dir.path()),
        adapter(&model, 16, 2, dir.path()),
    );
    let plain = logits(&model, &ids, None);

    let one = Blend {
        parts: vec![(a1.clone(), 1.0)],
    };
    let unmerged = logits(&model, &ids, Some(&one));
    assert!(
        max_diff(&unmerged, &plain) > 0.05,
        "the adapter must change the logits"
    );
    let mut merged_model = load(Precision::F32);
    merged_model.merge_lora(&a1, 1.0).unwrap();
    let merged = logits(&merged_model, &ids, None);
    let d = max_diff(&unmerged, &merged);
    assert!(d < TOL, "one adapter: unmerged vs merged differ by {d}");

    let blend = Blend {
        parts: vec![(a1.clone(), 0.7), (a2.clone(), 0.3)],
    };
    let unmerged = logits(&model, &ids, Some(&blend));
    let mut merged_model = load(Precision::F32);
    merged_model.merge_lora(&a1, 0.7).unwrap();
    merged_model.merge_lora(&a2, 0.3).unwrap();
    let merged = logits(&merged_model, &ids, None);
    let d = max_diff(&unmerged, &merged);
    assert!(d < TOL, "blend: unmerged vs merged differ by {d}");
}

#[test]
fn rows_with_different_adapters_in_one_batch_get_their_own_logits() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(Precision::Native);
    let (_, tok) = Llama::load(&nimmer_e2e::driver_gguf(), Precision::Native, 16).unwrap();
    let adapters: Vec<Arc<Adapter>> = (0..8)
        .map(|i| adapter(&model, 8, 10 + i, dir.path()))
        .collect();
    let (blends, prompts) = nine_rows(&adapters, &tok);
    let alone: Vec<Vec<f32>> = prompts
        .iter()
        .zip(&blends)
        .map(|(p, b)| logits(&model, p, b.as_ref()))
        .collect();
    let mut kvs: Vec<KvCache> = prompts
        .iter()
        .map(|p| KvCache::new(&model.cfg, p.len()))
        .collect();
    let mut chunks: Vec<Chunk<'_>> = prompts
        .iter()
        .zip(kvs.iter_mut())
        .zip(&blends)
        .map(|((p, kv), b)| Chunk {
            tokens: p,
            kv,
            logits: true,
            lora: b.as_ref(),
        })
        .collect();
    let together = model
        .forward(&mut chunks, &mut Workspace::default())
        .unwrap();
    for (i, (t, a)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(t, a, "row {i} differs in the batch");
    }
    // And the adapters do make the rows differ from the base model.
    let base = logits(&model, &prompts[0], None);
    assert!(max_diff(&alone[0], &base) > 0.05);
}

/// The candle decoder (how the Driver runs on CUDA; here on the CPU) with one workspace for every call, as
/// the engine holds it: blends go through its device slot tables, reused and grown across calls.
mod candle_decoder {
    use super::*;
    use candle_core::Device;
    use nimmer_tiers::llama::{CandleKv, CandleLlama, Decoder, LoraTables};

    fn load() -> CandleLlama {
        CandleLlama::load(
            &nimmer_e2e::driver_gguf(),
            Precision::F32,
            512,
            &Device::Cpu,
        )
        .expect("driver loads on candle")
        .0
    }

    fn logits(
        m: &CandleLlama,
        ws: &mut LoraTables,
        tokens: &[u32],
        blend: Option<&Blend>,
    ) -> Vec<f32> {
        let mut kv = m.new_cache(tokens.len());
        let mut chunk = [Chunk {
            tokens,
            kv: &mut kv,
            logits: true,
            lora: blend,
        }];
        m.forward(&mut chunk, ws).unwrap().remove(0)
    }

    /// Our decoder and candle's differ in f32 summation order (measured below 1e-3 on these logits).
    const CROSS_TOL: f32 = 5e-3;

    #[test]
    fn candle_decoder_applies_one_adapter_and_a_blend_like_merged_weights() {
        let dir = tempfile::tempdir().unwrap();
        let ours = super::load(Precision::F32);
        let (_, tok) = Llama::load(&nimmer_e2e::driver_gguf(), Precision::F32, 16).unwrap();
        let ids = nimmer_e2e::chat_ids(&tok, SYSTEM, "Tell me about the harbour.");
        let (a1, a2) = (
            adapter(&ours, 8, 1, dir.path()),
            adapter(&ours, 16, 2, dir.path()),
        );
        let m = load();
        let mut ws = LoraTables::default();
        let plain = logits(&m, &mut ws, &ids, None);
        let d = max_diff(&plain, &super::logits(&ours, &ids, None));
        assert!(d < CROSS_TOL, "base model: candle vs ours differ by {d}");

        for parts in [
            vec![(a1.clone(), 1.0)],
            vec![(a1.clone(), 0.7), (a2.clone(), 0.3)],
        ] {
            let blend = Blend { parts };
            let unmerged = logits(&m, &mut ws, &ids, Some(&blend));
            assert!(
                max_diff(&unmerged, &plain) > 0.05,
                "the blend must change the logits"
            );
            let mut merged = super::load(Precision::F32);
            for (a, w) in &blend.parts {
                merged.merge_lora(a, *w).unwrap();
            }
            let d = max_diff(&unmerged, &super::logits(&merged, &ids, None));
            println!(
                "{} part(s): candle unmerged vs merged: max |dlogit| {d}",
                blend.parts.len()
            );
            assert!(
                d < CROSS_TOL,
                "{} part(s): candle unmerged vs merged differ by {d}",
                blend.parts.len()
            );
        }
    }

    #[test]
    fn candle_decoder_rows_with_different_adapters_in_one_batch_get_their_own_logits() {
        let dir = tempfile::tempdir().unwrap();
        let ours = super::load(Precision::F32);
        let (_, tok) = Llama::load(&nimmer_e2e::driver_gguf(), Precision::F32, 16).unwrap();
        let adapters: Vec<Arc<Adapter>> = (0..8)
            .map(|i| adapter(&ours, if i % 2 == 0 { 8 } else { 4 }, 30 + i, dir.path()))
            .collect();
        drop(ours);
        let (blends, prompts) = nine_rows(&adapters, &tok);
        let m = load();
        let mut ws = LoraTables::default();
        // Alone, one after the other: each call reuses or fills a slot.
        let alone: Vec<Vec<f32>> = prompts
            .iter()
            .zip(&blends)
            .map(|(p, b)| logits(&m, &mut ws, p, b.as_ref()))
            .collect();
        // Together, twice (the second time every blend already has its slot), and in reverse order.
        for order in [false, true, true] {
            let mut idx: Vec<usize> = (0..prompts.len()).collect();
            if order {
                idx.reverse();
            }
            let mut kvs: Vec<CandleKv> =
                idx.iter().map(|&i| m.new_cache(prompts[i].len())).collect();
            let mut chunks: Vec<Chunk<'_, CandleKv>> = idx
                .iter()
                .zip(kvs.iter_mut())
                .map(|(&i, kv)| Chunk {
                    tokens: &prompts[i],
                    kv,
                    logits: true,
                    lora: blends[i].as_ref(),
                })
                .collect();
            let together = m.forward(&mut chunks, &mut ws).unwrap();
            for (t, &i) in together.iter().zip(&idx) {
                let d = max_diff(t, &alone[i]);
                assert!(d < 1e-3, "row {i} differs in the batch by {d}");
            }
        }
        // The adapters make rows differ from the base model, and from each other.
        let base = logits(&m, &mut ws, &prompts[0], None);
        assert!(max_diff(&alone[0], &base) > 0.05);
        assert!(max_diff(&alone[0], &alone[3]) > 0.05);
    }
}

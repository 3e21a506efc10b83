//! Driver tier end to end, on the real default model (SmolLM2-135M-Instruct, Q4_1): agreement with candle's
//! `quantized_llama` on the same file, batch invariance, and an answer a user can check.

use nimmer_config::Precision;
use nimmer_e2e::{
    chat, chat_ids, collect, driver, our_logits, reference_logits, reference_model, run,
};
use nimmer_tiers::SamplingParams;
use nimmer_tiers::llama::{KvCache, Llama, Workspace};
use nimmer_tiers::sampling::argmax;

const SYSTEM: &str = "You are a helpful assistant.";

/// Teacher-forced against the library's Q4_1 model: both see the reference's own tokens for 48 steps.
///
/// Int8 activation quantization makes a quantized transformer chaotic: a 1e-7 float-order difference
/// (our kernels vs candle's `gemm`/`vec_dot` summation order) can flip one activation's rounding, and
/// the flip cascades through later layers into logit differences of up to ~1 (measured: layers 0-7 agree to
/// 1e-6, a flip at layer 8, 0.45 at the output). Free-running greedy decoding therefore diverges from any
/// implementation that is not bit-identical at the first near-tie. This test checks every step: where the
/// reference's top-2 margin exceeds 0.3 our greedy choice must be the same (measured: disagreements only at
/// margins <= 0.15), at least 44 of 48 choices agree overall, and the mean logit difference stays small.
/// The exact-math agreement (free-running, 48 tokens) is `greedy_tokens_equal_candle_at_full_precision`.
#[test]
fn quantized_driver_agrees_with_candle_quantized_llama_token_by_token() {
    let (model, tok) = Llama::load(&nimmer_e2e::driver_gguf(), Precision::Native, 2048).unwrap();
    let prompt = chat_ids(
        &tok,
        SYSTEM,
        "Tell me a short story about a lighthouse keeper.",
    );
    let mut reference = reference_model();
    let mut kv = KvCache::new(&model.cfg, prompt.len() + 64);
    let mut ws = Workspace::default();
    let mut r = reference_logits(&mut reference, &prompt, 0);
    let mut o = our_logits(&model, &mut kv, &mut ws, &prompt);
    let (mut checked, mut agreed, mut sum_diff) = (0, 0, 0f32);
    for (step, pos) in (0..48).zip(prompt.len()..) {
        let t = argmax(&r);
        let mut sorted = r.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let margin = sorted[0] - sorted[1];
        sum_diff += r.iter().zip(&o).map(|(a, b)| (a - b).abs()).sum::<f32>() / r.len() as f32;
        agreed += usize::from(argmax(&o) == t);
        if margin > 0.3 {
            assert_eq!(argmax(&o), t, "step {step}: reference margin {margin:.3}");
            checked += 1;
        }
        r = reference_logits(&mut reference, &[t], pos);
        o = our_logits(&model, &mut kv, &mut ws, &[t]);
    }
    let mean = sum_diff / 48.0;
    assert!(
        checked >= 32,
        "only {checked} of 48 steps had a clear reference choice"
    );
    assert!(agreed >= 44, "greedy choice agreed on {agreed} of 48 steps");
    assert!(
        mean < 0.3,
        "mean absolute logit difference {mean} (measured 0.18)"
    );
}

/// The engine's greedy output at batch 1 is the same as the output of each prompt run alone through `Llama`.
#[test]
fn eight_sequences_decoded_together_get_the_tokens_each_gets_alone() {
    let h = driver();
    let users = [
        "What is the capital of France?",
        "Name three colors.",
        "Write a haiku about rain.",
        "How do I boil an egg?",
        "Say hello in Spanish.",
        "What is 2 + 2?",
        "Describe a cat in one sentence.",
        "Give me a tip for sleeping well.",
    ];
    let req = |u: &str| chat(SYSTEM, u, SamplingParams::greedy(24));
    let alone: Vec<_> = users.iter().map(|u| run(h, req(u)).tokens).collect();
    let streams: Vec<_> = users.iter().map(|u| h.generate(req(u)).unwrap()).collect();
    let together: Vec<_> = streams.into_iter().map(|rx| collect(rx).tokens).collect();
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "sequence {i} ({}) changed in a batch", users[i]);
    }
}

#[test]
fn a_sequence_joining_mid_flight_does_not_change_the_others() {
    let h = driver();
    let first = [
        "Tell me about the sea.",
        "List some fruits.",
        "Why is the sky blue?",
    ];
    let req = |u: &str, n| chat(SYSTEM, u, SamplingParams::greedy(n));
    let alone: Vec<_> = first.iter().map(|u| run(h, req(u, 40)).tokens).collect();
    let mut streams: Vec<_> = first
        .iter()
        .map(|u| h.generate(req(u, 40)).unwrap())
        .collect();
    // Wait until the first sequence is decoding, then add a long prompt that prefills in chunks.
    match streams[0].blocking_recv() {
        Some(nimmer_tiers::Event::Token { .. }) => {}
        other => panic!("expected a token, got {other:?}"),
    }
    let joiner_prompt = "Explain, step by step and in detail, how a lighthouse keeper maintained the lamp, the lens and the clockwork in the nineteenth century. ".repeat(6);
    let joiner = h.generate(req(&joiner_prompt, 8)).unwrap();
    let mut first_stream = streams.remove(0);
    let mut t0 = vec![alone[0][0]];
    t0.extend(std::iter::from_fn(|| match first_stream.blocking_recv() {
        Some(nimmer_tiers::Event::Token { id, .. }) => Some(id),
        _ => None,
    }));
    assert_eq!(t0, alone[0]);
    for (i, rx) in streams.into_iter().enumerate() {
        assert_eq!(
            collect(rx).tokens,
            alone[i + 1],
            "sequence {} changed",
            i + 1
        );
    }
    assert_eq!(collect(joiner).tokens.len(), 8);
}

#[test]
fn the_capital_of_france_is_paris() {
    let out = run(
        driver(),
        chat(
            SYSTEM,
            "What is the capital of France?",
            SamplingParams::greedy(32),
        ),
    );
    assert!(out.text.contains("Paris"), "answer: {:?}", out.text);
}

#[test]
fn stop_strings_end_generation_without_being_streamed() {
    let params = SamplingParams {
        stop: vec!["Paris".into()],
        ..SamplingParams::greedy(32)
    };
    let out = run(
        driver(),
        chat(SYSTEM, "What is the capital of France?", params),
    );
    assert!(!out.text.contains("Paris"), "{:?}", out.text);
    assert_eq!(out.done.finish_reason, nimmer_tiers::FinishReason::Stop);
}

#[test]
fn max_tokens_ends_with_length() {
    let out = run(
        driver(),
        chat(SYSTEM, "Tell me a long story.", SamplingParams::greedy(5)),
    );
    assert_eq!(out.done.completion_tokens, 5);
    assert_eq!(out.done.finish_reason, nimmer_tiers::FinishReason::Length);
}

#[test]
fn dropping_the_receiver_cancels_the_sequence() {
    let h = driver();
    let mut rx = h
        .generate(chat(
            SYSTEM,
            "Count to one thousand.",
            SamplingParams::greedy(1000),
        ))
        .unwrap();
    assert!(matches!(
        rx.blocking_recv(),
        Some(nimmer_tiers::Event::Token { .. })
    ));
    drop(rx);
    // The engine keeps serving: a new request completes.
    let out = run(h, chat(SYSTEM, "Say hi.", SamplingParams::greedy(4)));
    assert_eq!(out.done.completion_tokens, out.tokens.len());
}

#[test]
fn seeded_sampling_is_reproducible() {
    let h = driver();
    let p = SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
        top_k: 40,
        seed: Some(42),
        ..SamplingParams::greedy(16)
    };
    let a = run(h, chat(SYSTEM, "Invent a name for a tavern.", p.clone()));
    let b = run(h, chat(SYSTEM, "Invent a name for a tavern.", p));
    assert_eq!(a.tokens, b.tokens);
}

fn candle_driver() -> &'static nimmer_tiers::LlmHandle {
    static H: std::sync::OnceLock<nimmer_tiers::LlmHandle> = std::sync::OnceLock::new();
    H.get_or_init(start_candle_driver)
}

/// A Driver engine on `backend = "candle"` of its own.
fn start_candle_driver() -> nimmer_tiers::LlmHandle {
    let mut spec = nimmer_e2e::config().tiers.tiers.driver.clone();
    spec.backend = Some(nimmer_config::Backend::Candle);
    let limits = nimmer_tiers::EngineLimits::of(&nimmer_e2e::config().budgets.tiers.driver);
    nimmer_tiers::LlmHandle::start("driver", &spec, limits, &nimmer_e2e::driver_gguf()).unwrap()
}

/// With `backend = "candle"` the engine runs candle's own ops (the path CUDA uses), so on the CPU its
/// free-running greedy tokens equal the library's `quantized_llama` exactly.
#[test]
fn the_engine_on_the_candle_backend_equals_candle_quantized_llama_for_48_tokens() {
    let h = candle_driver();
    let user = "Tell me a short story about a lighthouse keeper.";
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(48)
    };
    let out = run(h, chat(SYSTEM, user, params));
    let prompt = chat_ids(&h.info().tokenizer, SYSTEM, user);
    let mut reference = reference_model();
    let mut l = reference_logits(&mut reference, &prompt, 0);
    let mut want = Vec::new();
    for pos in prompt.len()..prompt.len() + 48 {
        let t = argmax(&l);
        want.push(t);
        l = reference_logits(&mut reference, &[t], pos);
    }
    assert_eq!(out.tokens, want);
}

#[test]
fn the_candle_backend_is_batch_invariant_on_the_cpu() {
    // An engine of its own: on the shared one, another test's sequences can join the "alone" runs' batches
    // (a different batch than the one this test compares against).
    let h = &start_candle_driver();
    let users = [
        "Name three colors.",
        "What is 2 + 2?",
        "Say hello in Spanish.",
    ];
    let req = |u: &str| chat(SYSTEM, u, SamplingParams::greedy(16));
    let alone: Vec<_> = users.iter().map(|u| run(h, req(u)).tokens).collect();
    let streams: Vec<_> = users.iter().map(|u| h.generate(req(u)).unwrap()).collect();
    for (i, rx) in streams.into_iter().enumerate() {
        assert_eq!(collect(rx).tokens, alone[i], "{}", users[i]);
    }
}

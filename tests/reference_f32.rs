//! Exact-math agreement with the library: our f32 path (Theia's precision) against candle's `quantized_llama`
//! on the same GGUF with `CANDLE_DEQUANTIZE_ALL=1` (the library dequantizes every weight, so neither side
//! quantizes activations). Greedy tokens must be equal, free-running, over 48 tokens.
//! Its own test binary: the variable is read once per process by candle.

use nimmer_config::Precision;
use nimmer_e2e::{chat_ids, our_logits, reference_logits, reference_model};
use nimmer_tiers::llama::{KvCache, Llama, Workspace};
use nimmer_tiers::sampling::argmax;

#[test]
fn greedy_tokens_equal_candle_at_full_precision() {
    // SAFETY: set before any thread of this process reads the environment (single test in this binary).
    unsafe { std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1") };
    let (model, tok) = Llama::load(&nimmer_e2e::driver_gguf(), Precision::F32, 2048).unwrap();
    for user in [
        "Tell me a short story about a lighthouse keeper.",
        "What is the capital of France?",
    ] {
        let prompt = chat_ids(&tok, "You are a helpful assistant.", user);
        let mut reference = reference_model();
        let mut kv = KvCache::new(&model.cfg, prompt.len() + 64);
        let mut ws = Workspace::default();
        let (mut want, mut got) = (Vec::new(), Vec::new());
        let mut r = reference_logits(&mut reference, &prompt, 0);
        let mut o = our_logits(&model, &mut kv, &mut ws, &prompt);
        for pos in prompt.len()..prompt.len() + 48 {
            let (a, b) = (argmax(&r), argmax(&o));
            want.push(a);
            got.push(b);
            r = reference_logits(&mut reference, &[a], pos);
            o = our_logits(&model, &mut kv, &mut ws, &[b]);
        }
        assert_eq!(
            got,
            want,
            "{user}\nours: {:?}\nreference: {:?}",
            tok.decode(&got),
            tok.decode(&want)
        );
    }
}

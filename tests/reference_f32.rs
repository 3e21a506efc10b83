//! Exact-math agreement with the library: our f32 path (Theia's precision) against candle's `quantized_llama`
//! on the same GGUF with `CANDLE_DEQUANTIZE_ALL=1` (the library dequantizes every weight, so neither side
//! quantizes activations). Greedy tokens must be equal, free-running, over 48 tokens.
//! Its own test binary: the variable is read once per process by candle.

use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, IndexOp, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use nimmer_config::Precision;
use nimmer_tiers::llama::{Chunk, KvCache, Llama, Workspace};
use nimmer_tiers::sampling::argmax;
use nimmer_tiers::tokenizer::Message;

#[test]
fn greedy_tokens_equal_candle_at_full_precision() {
    // SAFETY: set before any thread of this process reads the environment (single test in this binary).
    unsafe { std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1") };
    let path = nimmer_e2e::driver_gguf();
    let (model, tok) = Llama::load(&path, Precision::F32, 2048).unwrap();
    for user in [
        "Tell me a short story about a lighthouse keeper.",
        "What is the capital of France?",
    ] {
        let prompt = tok
            .encode(
                &tok.render_chat(&[
                    Message::new("system", "You are a helpful assistant."),
                    Message::new("user", user),
                ])
                .unwrap(),
            )
            .unwrap();
        let mut f = std::fs::File::open(&path).unwrap();
        let ct = Content::read(&mut f).unwrap();
        let mut reference = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
        let mut kv = KvCache::new(&model.cfg, prompt.len() + 64);
        let mut ws = Workspace::default();
        let (mut want, mut got) = (Vec::new(), Vec::new());
        let input = Tensor::new(prompt.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut r = reference
            .forward(&input, 0)
            .unwrap()
            .i(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut o = model
            .forward(
                &mut [Chunk {
                    tokens: &prompt,
                    kv: &mut kv,
                    logits: true,
                }],
                &mut ws,
            )
            .unwrap()
            .remove(0);
        for i in 0..48 {
            let (a, b) = (argmax(&r), argmax(&o));
            want.push(a);
            got.push(b);
            let input = Tensor::new(&[a], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            r = reference
                .forward(&input, prompt.len() + i)
                .unwrap()
                .i(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            o = model
                .forward(
                    &mut [Chunk {
                        tokens: &[b],
                        kv: &mut kv,
                        logits: true,
                    }],
                    &mut ws,
                )
                .unwrap()
                .remove(0);
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

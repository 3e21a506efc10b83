//! Driver tier against the real default model (SmolLM2-135M-Instruct Q4_1).

use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, IndexOp, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use nimmer_config::Precision;
use nimmer_tiers::llama::{Chunk, KvCache, Llama, Workspace};
use nimmer_tiers::tokenizer::Message;

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy tokens from candle's own `quantized_llama` (the reference).
fn reference_greedy(prompt: &[u32], n: usize) -> Vec<u32> {
    let path = nimmer_e2e::driver_gguf();
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = Content::read(&mut f).unwrap();
    let mut model = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
    let mut out = Vec::new();
    let input = Tensor::new(prompt, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mut logits = model.forward(&input, 0).unwrap();
    let mut pos = prompt.len();
    for _ in 0..n {
        let l = logits.i(0).unwrap().to_vec1::<f32>().unwrap();
        let t = argmax(&l);
        out.push(t);
        let input = Tensor::new(&[t], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        logits = model.forward(&input, pos).unwrap();
        pos += 1;
    }
    out
}

fn ours_greedy(model: &Llama, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut kv = KvCache::new(&model.cfg, prompt.len() + n);
    let mut ws = Workspace::default();
    let mut logits = model.forward(&mut [Chunk { tokens: prompt, kv: &mut kv, logits: true }], &mut ws).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let t = argmax(&logits[0]);
        out.push(t);
        logits = model.forward(&mut [Chunk { tokens: &[t], kv: &mut kv, logits: true }], &mut ws).unwrap();
    }
    out
}

fn chat(model_tok: &nimmer_tiers::tokenizer::GgufTokenizer, system: &str, user: &str) -> Vec<u32> {
    let text = model_tok.render_chat(&[Message::new("system", system), Message::new("user", user)]).unwrap();
    model_tok.encode(&text).unwrap()
}

#[test]
fn greedy_tokens_at_batch_one_equal_candle_quantized_llama_over_48_tokens() {
    let path = nimmer_e2e::driver_gguf();
    let (model, tok) = Llama::load(&path, Precision::Native, 2048).unwrap();
    let prompt = chat(&tok, "You are a helpful assistant.", "Tell me a short story about a lighthouse keeper.");
    let want = reference_greedy(&prompt, 48);
    let got = ours_greedy(&model, &prompt, 48);
    assert_eq!(got, want, "ours: {:?}\nreference: {:?}", tok.decode(&got), tok.decode(&want));
}

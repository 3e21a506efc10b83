//! LLM tiers from a Hugging Face llama directory (`config.json`, `*.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json`). The directory is made from the Driver's GGUF: weights dequantized, q/k rows
//! un-permuted back to Hugging Face's rotate-half layout. At f32 it must behave exactly like the GGUF.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use nimmer_config::Precision;
use nimmer_e2e::{chat, chat_ids, our_logits, run};
use nimmer_tiers::fetch::{Verify, ensure_llm};
use nimmer_tiers::llama::{KvCache, Llama, Workspace, hf_name};
use nimmer_tiers::sampling::argmax;
use nimmer_tiers::{LlmHandle, SamplingParams};

const SYSTEM: &str = "You are a helpful assistant.";

/// GGUF rows of one head are (2i, 2i+1) pairs; Hugging Face keeps (i, i + d/2).
fn unpermute(w: &Tensor, heads: usize) -> Tensor {
    let (n, k) = w.dims2().unwrap();
    let hd = n / heads;
    let v = w.to_vec2::<f32>().unwrap();
    let mut out = vec![vec![0f32; k]; n];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                out[h * hd + j * hd / 2 + i] = v[h * hd + 2 * i + j].clone();
            }
        }
    }
    Tensor::new(out, &Device::Cpu).unwrap()
}

fn export_hf(dir: &Path) {
    let path = nimmer_e2e::driver_gguf();
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = Content::read(&mut f).unwrap();
    let u = |k: &str| ct.metadata[k].to_u32().unwrap();
    let (heads, kv_heads) = (
        u("llama.attention.head_count") as usize,
        u("llama.attention.head_count_kv") as usize,
    );
    let mut tensors = HashMap::new();
    for name in ct.tensor_infos.keys() {
        let mut t = ct
            .tensor(&mut f, name, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        if name.ends_with("attn_q.weight") {
            t = unpermute(&t, heads);
        } else if name.ends_with("attn_k.weight") {
            t = unpermute(&t, kv_heads);
        }
        tensors.insert(hf_name(name), t);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "model_type": "llama",
        "hidden_size": u("llama.embedding_length"),
        "intermediate_size": u("llama.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_hidden_layers": u("llama.block_count"),
        "rms_norm_eps": ct.metadata["llama.attention.layer_norm_rms_epsilon"].to_f32().unwrap(),
        "rope_theta": ct.metadata["llama.rope.freq_base"].to_f32().unwrap(),
        "max_position_embeddings": u("llama.context_length"),
        "vocab_size": 49152,
        "tie_word_embeddings": true,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let (_, tok) = Llama::load(&path, Precision::F32, 64).unwrap();
    tok.inner().save(dir.join("tokenizer.json"), false).unwrap();
    let tc = serde_json::json!({ "chat_template": tok.chat_template(), "bos_token": "<|im_start|>", "eos_token": { "content": "<|im_end|>" } });
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

fn exported() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        export_hf(d.path());
        d
    })
    .path()
}

#[test]
fn a_hugging_face_directory_runs_exactly_like_the_gguf_at_full_precision() {
    let (gguf, gtok) = Llama::load(&nimmer_e2e::driver_gguf(), Precision::F32, 512).unwrap();
    let (hf, htok) = Llama::load(exported(), Precision::F32, 512).unwrap();
    assert!(hf.cfg.rope_neox && !gguf.cfg.rope_neox);
    let prompt = chat_ids(&gtok, SYSTEM, "What is the capital of France?");
    assert_eq!(
        chat_ids(&htok, SYSTEM, "What is the capital of France?"),
        prompt
    );
    assert_eq!(htok.eos_ids, gtok.eos_ids);
    let mut out = [Vec::new(), Vec::new()];
    for (m, o) in [&gguf, &hf].into_iter().zip(out.iter_mut()) {
        let mut kv = KvCache::new(&m.cfg, prompt.len() + 40);
        let mut ws = Workspace::default();
        let mut l = our_logits(m, &mut kv, &mut ws, &prompt);
        for _ in 0..32 {
            let t = argmax(&l);
            o.push(t);
            l = our_logits(m, &mut kv, &mut ws, &[t]);
        }
    }
    assert_eq!(
        out[0],
        out[1],
        "gguf: {:?}\nhf: {:?}",
        gtok.decode(&out[0]),
        htok.decode(&out[1])
    );
}

#[test]
fn a_tier_configured_with_a_llama_safetensors_model_serves_requests() {
    let dir = exported();
    let model = format!(
        "[models.hf-smollm]\nformat = \"llama-safetensors\"\ndir = \"{}\"\nfiles = [{{ name = \"config.json\" }}, {{ name = \"model.safetensors\" }}, {{ name = \"tokenizer.json\" }}, {{ name = \"tokenizer_config.json\" }}]\n",
        dir.display()
    );
    let cfg = nimmer_e2e::config_with_driver_model("hf-smollm", &model);
    let path = ensure_llm(&cfg.tiers, "hf-smollm", Verify::Cached).unwrap();
    assert_eq!(path, dir);
    // Native precision requantizes f32 weights to 8-bit blocks.
    let h = LlmHandle::start(
        "driver",
        &cfg.tiers.tiers.driver,
        nimmer_tiers::EngineLimits::of(&cfg.budgets.tiers.driver),
        &path,
    )
    .unwrap();
    let out = run(
        &h,
        chat(
            SYSTEM,
            "What is the capital of France?",
            SamplingParams::greedy(24),
        ),
    );
    assert!(out.text.contains("Paris"), "{:?}", out.text);
}

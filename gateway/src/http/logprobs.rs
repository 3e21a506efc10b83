//! Token log probabilities in OpenAI's two shapes: chat's `logprobs.content` (one entry per token: its
//! text, log probability, UTF-8 bytes and the most likely alternatives) and the legacy completions'
//! `logprobs` (parallel `tokens`, `token_logprobs`, `top_logprobs` maps and `text_offset`).

use nimmer_tiers::TokenLogprobs;
use serde_json::{Value, json};

/// Chat's `choices[].logprobs`: `{"content": [...]}`.
pub(super) fn chat(tokens: &[TokenLogprobs]) -> Value {
    let entry = |t: &str, lp: f32| json!({ "token": t, "logprob": lp, "bytes": t.as_bytes() });
    let content: Vec<Value> = tokens
        .iter()
        .map(|l| {
            let mut e = entry(&l.token, l.logprob);
            e["top_logprobs"] = l.top.iter().map(|(_, t, lp)| entry(t, *lp)).collect();
            e
        })
        .collect();
    json!({ "content": content })
}

/// The completions' `choices[].logprobs`, its text offsets counted from `offset` (bytes).
pub(super) fn completion(tokens: &[TokenLogprobs], offset: usize) -> Value {
    let mut at = offset;
    let mut text_offset = Vec::with_capacity(tokens.len());
    for t in tokens {
        text_offset.push(at);
        at += t.token.len();
    }
    let top: Vec<serde_json::Map<String, Value>> = tokens
        .iter()
        .map(|l| {
            l.top
                .iter()
                .map(|(_, t, lp)| (t.clone(), json!(lp)))
                .collect()
        })
        .collect();
    json!({
        "tokens": tokens.iter().map(|t| t.token.as_str()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}

//! The server-sent events of a streamed (chat) completion, turned back into [`Event`]s: tokens, the usage the
//! server reports, its mid-stream `{"error"}` chunks, and the connection going away before the end.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use nimmer_tiers::{Completion, Event, FinishReason};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;

use super::{Inner, short, until};
use crate::tier::Health;

/// One streamed chunk of a (chat) completion, the fields we read.
#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    /// `completions` streams the text here.
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: usize,
}

/// Reads the server-sent events into `tx` until the stream ends, the receiver goes away (dropping the
/// response cancels on the server) or the deadline passes before the first token.
pub(super) async fn relay(
    t: Arc<Inner>,
    resp: reqwest::Response,
    tx: mpsc::UnboundedSender<Event>,
    mut deadline: Option<tokio::time::Instant>,
    started: Instant,
    prompt_tokens: usize,
) {
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut tokens = 0usize;
    let mut ttft_ms = 0.0;
    let mut finish: Option<String> = None;
    let mut usage: Option<Usage> = None;
    let end = loop {
        let next = tokio::select! {
            _ = tx.closed() => return,
            n = until(deadline, body.next()) => n,
        };
        let bytes = match next {
            None => break Some(Event::Expired),
            // A server that closes after its last chunk without `[DONE]` still finished.
            Some(None) if finish.is_some() => break None,
            Some(None) => break Some(closed(&t, "the stream ended")),
            Some(Some(Err(e))) => break Some(closed(&t, &short(&e))),
            Some(Some(Ok(b))) => b,
        };
        buf.extend_from_slice(&bytes);
        let mut done = false;
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim_start();
            if data == "[DONE]" {
                done = true;
                break;
            }
            let chunk: Chunk = match serde_json::from_str(data) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(tier = %t.tier, error = %e, "an unreadable chunk from the remote tier");
                    continue;
                }
            };
            if let Some(e) = chunk.error {
                let _ = tx.send(Event::Error(format!(
                    "the {} server failed mid-stream: {e}",
                    t.tier
                )));
                return;
            }
            if let Some(u) = chunk.usage {
                usage = Some(u);
            }
            for c in chunk.choices {
                let text = c.delta.and_then(|d| d.content).or(c.text);
                if let Some(text) = text.filter(|s| !s.is_empty()) {
                    if tokens == 0 {
                        ttft_ms = started.elapsed().as_secs_f64() * 1e3;
                        // Running now: the deadline no longer applies (as in the local engine).
                        deadline = None;
                    }
                    tokens += 1;
                    if tx
                        .send(Event::Token {
                            id: 0,
                            text,
                            logprobs: None,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
                if c.finish_reason.is_some() {
                    finish = c.finish_reason;
                }
            }
        }
        if done {
            break None;
        }
    };
    let _ = tx.send(end.unwrap_or_else(|| {
        Event::Done(Completion {
            finish_reason: match finish.as_deref() {
                Some("length") => FinishReason::Length,
                _ => FinishReason::Stop,
            },
            prompt_tokens: usage.as_ref().map_or(prompt_tokens, |u| u.prompt_tokens),
            cached_tokens: usage
                .as_ref()
                .and_then(|u| u.prompt_tokens_details.as_ref())
                .map_or(0, |d| d.cached_tokens),
            completion_tokens: usage.as_ref().map_or(tokens, |u| u.completion_tokens),
            queue_ms: 0.0,
            ttft_ms,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }));
}

/// The stream closed before the generation ended: the server or the connection went away.
fn closed(t: &Inner, why: &str) -> Event {
    t.set_health(Health::Down {
        reason: format!("{}: {why} mid-generation", t.base),
    });
    Event::Error(format!(
        "the {} server: {why} before the generation ended",
        t.tier
    ))
}

//! `POST /v1/completions`: OpenAI's text completions (a raw prompt, encoded as is: no chat template) on
//! `driver` or `theia`, whole or streamed as `text_completion` chunks ending in `[DONE]`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use nimmer_tiers::{Prompt, TokenLogprobs};
use serde_json::json;

use super::{ValidJson, openai};
use crate::api::{CompletionRequest, Usage};
use crate::error::ApiError;
use crate::state::Gateway;

pub(super) async fn completions(
    State(gw): State<Arc<Gateway>>,
    ValidJson(req): ValidJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let (text, params) = req.parts()?;
    let prompt = Prompt::Text(text);
    let mut running = openai::start(&gw, &req.model, req.user.as_deref(), &prompt, &params).await?;
    let id = format!("cmpl-{}-{}", running.tier.as_str(), running.permit.id);
    openai::stoppable(&gw, &mut running, &id);
    let (created, model) = (openai::now_s(), req.model.clone());
    if !req.stream {
        let (text, done) = running.collect().await?;
        let lp = params
            .logprobs
            .map(|_| super::logprobs::completion(&running.logprobs, 0));
        return Ok(Json(json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{ "index": 0, "text": text, "logprobs": lp, "finish_reason": done.finish_reason }],
            "usage": Usage::of(done.prompt_tokens, done.cached_tokens, done.completion_tokens).openai(),
        }))
        .into_response());
    }
    // Streamed text offsets run on from chunk to chunk.
    let offset = std::sync::atomic::AtomicUsize::new(0);
    let chunk = move |text: Option<String>,
                      finish: Option<serde_json::Value>,
                      usage: Option<Usage>,
                      lp: Option<&TokenLogprobs>| {
        let lp = lp.map(|l| {
            let at = offset.fetch_add(l.token.len(), std::sync::atomic::Ordering::Relaxed);
            super::logprobs::completion(std::slice::from_ref(l), at)
        });
        let mut c = json!({ "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{ "index": 0, "text": text.unwrap_or_default(), "logprobs": lp, "finish_reason": finish }] });
        if let Some(u) = usage {
            c["usage"] = u.openai();
        }
        SseEvent::default().data(c.to_string())
    };
    Ok(openai::stream(running, None, Box::new(chunk)))
}

//! `POST /v1/completions`: OpenAI's text completions (a raw prompt, encoded as is: no chat template) on
//! `driver` or `theia`, whole or streamed as `text_completion` chunks ending in `[DONE]`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use nimmer_tiers::{Event, Prompt};
use serde_json::json;

use super::ValidJson;
use crate::admission::{Ask, Target};
use crate::api::{CompletionRequest, Usage};
use crate::dialog;
use crate::error::ApiError;
use crate::state::Gateway;

pub(super) async fn completions(
    State(gw): State<Arc<Gateway>>,
    ValidJson(req): ValidJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let tier = super::openai::tier_of(&req.model)?;
    let (text, params) = req.parts()?;
    let zone = req.user.clone().unwrap_or_else(|| "_openai".into());
    crate::api::check_token("user", &zone)?;
    let prompt = Prompt::Text(text);
    let mut running = dialog::start(
        &gw,
        Ask {
            target: Target::Tier(tier),
            zone: &zone,
            priority: 0,
            deadline: None,
            prompt: &prompt,
            params: &params,
            traits: None,
        },
    )
    .await?;
    let id = format!("cmpl-{}", running.permit.id);
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let model = req.model.clone();
    if !req.stream {
        let (text, done) = running.collect().await?;
        return Ok(Json(json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{ "index": 0, "text": text, "logprobs": null, "finish_reason": done.finish_reason }],
            "usage": Usage::of(done.prompt_tokens, done.cached_tokens, done.completion_tokens).openai(),
        }))
        .into_response());
    }
    let chunk = move |text: &str, finish: Option<serde_json::Value>, usage: Option<Usage>| {
        let mut c = json!({ "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }] });
        if let Some(u) = usage {
            c["usage"] = u.openai();
        }
        SseEvent::default().data(c.to_string())
    };
    let events = async_stream::stream! {
        while let Some(ev) = running.next().await {
            match ev {
                Event::Token { text, .. } => yield chunk(&text, None, None),
                Event::Done(c) => {
                    let usage = Usage::of(c.prompt_tokens, c.cached_tokens, c.completion_tokens);
                    yield chunk("", Some(json!(c.finish_reason)), Some(usage));
                    yield SseEvent::default().data("[DONE]");
                    return;
                }
                Event::Error(e) => {
                    tracing::error!(error = %e, "generation failed mid-stream");
                    break;
                }
                Event::Expired => break,
            }
        }
        yield SseEvent::default()
            .event("error")
            .data(json!({ "error": "internal error" }).to_string());
    };
    Ok(Sse::new(events.map(Ok::<_, Infallible>)).into_response())
}

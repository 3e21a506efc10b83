//! `POST /v1/chat/completions`: the OpenAI-compatible chat endpoint (`model` = `driver` or `theia`; the
//! `user` field, when given, is the zone), whole or streamed as `chat.completion.chunk`s ending in `[DONE]`;
//! `GET /v1/models` lists them, Saturn (embeddings) and each trait-LoRA adapter as `driver:<adapter>` (the
//! Driver in that adapter's voice); OpenAI clients and remote-tier probes read it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use nimmer_tiers::{Event, Prompt, SamplingParams, TokenLogprobs};
use serde_json::json;

use super::ValidJson;
use crate::Tier;
use crate::admission::{Ask, Target};
use crate::api::{ChatRequest, Usage};
use crate::dialog;
use crate::error::ApiError;
use crate::state::Gateway;

pub(super) async fn models(State(gw): State<Arc<Gateway>>) -> Json<serde_json::Value> {
    let model = |id: &str, owned_by: &str| json!({ "id": id, "object": "model", "created": 0, "owned_by": owned_by });
    let mut data = vec![
        model("driver", "nimmer"),
        model("theia", "nimmer"),
        model("saturn", "nimmer"),
    ];
    let live = gw.live();
    let adapters: std::collections::BTreeSet<&String> =
        live.config.budgets.traits.values().collect();
    data.extend(
        adapters
            .iter()
            .map(|a| model(&format!("driver:{a}"), "driver")),
    );
    Json(json!({ "object": "list", "data": data }))
}

/// The LLM tier an OpenAI `model` names, and for `driver:<adapter>` the traits that select the adapter.
pub(super) fn tier_of(
    gw: &Gateway,
    model: &str,
) -> Result<(Tier, Option<BTreeMap<String, f32>>), ApiError> {
    match model {
        "driver" => Ok((Tier::Driver, None)),
        "theia" => Ok((Tier::Theia, None)),
        other => match other.strip_prefix("driver:") {
            Some(adapter) => {
                let live = gw.live();
                let traits = &live.config.budgets.traits;
                match traits.iter().find(|(_, a)| *a == adapter) {
                    Some((t, _)) => Ok((Tier::Driver, Some([(t.clone(), 1.0)].into()))),
                    None => Err(ApiError::invalid(
                        "model",
                        format!(
                            "no trait voices the adapter `{adapter}` (GET /v1/models lists them)"
                        ),
                    )),
                }
            }
            None => Err(ApiError::invalid(
                "model",
                format!("unknown model `{other}` (driver, theia, driver:<adapter>)"),
            )),
        },
    }
}

/// Starts a generation for an OpenAI route: on the tier `model` names, in the zone `user` names (default
/// `_openai`).
pub(super) async fn start(
    gw: &Gateway,
    model: &str,
    user: Option<&str>,
    prompt: &Prompt,
    params: &SamplingParams,
) -> Result<dialog::Running, ApiError> {
    let (tier, traits) = tier_of(gw, model)?;
    let zone = user.unwrap_or("_openai");
    crate::api::check_token("user", zone)?;
    dialog::start(
        gw,
        Ask {
            target: Target::Tier(tier),
            zone,
            priority: 0,
            deadline: None,
            prompt,
            params,
            traits: traits.as_ref(),
        },
    )
    .await
}

/// Makes a started OpenAI generation stoppable by its response `id` (`DELETE /v1/requests/{id}`).
pub(super) fn stoppable(gw: &Gateway, running: &mut dialog::Running, id: &str) {
    running.watch(gw.requests().register(id, None, false));
}

/// Unix seconds (a response's `created`).
pub(super) fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One SSE chunk of an OpenAI stream: `(text, finish_reason, usage, the token's logprobs)`.
pub(super) type Chunk = dyn Fn(Option<String>, Option<serde_json::Value>, Option<Usage>, Option<&TokenLogprobs>) -> SseEvent
    + Send
    + 'static;

/// A running generation as OpenAI's SSE: `head` first if given, then `chunk(Some(text), None, None, lp)`
/// per token, `chunk(None, finish_reason, usage, None)` at the end and `[DONE]`; an `error` event if it
/// fails or is stopped.
pub(super) fn stream(
    mut running: dialog::Running,
    head: Option<SseEvent>,
    chunk: Box<Chunk>,
) -> Response {
    let events = async_stream::stream! {
        if let Some(h) = head {
            yield h;
        }
        while let Some(ev) = running.next().await {
            match ev {
                Event::Token { text, logprobs, .. } => yield chunk(Some(text), None, None, logprobs.as_deref()),
                Event::Done(c) => {
                    let usage = Usage::of(c.prompt_tokens, c.cached_tokens, c.completion_tokens);
                    yield chunk(None, Some(json!(c.finish_reason)), Some(usage), None);
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
        let error = match &running.cancelled {
            Some(why) => json!({ "error": { "message": format!("the request was {why}"), "type": "cancelled", "code": 409 } }),
            None => json!({ "error": { "message": "internal error", "type": "internal", "code": 500 } }),
        };
        yield SseEvent::default().event("error").data(error.to_string());
    };
    Sse::new(events.map(Ok::<_, Infallible>)).into_response()
}

pub(super) async fn chat(
    State(gw): State<Arc<Gateway>>,
    ValidJson(req): ValidJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let params = req.params()?;
    let prompt = Prompt::Chat(req.messages.clone());
    let mut running = start(&gw, &req.model, req.user.as_deref(), &prompt, &params).await?;
    let id = format!("chatcmpl-{}-{}", running.tier.as_str(), running.permit.id);
    stoppable(&gw, &mut running, &id);
    let (created, model) = (now_s(), req.model.clone());
    if !req.stream {
        let (text, done) = running.collect().await?;
        let lp = params
            .logprobs
            .map(|_| super::logprobs::chat(&running.logprobs));
        return Ok(Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{ "index": 0, "message": { "role": "assistant", "content": text }, "logprobs": lp, "finish_reason": done.finish_reason }],
            "usage": Usage::of(done.prompt_tokens, done.cached_tokens, done.completion_tokens).openai(),
        }))
        .into_response());
    }
    let chunk = move |text: Option<String>,
                      finish: Option<serde_json::Value>,
                      usage: Option<Usage>,
                      lp: Option<&TokenLogprobs>| {
        let delta = match text {
            Some(t) => json!({ "content": t }),
            None if finish.is_none() => json!({ "role": "assistant", "content": "" }),
            None => json!({}),
        };
        let lp = lp.map(|l| super::logprobs::chat(std::slice::from_ref(l)));
        let mut c = json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{ "index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish }] });
        if let Some(u) = usage {
            c["usage"] = u.openai();
        }
        SseEvent::default().data(c.to_string())
    };
    let head = chunk(None, None, None, None);
    Ok(stream(running, Some(head), Box::new(chunk)))
}

//! The HTTP front (axum): thin handlers that parse, call [`Gateway`], and shape responses (JSON or SSE).
//! A response stream owns its slot permit and the engine's receiver, so a client that disconnects frees its
//! slot and cancels its sequence.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use nimmer_tiers::{Completion, Event, GenerateRequest, Prompt};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::api::{
    ChatRequest, ClassifyRequest, Dialog, DialogRequest, DialogResponse, Kind, SlotInfo, Timings,
    Usage, Work,
};
use crate::core::{Gateway, Running, Tier};
use crate::error::ApiError;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 256 * 1024;

/// The router over a gateway; tests drive it on `127.0.0.1:0`.
pub fn app(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/dialog", post(dialog))
        .route("/v1/classify", post(classify))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/zones", get(zones))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|| async {
                Json(json!({ "ready": true, "tiers": ["driver", "theia", "saturn"] }))
            }),
        )
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(gw)
}

/// JSON body whose errors name the field (`sampling.temperature`), with 400/413/415/422 as fits.
pub struct ValidJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ValidJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| match e.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge { limit: BODY_LIMIT },
                _ => ApiError::Malformed {
                    message: e.body_text(),
                },
            })?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(de)
            .map(ValidJson)
            .map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                match inner.classify() {
                    serde_json::error::Category::Data => ApiError::invalid(
                        if path == "." {
                            "body".to_string()
                        } else {
                            path
                        },
                        inner.to_string(),
                    ),
                    _ => ApiError::Malformed {
                        message: inner.to_string(),
                    },
                }
            })
    }
}

fn usage(c: &Completion) -> Usage {
    Usage {
        prompt_tokens: c.prompt_tokens,
        completion_tokens: c.completion_tokens,
        total_tokens: c.prompt_tokens + c.completion_tokens,
    }
}

/// Where a generation ran: what a response reports besides the text and the completion.
struct Served {
    tier: Tier,
    slot: SlotInfo,
    degraded_reason: Option<String>,
}

impl Served {
    fn of(r: &Running) -> Self {
        Self {
            tier: r.tier,
            slot: SlotInfo {
                zone: r.permit.zone.clone(),
                id: r.permit.id,
            },
            degraded_reason: r.degraded_reason.clone(),
        }
    }
}

fn response(d: &Dialog, s: &Served, text: String, done: &Completion) -> DialogResponse {
    DialogResponse {
        uid: d.uid.clone(),
        text,
        tier: s.tier.name().into(),
        adapters: Vec::new(),
        finish_reason: Some(done.finish_reason),
        usage: usage(done),
        timings: Timings {
            queue_ms: done.queue_ms,
            ttft_ms: done.ttft_ms,
            total_ms: done.total_ms,
        },
        slot: s.slot.clone(),
        degraded: s.degraded_reason.is_some(),
        degraded_reason: s.degraded_reason.clone(),
        classification: None,
    }
}

/// Runs a generation to its end, returning the text and the completion.
async fn finish(r: &mut Running) -> Result<(String, Completion), ApiError> {
    let mut text = String::new();
    let mut ev = Some(std::mem::replace(&mut r.first, Event::Error(String::new())));
    loop {
        let next = match ev.take() {
            Some(e) => Some(e),
            None => r.events.recv().await,
        };
        match next {
            Some(Event::Token { text: t, .. }) => text.push_str(&t),
            Some(Event::Done(c)) => return Ok((text, c)),
            Some(Event::Error(e)) => return Err(ApiError::Internal(e)),
            None => {
                return Err(ApiError::Unavailable {
                    tier: r.tier.name().into(),
                });
            }
        }
    }
}

/// Streams a generation's events; the stream owns the slot permit.
fn token_stream(mut r: Running) -> impl Stream<Item = Event> {
    async_stream::stream! {
        let first = std::mem::replace(&mut r.first, Event::Error(String::new()));
        let done = matches!(first, Event::Done(_));
        yield first;
        if !done {
            while let Some(ev) = r.events.recv().await {
                let end = matches!(ev, Event::Done(_) | Event::Error(_));
                yield ev;
                if end {
                    break;
                }
            }
        }
        drop(r);
    }
}

async fn dialog(
    State(gw): State<Arc<Gateway>>,
    ValidJson(req): ValidJson<DialogRequest>,
) -> Result<Response, ApiError> {
    let d = req.validate()?;
    let uid = format!(
        "{}/{}/{}/{}",
        d.uid.gm_event, d.uid.district, d.uid.scene, d.uid.slot
    );
    tracing::info!(uid = %uid, zone = %d.zone, kind = ?d.kind, "dialog");
    if let Work::Classify { classifier, input } = &d.work {
        let (permit, _) = gw
            .route(Kind::Classify, &d.zone, d.priority, d.deadline_ms)
            .await?;
        let t = std::time::Instant::now();
        let mut out = gw
            .saturn()
            .classify(classifier, vec![input.clone()])
            .await?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let resp = DialogResponse {
            uid: d.uid.clone(),
            text: out[0].label.clone(),
            tier: Tier::Saturn.name().into(),
            adapters: Vec::new(),
            finish_reason: None,
            usage: Usage {
                prompt_tokens: 0,
                completion_tokens: 0,
                total_tokens: 0,
            },
            timings: Timings {
                queue_ms: 0.0,
                ttft_ms: ms,
                total_ms: ms,
            },
            slot: SlotInfo {
                zone: permit.zone.clone(),
                id: permit.id,
            },
            degraded: false,
            degraded_reason: None,
            classification: out.pop(),
        };
        return Ok(Json(resp).into_response());
    }
    let mut running = gw.dialog(&d).await?;
    if !d.stream {
        let (text, done) = finish(&mut running).await?;
        return Ok(Json(response(&d, &Served::of(&running), text, &done)).into_response());
    }
    let served = Served::of(&running);
    let mut text = String::new();
    let events = futures::StreamExt::map(
        token_stream(running),
        move |ev| -> Result<SseEvent, Infallible> {
            Ok(match ev {
                Event::Token { id, text: t } => {
                    text.push_str(&t);
                    SseEvent::default()
                        .event("token")
                        .data(json!({ "id": id, "text": t }).to_string())
                }
                Event::Done(c) => {
                    let body = response(&d, &served, std::mem::take(&mut text), &c);
                    SseEvent::default()
                        .event("done")
                        .data(serde_json::to_string(&body).unwrap_or_default())
                }
                Event::Error(e) => {
                    tracing::error!(error = %e, "generation failed mid-stream");
                    SseEvent::default()
                        .event("error")
                        .data(json!({ "error": "internal error", "kind": "internal" }).to_string())
                }
            })
        },
    );
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn classify(
    State(gw): State<Arc<Gateway>>,
    ValidJson(req): ValidJson<ClassifyRequest>,
) -> Result<Response, ApiError> {
    if req.inputs.is_empty() || req.inputs.len() > 64 {
        return Err(ApiError::invalid("inputs", "give 1 to 64 inputs"));
    }
    let _permit = gw.slot(Tier::Saturn, "_classify", 0, None).await?;
    let out = gw.saturn().classify(&req.classifier, req.inputs).await?;
    Ok(Json(json!({ "classifier": req.classifier, "results": out })).into_response())
}

async fn chat(
    State(gw): State<Arc<Gateway>>,
    ValidJson(req): ValidJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let tier = match req.model.as_str() {
        "driver" => Tier::Driver,
        "theia" => Tier::Theia,
        other => {
            return Err(ApiError::invalid(
                "model",
                format!("unknown model `{other}` (driver, theia)"),
            ));
        }
    };
    let params = req.params()?;
    let zone = req.user.clone().unwrap_or_else(|| "_openai".into());
    if crate::api::check_token("user", &zone).is_err() {
        return Err(ApiError::invalid(
            "user",
            "must be a NATS-safe token (letters, digits, '-', '_')",
        ));
    }
    let permit = gw.slot(tier, &zone, 0, None).await?;
    let mut running = gw
        .generate(
            permit,
            None,
            GenerateRequest {
                prompt: Prompt::Chat(req.messages.clone()),
                params,
            },
            None,
        )
        .await?;
    let id = format!("chatcmpl-{}", running.permit.id);
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let model = req.model.clone();
    if !req.stream {
        let (text, done) = finish(&mut running).await?;
        return Ok(Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": done.finish_reason }],
            "usage": usage(&done),
        }))
        .into_response());
    }
    let chunk = move |delta: serde_json::Value,
                      finish: Option<serde_json::Value>,
                      usage: Option<Usage>| {
        let mut c = json!({ "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }] });
        if let Some(u) = usage {
            c["usage"] = json!(u);
        }
        SseEvent::default().data(c.to_string())
    };
    let head = chunk(json!({ "role": "assistant", "content": "" }), None, None);
    let body = futures::StreamExt::map(token_stream(running), move |ev| match ev {
        Event::Token { text, .. } => chunk(json!({ "content": text }), None, None),
        Event::Done(c) => chunk(json!({}), Some(json!(c.finish_reason)), Some(usage(&c))),
        Event::Error(e) => {
            tracing::error!(error = %e, "generation failed mid-stream");
            SseEvent::default()
                .event("error")
                .data(json!({ "error": "internal error" }).to_string())
        }
    });
    let all = futures::StreamExt::chain(futures::stream::once(async move { head }), body);
    let all = futures::StreamExt::chain(
        all,
        futures::stream::once(async { SseEvent::default().data("[DONE]") }),
    );
    Ok(Sse::new(futures::StreamExt::map(all, Ok::<_, Infallible>)).into_response())
}

async fn zones(State(gw): State<Arc<Gateway>>) -> Json<serde_json::Value> {
    Json(json!({ "zones": gw.zones() }))
}

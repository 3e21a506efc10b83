//! The HTTP front (axum): thin handlers that parse, call [`Gateway`], and shape responses (JSON or SSE).
//! A response stream owns its slot permit and the engine's receiver, so a client that disconnects frees its
//! slot and cancels its sequence. NPC routes and ops routes sit behind separate optional bearer tokens
//! (a tower layer each); `/healthz` and `/readyz` are open.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::Stream;
use nimmer_loras::LoraError;
use nimmer_tiers::{Event, Prompt};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::api::{ChatRequest, ClassifyRequest, DialogRequest, Usage, Work};
use crate::core::{Gateway, Generation, Running, Target, Tier};
use crate::dialog::{self, Served, finish, response, usage};
use crate::error::ApiError;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 256 * 1024;

/// Bearer tokens: NPC services (dialog, classify, chat) and ops (zones, config, metrics) each accept any
/// token of their list; an empty list leaves those routes open.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    pub npc: Vec<String>,
    pub ops: Vec<String>,
}

/// A tower layer admitting requests that carry one of `tokens` as `Authorization: Bearer ...`.
async fn require_bearer(
    State(tokens): State<Arc<Vec<String>>>,
    req: Request,
    next: Next,
) -> Response {
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compare every token in full so timing does not tell which prefix matched.
    let ok = given.is_some_and(|g| {
        tokens.iter().fold(false, |acc, t| {
            acc | (t.len() == g.len()
                && t.bytes().zip(g.bytes()).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0)
        })
    });
    if ok {
        next.run(req).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

fn guarded(r: Router<Arc<Gateway>>, tokens: Vec<String>) -> Router<Arc<Gateway>> {
    if tokens.is_empty() {
        r
    } else {
        r.layer(middleware::from_fn_with_state(
            Arc::new(tokens),
            require_bearer,
        ))
    }
}

/// The router over a gateway; tests drive it on `127.0.0.1:0`.
pub fn app(gw: Arc<Gateway>, auth: Auth) -> Router {
    let npc = Router::new()
        .route("/v1/dialog", post(post_dialog))
        .route("/v1/classify", post(classify))
        .route("/v1/chat/completions", post(chat));
    let ops = Router::new()
        .route("/v1/zones", get(zones))
        .route("/v1/zones/{id}", put(put_zone))
        .route("/v1/config", get(config))
        .route("/v1/adapters", get(list_adapters).post(load_adapter))
        .route("/v1/adapters/prefetch", post(prefetch_adapters))
        .route("/v1/adapters/{name}", axum::routing::delete(delete_adapter))
        .route("/metrics", get(prometheus));
    Router::new()
        .merge(guarded(npc, auth.npc))
        .merge(guarded(ops, auth.ops))
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

/// Streams a generation's events; the stream owns the slot permit.
fn token_stream(mut r: Running) -> impl Stream<Item = Event> {
    async_stream::stream! {
        while let Some(ev) = r.next().await {
            let end = matches!(ev, Event::Done(_) | Event::Error(_));
            yield ev;
            if end {
                break;
            }
        }
        drop(r);
    }
}

async fn post_dialog(
    State(gw): State<Arc<Gateway>>,
    ValidJson(req): ValidJson<DialogRequest>,
) -> Result<Response, ApiError> {
    let d = req.validate()?;
    let uid = format!(
        "{}/{}/{}/{}",
        d.uid.gm_event, d.uid.district, d.uid.scene, d.uid.slot
    );
    let span =
        tracing::info_span!("dialog", uid = %uid, zone = %d.zone, kind = ?d.kind, front = "http");
    tracing::Instrument::instrument(run_dialog(gw, d), span).await
}

async fn run_dialog(gw: Arc<Gateway>, d: crate::api::Dialog) -> Result<Response, ApiError> {
    tracing::debug!(stream = d.stream, "dialog accepted");
    if matches!(d.work, Work::Classify { .. }) || !d.stream {
        let resp = dialog::complete(&gw, &d).await?;
        return Ok(Json(resp).into_response());
    }
    let running = gw.dialog(&d).await?;
    let served = Served::of(&running);
    let mut text = String::new();
    let gw = gw.clone();
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
                    gw.publish_result(&d, &body);
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
    let mut running = gw
        .generate(Generation {
            target: Target::Tier(tier),
            zone: &zone,
            priority: 0,
            deadline_ms: None,
            prompt: Prompt::Chat(req.messages.clone()),
            params,
            traits: None,
        })
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

/// `PUT /v1/zones/{id}` body.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PutZone {
    #[serde(default)]
    class: Option<String>,
}

async fn put_zone(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req: PutZone = if body.iter().all(u8::is_ascii_whitespace) {
        PutZone::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => ApiError::invalid("class", e.to_string()),
            _ => ApiError::Malformed {
                message: e.to_string(),
            },
        })?
    };
    let class = gw.put_zone(&id, req.class.as_deref())?;
    Ok(Json(json!({ "zone": id, "class": class })))
}

/// The configuration in effect: its version, origin and every value (models, tiers, classifiers, budgets).
async fn config(State(gw): State<Arc<Gateway>>) -> Json<serde_json::Value> {
    let live = gw.live();
    let c = &live.config;
    let applied = live
        .applied_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Json(json!({
        "version": live.version,
        "applied_at_ms": applied,
        "origin": c.origin,
        "budgets": c.budgets,
        "tiers": c.tiers,
        "classifiers": c.classifiers,
    }))
}

async fn prometheus() -> Response {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::handle().render(),
    )
        .into_response()
}

/// The registry's adapters, each with the traits that select it (from `[traits]`), and the whole map.
fn adapters_body(gw: &Gateway) -> serde_json::Value {
    let live = gw.live();
    let traits = &live.config.budgets.traits;
    let adapters: Vec<serde_json::Value> = gw
        .loras()
        .list()
        .into_iter()
        .map(|a| {
            let serves: Vec<&String> = traits
                .iter()
                .filter(|(_, adapter)| **adapter == a.name)
                .map(|(t, _)| t)
                .collect();
            let mut v = json!(a);
            v["traits"] = json!(serves);
            v
        })
        .collect();
    json!({
        "adapters": adapters,
        "stats": gw.loras().stats(),
        "traits": live.config.budgets.traits,
        "dir": gw.loras_dir().map(|d| d.display().to_string()),
    })
}

async fn list_adapters(State(gw): State<Arc<Gateway>>) -> Json<serde_json::Value> {
    Json(adapters_body(&gw))
}

/// `POST /v1/adapters` body: load (or replace) adapter `name` from the PEFT folder `path`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadAdapter {
    name: String,
    path: String,
}

fn lora_error(e: LoraError) -> ApiError {
    match e {
        LoraError::Io { .. } => ApiError::invalid("path", e.to_string()),
        other => ApiError::invalid("adapter", other.to_string()),
    }
}

async fn load_adapter(
    State(gw): State<Arc<Gateway>>,
    ValidJson(req): ValidJson<LoadAdapter>,
) -> Result<Json<serde_json::Value>, ApiError> {
    crate::api::check_token("name", &req.name)?;
    let gw2 = gw.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        gw2.loras().load(&req.name, std::path::Path::new(&req.path))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(lora_error)?;
    crate::metrics::lora_load(loaded.took.as_secs_f64());
    crate::metrics::loras(&gw.loras().stats());
    tracing::info!(adapter = %loaded.info.name, version = loaded.info.version, ms = loaded.took.as_millis() as u64, "adapter loaded");
    Ok(Json(
        json!({ "adapter": loaded.info, "load_ms": loaded.took.as_secs_f64() * 1e3 }),
    ))
}

async fn delete_adapter(
    State(gw): State<Arc<Gateway>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !gw.loras().remove(&name) {
        return Err(ApiError::NotFound {
            what: format!("adapter `{name}`"),
        });
    }
    crate::metrics::loras(&gw.loras().stats());
    Ok(Json(json!({ "deleted": name })))
}

/// `POST /v1/adapters/prefetch` body: adapters to make resident, by name or by trait.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Prefetch {
    #[serde(default)]
    adapters: Vec<String>,
    #[serde(default)]
    traits: Vec<String>,
}

async fn prefetch_adapters(
    State(gw): State<Arc<Gateway>>,
    ValidJson(req): ValidJson<Prefetch>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let live = gw.live();
    let mut names = req.adapters;
    for t in &req.traits {
        let a = live
            .config
            .budgets
            .traits
            .get(t)
            .ok_or_else(|| ApiError::invalid("traits", format!("unknown trait `{t}`")))?;
        names.push(a.clone());
    }
    let gw2 = gw.clone();
    let warmed = tokio::task::spawn_blocking(move || {
        names
            .iter()
            .map(|n| match gw2.loras().get(n) {
                Ok(Some(_)) => Ok(n.clone()),
                Ok(None) => Err(ApiError::invalid(
                    "adapters",
                    format!("unknown adapter `{n}`"),
                )),
                Err(e) => Err(lora_error(e)),
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    crate::metrics::loras(&gw.loras().stats());
    Ok(Json(json!({ "resident": warmed })))
}

//! The HTTP front (axum): thin handlers that parse, call the dialog use case or the gateway, and shape
//! responses (JSON or SSE). A response stream owns its slot permit and the tier's receiver, so a client that
//! disconnects frees its slot and cancels its sequence. NPC routes (`npc.rs`, `openai.rs`) and ops routes
//! (`ops.rs`) sit behind separate optional bearer tokens (a tower layer each); `/healthz` (liveness) and
//! `/readyz` (each tier's health; 503 naming the tiers that are down) are open.

mod completions;
mod embeddings;
mod events;
mod logprobs;
mod npc;
mod openai;
mod openai_errors;
mod ops;
mod ui;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use nimmer_wire::BODY_LIMIT;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::error::ApiError;
use crate::state::Gateway;

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

/// The router over a gateway; tests drive it with `oneshot` or on `127.0.0.1:0`.
pub fn app(gw: Arc<Gateway>, auth: Auth) -> Router {
    let openai = Router::new()
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(openai::models))
        .layer(middleware::from_fn(openai_errors::reshape));
    let npc = Router::new()
        .route("/v1/dialog", post(npc::dialog))
        .route("/v1/classify", post(npc::classify))
        .route("/v1/events", post(events::open))
        .route("/v1/requests/{*id}", delete(npc::cancel))
        .merge(openai);
    let ops = Router::new()
        .route("/v1/zones", get(ops::zones))
        .route("/v1/zones/{id}", put(ops::put_zone))
        .route("/v1/config", get(ops::config))
        .route(
            "/v1/config/budgets",
            get(ops::budgets_text).put(ops::put_budgets),
        )
        .route("/v1/status", get(ops::status))
        .route(
            "/v1/adapters",
            get(ops::list_adapters).post(ops::load_adapter),
        )
        .route("/v1/adapters/prefetch", post(ops::prefetch_adapters))
        .route("/v1/adapters/{name}", delete(ops::delete_adapter))
        .route("/metrics", get(ops::prometheus));
    Router::new()
        .merge(guarded(npc, auth.npc))
        .merge(guarded(ops, auth.ops))
        .route("/ui", get(ui::page))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(gw)
}

/// Ready when every tier is: 200 with each tier's health, else 503 naming the tiers that are down.
async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    let health = gw.health();
    let down: Vec<&str> = health
        .iter()
        .filter(|(_, h)| !h.is_ready())
        .map(|(t, _)| t.as_str())
        .collect();
    let tiers: serde_json::Map<String, serde_json::Value> = health
        .iter()
        .map(|(t, h)| (t.as_str().to_string(), json!(h)))
        .collect();
    if down.is_empty() {
        Json(json!({ "ready": true, "tiers": tiers })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "ready": false,
                "error": format!("tiers down: {}", down.join(", ")),
                "tiers": tiers,
            })),
        )
            .into_response()
    }
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
            .map_err(|e| ApiError::from_json(e, "body"))
    }
}

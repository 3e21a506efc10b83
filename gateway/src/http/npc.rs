//! `POST /v1/dialog` (JSON, or SSE with `stream`: `token` events, then `done` with the response) and
//! `POST /v1/classify`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::json;

use super::ValidJson;
use crate::Tier;
use crate::admission;
use crate::api::{ClassifyRequest, DialogRequest};
use crate::dialog::{self, Reply, Streamed};
use crate::error::ApiError;
use crate::state::Gateway;

pub(super) async fn dialog(
    State(gw): State<Arc<Gateway>>,
    ValidJson(req): ValidJson<DialogRequest>,
) -> Result<Response, ApiError> {
    let d = req.validate()?;
    let span =
        tracing::info_span!("dialog", uid = %d.uid, zone = %d.zone, kind = ?d.kind, front = "http");
    let reply = tracing::Instrument::instrument(dialog::run(&gw, d), span).await?;
    Ok(match reply {
        Reply::Whole(resp) => Json(resp).into_response(),
        Reply::Stream(items) => {
            let events = items.map(|item| -> Result<SseEvent, Infallible> {
                Ok(match item {
                    Streamed::Token { id, text } => SseEvent::default()
                        .event("token")
                        .data(json!({ "id": id, "text": text }).to_string()),
                    Streamed::Done(resp) => SseEvent::default()
                        .event("done")
                        .data(serde_json::to_string(&resp).unwrap_or_default()),
                    Streamed::Failed => SseEvent::default()
                        .event("error")
                        .data(json!({ "error": "internal error", "kind": "internal" }).to_string()),
                    Streamed::Cancelled(why) => SseEvent::default().event("error").data(
                        json!({ "error": format!("the request was {why}"), "kind": "cancelled" })
                            .to_string(),
                    ),
                })
            });
            Sse::new(events)
                .keep_alive(KeepAlive::default())
                .into_response()
        }
    })
}

/// Stops a running request (a dialog by its idempotency key or UID, an OpenAI response by its `id`).
pub(super) async fn cancel(
    State(gw): State<Arc<Gateway>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if gw.requests().cancel(&id) {
        Ok(Json(json!({ "cancelled": id })))
    } else {
        Err(ApiError::NotFound {
            what: format!("running request `{id}`"),
        })
    }
}

pub(super) async fn classify(
    State(gw): State<Arc<Gateway>>,
    ValidJson(req): ValidJson<ClassifyRequest>,
) -> Result<Response, ApiError> {
    if req.inputs.is_empty() || req.inputs.len() > 64 {
        return Err(ApiError::invalid("inputs", "give 1 to 64 inputs"));
    }
    let _permit = admission::slot(&gw, Tier::Saturn, "_classify", 0, None).await?;
    let out = gw
        .tiers()
        .saturn
        .classify(&req.classifier, req.inputs)
        .await?;
    Ok(Json(json!({ "classifier": req.classifier, "results": out })).into_response())
}

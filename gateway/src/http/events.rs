//! `POST /v1/events`: opens a GM event on the shard the map assigns it (201 with the event's id and shard;
//! 200 when an event of that id was open already).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use nimmer_wire::gm::OpenEvent;

use super::ValidJson;
use crate::error::ApiError;
use crate::state::Gateway;

pub(super) async fn open(
    State(gw): State<Arc<Gateway>>,
    ValidJson(req): ValidJson<OpenEvent>,
) -> Result<Response, ApiError> {
    let front = gw.events().ok_or_else(|| ApiError::ShardUnavailable {
        shard: "any".into(),
        why: "GM events travel over NATS: start the gateway with --nats".into(),
    })?;
    let opened = front.open(&req).await?;
    let status = if opened.opened {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(opened)).into_response())
}

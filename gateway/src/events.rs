//! GM events opened through the gateway (`POST /v1/events`): the shard map (gm.toml) picks the event's shard
//! from its template and district, and the request goes to that shard's processes on NATS
//! (`nimmerverse.gm.<shard>.open`), which check it against the same templates, open it and direct it. The
//! gateway checks only what routing needs (a known template, a district that is a token); the shard's
//! refusals (404, 422) come back as the caller's error.

use std::time::Duration;

use nimmer_config::{EventCatalog, GmFile};
use nimmer_wire::gm::{OpenEvent, Opened};
use serde_json::Value;

use crate::error::ApiError;

/// How long a shard may take to answer an open request (it writes one register row).
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// The templates and the shard map, and the NATS connection the shards listen on.
pub struct EventsFront {
    client: async_nats::Client,
    catalog: EventCatalog,
    map: GmFile,
}

impl EventsFront {
    pub fn new(client: async_nats::Client, catalog: EventCatalog, map: GmFile) -> Self {
        Self {
            client,
            catalog,
            map,
        }
    }

    /// Routes `req` to its shard and returns the shard's answer.
    pub async fn open(&self, req: &OpenEvent) -> Result<Opened, ApiError> {
        let t = self
            .catalog
            .events
            .get(&req.template)
            .ok_or_else(|| ApiError::NotFound {
                what: format!("event template `{}`", req.template),
            })?;
        let district = req.district.as_deref().unwrap_or(&t.district);
        nimmer_wire::check_token(district)
            .map_err(|e| ApiError::invalid("district", format!("`{district}`: {e}")))?;
        let shard = self.map.route(t, district).to_string();
        let unavailable = |why: String| ApiError::ShardUnavailable {
            shard: shard.clone(),
            why,
        };
        let payload = serde_json::to_vec(req).map_err(|e| ApiError::Internal(e.to_string()))?;
        let reply = tokio::time::timeout(
            OPEN_TIMEOUT,
            self.client
                .request(nimmer_wire::subjects::gm_open(&shard), payload.into()),
        )
        .await
        .map_err(|_| unavailable(format!("no answer within {OPEN_TIMEOUT:?}")))?
        .map_err(|e| match e.kind() {
            async_nats::client::RequestErrorKind::NoResponders => unavailable(format!(
                "no GM process serves it (start `nimmer gm --shard {shard}`)"
            )),
            _ => unavailable(e.to_string()),
        })?;
        let v: Value = serde_json::from_slice(&reply.payload)
            .map_err(|e| ApiError::Internal(format!("shard {shard} answered: {e}")))?;
        let Some(error) = v.get("error") else {
            return serde_json::from_value(v)
                .map_err(|e| ApiError::Internal(format!("shard {shard} answered: {e}")));
        };
        let message = error.as_str().unwrap_or_default().to_string();
        Err(match v.get("status").and_then(Value::as_u64) {
            Some(404) => ApiError::NotFound { what: message },
            Some(422) => ApiError::invalid(
                v.get("field").and_then(Value::as_str).unwrap_or("values"),
                message,
            ),
            Some(400) => ApiError::Malformed { message },
            _ => unavailable(message),
        })
    }
}

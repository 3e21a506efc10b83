//! The NATS front: request/reply on `nimmerverse.gateway.<kind>.<zone>` in the queue group `nimmer-gateway`,
//! so several gateways share the load. The body is a `POST /v1/dialog` body whose `kind` and `zone` may be
//! left out (the subject gives them; when given they must match). `nimmerverse.gateway.zones.<zone>` is the
//! twin of `PUT /v1/zones/{id}` (same body, same answer). The reply is the dialog response, or
//! `{"error", "kind", "field"?, "status"}` with the HTTP status the same request would get. Type conversion
//! only: the dialog runs in [`crate::dialog`], which also publishes its result.

use std::sync::Arc;

use futures::StreamExt;
use nimmer_wire::{BODY_LIMIT, QUEUE_GROUP, REQUEST_SUBJECTS};
use serde_json::{Value, json};

use crate::api::{DialogRequest, DialogResponse};
use crate::dialog::{self, Reply};
use crate::error::{ApiError, GatewayError};
use crate::state::Gateway;

/// Serves NATS requests until `shutdown` resolves; then unsubscribes (requests in flight still reply).
pub async fn serve_requests(
    client: async_nats::Client,
    gw: Arc<Gateway>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), GatewayError> {
    let mut sub = client
        .queue_subscribe(REQUEST_SUBJECTS, QUEUE_GROUP.into())
        .await
        .map_err(|e| GatewayError::Subscribe {
            subject: REQUEST_SUBJECTS.into(),
            message: e.to_string(),
        })?;
    tracing::info!(
        subject = REQUEST_SUBJECTS,
        queue = QUEUE_GROUP,
        "NATS front listening"
    );
    tokio::pin!(shutdown);
    loop {
        let msg = tokio::select! {
            m = sub.next() => match m { Some(m) => m, None => break },
            _ = &mut shutdown => break,
        };
        let (gw, client) = (gw.clone(), client.clone());
        tokio::spawn(async move {
            let answer = match nimmer_wire::subjects::parse_request(&msg.subject) {
                Some(("zones", zone)) => put_zone(&gw, zone, &msg.payload).await,
                _ => handle(&gw, &msg.subject, &msg.payload)
                    .await
                    .map(|r| serde_json::to_value(&r).unwrap_or_default()),
            };
            let reply = match answer {
                Ok(r) => serde_json::to_vec(&r).unwrap_or_default(),
                Err(e) => error_body(&e),
            };
            if let Some(to) = msg.reply {
                if let Err(e) = client.publish(to, reply.into()).await {
                    tracing::warn!(error = %e, "sending a NATS reply failed");
                }
            } else {
                tracing::debug!(subject = %msg.subject, "NATS request without reply subject: result published only");
            }
        });
    }
    let _ = sub.unsubscribe().await;
    Ok(())
}

fn error_body(e: &ApiError) -> Vec<u8> {
    let mut body =
        json!({ "error": e.to_string(), "kind": e.kind(), "status": e.status().as_u16() });
    if let Some(f) = e.field() {
        body["field"] = f.into();
    }
    if let ApiError::Internal(detail) = e {
        tracing::error!(error = %detail, "internal error (NATS request)");
    }
    body.to_string().into_bytes()
}

/// `nimmerverse.gateway.zones.<zone>`: the zone's activation, as `PUT /v1/zones/{id}`.
async fn put_zone(gw: &Gateway, zone: &str, payload: &[u8]) -> Result<Value, ApiError> {
    if payload.len() > BODY_LIMIT {
        return Err(ApiError::TooLarge { limit: BODY_LIMIT });
    }
    let req = crate::personas::ZonePut::parse(payload)?;
    crate::personas::put_zone(gw, zone, req).await
}

/// Parses a request from its subject and body and runs it to its response.
async fn handle(
    gw: &Arc<Gateway>,
    subject: &str,
    payload: &[u8],
) -> Result<DialogResponse, ApiError> {
    let d = parse(subject, payload)?.validate()?;
    if d.stream {
        return Err(ApiError::invalid(
            "stream",
            "streaming is served over HTTP (SSE); NATS replies once",
        ));
    }
    let span =
        tracing::info_span!("dialog", uid = %d.uid, zone = %d.zone, kind = ?d.kind, front = "nats");
    match tracing::Instrument::instrument(dialog::run(gw, d), span).await? {
        Reply::Whole(resp) => Ok(*resp),
        Reply::Stream(_) => Err(ApiError::Internal("a NATS dialog was streamed".into())),
    }
}

/// `nimmerverse.gateway.<kind>.<zone>` + JSON body → request; the subject's kind and zone fill the body's.
fn parse(subject: &str, payload: &[u8]) -> Result<DialogRequest, ApiError> {
    if payload.len() > BODY_LIMIT {
        return Err(ApiError::TooLarge { limit: BODY_LIMIT });
    }
    let Some((kind, zone)) = nimmer_wire::subjects::parse_request(subject) else {
        return Err(ApiError::invalid(
            "subject",
            "must be nimmerverse.gateway.<kind>.<zone>",
        ));
    };
    let mut body: Value = serde_json::from_slice(payload).map_err(|e| ApiError::Malformed {
        message: e.to_string(),
    })?;
    let obj = body
        .as_object_mut()
        .ok_or_else(|| ApiError::invalid("body", "must be a JSON object"))?;
    for (key, value) in [("kind", kind), ("zone", zone)] {
        match obj.get(key) {
            None => {
                obj.insert(key.into(), value.into());
            }
            Some(v) if v == value => {}
            Some(v) => {
                return Err(ApiError::invalid(
                    key,
                    format!("{v} does not match the subject's `{value}`"),
                ));
            }
        }
    }
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        ApiError::invalid(
            if path == "." { "body".into() } else { path },
            e.into_inner().to_string(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subject_fills_kind_and_zone() {
        let r = parse(
            "nimmerverse.gateway.dialog.plaza-1",
            br#"{"uid": "e/d/s/k", "prompt": "hi"}"#,
        )
        .unwrap();
        assert_eq!(r.zone, "plaza-1");
    }

    #[test]
    fn a_body_contradicting_the_subject_is_rejected() {
        let e = parse(
            "nimmerverse.gateway.dialog.plaza-1",
            br#"{"uid": "e/d/s/k", "zone": "other", "prompt": "hi"}"#,
        )
        .unwrap_err();
        assert_eq!(e.field(), Some("zone"));
        let e = parse("nimmerverse.gateway.dialog", b"{}").unwrap_err();
        assert_eq!(e.field(), Some("subject"));
        let e = parse("nimmerverse.gateway.bogus.z", br#"{"uid": "e/d/s/k"}"#).unwrap_err();
        assert_eq!(e.field(), Some("kind"));
        let e = parse("nimmerverse.gateway.dialog.z", b"{nope").unwrap_err();
        assert_eq!(e.status().as_u16(), 400);
    }
}

//! The NATS front and the results publisher.
//!
//! - Requests: request/reply on `nimmerverse.gateway.<kind>.<zone>` in the queue group `nimmer-gateway`, so
//!   several gateways share the load. The body is a `POST /v1/dialog` body whose `kind` and `zone` may be left
//!   out (the subject gives them; when given they must match). The reply is the dialog response, or
//!   `{"error", "kind", "field"?, "status"}` with the HTTP status the same request would get.
//! - Results: every finished dialog (HTTP or NATS) goes to JetStream on
//!   `nimmerverse.results.<gm_event>.<district>.<scene>` (stream `RESULTS`, work-queue retention) with
//!   `Nats-Msg-Id` = its result id. One publisher task owns the ordering: it retries with backoff until the
//!   server acknowledges, so a broker restart delays results but loses none while the gateway runs.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::api::{DialogRequest, DialogResponse, DialogResult};
use crate::core::Gateway;
use crate::error::ApiError;
use crate::http::BODY_LIMIT;

pub const RESULTS_STREAM: &str = "RESULTS";
pub use nimmer_compositor::streams::RESULTS_SUBJECTS;
pub const REQUEST_SUBJECTS: &str = "nimmerverse.gateway.>";
pub const QUEUE_GROUP: &str = "nimmer-gateway";

/// A result waiting to be published.
struct Outgoing {
    subject: String,
    msg_id: String,
    payload: Bytes,
}

/// The sending side of the results publisher; cheap to clone.
#[derive(Clone)]
pub struct ResultsSink {
    tx: mpsc::Sender<Outgoing>,
}

impl ResultsSink {
    /// Queues a result. When the publisher is behind, waits in a task instead of dropping it.
    pub fn send(&self, r: &DialogResult) {
        let payload = match serde_json::to_vec(r) {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                tracing::error!(error = %e, result_id = %r.result_id, "cannot serialize a result");
                return;
            }
        };
        let out = Outgoing {
            subject: r.uid.results_subject(),
            msg_id: r.result_id.clone(),
            payload,
        };
        if let Err(mpsc::error::TrySendError::Full(out)) = self.tx.try_send(out) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(out).await;
            });
        }
    }
}

/// Creates (or finds) the `RESULTS` stream and starts the publisher; the returned handle ends when every
/// sink is dropped and the queue is drained.
pub async fn start_results(
    client: async_nats::Client,
) -> anyhow::Result<(ResultsSink, tokio::task::JoinHandle<()>)> {
    let js = jetstream::new(client);
    js.get_or_create_stream(nimmer_compositor::streams::results_stream(RESULTS_STREAM))
        .await
        .map_err(|e| anyhow::anyhow!("creating the {RESULTS_STREAM} stream: {e}"))?;
    let (tx, mut rx) = mpsc::channel::<Outgoing>(4096);
    let task = tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            let mut backoff = Duration::from_millis(50);
            loop {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", out.msg_id.as_str());
                let acked = match js
                    .publish_with_headers(out.subject.clone(), headers, out.payload.clone())
                    .await
                {
                    Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match acked {
                    Ok(()) => {
                        crate::metrics::result_published(true);
                        break;
                    }
                    Err(e) => {
                        crate::metrics::result_published(false);
                        tracing::warn!(error = %e, result_id = %out.msg_id, retry_in_ms = backoff.as_millis() as u64, "publishing a result failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    });
    Ok((ResultsSink { tx }, task))
}

/// Serves NATS requests until `shutdown` resolves; then unsubscribes (requests in flight still reply).
pub async fn serve_requests(
    client: async_nats::Client,
    gw: Arc<Gateway>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut sub = client
        .queue_subscribe(REQUEST_SUBJECTS, QUEUE_GROUP.into())
        .await
        .map_err(|e| anyhow::anyhow!("subscribing to {REQUEST_SUBJECTS}: {e}"))?;
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
            let reply = match handle(&gw, &msg.subject, &msg.payload).await {
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

/// Parses a request from its subject and body and runs it to its response.
async fn handle(gw: &Gateway, subject: &str, payload: &[u8]) -> Result<DialogResponse, ApiError> {
    let d = parse(subject, payload)?.validate()?;
    if d.stream {
        return Err(ApiError::invalid(
            "stream",
            "streaming is served over HTTP (SSE); NATS replies once",
        ));
    }
    let uid = format!(
        "{}/{}/{}/{}",
        d.uid.gm_event, d.uid.district, d.uid.scene, d.uid.slot
    );
    let span =
        tracing::info_span!("dialog", uid = %uid, zone = %d.zone, kind = ?d.kind, front = "nats");
    tracing::Instrument::instrument(crate::dialog::complete(gw, &d), span).await
}

/// `nimmerverse.gateway.<kind>.<zone>` + JSON body → request; the subject's kind and zone fill the body's.
fn parse(subject: &str, payload: &[u8]) -> Result<DialogRequest, ApiError> {
    if payload.len() > BODY_LIMIT {
        return Err(ApiError::TooLarge { limit: BODY_LIMIT });
    }
    let parts: Vec<&str> = subject.split('.').collect();
    let [_, _, kind, zone] = parts[..] else {
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

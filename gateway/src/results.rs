//! The results publisher: every finished dialog goes to JetStream on its results subject
//! (`nimmerverse.results.<gm_event>.<district>.<scene>`, stream named by `transport.toml`, work-queue
//! retention) with `Nats-Msg-Id` = its result id. One publisher task owns the order and retries each result
//! with backoff until the server acknowledges it, so a broker restart delays results but loses none while
//! the gateway runs. The queue in front of it is bounded: when it is full, [`ResultsSink::send`] waits, so a
//! slow broker slows the requests that produce results instead of growing memory without bound.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use nimmer_wire::DialogResult;
use tokio::sync::mpsc;

use crate::metrics;

/// Results queued for the publisher at most (then senders wait).
pub const QUEUE: usize = 4096;

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

/// The publisher has stopped (the gateway is shutting down): the result was not queued.
#[derive(Debug, thiserror::Error)]
#[error("the results publisher has stopped")]
pub struct PublisherStopped;

impl ResultsSink {
    /// Queues a result for publishing, waiting while the queue is full.
    pub async fn send(&self, r: &DialogResult) -> Result<(), PublisherStopped> {
        let payload = match serde_json::to_vec(r) {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                // Every field of a result serializes; this is a bug, not a runtime condition.
                tracing::error!(error = %e, result_id = %r.result_id, "cannot serialize a result");
                return Ok(());
            }
        };
        let out = Outgoing {
            subject: r.uid.results_subject(),
            msg_id: r.result_id.clone(),
            payload,
        };
        match self.tx.try_send(out) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(out)) => {
                metrics::results_backpressure();
                tracing::warn!(
                    queued = QUEUE,
                    "results queue full: waiting for the publisher"
                );
                self.tx.send(out).await.map_err(|_| PublisherStopped)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(PublisherStopped),
        }
    }
}

/// Starts the publisher, which first creates the results stream `stream` with `replicas` copies (or brings
/// it up to date), retrying while JetStream does not answer (a cluster electing its leaders, a server
/// restarting): the gateway serves meanwhile and its results wait in the queue. The returned task ends when
/// every sink is dropped and the queue is drained.
pub fn start(
    client: async_nats::Client,
    stream: &str,
    replicas: usize,
) -> (ResultsSink, tokio::task::JoinHandle<()>) {
    let js = jetstream::new(client);
    let config = nimmer_wire::subjects::results_stream(stream, replicas);
    let (tx, mut rx) = mpsc::channel::<Outgoing>(QUEUE);
    let task = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(250);
        while let Err(e) = nimmer_wire::subjects::ensure_stream(&js, config.clone()).await {
            tracing::warn!(stream = %config.name, error = %e, retry_in = ?backoff, "results stream not ready; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        while let Some(out) = rx.recv().await {
            publish(&js, out).await;
        }
    });
    (ResultsSink { tx }, task)
}

/// Publishes one result, retrying with backoff (50 ms doubling to 5 s) until it is acknowledged.
async fn publish(js: &jetstream::Context, out: Outgoing) {
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
                metrics::result_published(true);
                return;
            }
            Err(e) => {
                metrics::result_published(false);
                tracing::warn!(error = %e, result_id = %out.msg_id, retry_in_ms = backoff.as_millis() as u64, "publishing a result failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimmer_wire::{DialogResponse, Kind, Uid};

    fn result(id: &str) -> DialogResult {
        DialogResult {
            result_id: id.into(),
            uid: Uid {
                gm_event: "e".into(),
                district: "d".into(),
                scene: "s".into(),
                slot: "k".into(),
            },
            zone: "z".into(),
            kind: Kind::Dialog,
            npc: None,
            participants: vec![],
            faction: None,
            finished_at_ms: 1,
            response: serde_json::from_str::<DialogResponse>(r#"{"text": "hi", "tier": "driver"}"#)
                .unwrap(),
        }
    }

    #[tokio::test]
    async fn a_full_queue_makes_the_sender_wait_instead_of_spawning_or_dropping() {
        let (tx, mut rx) = mpsc::channel(1);
        let sink = ResultsSink { tx };
        sink.send(&result("r1")).await.unwrap();
        let r2 = result("r2");
        let second = sink.send(&r2);
        tokio::pin!(second);
        // The queue holds one: the second send waits while nobody publishes.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut second)
                .await
                .is_err()
        );
        assert_eq!(rx.recv().await.unwrap().msg_id, "r1");
        second.await.unwrap();
        let out = rx.recv().await.unwrap();
        assert_eq!(
            (out.msg_id.as_str(), out.subject.as_str()),
            ("r2", "nimmerverse.results.e.d.s")
        );
    }

    #[tokio::test]
    async fn a_stopped_publisher_is_an_error_not_a_silent_drop() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let sink = ResultsSink { tx };
        assert!(sink.send(&result("r1")).await.is_err());
    }
}

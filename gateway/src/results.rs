//! The results publisher: every finished dialog goes to JetStream on its results subject
//! (`nimmerverse.results.<gm_event>.<district>.<scene>`, stream named by `transport.toml`, work-queue
//! retention) with `Nats-Msg-Id` = its result id. **Durable before answered**: [`ResultsSink::send`] returns
//! once JetStream acknowledged the result, or, when no ack came within `durable_wait` (a broker down, a
//! cluster electing), once the result is fsync'd in the gateway's [`Spool`]; the caller's 200 or SSE `done`
//! goes out after that. While anything is spooled, new results are spooled too (in order) and one publisher
//! task retries the backlog with backoff; a restarted gateway publishes what its spool still holds first.
//! The queue in front of the task is bounded: when it is full, senders wait, so a slow disk or broker slows
//! the requests that produce results instead of growing memory without bound.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use nimmer_wire::DialogResult;
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics;
pub use crate::spool::{Entry, Spool, SpoolError};

/// Results queued for the publisher at most (then senders wait).
pub const QUEUE: usize = 4096;
/// Results published (or spooled) together.
const BATCH: usize = 256;

/// What made a result durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durable {
    /// JetStream acknowledged it.
    Acked,
    /// It is synced in the spool (JetStream gets it later, from this process or the next one).
    Spooled,
    /// No spool is configured (or it failed): it waits in this process's memory only.
    Memory,
}

impl Durable {
    fn label(self) -> &'static str {
        match self {
            Self::Acked => "jetstream",
            Self::Spooled => "spool",
            Self::Memory => "memory",
        }
    }
}

/// A result waiting to be published, with whom to tell once it is durable.
struct Outgoing {
    entry: Entry,
    durable: oneshot::Sender<Durable>,
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
    /// Queues a result for publishing (waiting while the queue is full) and waits until it is durable.
    pub async fn send(&self, r: &DialogResult) -> Result<Durable, PublisherStopped> {
        let payload = match serde_json::to_vec(r) {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                // Every field of a result serializes; this is a bug, not a runtime condition.
                tracing::error!(error = %e, result_id = %r.result_id, "cannot serialize a result");
                return Ok(Durable::Memory);
            }
        };
        let (durable, told) = oneshot::channel();
        let out = Outgoing {
            entry: Entry {
                subject: r.uid.results_subject(),
                msg_id: r.result_id.clone(),
                payload,
            },
            durable,
        };
        let t = Instant::now();
        match self.tx.try_send(out) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(out)) => {
                metrics::results_backpressure();
                tracing::warn!(
                    queued = QUEUE,
                    "results queue full: waiting for the publisher"
                );
                self.tx.send(out).await.map_err(|_| PublisherStopped)?;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(PublisherStopped),
        }
        let via = told.await.map_err(|_| PublisherStopped)?;
        metrics::result_durable(via.label(), t.elapsed().as_secs_f64());
        Ok(via)
    }
}

/// How the publisher runs.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// The results stream (`transport.toml`) and its copies.
    pub stream: String,
    pub replicas: usize,
    /// How long an answer waits for JetStream's ack before its result is spooled instead.
    pub durable_wait: Duration,
}

/// Starts the publisher and a task that creates the results stream (or brings it up to date), retrying until
/// JetStream answers; the publisher publishes `pending` (what `spool` held at open) before anything new. Without a spool, results
/// JetStream does not take wait in memory. The returned task ends when every sink is dropped and the queue is
/// drained (with a spool: after a last few seconds of retries, leaving the rest spooled).
pub fn start(
    client: async_nats::Client,
    cfg: PublisherConfig,
    spool: Option<(Spool, Vec<Entry>)>,
) -> (ResultsSink, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<Outgoing>(QUEUE);
    let (spool, backlog) = match spool {
        Some((s, pending)) => {
            if !pending.is_empty() {
                tracing::info!(
                    results = pending.len(),
                    "publishing the results the spool kept from the last run"
                );
            }
            (Some(Arc::new(Mutex::new(s))), pending.into())
        }
        None => (None, VecDeque::new()),
    };
    let js = jetstream::new(client);
    // The stream exists as soon as JetStream answers (consumers bind to it before any result), not only at
    // the first publish.
    let (ready_tx, ready) = watch::channel(false);
    tokio::spawn({
        let (js, config) = (
            js.clone(),
            nimmer_wire::subjects::results_stream(&cfg.stream, cfg.replicas),
        );
        async move {
            let mut backoff = Duration::from_millis(250);
            while let Err(e) = nimmer_wire::subjects::ensure_stream(&js, config.clone()).await {
                tracing::warn!(stream = %config.name, error = %e, retry_in = ?backoff, "results stream not ready; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            ready_tx.send_replace(true);
        }
    });
    let publisher = Publisher {
        js,
        ready,
        wait: cfg.durable_wait,
        spool,
        backlog,
    };
    let task = tokio::spawn(publisher.run(rx));
    (ResultsSink { tx }, task)
}

struct Publisher {
    js: jetstream::Context,
    /// Whether the results stream exists yet.
    ready: watch::Receiver<bool>,
    wait: Duration,
    spool: Option<Arc<Mutex<Spool>>>,
    /// Durable (spooled or in memory) and not yet acked, oldest first.
    backlog: VecDeque<Entry>,
}

impl Publisher {
    async fn run(mut self, mut rx: mpsc::Receiver<Outgoing>) {
        let mut backoff = Duration::from_millis(50);
        let mut retry_at = tokio::time::Instant::now();
        let mut closed_at: Option<Instant> = None;
        loop {
            let mut fresh = Vec::new();
            if closed_at.is_none() {
                let first = if self.backlog.is_empty() {
                    match rx.recv().await {
                        Some(o) => Some(o),
                        // Every sink is gone and nothing waits: done.
                        None => return,
                    }
                } else {
                    tokio::select! {
                        o = rx.recv() => {
                            if o.is_none() {
                                closed_at = Some(Instant::now());
                            }
                            o
                        }
                        _ = tokio::time::sleep_until(retry_at) => None,
                    }
                };
                fresh.extend(first);
                while fresh.len() < BATCH {
                    match rx.try_recv() {
                        Ok(o) => fresh.push(o),
                        Err(_) => break,
                    }
                }
            }
            if !fresh.is_empty() {
                self.take(fresh).await;
            }
            if self.backlog.is_empty() {
                if closed_at.is_some() {
                    return;
                }
                continue;
            }
            if let Some(t) = closed_at {
                if t.elapsed() > Duration::from_secs(5) {
                    tracing::warn!(
                        results = self.backlog.len(),
                        spooled = self.spool.is_some(),
                        "stopping with results JetStream has not acknowledged"
                    );
                    return;
                }
                tokio::time::sleep_until(retry_at).await;
            }
            if tokio::time::Instant::now() >= retry_at {
                if self.retry().await {
                    backoff = Duration::from_millis(50);
                    retry_at = tokio::time::Instant::now();
                } else {
                    retry_at = tokio::time::Instant::now() + backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Makes new results durable: published and acked when nothing waits before them, else (or when no ack
    /// came in time) spooled behind the backlog.
    async fn take(&mut self, fresh: Vec<Outgoing>) {
        let (entries, tells): (Vec<Entry>, Vec<_>) =
            fresh.into_iter().map(|o| (o.entry, o.durable)).unzip();
        let acked = if self.backlog.is_empty() {
            self.publish(&entries).await
        } else {
            vec![false; entries.len()]
        };
        let mut late = Vec::new();
        for ((e, tell), ok) in entries.into_iter().zip(tells).zip(acked) {
            if ok {
                let _ = tell.send(Durable::Acked);
            } else {
                late.push((e, tell));
            }
        }
        if late.is_empty() {
            return;
        }
        let (late, tells): (Vec<Entry>, Vec<_>) = late.into_iter().unzip();
        let via = self.spool_put(late.clone()).await;
        self.backlog.extend(late);
        metrics::results_spooled(self.backlog.len());
        for tell in tells {
            let _ = tell.send(via);
        }
    }

    /// Publishes the oldest backlog entries once; true when all of them were acked.
    async fn retry(&mut self) -> bool {
        let n = self.backlog.len().min(BATCH);
        let head: Vec<Entry> = self.backlog.iter().take(n).cloned().collect();
        let acked = self.publish(&head).await;
        let mut kept = VecDeque::with_capacity(self.backlog.len());
        let mut done = Vec::new();
        for (e, ok) in self.backlog.drain(..n).zip(&acked) {
            if *ok {
                done.push(e.msg_id);
            } else {
                kept.push_back(e);
            }
        }
        kept.extend(self.backlog.drain(..));
        self.backlog = kept;
        metrics::results_spooled(self.backlog.len());
        if let Some(spool) = self.spool.clone()
            && !done.is_empty()
        {
            let r = tokio::task::spawn_blocking(move || {
                spool
                    .lock()
                    .expect("spool lock")
                    .done(done.iter().map(String::as_str))
            })
            .await;
            if let Ok(Err(e)) = r {
                tracing::warn!(error = %e, "marking spooled results done failed (they will be republished and deduplicated)");
            }
        }
        if self.backlog.is_empty() {
            tracing::info!("every spooled result is published");
        }
        acked.iter().all(|ok| *ok)
    }

    /// Syncs `entries` to the spool; what they rest on.
    async fn spool_put(&self, entries: Vec<Entry>) -> Durable {
        let Some(spool) = self.spool.clone() else {
            return Durable::Memory;
        };
        let n = entries.len();
        match tokio::task::spawn_blocking(move || spool.lock().expect("spool lock").put(&entries))
            .await
        {
            Ok(Ok(())) => {
                tracing::debug!(results = n, "results spooled");
                Durable::Spooled
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, results = n, "spooling results failed: they wait in memory only");
                Durable::Memory
            }
            Err(e) => {
                tracing::error!(error = %e, "the spool writer panicked");
                Durable::Memory
            }
        }
    }

    /// Publishes `entries` together and waits up to `wait` for their acks; which were acked.
    async fn publish(&self, entries: &[Entry]) -> Vec<bool> {
        let deadline = tokio::time::Instant::now() + self.wait;
        // Until the stream exists (the task `start` spawns creates it), results are spooled as in any outage.
        let mut ready = self.ready.clone();
        if !matches!(
            tokio::time::timeout_at(deadline, ready.wait_for(|r| *r)).await,
            Ok(Ok(_))
        ) {
            tracing::warn!("results stream not ready");
            return vec![false; entries.len()];
        }
        let js = &self.js;
        let sent = tokio::time::timeout_at(deadline, async {
            let mut acks = Vec::with_capacity(entries.len());
            for e in entries {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", e.msg_id.as_str());
                acks.push(
                    js.publish_with_headers(e.subject.clone(), headers, e.payload.clone())
                        .await
                        .ok(),
                );
            }
            acks
        })
        .await;
        let Ok(acks) = sent else {
            metrics::result_published(false);
            tracing::warn!(
                results = entries.len(),
                "publishing results timed out; they are kept and retried"
            );
            return vec![false; entries.len()];
        };
        let acked = futures::future::join_all(acks.into_iter().map(|a| async move {
            match a {
                Some(a) => matches!(tokio::time::timeout_at(deadline, a).await, Ok(Ok(_))),
                None => false,
            }
        }))
        .await;
        let failed = acked.iter().filter(|ok| !**ok).count();
        for ok in &acked {
            metrics::result_published(*ok);
        }
        if failed > 0 {
            tracing::warn!(
                failed,
                of = entries.len(),
                "JetStream did not acknowledge results in time; they are kept and retried"
            );
        }
        acked
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
    async fn a_sender_waits_for_room_in_the_queue_and_then_for_durability() {
        let (tx, mut rx) = mpsc::channel(1);
        let sink = ResultsSink { tx };
        let first = tokio::spawn({
            let sink = sink.clone();
            async move { sink.send(&result("r1")).await }
        });
        let second = tokio::spawn({
            let sink = sink.clone();
            async move { sink.send(&result("r2")).await }
        });
        let o1 = rx.recv().await.unwrap();
        assert_eq!(o1.entry.msg_id, "r1");
        // Queued is not durable: the sender still waits.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!first.is_finished());
        o1.durable.send(Durable::Acked).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), Durable::Acked);
        let o2 = rx.recv().await.unwrap();
        assert_eq!(
            (o2.entry.msg_id.as_str(), o2.entry.subject.as_str()),
            ("r2", "nimmerverse.results.e.d.s")
        );
        o2.durable.send(Durable::Spooled).unwrap();
        assert_eq!(second.await.unwrap().unwrap(), Durable::Spooled);
    }

    #[tokio::test]
    async fn a_stopped_publisher_is_an_error_not_a_silent_drop() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let sink = ResultsSink { tx };
        assert!(sink.send(&result("r1")).await.is_err());
    }

    async fn messages(js: &jetstream::Context) -> u64 {
        match js.get_stream("RESULTS").await {
            Ok(mut s) => s.info().await.map_or(0, |i| i.state.messages),
            Err(_) => 0,
        }
    }

    /// Results answered while nats-server is down are spooled; a publisher that died with them (its task
    /// aborted: no shutdown path) leaves them to the next one, which publishes them once the server is back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn results_answered_during_an_outage_are_spooled_and_published_by_the_next_start() {
        let mut nats = nimmer_services::NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let cfg = PublisherConfig {
            stream: "RESULTS".into(),
            replicas: 1,
            durable_wait: Duration::from_millis(300),
        };
        let url = nats.url.clone();
        let connect = || async {
            async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .connect(url.as_str())
                .await
                .unwrap()
        };
        let client = connect().await;
        let (sink, task) = start(
            client.clone(),
            cfg.clone(),
            Some(Spool::open(dir.path()).unwrap()),
        );
        assert_eq!(sink.send(&result("up-1")).await.unwrap(), Durable::Acked);
        nats.kill();
        for i in 0..5 {
            assert_eq!(
                sink.send(&result(&format!("down-{i}"))).await.unwrap(),
                Durable::Spooled
            );
        }
        // The gateway dies: its memory is gone, the spool is not.
        task.abort();
        let _ = task.await;
        drop((sink, client));
        nats.start_again();
        let client = connect().await;
        let js = jetstream::new(client.clone());
        let (spool, pending) = Spool::open(dir.path()).unwrap();
        assert_eq!(pending.len(), 5);
        let (sink, task) = start(client, cfg, Some((spool, pending)));
        let t = Instant::now();
        while messages(&js).await < 6 {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the spool was not published"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Published once each, and the spool is empty once they are acked.
        assert_eq!(sink.send(&result("up-2")).await.unwrap(), Durable::Acked);
        assert_eq!(messages(&js).await, 7);
        drop(sink);
        task.await.unwrap();
        assert!(Spool::open(dir.path()).unwrap().1.is_empty());
    }
}

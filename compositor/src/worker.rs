//! A compositor: pulls results from the shared durable consumer, composes each batch in ONE PostgreSQL
//! transaction (canon rows + outbox rows; a batch with a value the schema rejects is redone one savepoint per
//! result to find it), and acks the results only after the commit. A crash before the commit leaves the results unacked (redelivered to any compositor after
//! `ack_wait_s`); a crash after it makes the redelivery a no-op (the canon row exists). A malformed result, or
//! one the schema rejects, is published to the dead-letter subject with its reason and acked.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, Message, consumer};
use futures::StreamExt;
use nimmer_config::TransportFile;
use sqlx::PgPool;

use crate::canon::{Composed, DialogResult, compose_batch, parse_result};
use crate::error::{CompositorError, Result};

/// What one batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchStats {
    pub composed: usize,
    pub duplicates: usize,
    pub dead: usize,
}

pub struct Compositor {
    pub pool: PgPool,
    pub js: jetstream::Context,
    pub transport: TransportFile,
}

/// Failures of the database or the broker, not of a result: connection trouble, the server shutting down or
/// out of resources, serialization conflicts, timeouts. A batch that fails so is redelivered whole; anything
/// else is the fault of some result in it, found by composing each alone.
fn is_transient(e: &CompositorError) -> bool {
    match e {
        CompositorError::Db(sqlx::Error::Database(d)) => d.code().is_some_and(|c| {
            ["08", "40", "53", "57", "58"]
                .iter()
                .any(|k| c.starts_with(k))
        }),
        CompositorError::Db(
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_),
        ) => true,
        CompositorError::DbTimeout(_) | CompositorError::Nats(_) => true,
        _ => false,
    }
}

/// SQLSTATE classes that blame the data, not the database: data exceptions (22) and integrity violations (23).
fn is_data_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
        _ => false,
    }
}

impl Compositor {
    /// Consumes until `shutdown` resolves (finishing the batch in hand).
    pub async fn run(
        &self,
        consumer: consumer::Consumer<consumer::pull::Config>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(100);
        let mut stream = None;
        loop {
            // One continuous pull (results arrive as they are published); a batch is the first result
            // waited for plus whatever else arrives within 2 ms, up to `batch`.
            let msgs = match stream.as_mut() {
                None => {
                    let s = consumer
                        .stream()
                        .max_messages_per_batch(self.transport.results.batch)
                        .heartbeat(Duration::from_secs(5))
                        .expires(Duration::from_secs(30))
                        .messages();
                    match tokio::select! { _ = &mut shutdown => return Ok(()), s = s => s } {
                        Ok(s) => stream = Some(s),
                        Err(e) => {
                            tracing::warn!(error = %e, "pulling results failed; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                    continue;
                }
                Some(s) => {
                    let first = tokio::select! {
                        _ = &mut shutdown => return Ok(()),
                        m = s.next() => m,
                    };
                    let mut msgs = Vec::new();
                    let mut failed = None;
                    match first {
                        Some(Ok(m)) => msgs.push(m),
                        Some(Err(e)) => failed = Some(e.to_string()),
                        None => failed = Some("the pull ended".into()),
                    }
                    while failed.is_none()
                        && !msgs.is_empty()
                        && msgs.len() < self.transport.results.batch
                    {
                        match tokio::time::timeout(Duration::from_millis(2), s.next()).await {
                            Ok(Some(Ok(m))) => msgs.push(m),
                            Ok(Some(Err(e))) => failed = Some(e.to_string()),
                            Ok(None) => failed = Some("the pull ended".into()),
                            Err(_) => break,
                        }
                    }
                    if let Some(e) = failed {
                        // E.g. missed heartbeats while the server restarts: pull again.
                        tracing::warn!(error = %e, "results pull interrupted; pulling again");
                        stream = None;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    msgs
                }
            };
            if msgs.is_empty() {
                continue;
            }
            match self.process(msgs).await {
                Ok(s) => {
                    backoff = Duration::from_millis(100);
                    metrics::counter!("nimmer_canon_rows_total", "result" => "composed")
                        .increment(s.composed as u64);
                    metrics::counter!("nimmer_canon_rows_total", "result" => "duplicate")
                        .increment(s.duplicates as u64);
                    metrics::counter!("nimmer_canon_rows_total", "result" => "dead_letter")
                        .increment(s.dead as u64);
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "composing a batch failed; its results will be redelivered");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Composes `msgs` in one transaction, then acks them (and dead-letters the bad ones). On error nothing is
    /// acked: the results are redelivered.
    pub async fn process(&self, msgs: Vec<Message>) -> Result<BatchStats> {
        let mut stats = BatchStats::default();
        let mut good = Vec::with_capacity(msgs.len());
        let mut dead = Vec::new();
        for m in msgs {
            match parse_result(&m.payload) {
                Ok(r) => good.push((m, r)),
                Err(reason) => dead.push((m, reason)),
            }
        }
        let results: Vec<DialogResult> = good.iter().map(|(_, r)| r.clone()).collect();
        let mut tx = self.pool.begin().await?;
        // Per result: what composing it did, or why it is dead; `None`: it is retried later (NAKed).
        let composed: Vec<Option<std::result::Result<Composed, String>>> = match compose_batch(
            &mut tx,
            &results,
            &self.transport,
        )
        .await
        {
            Ok(c) => {
                tx.commit().await?;
                c.into_iter().map(|c| Some(Ok(c))).collect()
            }
            Err(CompositorError::Db(e)) if is_data_error(&e) => {
                drop(tx);
                tracing::info!(error = %e, "a result in the batch was rejected; composing one by one");
                self.one_by_one(&results)
                    .await?
                    .into_iter()
                    .map(Some)
                    .collect()
            }
            Err(e) if is_transient(&e) => return Err(e),
            Err(e) => {
                // Not the database's fault, not a value the schema names: some result cannot be
                // composed. Each alone, so the others commit now instead of waiting for its redeliveries.
                drop(tx);
                tracing::warn!(error = %e, "composing a batch failed; composing its results one at a time");
                self.alone(&good).await?
            }
        };
        let mut done = Vec::with_capacity(good.len());
        for ((m, _), c) in good.into_iter().zip(composed) {
            match c {
                Some(Ok(Composed::New(_))) => {
                    stats.composed += 1;
                    done.push(m);
                }
                Some(Ok(Composed::Duplicate)) => {
                    stats.duplicates += 1;
                    done.push(m);
                }
                Some(Ok(Composed::Rejected(reason)) | Err(reason)) => dead.push((m, reason)),
                None => {}
            }
        }
        for m in &done {
            if let Err(e) = m.ack().await {
                // The row is committed: a redelivery is a no-op.
                tracing::warn!(error = %e, "ack after commit failed; the result will be redelivered and skipped");
            }
        }
        stats.dead = dead.len();
        for (m, reason) in dead {
            self.dead_letter(&m, &reason).await?;
        }
        Ok(stats)
    }

    /// Composes each result in its own transaction. One that fails for a reason of its own is NAKed with a
    /// delay (`None`: retried later, its batch-mates not held) until it has been delivered `max_attempts`
    /// times, then its reason is returned (dead-lettered); a transient failure fails the call (everything not
    /// yet acked is redelivered).
    async fn alone(
        &self,
        good: &[(Message, DialogResult)],
    ) -> Result<Vec<Option<std::result::Result<Composed, String>>>> {
        let mut out = Vec::with_capacity(good.len());
        for (m, r) in good {
            let mut tx = self.pool.begin().await?;
            let reason =
                match compose_batch(&mut tx, std::slice::from_ref(r), &self.transport).await {
                    Ok(mut c) => {
                        tx.commit().await?;
                        out.push(Some(Ok(c.pop().expect("one result in, one out"))));
                        continue;
                    }
                    Err(e) if is_transient(&e) => return Err(e),
                    Err(e) => format!("cannot be composed: {e}"),
                };
            let attempts = m.info().map_or(1, |i| i.delivered.max(1) as u64);
            if attempts >= self.transport.results.max_attempts {
                out.push(Some(Err(format!("{reason} (after {attempts} attempts)"))));
                continue;
            }
            tracing::warn!(result_id = %r.result_id, attempts, reason, "a result failed to compose; retrying it later");
            metrics::counter!("nimmer_canon_rows_total", "result" => "retried").increment(1);
            let delay = Duration::from_secs(attempts.min(self.transport.results.ack_wait_s));
            if let Err(e) = m.ack_with(AckKind::Nak(Some(delay))).await {
                tracing::warn!(error = %e, "nak failed; the result is redelivered after ack_wait");
            }
            out.push(None);
        }
        Ok(out)
    }

    /// Composes `results` one savepoint each in one transaction; a result the schema rejects gets its reason.
    async fn one_by_one(
        &self,
        results: &[DialogResult],
    ) -> Result<Vec<std::result::Result<Composed, String>>> {
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::with_capacity(results.len());
        for r in results {
            let mut sp = sqlx::Connection::begin(&mut *tx).await?;
            match compose_batch(&mut sp, std::slice::from_ref(r), &self.transport).await {
                Ok(mut c) => {
                    sp.commit().await?;
                    out.push(Ok(c.pop().expect("one result in, one out")));
                }
                Err(CompositorError::Db(e)) if is_data_error(&e) => {
                    sp.rollback().await?;
                    out.push(Err(format!("rejected by the canon schema: {e}")));
                }
                Err(e) => return Err(e),
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Stores `m` on the dead-letter subject with `reason`, then acks it (terminating its delivery).
    async fn dead_letter(&self, m: &Message, reason: &str) -> Result<()> {
        tracing::warn!(subject = %m.subject, reason, "result dead-lettered");
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nimmer-Reason", reason.replace(['\r', '\n'], " ").as_str());
        headers.insert("Nimmer-Subject", m.subject.as_str());
        self.js
            .publish_with_headers(
                self.transport.results.dead_letter.clone(),
                headers,
                m.payload.clone(),
            )
            .await
            .map_err(CompositorError::nats)?
            .await
            .map_err(CompositorError::nats)?;
        m.ack_with(AckKind::Term)
            .await
            .map_err(CompositorError::nats)
    }
}

/// Reports the results waiting for compositors (`nimmer_results_pending`, the autoscaling signal) every
/// `every` until the task is dropped.
pub async fn report_depth(
    mut consumer: consumer::Consumer<consumer::pull::Config>,
    every: Duration,
) {
    loop {
        match consumer.info().await {
            Ok(i) => {
                metrics::gauge!("nimmer_results_pending")
                    .set((i.num_pending as usize + i.num_ack_pending) as f64);
            }
            Err(e) => tracing::debug!(error = %e, "consumer info failed"),
        }
        tokio::time::sleep(every).await;
    }
}

//! The relay (the "pgnats path" done transactionally): drains the outbox into JetStream `CANON`. Every
//! compositor process runs one; a session-level advisory lock makes exactly one the leader, and a standby takes
//! over when the leader's connection goes away. The leader reads outbox rows in id (commit) order, publishes
//! them all with their `Nats-Msg-Id` (the canon UID; `<canon UID>@<player>` for a player's copy), awaits the acks together, and deletes the acked rows. It sleeps
//! until a NOTIFY from the outbox trigger (sent at commit, so a rolled-back transaction publishes nothing) or
//! `poll_ms`. A failed publish leaves its rows for the next round; JetStream's duplicate window absorbs the
//! republish of rows acked but not yet deleted.

use std::time::Duration;

use async_nats::jetstream;
use futures::future::join_all;
use nimmer_config::TransportFile;
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool};

use crate::error::{CompositorError, Result};

/// The advisory lock key of the relay leader ("nimmer r" in ASCII).
pub const LEADER_LOCK: i64 = 0x6e69_6d6d_6572_2072;

pub struct Relay {
    pub pool: PgPool,
    pub url: String,
    pub js: jetstream::Context,
    pub transport: TransportFile,
}

impl Relay {
    /// Competes for leadership and drains while leader, until `shutdown`.
    pub async fn run(&self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        let poll = Duration::from_millis(self.transport.relay.poll_ms);
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                r = self.lead() => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "relay: lost leadership or failed; retrying");
                    }
                    tokio::time::sleep(poll).await;
                }
            }
        }
    }

    /// Waits to become leader, then drains until an error.
    async fn lead(&self) -> Result<()> {
        let mut conn = PgConnection::connect(&self.url).await?;
        let poll = Duration::from_millis(self.transport.relay.poll_ms);
        loop {
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(LEADER_LOCK)
                .fetch_one(&mut conn)
                .await?;
            if got {
                break;
            }
            tokio::time::sleep(poll).await;
        }
        tracing::info!("relay: leader");
        metrics::gauge!("nimmer_relay_leader").set(1.0);
        let r = self.drain_loop(&mut conn).await;
        metrics::gauge!("nimmer_relay_leader").set(0.0);
        r
    }

    async fn drain_loop(&self, conn: &mut PgConnection) -> Result<()> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen("nimmer_outbox").await?;
        let poll = Duration::from_millis(self.transport.relay.poll_ms);
        loop {
            let n = self.drain_once(conn).await?;
            if n < self.transport.relay.batch {
                // Nothing (or little) left: sleep until the next commit or the poll interval.
                let _ = tokio::time::timeout(poll, listener.recv()).await;
            }
        }
    }

    /// Publishes one batch of outbox rows and deletes those acked; how many were published.
    pub async fn drain_once(&self, conn: &mut PgConnection) -> Result<usize> {
        let rows: Vec<(i64, String, String, Vec<u8>)> =
            sqlx::query_as("SELECT id, msg_id, subject, payload FROM outbox ORDER BY id LIMIT $1")
                .bind(self.transport.relay.batch as i64)
                .fetch_all(&mut *conn)
                .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut pending = Vec::with_capacity(rows.len());
        for (id, uid, subject, payload) in rows {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", uid.as_str());
            let ack = self
                .js
                .publish_with_headers(subject, headers, payload.into())
                .await
                .map_err(CompositorError::nats)?;
            pending.push((id, ack));
        }
        let (ids, acks): (Vec<i64>, Vec<_>) = pending.into_iter().unzip();
        let results = join_all(acks.into_iter().map(std::future::IntoFuture::into_future)).await;
        // Rows are deleted up to the first failure, so the outbox keeps its order.
        let acked: Vec<i64> = ids
            .iter()
            .zip(&results)
            .take_while(|(_, r)| r.is_ok())
            .map(|(id, _)| *id)
            .collect();
        if !acked.is_empty() {
            sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
                .bind(&acked)
                .execute(&mut *conn)
                .await?;
            metrics::counter!("nimmer_canon_published_total").increment(acked.len() as u64);
        }
        if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
            return Err(CompositorError::Nats(format!("publishing canon: {e}")));
        }
        Ok(acked.len())
    }
}

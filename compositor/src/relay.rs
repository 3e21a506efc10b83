//! The relay (the "pgnats path" done transactionally): drains the outbox into JetStream `CANON`. Every
//! compositor process runs one; a session-level advisory lock makes exactly one the leader, and a standby takes
//! over when the leader's connection goes away. The leader reads outbox rows in id (commit) order and publishes
//! them with their `Nats-Msg-Id` (the result id; `<result id>@<player>` for a player's copy): one subject's
//! rows one after another, so they are stored in order, different subjects concurrently; then it deletes
//! the acked rows. It sleeps until a NOTIFY from the outbox trigger (sent at commit, so a rolled-back
//! transaction publishes nothing) or `poll_ms`. A failed publish leaves its rows for the next round. Rows
//! that may have been stored without being deleted (those a new leader inherits, and a subject whose publish
//! failed) are checked against the subject's last stored message first, so they are never stored twice,
//! whatever JetStream's duplicate window.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
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
        let mut conn = self.db(PgConnection::connect(&self.url)).await?;
        let poll = Duration::from_millis(self.transport.relay.poll_ms);
        loop {
            let got: bool = self
                .db(sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(LEADER_LOCK)
                    .fetch_one(&mut conn))
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
        // Rows up to here may have been published by an earlier leader (or by this process before it lost
        // its connection) without being deleted: their subjects are checked before they are published.
        let inherited: Option<i64> = self
            .db(sqlx::query_scalar("SELECT max(id) FROM outbox").fetch_one(&mut *conn))
            .await?;
        let mut suspects = Suspects {
            up_to: inherited.unwrap_or(0),
            subjects: HashSet::new(),
        };
        loop {
            let round = self.drain_once(conn, &mut suspects).await?;
            if round.failed {
                tokio::time::sleep(poll).await;
            } else if round.published < self.transport.relay.batch {
                // Nothing (or little) left: sleep until the next commit or the poll interval.
                let _ = tokio::time::timeout(poll, listener.recv()).await;
            }
        }
    }

    /// Publishes one batch of outbox rows and deletes those JetStream holds. Rows of one subject are
    /// published one after another (each after the previous one's ack), subjects concurrently, so a subject's
    /// messages are stored in outbox (commit) order and a failure never lets a later row overtake an earlier
    /// one. A subject in `suspects` is first asked for its last stored message: rows up to that one are
    /// deleted without being published again, so a republish never duplicates, however long after the
    /// first publish (JetStream's duplicate window is not relied on).
    pub async fn drain_once(
        &self,
        conn: &mut PgConnection,
        suspects: &mut Suspects,
    ) -> Result<Round> {
        let rows: Vec<Row> = self
            .db(sqlx::query_as(
                "SELECT id, msg_id, subject, payload FROM outbox ORDER BY id LIMIT $1",
            )
            .bind(self.transport.relay.batch as i64)
            .fetch_all(&mut *conn))
            .await?;
        if rows.is_empty() {
            return Ok(Round::default());
        }
        let mut chains: Vec<(String, Vec<Row>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for row in rows {
            let at = *index.entry(row.subject.clone()).or_insert_with(|| {
                chains.push((row.subject.clone(), Vec::new()));
                chains.len() - 1
            });
            chains[at].1.push(row);
        }
        let outcomes = join_all(chains.iter().map(|(subject, rows)| {
            let check = suspects.subjects.contains(subject)
                || rows.first().is_some_and(|r| r.id <= suspects.up_to);
            self.publish_chain(subject, rows, check)
        }))
        .await;
        let mut acked = Vec::new();
        let mut round = Round::default();
        for ((subject, _), o) in chains.iter().zip(outcomes) {
            acked.extend(o.acked);
            round.skipped += o.skipped;
            match o.error {
                Some(e) => {
                    tracing::warn!(subject, error = %e, "relay: publishing canon failed; the subject is retried");
                    suspects.subjects.insert(subject.clone());
                    round.failed = true;
                }
                None => {
                    suspects.subjects.remove(subject);
                }
            }
        }
        if !acked.is_empty() {
            self.db(sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
                .bind(&acked)
                .execute(&mut *conn))
                .await?;
        }
        round.published = acked.len() - round.skipped;
        metrics::counter!("nimmer_canon_published_total").increment(round.published as u64);
        if round.skipped > 0 {
            tracing::info!(
                rows = round.skipped,
                "relay: rows JetStream already held were deleted, not published again"
            );
            metrics::counter!("nimmer_relay_already_stored_total").increment(round.skipped as u64);
        }
        Ok(round)
    }

    /// Publishes `rows` (one subject, id order) one by one; with `check`, first skips those the stream
    /// already holds.
    async fn publish_chain(&self, subject: &str, rows: &[Row], check: bool) -> Chain {
        let mut chain = Chain::default();
        let mut from = 0;
        if check {
            match self.stored_prefix(subject, rows).await {
                Ok(n) => {
                    chain.acked.extend(rows[..n].iter().map(|r| r.id));
                    chain.skipped = n;
                    from = n;
                }
                Err(e) => {
                    chain.error = Some(e);
                    return chain;
                }
            }
        }
        for row in &rows[from..] {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", row.msg_id.as_str());
            let stored = match self
                .js
                .publish_with_headers(subject.to_string(), headers, row.payload.clone().into())
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match stored {
                Ok(()) => chain.acked.push(row.id),
                Err(e) => {
                    chain.error = Some(e);
                    break;
                }
            }
        }
        chain
    }

    /// How many of `rows` (one subject, id order) the stream already holds: those up to the one whose
    /// message id is the subject's last stored message (a subject's rows are stored in order, each only after
    /// the one before it was acknowledged, so what is stored is a prefix).
    async fn stored_prefix(
        &self,
        subject: &str,
        rows: &[Row],
    ) -> std::result::Result<usize, String> {
        let stream = match self.stream_of(subject) {
            Some(s) => s.to_string(),
            None => self
                .js
                .stream_by_subject(subject)
                .await
                .map_err(|e| format!("finding the stream of {subject}: {e}"))?,
        };
        let stream = self
            .js
            .get_stream_no_info(&stream)
            .await
            .map_err(|e| format!("stream {stream}: {e}"))?;
        let last = match stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => m,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(0),
            Err(e) => return Err(format!("last message on {subject}: {e}")),
        };
        let id = last
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_string());
        Ok(id
            .and_then(|id| rows.iter().position(|r| r.msg_id == id))
            .map_or(0, |at| at + 1))
    }

    /// `fut` (a PostgreSQL call), failing when it takes longer than `db_timeout_ms`.
    async fn db<T>(
        &self,
        fut: impl std::future::Future<Output = std::result::Result<T, sqlx::Error>>,
    ) -> Result<T> {
        let ms = self.transport.relay.db_timeout_ms;
        match tokio::time::timeout(Duration::from_millis(ms), fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(CompositorError::DbTimeout(ms)),
        }
    }

    /// The stream a subject of the transport's templates goes to (by the template's literal prefix).
    fn stream_of(&self, subject: &str) -> Option<&str> {
        let t = &self.transport;
        [
            (&t.canon.subject, &t.canon.stream),
            (&t.players.subject, &t.players.stream),
            (&t.factions.subject, &t.factions.stream),
        ]
        .into_iter()
        .filter_map(|(template, stream)| {
            let prefix = &template[..template.find('{')?];
            subject
                .starts_with(prefix)
                .then_some((prefix.len(), stream.as_str()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, stream)| stream)
    }
}

/// An outbox row.
#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    msg_id: String,
    subject: String,
    payload: Vec<u8>,
}

/// What the leader is unsure JetStream already holds.
#[derive(Debug, Default)]
pub struct Suspects {
    /// Outbox rows with ids up to this were there when this leader took over.
    pub up_to: i64,
    /// Subjects whose last publish failed (it may have been stored all the same).
    pub subjects: HashSet<String>,
}

/// What a round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Rows published and deleted.
    pub published: usize,
    /// Rows found already stored and deleted without publishing.
    pub skipped: usize,
    /// Some subject failed (its rows wait for the next round).
    pub failed: bool,
}

#[derive(Default)]
struct Chain {
    acked: Vec<i64>,
    skipped: usize,
    error: Option<String>,
}

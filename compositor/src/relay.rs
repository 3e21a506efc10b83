//! The relay (the "pgnats path" done transactionally): drains the outbox into JetStream `CANON`, `PLAYERS`
//! and `FACTIONS`. Every compositor process runs one; a session-level advisory lock makes exactly one the
//! leader, and a standby takes over when the leader's connection goes away. The leader reads outbox rows in id
//! (commit) order and publishes each stream's share of a round pipelined, streams concurrently, each row with
//! its `Nats-Msg-Id` (the result id; `<result id>@<player>` for a player's copy) and the stream sequence it
//! must follow (`Nats-Expected-Last-Sequence`): the relay is the streams' only writer, so a row lost or
//! refused makes JetStream refuse every row after it, and a stream's stored rows are always an id-order prefix
//! of what was sent, whatever fails when (a stale leader's late publishes break the chain too instead of
//! interleaving). Then it deletes the acked prefix. It sleeps until a NOTIFY from the outbox trigger (sent at
//! commit, so a rolled-back transaction publishes nothing) or `poll_ms`. A failed round leaves its rows for
//! the next. Rows that may have been stored without being deleted (those a new leader inherits, and the
//! subjects of a failed round) are checked against the subject's last stored message first, so they are
//! never stored twice, whatever JetStream's duplicate window.

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
        let mut state = LeaderState {
            up_to: inherited.unwrap_or(0),
            ..Default::default()
        };
        loop {
            let round = self.drain_once(conn, &mut state).await?;
            if round.failed {
                tokio::time::sleep(poll).await;
            } else if round.published < self.transport.relay.batch {
                // Nothing (or little) left: sleep until the next commit or the poll interval.
                let _ = tokio::time::timeout(poll, listener.recv()).await;
            }
        }
    }

    /// Publishes one round of outbox rows and deletes those JetStream holds. Each stream's rows are sent as
    /// one sequence chain, so a failure never stores a later row without the earlier ones; a subject in
    /// `state.suspects` is first asked for its last stored message, and rows up to that one are deleted
    /// without being published again, so a republish never duplicates, however long after the first publish
    /// (JetStream's duplicate window is not relied on).
    pub async fn drain_once(
        &self,
        conn: &mut PgConnection,
        state: &mut LeaderState,
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
        let mut round = Round::default();
        let mut groups: Vec<(String, Vec<Row>)> = Vec::new();
        let mut streams: HashMap<String, std::result::Result<String, String>> = HashMap::new();
        for row in rows {
            if !streams.contains_key(&row.subject) {
                let found = self.stream_for(&row.subject).await;
                streams.insert(row.subject.clone(), found);
            }
            match &streams[&row.subject] {
                Ok(stream) => match groups.iter_mut().find(|(s, _)| s == stream) {
                    Some((_, rows)) => rows.push(row),
                    None => groups.push((stream.clone(), vec![row])),
                },
                // Every row of the subject stays for a later round (the answer is the same for all).
                Err(e) => {
                    tracing::warn!(subject = row.subject, error = %e, "relay: no stream for a canon subject");
                    round.failed = true;
                }
            }
        }
        let outcomes = join_all(groups.iter().map(|(stream, rows)| {
            self.publish_stream(stream, rows, state, state.last_seq.get(stream).copied())
        }))
        .await;
        let mut acked = Vec::new();
        for ((stream, rows), o) in groups.iter().zip(outcomes) {
            acked.extend(o.acked);
            round.skipped += o.skipped;
            match o.error {
                Some(e) => {
                    tracing::warn!(stream, error = %e, "relay: publishing canon failed; its rows are retried");
                    state.suspects.extend(o.unsure);
                    state.last_seq.remove(stream);
                    round.failed = true;
                }
                None => {
                    for row in rows {
                        state.suspects.remove(&row.subject);
                    }
                    if let Some(seq) = o.last_seq {
                        state.last_seq.insert(stream.clone(), seq);
                    }
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

    /// Publishes `rows` (one stream, id order): first skips, per suspect subject, what the stream already
    /// holds, then sends the rest chained on the stream's last sequence (`last_seq`, or asked of JetStream).
    async fn publish_stream(
        &self,
        stream: &str,
        rows: &[Row],
        state: &LeaderState,
        last_seq: Option<u64>,
    ) -> Published {
        let mut out = Published::default();
        let mut subjects: Vec<&str> = Vec::new();
        for row in rows {
            if !subjects.contains(&row.subject.as_str()) {
                subjects.push(&row.subject);
            }
        }
        let suspect: Vec<&str> = subjects
            .into_iter()
            .filter(|s| {
                state.suspects.contains(*s)
                    || rows
                        .iter()
                        .find(|r| r.subject == *s)
                        .is_some_and(|r| r.id <= state.up_to)
            })
            .collect();
        let checks = join_all(suspect.iter().map(|subject| {
            let of: Vec<&Row> = rows.iter().filter(|r| r.subject == *subject).collect();
            async move {
                let n = self.stored_prefix(stream, subject, &of).await;
                (of, n)
            }
        }))
        .await;
        let mut stored = HashSet::new();
        for (of, n) in checks {
            match n {
                Ok(n) => stored.extend(of[..n].iter().map(|r| r.id)),
                Err(e) => out.error = Some(e),
            }
        }
        out.skipped = stored.len();
        out.acked.extend(stored.iter().copied());
        if out.error.is_some() {
            // Nothing else is published before every suspect subject's stored prefix is known.
            out.unsure = suspect.iter().map(|s| s.to_string()).collect();
            return out;
        }
        let rest: Vec<&Row> = rows.iter().filter(|r| !stored.contains(&r.id)).collect();
        let (sent, result) = self.publish_chain(stream, &rest, last_seq).await;
        out.acked.extend(rest[..sent].iter().map(|r| r.id));
        match result {
            Ok(seq) => out.last_seq = seq,
            Err(e) => {
                out.error = Some(e);
                out.unsure = rest[sent..].iter().map(|r| r.subject.clone()).collect();
            }
        }
        out
    }

    /// Sends `rows` without waiting between them, each expecting the stream's last sequence to be the one
    /// before it, and awaits the acks in order. Returns how many were acked (a prefix: after a failure the
    /// rest count as unknown) and the stream's last sequence, or the first failure.
    async fn publish_chain(
        &self,
        stream: &str,
        rows: &[&Row],
        last_seq: Option<u64>,
    ) -> (usize, std::result::Result<Option<u64>, String>) {
        if rows.is_empty() {
            return (0, Ok(last_seq));
        }
        let mut seq = match last_seq {
            Some(s) => s,
            None => match self.js.get_stream(stream).await {
                Ok(s) => s.cached_info().state.last_sequence,
                Err(e) => return (0, Err(format!("stream {stream}: {e}"))),
            },
        };
        let mut acks = Vec::with_capacity(rows.len());
        for row in rows {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", row.msg_id.as_str());
            headers.insert("Nats-Expected-Last-Sequence", seq.to_string().as_str());
            seq += 1;
            match self
                .js
                .publish_with_headers(row.subject.clone(), headers, row.payload.clone().into())
                .await
            {
                Ok(ack) => acks.push(ack),
                // Not sent: nothing after it is either.
                Err(e) => {
                    return self.settle(acks, Some(e.to_string())).await;
                }
            }
        }
        self.settle(acks, None).await
    }

    /// Awaits `acks` in order; the count of the acked prefix and the last stored sequence, or the first error.
    async fn settle(
        &self,
        acks: Vec<async_nats::jetstream::context::PublishAckFuture>,
        unsent: Option<String>,
    ) -> (usize, std::result::Result<Option<u64>, String>) {
        let mut n = 0;
        let mut last = None;
        for ack in acks {
            match ack.await {
                // A duplicate was stored before and did not move the sequence: the chain breaks after it,
                // and the next round asks JetStream where the stream stands.
                Ok(a) if a.duplicate => {
                    return (n + 1, Err(format!("{} was already stored", a.sequence)));
                }
                Ok(a) => {
                    n += 1;
                    last = Some(a.sequence);
                }
                Err(e) => return (n, Err(e.to_string())),
            }
        }
        match unsent {
            Some(e) => (n, Err(e)),
            None => (n, Ok(last)),
        }
    }

    /// How many of `rows` (one subject, id order) `stream` already holds: those up to the one whose message
    /// id is the subject's last stored message (a stream stores a prefix of each chain it was sent, so a
    /// subject's stored rows are a prefix of its rows).
    async fn stored_prefix(
        &self,
        stream: &str,
        subject: &str,
        rows: &[&Row],
    ) -> std::result::Result<usize, String> {
        let stream = self
            .js
            .get_stream_no_info(stream)
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

    /// The stream a subject goes to: by the transport templates' literal prefixes, else asked of JetStream.
    async fn stream_for(&self, subject: &str) -> std::result::Result<String, String> {
        let t = &self.transport;
        let known = [
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
        .map(|(_, stream)| stream.to_string());
        match known {
            Some(s) => Ok(s),
            None => self
                .js
                .stream_by_subject(subject)
                .await
                .map_err(|e| format!("finding the stream of {subject}: {e}")),
        }
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

/// What a leader knows and what it is unsure JetStream already holds.
#[derive(Debug, Default)]
pub struct LeaderState {
    /// Outbox rows with ids up to this were there when this leader took over.
    pub up_to: i64,
    /// Subjects whose last publish failed (part of it may have been stored all the same).
    pub suspects: HashSet<String>,
    /// Each stream's last sequence after this leader's last successful round (absent: asked of JetStream).
    pub last_seq: HashMap<String, u64>,
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

/// What publishing one stream's rows did.
#[derive(Default)]
struct Published {
    /// Rows JetStream holds (deleted from the outbox).
    acked: Vec<i64>,
    /// Of those, rows it already held (not published again).
    skipped: usize,
    error: Option<String>,
    /// Subjects that may hold part of what failed: checked before their next publish.
    unsure: Vec<String>,
    /// The stream's last sequence after this round's publishes (None: nothing published).
    last_seq: Option<u64>,
}

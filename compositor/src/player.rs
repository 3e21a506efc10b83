//! The player client: follows a player's subject on `PLAYERS` from the checkpoint stored in the player's SQLite
//! file and applies canon there idempotently (the result id is the key), storing the new checkpoint (the last
//! applied stream sequence) in the same SQLite transaction. A crash between apply and checkpoint cannot happen;
//! a redelivery is ignored by the key. A late joiner starts from sequence 1 and catches up on its whole feed.
//! Each time the feed (re)starts, the client checks that the stream still holds everything after its
//! checkpoint: a checkpoint behind the stream's first message (retention, a purge) or a recreated stream is a
//! gap, reported and filled from PostgreSQL canon through the compositors ([`crate::resync`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use nimmer_config::{TransportFile, valid_token};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};

use crate::canon::Canon;
use crate::error::{CompositorError, Result};

/// A player's local canon store.
pub struct PlayerStore {
    pool: SqlitePool,
    path: PathBuf,
}

/// Rows are keyed by result id (the dialog's idempotency key, never handed out twice), not by canon UID (a
/// scene sequence, which a PostgreSQL failover that lost commits hands out again).
const CANON_TABLE: &str = "CREATE TABLE IF NOT EXISTS canon (
        result_id TEXT PRIMARY KEY,
        canon_uid TEXT NOT NULL,
        gm_event TEXT NOT NULL,
        district TEXT NOT NULL,
        scene TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        npc TEXT,
        text TEXT NOT NULL,
        faction TEXT,
        finished_at_ms INTEGER NOT NULL,
        applied_at_ms INTEGER NOT NULL,
        row TEXT NOT NULL
    )";

/// The schema version this code writes (`PRAGMA user_version`): 0 keyed canon by canon UID.
const VERSION: i64 = 1;

const SCHEMA: &[&str] = &[
    CANON_TABLE,
    "CREATE INDEX IF NOT EXISTS canon_uid ON canon (canon_uid)",
    "CREATE INDEX IF NOT EXISTS canon_scene ON canon (gm_event, district, scene, seq)",
    "CREATE TABLE IF NOT EXISTS checkpoint (feed TEXT PRIMARY KEY, stream_seq INTEGER NOT NULL)",
    // Which stream the checkpoint counts in (its creation time): a recreated stream starts counting again.
    "CREATE TABLE IF NOT EXISTS feed_stream (feed TEXT PRIMARY KEY, created TEXT NOT NULL)",
];

/// Rebuilds a version-0 store (canon keyed by canon UID) keyed by result id, in one transaction.
const FROM_V0: &[&str] = &[
    "ALTER TABLE canon RENAME TO canon_v0",
    "DROP INDEX IF EXISTS canon_scene",
    CANON_TABLE,
    "INSERT OR IGNORE INTO canon (result_id, canon_uid, gm_event, district, scene, seq, kind, npc, text, faction,
                                  finished_at_ms, applied_at_ms, row)
     SELECT json_extract(row, '$.result_id'), canon_uid, gm_event, district, scene, seq, kind, npc, text, faction,
            finished_at_ms, applied_at_ms, row FROM canon_v0",
    "DROP TABLE canon_v0",
];

impl PlayerStore {
    /// Opens (creating) the store at `path`. A file that is not a player store says so, naming the file.
    /// Another process holding the file busy (e.g. mid-open) is waited for, up to 10 s.
    pub async fn open(path: &Path) -> Result<Self> {
        let mut tries = 0;
        loop {
            match Self::try_open(path).await {
                Err(e) if is_busy(&e) && tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    return Err(CompositorError::Store(format!(
                        "{}: not a usable player store (SQLite): {e}",
                        path.display()
                    )));
                }
                Ok(Err(corrupt)) => {
                    return Err(CompositorError::Store(format!(
                        "{}: the player store is corrupt: {corrupt}",
                        path.display()
                    )));
                }
                Ok(Ok(pool)) => {
                    return Ok(Self {
                        pool,
                        path: path.to_path_buf(),
                    });
                }
            }
        }
    }

    async fn try_open(path: &Path) -> Result<Result<SqlitePool, String>, sqlx::Error> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .busy_timeout(Duration::from_secs(10))
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Normal);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await?;
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&pool)
            .await?;
        let has_canon: bool = sqlx::query_scalar(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'canon'",
        )
        .fetch_one(&pool)
        .await?;
        if version < 1 && has_canon {
            let mut tx = pool.begin().await?;
            for stmt in FROM_V0 {
                sqlx::query(stmt).execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
        for stmt in SCHEMA {
            sqlx::query(stmt).execute(&pool).await?;
        }
        sqlx::query(&format!("PRAGMA user_version = {VERSION}"))
            .execute(&pool)
            .await?;
        let ok: String = sqlx::query_scalar("PRAGMA quick_check")
            .fetch_one(&pool)
            .await?;
        Ok(if ok == "ok" { Ok(pool) } else { Err(ok) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last applied stream sequence of `feed` (0: none).
    pub async fn checkpoint(&self, feed: &str) -> Result<u64> {
        let v: Option<i64> = sqlx::query_scalar("SELECT stream_seq FROM checkpoint WHERE feed = ?")
            .bind(feed)
            .fetch_optional(&self.pool)
            .await?;
        Ok(v.unwrap_or(0) as u64)
    }

    /// Applies `rows` (stream sequence, canon) and moves `feed`'s checkpoint to the last one, in one
    /// transaction. Returns, per row, whether it was new.
    pub async fn apply(&self, feed: &str, rows: &[(u64, Canon)]) -> Result<Vec<bool>> {
        let Some((last, _)) = rows.last() else {
            return Ok(Vec::new());
        };
        let mut tx = self.pool.begin().await?;
        let new = insert(&mut tx, rows.iter().map(|(_, c)| c)).await?;
        set_checkpoint(&mut tx, feed, *last).await?;
        tx.commit().await?;
        Ok(new)
    }

    /// Applies rows read back from canon after a gap, sets `feed`'s checkpoint to `checkpoint` and records
    /// which stream (by its creation time) it counts in, in one transaction. Returns, per row, whether it
    /// was new.
    pub async fn resync(
        &self,
        feed: &str,
        rows: &[Canon],
        checkpoint: u64,
        stream_created: &str,
    ) -> Result<Vec<bool>> {
        let mut tx = self.pool.begin().await?;
        let new = insert(&mut tx, rows.iter()).await?;
        set_checkpoint(&mut tx, feed, checkpoint).await?;
        set_stream(&mut tx, feed, stream_created).await?;
        tx.commit().await?;
        Ok(new)
    }

    /// The creation time of the stream `feed`'s checkpoint counts in (none: not recorded yet).
    pub async fn stream_created(&self, feed: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT created FROM feed_stream WHERE feed = ?")
                .bind(feed)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Records the stream `feed`'s checkpoint counts in.
    pub async fn set_stream_created(&self, feed: &str, created: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        set_stream(&mut tx, feed, created).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The result id of the row applied last (none: the store is empty).
    pub async fn newest(&self) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT result_id FROM canon ORDER BY rowid DESC LIMIT 1")
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Deletes rows older than their kind's rule (`now_ms` - `max_age_h`); how many were deleted.
    pub async fn prune(&self, rules: &[nimmer_config::PruneRule], now_ms: i64) -> Result<u64> {
        let named: Vec<&str> = rules
            .iter()
            .filter(|r| r.kind != "*")
            .map(|r| r.kind.as_str())
            .collect();
        let mut deleted = 0;
        for r in rules {
            let cutoff = now_ms - (r.max_age_h as i64) * 3_600_000;
            let q = if r.kind == "*" {
                // Kinds without their own rule.
                let list = serde_json::to_string(&named).expect("names serialize");
                sqlx::query(
                    "DELETE FROM canon WHERE finished_at_ms < ?
                     AND kind NOT IN (SELECT value FROM json_each(?))",
                )
                .bind(cutoff)
                .bind(list)
            } else {
                sqlx::query("DELETE FROM canon WHERE finished_at_ms < ? AND kind = ?")
                    .bind(cutoff)
                    .bind(r.kind.clone())
            };
            deleted += q.execute(&self.pool).await?.rows_affected();
        }
        Ok(deleted)
    }

    /// Canon rows held.
    pub async fn count(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM canon")
            .fetch_one(&self.pool)
            .await?;
        Ok(n as u64)
    }

    /// Every canon UID held, sorted.
    pub async fn canon_uids(&self) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT canon_uid FROM canon ORDER BY canon_uid")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    pub async fn close(self) {
        self.pool.close().await;
    }
}

/// SQLITE_BUSY / SQLITE_LOCKED: another connection holds the file for a moment.
fn is_busy(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("5" | "6" | "261" | "517")))
}

/// Inserts `rows` (new result ids only); per row, whether it was new.
async fn insert<'a>(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    rows: impl Iterator<Item = &'a Canon>,
) -> Result<Vec<bool>> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let all: Vec<&Canon> = rows.collect();
    let mut inserted = std::collections::HashSet::new();
    // Multi-row inserts (64 rows, 768 parameters each): one statement per chunk, not per row.
    for chunk in all.chunks(64) {
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO canon (result_id, canon_uid, gm_event, district, scene, seq, kind, npc, text, faction,
                                finished_at_ms, applied_at_ms, row) ",
        );
        q.push_values(chunk, |mut b, c| {
            b.push_bind(&c.result_id)
                .push_bind(&c.canon_uid)
                .push_bind(&c.gm_event)
                .push_bind(&c.district)
                .push_bind(&c.scene)
                .push_bind(c.seq)
                .push_bind(&c.kind)
                .push_bind(&c.npc)
                .push_bind(&c.text)
                .push_bind(&c.faction)
                .push_bind(c.finished_at_ms)
                .push_bind(now)
                .push_bind(serde_json::to_string(c).expect("canon serializes"));
        });
        q.push(" ON CONFLICT (result_id) DO NOTHING RETURNING result_id");
        let uids: Vec<String> = q.build_query_scalar().fetch_all(&mut **tx).await?;
        inserted.extend(uids);
    }
    // New: inserted now, and the first of its UID in this batch.
    Ok(all.iter().map(|c| inserted.remove(&c.result_id)).collect())
}

async fn set_checkpoint(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    feed: &str,
    seq: u64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO checkpoint (feed, stream_seq) VALUES (?, ?)
         ON CONFLICT (feed) DO UPDATE SET stream_seq = excluded.stream_seq",
    )
    .bind(feed)
    .bind(seq as i64)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn set_stream(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    feed: &str,
    created: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO feed_stream (feed, created) VALUES (?, ?)
         ON CONFLICT (feed) DO UPDATE SET created = excluded.created",
    )
    .bind(feed)
    .bind(created)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A player id must be one subject token.
fn check_player(player: &str) -> Result<()> {
    if valid_token(player) {
        Ok(())
    } else {
        Err(CompositorError::Config(format!(
            "player id {player:?} cannot be a subject token"
        )))
    }
}

/// The rows [`PlayerStore::apply`] found new.
fn only_new(rows: impl IntoIterator<Item = Canon>, new: Vec<bool>) -> Vec<Canon> {
    rows.into_iter()
        .zip(new)
        .filter_map(|(c, n)| n.then_some(c))
        .collect()
}

/// What [`follow`] reports after each applied batch.
#[derive(Debug, Clone)]
pub struct Applied {
    pub new: Vec<Canon>,
    pub checkpoint: u64,
    /// Set when this batch filled a gap from canon (the rows the feed no longer held).
    pub gap: Option<Gap>,
}

/// A gap in a player's feed: the stream no longer holds everything after the player's checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// The player's checkpoint when the gap was found.
    pub checkpoint: u64,
    /// The stream's first sequence then (the feed resumes there).
    pub first_available: u64,
    /// The stream was recreated since the checkpoint (it counts from the start again).
    pub recreated: bool,
}

/// Follows `player`'s feed from its checkpoint, applying batches into `store`, until `stop` resolves.
/// `on_batch` sees each batch's new rows.
pub async fn follow(
    js: &jetstream::Context,
    t: &TransportFile,
    player: &str,
    store: &PlayerStore,
    stop: impl std::future::Future<Output = ()>,
    mut on_batch: impl FnMut(&Applied),
) -> Result<()> {
    check_player(player)?;
    tokio::pin!(stop);
    let feed = t.player_subject(player);
    prune_now(store, &t.players.prune).await;
    let mut last_prune = std::time::Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        if last_prune.elapsed() > Duration::from_secs(600) {
            prune_now(store, &t.players.prune).await;
            last_prune = std::time::Instant::now();
        }
        let from = match resume_point(js, t, player, &feed, store, &mut on_batch).await {
            Ok(from) => from,
            Err(e) => {
                tracing::warn!(error = %e, player, "checking the player feed for gaps failed; retrying");
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let run = follow_from(js, t, &feed, from, store, &mut on_batch);
        tokio::select! {
            _ = &mut stop => return Ok(()),
            r = run => {
                // The stream ended or failed (e.g. the server went away): resume from the checkpoint.
                if let Err(e) = r {
                    tracing::warn!(error = %e, player, "player feed interrupted; resuming from the checkpoint");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Where `feed` resumes: after the checkpoint, unless the stream no longer holds everything after it; then
/// the gap is reported, the player's rows are read back from canon (from just before the newest one it
/// holds) and applied, and the feed resumes at the stream's first message (what it still holds is applied
/// again as no-ops).
async fn resume_point(
    js: &jetstream::Context,
    t: &TransportFile,
    player: &str,
    feed: &str,
    store: &PlayerStore,
    on_batch: &mut impl FnMut(&Applied),
) -> Result<u64> {
    let checkpoint = store.checkpoint(feed).await?;
    let stream = js
        .get_stream(&t.players.stream)
        .await
        .map_err(CompositorError::nats)?;
    let info = stream.cached_info();
    let created = info.created.unix_timestamp_nanos().to_string();
    let first = info.state.first_sequence.max(1);
    let known = store.stream_created(feed).await?;
    let recreated =
        known.as_ref().is_some_and(|k| *k != created) || checkpoint > info.state.last_sequence;
    if !recreated && checkpoint + 1 >= first {
        if known.is_none() {
            store.set_stream_created(feed, &created).await?;
        }
        return Ok(checkpoint + 1);
    }
    let gap = Gap {
        checkpoint,
        first_available: first,
        recreated,
    };
    tracing::warn!(
        player,
        ?gap,
        "player feed gap: the stream no longer holds everything after the checkpoint; resyncing from canon"
    );
    metrics::counter!("nimmer_player_gaps_total").increment(1);
    let rows = crate::resync::fetch(&js.client(), t, player, store.newest().await?).await?;
    let resume = first - 1;
    let new = store.resync(feed, &rows, resume, &created).await?;
    let new = only_new(rows, new);
    tracing::info!(
        player,
        rows = new.len(),
        resume_at = first,
        "player feed gap filled from canon"
    );
    on_batch(&Applied {
        new,
        checkpoint: resume,
        gap: Some(gap),
    });
    Ok(first)
}

async fn follow_from(
    js: &jetstream::Context,
    t: &TransportFile,
    feed: &str,
    from: u64,
    store: &PlayerStore,
    on_batch: &mut impl FnMut(&Applied),
) -> Result<()> {
    let stream = js
        .get_stream(&t.players.stream)
        .await
        .map_err(CompositorError::nats)?;
    let c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: feed.to_string(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            ..Default::default()
        })
        .await
        .map_err(CompositorError::nats)?;
    let mut msgs = c.messages().await.map_err(CompositorError::nats)?;
    loop {
        // A batch: the first message (waiting), then whatever else is already here.
        let Some(first) = msgs.next().await else {
            return Err(CompositorError::Nats("the feed ended".into()));
        };
        let mut batch = vec![first.map_err(CompositorError::nats)?];
        while batch.len() < 512 {
            match tokio::time::timeout(Duration::from_millis(2), msgs.next()).await {
                Ok(Some(m)) => batch.push(m.map_err(CompositorError::nats)?),
                _ => break,
            }
        }
        let mut rows = Vec::with_capacity(batch.len());
        for m in &batch {
            let seq = m.info().map_err(CompositorError::nats)?.stream_sequence;
            match serde_json::from_slice::<Canon>(&m.payload) {
                Ok(c) => rows.push((seq, c)),
                Err(e) => tracing::error!(seq, error = %e, "skipping a malformed canon message"),
            }
        }
        let checkpoint = batch
            .last()
            .and_then(|m| m.info().ok())
            .map_or(0, |i| i.stream_sequence);
        let new = store.apply(feed, &rows).await?;
        on_batch(&Applied {
            new: only_new(rows.into_iter().map(|(_, c)| c), new),
            checkpoint,
            gap: None,
        });
    }
}

async fn prune_now(store: &PlayerStore, rules: &[nimmer_config::PruneRule]) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    match store.prune(rules, now).await {
        Ok(n) if n > 0 => tracing::info!(deleted = n, "player store pruned"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "pruning the player store failed"),
    }
}

/// The checkpoint name of district pushes in the player store.
pub const DISTRICT_FEED: &str = "district";

/// The player client in district-fallback mode: subscribes to the player's push subject, announces itself on
/// its presence subject (so distributors push what was queued while it was offline), and applies each push
/// into `store` before acknowledging it, until `stop` resolves.
pub async fn follow_district(
    client: &async_nats::Client,
    t: &TransportFile,
    player: &str,
    store: &PlayerStore,
    stop: impl std::future::Future<Output = ()>,
    mut on_batch: impl FnMut(&Applied),
) -> Result<()> {
    check_player(player)?;
    tokio::pin!(stop);
    let mut pushes = client
        .subscribe(t.push_subject(player))
        .await
        .map_err(CompositorError::nats)?;
    client.flush().await.map_err(CompositorError::nats)?;
    client
        .publish(t.presence_subject(player), player.to_string().into())
        .await
        .map_err(CompositorError::nats)?;
    loop {
        let m = tokio::select! {
            _ = &mut stop => return Ok(()),
            m = pushes.next() => match m {
                Some(m) => m,
                None => return Err(CompositorError::Nats("push subscription ended".into())),
            },
        };
        let Some(reply) = m.reply.clone() else {
            continue;
        };
        let answer = match serde_json::from_slice::<crate::district::Push>(&m.payload) {
            Ok(push) => {
                let new = store.apply(DISTRICT_FEED, &push.rows).await?;
                let checkpoint = push.rows.last().map_or(0, |(s, _)| *s);
                on_batch(&Applied {
                    new: only_new(push.rows.into_iter().map(|(_, c)| c), new),
                    checkpoint,
                    gap: None,
                });
                "ok".to_string()
            }
            Err(e) => format!("malformed push: {e}"),
        };
        client
            .publish(reply, answer.into())
            .await
            .map_err(CompositorError::nats)?;
    }
}

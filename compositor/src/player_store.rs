//! A player's local canon store: one SQLite file with the canon rows it applied (keyed by result id), its
//! feeds' checkpoints (the last applied stream sequence) and which stream each counts in. Rows and checkpoint
//! move in one transaction, so a crash between them cannot happen. Written by [`crate::player`]'s followers.

use std::path::{Path, PathBuf};
use std::time::Duration;

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

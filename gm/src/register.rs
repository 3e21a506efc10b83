//! The directors' register in PostgreSQL (`directors`, beside the canon register's `events`): one row per
//! open event with its walk's [`Progress`] and its lease (owner, epoch, expiry).
//!
//! A shard process renews all its leases with one statement ([`Register::renew`]) and takes the expired
//! leases of its shard ([`Register::take_expired`], bumping the epoch). Every write names the owner and epoch
//! it holds ([`Register::record`], [`Register::complete`]): one that finds neither has lost the event to
//! another process and changes nothing. Why lease rows and not advisory locks or a KV bucket: docs/gm.md.

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::{PgPool, Row};

use crate::error::Result;
use crate::walk::Progress;

/// An event this process holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub gm_event: String,
    pub template: String,
    pub district: String,
    pub values: BTreeMap<String, String>,
    /// Bumped by every takeover: writes under an older epoch are refused.
    pub epoch: i64,
    /// When the event opened (Unix milliseconds, the database's clock).
    pub opened_ms: i64,
    pub progress: Progress,
}

/// One shard process's view of the register.
#[derive(Debug, Clone)]
pub struct Register {
    pool: PgPool,
    /// This process (unique per run).
    owner: String,
    shard: String,
    ttl: Duration,
}

impl Register {
    pub fn new(pool: PgPool, shard: &str, owner: &str, ttl: Duration) -> Self {
        Self {
            pool,
            owner: owner.to_string(),
            shard: shard.to_string(),
            ttl,
        }
    }

    fn ttl_s(&self) -> f64 {
        self.ttl.as_secs_f64()
    }

    /// Opens `gm_event` as this process's (the canon register's event row too). `None` when the event exists
    /// already: an event opens once.
    pub async fn open(
        &self,
        gm_event: &str,
        template: &str,
        district: &str,
        values: &BTreeMap<String, String>,
        progress: &Progress,
    ) -> Result<Option<Lease>> {
        let mut tx = self.pool.begin().await?;
        let fresh = sqlx::query("INSERT INTO events (gm_event) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(gm_event)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if !fresh {
            return Ok(None);
        }
        let opened_ms: i64 = sqlx::query_scalar(
            "INSERT INTO directors (gm_event, template, shard, district, vals, progress, owner, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8))
             RETURNING (extract(epoch FROM opened_at) * 1000)::bigint",
        )
        .bind(gm_event)
        .bind(template)
        .bind(&self.shard)
        .bind(district)
        .bind(serde_json::to_value(values)?)
        .bind(serde_json::to_value(progress)?)
        .bind(&self.owner)
        .bind(self.ttl_s())
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(Lease {
            gm_event: gm_event.to_string(),
            template: template.to_string(),
            district: district.to_string(),
            values: values.clone(),
            epoch: 1,
            opened_ms,
            progress: progress.clone(),
        }))
    }

    /// Extends every lease this process holds; returns how many it holds.
    pub async fn renew(&self) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE directors SET expires_at = now() + make_interval(secs => $2) WHERE owner = $1",
        )
        .bind(&self.owner)
        .bind(self.ttl_s())
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Takes up to `limit` events of this shard whose lease expired (their process died or stalled), each with
    /// its recorded progress and a new epoch.
    pub async fn take_expired(&self, limit: i64) -> Result<Vec<Lease>> {
        let rows = sqlx::query(
            "UPDATE directors d SET owner = $1, epoch = d.epoch + 1,
                    expires_at = now() + make_interval(secs => $3)
             WHERE d.gm_event IN (
                 SELECT gm_event FROM directors
                 WHERE shard = $2 AND expires_at < now()
                 ORDER BY expires_at LIMIT $4 FOR UPDATE SKIP LOCKED)
             RETURNING d.gm_event, d.template, d.district, d.vals, d.progress, d.epoch,
                       (extract(epoch FROM d.opened_at) * 1000)::bigint AS opened_ms",
        )
        .bind(&self.owner)
        .bind(&self.shard)
        .bind(self.ttl_s())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(Lease {
                    gm_event: r.try_get("gm_event")?,
                    template: r.try_get("template")?,
                    district: r.try_get("district")?,
                    values: serde_json::from_value(r.try_get("vals")?)?,
                    epoch: r.try_get("epoch")?,
                    opened_ms: r.try_get("opened_ms")?,
                    progress: serde_json::from_value(r.try_get("progress")?)?,
                })
            })
            .collect()
    }

    /// The event's recorded progress again, if this process still holds it at `lease`'s epoch (a director
    /// resumes from it after a failed round, as a successor would).
    pub async fn reload(&self, lease: &Lease) -> Result<Option<Lease>> {
        let progress: Option<serde_json::Value> = sqlx::query_scalar(
            "SELECT progress FROM directors WHERE gm_event = $1 AND owner = $2 AND epoch = $3",
        )
        .bind(&lease.gm_event)
        .bind(&self.owner)
        .bind(lease.epoch)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match progress {
            Some(p) => Some(Lease {
                progress: serde_json::from_value(p)?,
                ..lease.clone()
            }),
            None => None,
        })
    }

    /// Lets every lease of this process expire now (a process shutting down): the shard's other processes
    /// take its events at their next look instead of after the TTL.
    pub async fn release(&self) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE directors SET expires_at = now() - interval '1 millisecond' WHERE owner = $1",
        )
        .bind(&self.owner)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Lets this process's lease of `gm_event` (at `epoch`) expire now (its director failed): the shard takes
    /// it again at its next look.
    pub async fn release_event(&self, gm_event: &str, epoch: i64) -> Result<bool> {
        Ok(sqlx::query(
            "UPDATE directors SET expires_at = now() - interval '1 millisecond'
             WHERE gm_event = $1 AND owner = $2 AND epoch = $3",
        )
        .bind(gm_event)
        .bind(&self.owner)
        .bind(epoch)
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1)
    }

    pub fn shard(&self) -> &str {
        &self.shard
    }

    /// Records `lease.progress` if this process still holds the lease at its epoch; `false` when it was lost.
    pub async fn record(&self, lease: &Lease) -> Result<bool> {
        Ok(sqlx::query(
            "UPDATE directors SET progress = $4 WHERE gm_event = $1 AND owner = $2 AND epoch = $3",
        )
        .bind(&lease.gm_event)
        .bind(&self.owner)
        .bind(lease.epoch)
        .bind(serde_json::to_value(&lease.progress)?)
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1)
    }

    /// Completes the event if this process still holds it: its director row goes, the canon register marks
    /// it completed and prunes its scenes (late results are dead-lettered), in one transaction. `false` when
    /// the lease was lost.
    pub async fn complete(&self, lease: &Lease) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let held =
            sqlx::query("DELETE FROM directors WHERE gm_event = $1 AND owner = $2 AND epoch = $3")
                .bind(&lease.gm_event)
                .bind(&self.owner)
                .bind(lease.epoch)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1;
        if !held {
            return Ok(false);
        }
        nimmer_compositor::complete_event_in(&mut tx, &lease.gm_event).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// How many of `result_ids` are canon rows already (a director completes its event only once all its
    /// published slots are: the compositors reject results of completed events).
    pub async fn composed(&self, result_ids: &[String]) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM canon WHERE result_id = ANY($1)")
                .bind(result_ids)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Open events of this shard (any owner).
    pub async fn open_events(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM directors WHERE shard = $1")
                .bind(&self.shard)
                .fetch_one(&self.pool)
                .await?,
        )
    }
}

//! The district-distribution fallback (the design's Option B, `[delivery] mode = "district"`): canon reaches
//! players straight from PostgreSQL. Compositors write one delivery row per participant in the canon
//! transaction; each district has one distributor (a PostgreSQL advisory lock per district, taken by whichever
//! compositor process gets it first) that pushes a player's queued rows, in order, by NATS request to the
//! player's push subject, and deletes them once the player has applied them and replied. A player with no
//! subscriber there is offline: its rows stay queued until it announces itself on its presence subject (or the
//! next sweep). The player client applies pushes into the same SQLite store as in JetStream mode.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use nimmer_config::TransportFile;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool};

use crate::canon::Canon;
use crate::error::{CompositorError, Result};

/// Namespace of the per-district advisory locks (`pg_try_advisory_lock(DISTRICT_LOCK, hashtext(district))`).
pub const DISTRICT_LOCK: i32 = 0x6e69_6d64;

/// What a distributor pushes: delivery ids and their canon rows, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Push {
    pub district: String,
    pub rows: Vec<(u64, Canon)>,
}

pub struct Distributor {
    pub pool: PgPool,
    pub url: String,
    pub client: async_nats::Client,
    pub transport: TransportFile,
}

impl Distributor {
    /// Serves the districts it can lock until `shutdown`.
    pub async fn run(&self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                r = self.serve() => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "district distributor failed; restarting");
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    async fn serve(&self) -> Result<()> {
        // The connection that holds this process's district locks: if it dies, so do the locks.
        let mut conn = PgConnection::connect(&self.url).await?;
        let mut held = HashSet::new();
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen("nimmer_deliveries").await?;
        let presence_all = self.transport.presence_subject("*");
        let mut presence = self
            .client
            .subscribe(presence_all)
            .await
            .map_err(CompositorError::nats)?;
        let mut sweep = tokio::time::interval(Duration::from_secs(self.transport.delivery.sweep_s));
        loop {
            let player = tokio::select! {
                n = listener.recv() => { n?; None }
                m = presence.next() => {
                    let Some(m) = m else {
                        return Err(CompositorError::Nats("presence subscription ended".into()));
                    };
                    // The payload is the player id.
                    Some(String::from_utf8_lossy(&m.payload).to_string())
                }
                _ = sweep.tick() => None,
            };
            self.deliver(&mut conn, &mut held, player.as_deref())
                .await?;
        }
    }

    /// Pushes the queued rows of every (district, player) pair this process can serve (`player`: only that one).
    async fn deliver(
        &self,
        conn: &mut PgConnection,
        held: &mut HashSet<String>,
        player: Option<&str>,
    ) -> Result<()> {
        let pairs: Vec<(String, String)> = sqlx::query_as(
            "SELECT DISTINCT district, player FROM deliveries WHERE $1::text IS NULL OR player = $1",
        )
        .bind(player)
        .fetch_all(&mut *conn)
        .await?;
        for (district, player) in pairs {
            if !held.contains(&district) {
                let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
                    .bind(DISTRICT_LOCK)
                    .bind(&district)
                    .fetch_one(&mut *conn)
                    .await?;
                if !got {
                    continue; // another process distributes this district
                }
                tracing::info!(%district, "district distributor: serving");
                held.insert(district.clone());
            }
            self.push(conn, &district, &player).await?;
        }
        Ok(())
    }

    /// Pushes `player`'s queue in `district` in batches until it is empty or the player does not answer.
    async fn push(&self, conn: &mut PgConnection, district: &str, player: &str) -> Result<()> {
        let subject = self.transport.push_subject(player);
        loop {
            let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
                "SELECT id, payload FROM deliveries WHERE district = $1 AND player = $2 ORDER BY id LIMIT 256",
            )
            .bind(district)
            .bind(player)
            .fetch_all(&mut *conn)
            .await?;
            if rows.is_empty() {
                return Ok(());
            }
            let mut push = Push {
                district: district.to_string(),
                rows: Vec::with_capacity(rows.len()),
            };
            for (id, payload) in &rows {
                let c: Canon = serde_json::from_slice(payload).map_err(|e| {
                    CompositorError::Store(format!("delivery {id}: bad payload: {e}"))
                })?;
                push.rows.push((*id as u64, c));
            }
            let body = serde_json::to_vec(&push).expect("push serializes");
            let reply = tokio::time::timeout(
                Duration::from_secs(5),
                self.client.request(subject.clone(), body.into()),
            )
            .await;
            match reply {
                Ok(Ok(m)) if m.payload.as_ref() == b"ok" => {
                    let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
                    sqlx::query("DELETE FROM deliveries WHERE id = ANY($1)")
                        .bind(&ids)
                        .execute(&mut *conn)
                        .await?;
                    metrics::counter!("nimmer_district_delivered_total")
                        .increment(ids.len() as u64);
                }
                Ok(Ok(m)) => {
                    tracing::warn!(player, reply = %String::from_utf8_lossy(&m.payload), "player refused a push; kept queued");
                    return Ok(());
                }
                // No responders: offline; the rows wait for its presence announcement.
                Ok(Err(_)) | Err(_) => return Ok(()),
            }
        }
    }
}

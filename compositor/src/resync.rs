//! Resync: canon a player's feed no longer holds, read back from PostgreSQL. Every compositor serves
//! `[players] resync_subject` (NATS service `nimmer-canon`, so any one of them answers); the player client asks
//! when it finds a gap in its feed (see [`crate::player`]): the canon rows the player took part in, from just
//! before the newest one it holds, in canon id order, a page at a time.

use async_nats::service::ServiceExt;
use futures::StreamExt;
use nimmer_config::TransportFile;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::canon::Canon;
use crate::error::{CompositorError, Result};

/// The most rows one page carries.
pub const MAX_PAGE: usize = 1000;

/// Canon ids are taken at insert, so rows commit slightly out of id order: a resync starts this many ids
/// before the player's newest row (rows sent again are no-ops in the player's store, which keys by result id).
const MARGIN: i64 = 10_000;

/// A player's request for a page.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResyncRequest {
    /// The result id of the newest row the player holds (none: from the first).
    #[serde(default)]
    pub after: Option<String>,
    /// Where the previous page ended (from its answer); takes precedence over `after`.
    #[serde(default)]
    pub cursor: Option<i64>,
    /// Rows per page (1 to [`MAX_PAGE`]).
    pub limit: usize,
}

/// One page of a player's canon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResyncPage {
    pub rows: Vec<Canon>,
    /// Pass back as `cursor` for the next page.
    pub cursor: i64,
    /// More rows follow.
    pub more: bool,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    canon_uid: String,
    result_id: String,
    gm_event: String,
    district: String,
    scene: String,
    slot: String,
    seq: i64,
    zone: String,
    kind: String,
    tier: String,
    npc: Option<String>,
    text: String,
    participants: Vec<String>,
    faction: Option<String>,
    adapters: Vec<String>,
    finished_at_ms: i64,
}

/// One page of `player`'s canon for `req`.
pub async fn page(pool: &PgPool, player: &str, req: &ResyncRequest) -> Result<ResyncPage> {
    let from = match (req.cursor, &req.after) {
        (Some(c), _) => c,
        (None, Some(uid)) => {
            sqlx::query_scalar::<_, i64>("SELECT id FROM canon WHERE result_id = $1")
                .bind(uid)
                .fetch_optional(pool)
                .await?
                // Unknown (pruned, or lost in a failover): everything the player took part in.
                .map_or(0, |id| (id - MARGIN).max(0))
        }
        (None, None) => 0,
    };
    let limit = req.limit.clamp(1, MAX_PAGE);
    let mut rows: Vec<Row> = sqlx::query_as(
        "SELECT id, canon_uid, result_id, gm_event, district, scene, slot, seq, zone, kind, tier, npc, text,
                participants, faction, adapters,
                round(extract(epoch FROM finished_at) * 1000)::bigint AS finished_at_ms
         FROM canon WHERE participants @> ARRAY[$1] AND id > $2 ORDER BY id LIMIT $3",
    )
    .bind(player)
    .bind(from)
    .bind(limit as i64 + 1)
    .fetch_all(pool)
    .await?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    let cursor = rows.last().map_or(from, |r| r.id);
    let rows = rows
        .into_iter()
        .map(|r| Canon {
            canon_uid: r.canon_uid,
            result_id: r.result_id,
            gm_event: r.gm_event,
            district: r.district,
            scene: r.scene,
            slot: r.slot,
            seq: r.seq,
            zone: r.zone,
            kind: r.kind,
            tier: r.tier,
            npc: r.npc,
            text: r.text,
            participants: r.participants,
            faction: r.faction,
            adapters: r.adapters,
            finished_at_ms: r.finished_at_ms,
        })
        .collect();
    Ok(ResyncPage { rows, cursor, more })
}

/// Serves resync requests until `stop` resolves.
pub async fn serve(
    pool: PgPool,
    client: async_nats::Client,
    t: &TransportFile,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let filter = t.resync_filter();
    let service = client
        .service_builder()
        .description("nimmer canon: rows a player's feed no longer holds")
        .start("nimmer-canon", env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| CompositorError::Nats(format!("service nimmer-canon: {e}")))?;
    let mut requests = service
        .endpoint_builder()
        .name("resync")
        .add(filter.clone())
        .await
        .map_err(|e| CompositorError::Nats(format!("endpoint {filter}: {e}")))?;
    // The player id is the subject token where the template has `{player}`.
    let at = t
        .players
        .resync_subject
        .split('.')
        .position(|tok| tok == "{player}");
    tokio::pin!(stop);
    loop {
        let req = tokio::select! {
            r = requests.next() => match r { Some(r) => r, None => break },
            _ = &mut stop => break,
        };
        let player = at.and_then(|i| req.message.subject.split('.').nth(i).map(str::to_string));
        let pool = pool.clone();
        tokio::spawn(async move {
            let answer = match (
                player,
                serde_json::from_slice::<ResyncRequest>(&req.message.payload),
            ) {
                (Some(player), Ok(r)) => match page(&pool, &player, &r).await {
                    Ok(p) => Ok(serde_json::to_vec(&p).expect("a page serializes").into()),
                    Err(e) => {
                        tracing::warn!(player, error = %e, "resync: reading canon failed");
                        Err(async_nats::service::error::Error {
                            status: format!("reading canon failed: {e}"),
                            code: 503,
                        })
                    }
                },
                (_, Err(e)) => Err(async_nats::service::error::Error {
                    status: format!("not a resync request: {e}"),
                    code: 400,
                }),
                (None, _) => Err(async_nats::service::error::Error {
                    status: "no player in the subject".into(),
                    code: 400,
                }),
            };
            let _ = req.respond(answer).await;
        });
    }
    drop(requests);
    let _ = service.stop().await;
    Ok(())
}

/// Asks the compositors for every page of `player`'s canon after `after` (the result id of the newest row
/// the player holds; none: all of it).
pub async fn fetch(
    client: &async_nats::Client,
    t: &TransportFile,
    player: &str,
    after: Option<String>,
) -> Result<Vec<Canon>> {
    let subject = t.resync_subject(player);
    let mut req = ResyncRequest {
        after,
        cursor: None,
        limit: MAX_PAGE,
    };
    let mut rows = Vec::new();
    loop {
        let body = serde_json::to_vec(&req).expect("a request serializes");
        let m = client
            .request(subject.clone(), body.into())
            .await
            .map_err(|e| CompositorError::Nats(format!("resync request on {subject}: {e}")))?;
        if let Some(status) = m.headers.as_ref().and_then(|h| h.get("Nats-Service-Error")) {
            return Err(CompositorError::Nats(format!(
                "resync on {subject}: {}",
                status.as_str()
            )));
        }
        let page: ResyncPage = serde_json::from_slice(&m.payload)
            .map_err(|e| CompositorError::Nats(format!("resync on {subject}: a bad page: {e}")))?;
        rows.extend(page.rows);
        if !page.more {
            return Ok(rows);
        }
        req.cursor = Some(page.cursor);
    }
}

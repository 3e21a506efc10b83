//! Composing canon: a finished dialog result (the gateway's `DialogResult` JSON, read leniently: only the fields
//! canon needs) becomes one canon row with its place in the scene, plus the outbox row the relay publishes, in
//! the caller's transaction. A result already composed (same `result_id`) is a no-op.

use nimmer_config::{TransportFile, valid_token};
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, Transaction};

use crate::error::Result;

#[derive(Debug, Clone, Deserialize)]
pub struct UidIn {
    pub gm_event: String,
    pub district: String,
    pub scene: String,
    pub slot: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NpcIn {
    pub id: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ResponseIn {
    pub text: String,
    pub tier: String,
    #[serde(default)]
    pub adapters: Vec<String>,
}

/// A dialog result as published to `RESULTS`.
#[derive(Debug, Clone, Deserialize)]
pub struct ResultIn {
    pub result_id: String,
    pub uid: UidIn,
    pub zone: String,
    pub kind: String,
    #[serde(default)]
    pub npc: Option<NpcIn>,
    #[serde(default)]
    pub participants: Vec<String>,
    #[serde(default)]
    pub faction: Option<String>,
    pub finished_at_ms: i64,
    pub response: ResponseIn,
}

impl ResultIn {
    /// Parses and checks a result; the error is the dead-letter reason.
    pub fn parse(payload: &[u8]) -> Result<Self, String> {
        let r: Self =
            serde_json::from_slice(payload).map_err(|e| format!("not a dialog result: {e}"))?;
        if r.result_id.is_empty() {
            return Err("result_id is empty".into());
        }
        for (field, v) in [
            ("uid.gm_event", &r.uid.gm_event),
            ("uid.district", &r.uid.district),
            ("uid.scene", &r.uid.scene),
        ]
        .into_iter()
        .chain(r.participants.iter().map(|p| ("participants", p)))
        .chain(r.faction.iter().map(|f| ("faction", f)))
        {
            if !valid_token(v) {
                return Err(format!(
                    "{field} {v:?} cannot be a subject token (empty, or has `.`, `*`, `>` or whitespace)"
                ));
            }
        }
        if r.finished_at_ms <= 0 {
            return Err("finished_at_ms must be a positive Unix time in milliseconds".into());
        }
        Ok(r)
    }
}

/// A canon row as published on `CANON` and applied by players.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Canon {
    pub canon_uid: String,
    pub result_id: String,
    pub gm_event: String,
    pub district: String,
    pub scene: String,
    pub slot: String,
    pub seq: i64,
    pub zone: String,
    pub kind: String,
    pub tier: String,
    pub npc: Option<String>,
    pub text: String,
    pub participants: Vec<String>,
    pub faction: Option<String>,
    pub adapters: Vec<String>,
    pub finished_at_ms: i64,
}

/// What composing one result did.
#[derive(Debug, Clone, PartialEq)]
pub enum Composed {
    /// A new canon row (and its outbox row).
    New(Box<Canon>),
    /// The result was composed before.
    Duplicate,
}

/// Writes the canon row and outbox row of `r` in `tx`. The scene's sequence number comes from the register
/// (`scenes`), whose row lock orders concurrent compositors within a scene.
pub async fn compose(
    tx: &mut Transaction<'_, Postgres>,
    r: &ResultIn,
    transport: &TransportFile,
) -> Result<Composed> {
    let seen: Option<i64> = sqlx::query_scalar("SELECT id FROM canon WHERE result_id = $1")
        .bind(&r.result_id)
        .fetch_optional(&mut **tx)
        .await?;
    if seen.is_some() {
        return Ok(Composed::Duplicate);
    }
    sqlx::query("INSERT INTO events (gm_event) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(&r.uid.gm_event)
        .execute(&mut **tx)
        .await?;
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO scenes (gm_event, district, scene, last_seq) VALUES ($1, $2, $3, 1)
         ON CONFLICT (gm_event, district, scene)
         DO UPDATE SET last_seq = scenes.last_seq + 1, last_at = now()
         RETURNING last_seq",
    )
    .bind(&r.uid.gm_event)
    .bind(&r.uid.district)
    .bind(&r.uid.scene)
    .fetch_one(&mut **tx)
    .await?;
    let canon = Canon {
        canon_uid: format!(
            "{}/{}/{}/{seq}",
            r.uid.gm_event, r.uid.district, r.uid.scene
        ),
        result_id: r.result_id.clone(),
        gm_event: r.uid.gm_event.clone(),
        district: r.uid.district.clone(),
        scene: r.uid.scene.clone(),
        slot: r.uid.slot.clone(),
        seq,
        zone: r.zone.clone(),
        kind: r.kind.clone(),
        tier: r.response.tier.clone(),
        npc: r.npc.as_ref().map(|n| n.id.clone()),
        text: r.response.text.clone(),
        participants: r.participants.clone(),
        faction: r.faction.clone(),
        adapters: r.response.adapters.clone(),
        finished_at_ms: r.finished_at_ms,
    };
    // A concurrent compositor may have inserted the same result since the check: the unique key turns
    // that into a no-op here, and the caller's commit keeps the register consistent.
    let inserted: Option<i64> = sqlx::query_scalar(
        "INSERT INTO canon (canon_uid, result_id, gm_event, district, scene, slot, seq, zone, kind, tier,
                            npc, text, participants, faction, adapters, finished_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                 to_timestamp($16::double precision / 1000))
         ON CONFLICT (result_id) DO NOTHING
         RETURNING id",
    )
    .bind(&canon.canon_uid)
    .bind(&canon.result_id)
    .bind(&canon.gm_event)
    .bind(&canon.district)
    .bind(&canon.scene)
    .bind(&canon.slot)
    .bind(canon.seq)
    .bind(&canon.zone)
    .bind(&canon.kind)
    .bind(&canon.tier)
    .bind(&canon.npc)
    .bind(&canon.text)
    .bind(&canon.participants)
    .bind(&canon.faction)
    .bind(&canon.adapters)
    .bind(canon.finished_at_ms as f64)
    .fetch_optional(&mut **tx)
    .await?;
    if inserted.is_none() {
        return Ok(Composed::Duplicate);
    }
    let payload = serde_json::to_vec(&canon).expect("canon serializes");
    let mut msg_ids = vec![canon.canon_uid.clone()];
    let mut subjects =
        vec![transport.canon_subject(&canon.gm_event, &canon.district, &canon.scene)];
    let mut seen = std::collections::BTreeSet::new();
    for p in canon
        .participants
        .iter()
        .filter(|p| seen.insert(p.as_str()))
    {
        msg_ids.push(format!("{}@{p}", canon.canon_uid));
        subjects.push(transport.player_subject(p));
    }
    if let Some(f) = &canon.faction {
        msg_ids.push(format!("{}#{f}", canon.canon_uid));
        subjects.push(transport.faction_subject(f));
    }
    sqlx::query(
        "INSERT INTO outbox (msg_id, subject, payload)
         SELECT m, s, $3 FROM unnest($1::text[], $2::text[]) AS t(m, s)",
    )
    .bind(&msg_ids)
    .bind(&subjects)
    .bind(&payload)
    .execute(&mut **tx)
    .await?;
    Ok(Composed::New(Box::new(canon)))
}

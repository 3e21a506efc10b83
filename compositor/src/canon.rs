//! Composing canon: a finished dialog result (the wire crate's `DialogResult`, whose fields canon does not need
//! have defaults) becomes one canon row with its place in the scene, plus the outbox row the relay publishes, in
//! the caller's transaction. A result already composed (same `result_id`) is a no-op.

use nimmer_config::{DeliveryMode, TransportFile};
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, Transaction};

use crate::error::Result;

pub use nimmer_wire::DialogResult;

/// Parses and checks a result; the error is the dead-letter reason.
pub fn parse_result(payload: &[u8]) -> Result<DialogResult, String> {
    let r: DialogResult =
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
        if let Err(e) = nimmer_wire::check_token(v) {
            return Err(format!("{field} {v:?} cannot be a subject token: {e}"));
        }
    }
    if r.finished_at_ms == 0 || r.finished_at_ms > i64::MAX as u64 {
        return Err("finished_at_ms must be a positive Unix time in milliseconds".into());
    }
    Ok(r)
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
    /// Not composable (its event is completed): dead-lettered with this reason.
    Rejected(String),
}

/// Marks `gm_event` completed and prunes its register entries (its scenes); later results for it are rejected.
/// Returns whether the event was known and how many scene entries were pruned.
pub async fn complete_event(pool: &sqlx::PgPool, gm_event: &str) -> Result<(bool, u64)> {
    let mut tx = pool.begin().await?;
    let done = complete_event_in(&mut tx, gm_event).await?;
    tx.commit().await?;
    Ok(done)
}

/// [`complete_event`] inside the caller's transaction (a director completes its event with its own row).
pub async fn complete_event_in(
    tx: &mut Transaction<'_, Postgres>,
    gm_event: &str,
) -> Result<(bool, u64)> {
    let known = sqlx::query(
        "UPDATE events SET status = 'completed', completed_at = coalesce(completed_at, now())
         WHERE gm_event = $1",
    )
    .bind(gm_event)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1;
    let pruned = sqlx::query("DELETE FROM scenes WHERE gm_event = $1")
        .bind(gm_event)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    Ok((known, pruned))
}

async fn completed_events(
    tx: &mut Transaction<'_, Postgres>,
    events: &[&str],
) -> Result<std::collections::HashSet<String>> {
    Ok(sqlx::query_scalar(
        "SELECT gm_event FROM events WHERE status = 'completed' AND gm_event = ANY($1)",
    )
    .bind(events)
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .collect())
}

fn canon_of(r: &DialogResult, seq: i64) -> Canon {
    Canon {
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
        kind: r.kind.as_str().to_string(),
        tier: r.response.tier.clone(),
        npc: r.npc.as_ref().map(|n| n.id.clone()),
        text: r.response.text.clone(),
        participants: r.participants.clone(),
        faction: r.faction.clone(),
        adapters: r.response.adapters.clone(),
        finished_at_ms: r.finished_at_ms as i64,
    }
}

/// The messages a canon row goes out as: `(msg ids, subjects)` — the scene subject, one per distinct
/// participant, one for its faction. The message ids derive from the result id (the dialog's idempotency
/// key), never from the scene's sequence number, which a database that lost its last commits would hand out
/// again.
fn outbox_rows(canon: &Canon, transport: &TransportFile) -> (Vec<String>, Vec<String>) {
    let mut msg_ids = vec![canon.result_id.clone()];
    let mut subjects =
        vec![transport.canon_subject(&canon.gm_event, &canon.district, &canon.scene)];
    if transport.delivery.mode == DeliveryMode::Jetstream {
        for p in distinct(&canon.participants) {
            msg_ids.push(format!("{}@{p}", canon.result_id));
            subjects.push(transport.player_subject(p));
        }
    }
    if let Some(f) = &canon.faction {
        msg_ids.push(format!("{}#{f}", canon.result_id));
        subjects.push(transport.faction_subject(f));
    }
    (msg_ids, subjects)
}

/// Separates list items inside one text value (it cannot occur in subject tokens or adapter names).
const SEP: &str = "\u{1f}";

/// Composes `results` in `tx` (canon rows, outbox rows and, in district mode, delivery rows) with a fixed
/// number of statements: known results are skipped (after waiting for a transaction composing the same
/// result elsewhere), each scene's
/// sequence numbers are reserved with one upsert (scenes locked in a fixed order), and canon and outbox rows
/// are inserted from arrays. One result per entry of the returned list, in order. A value the schema rejects
/// fails the whole call: the caller then composes the results one by one to find it.
pub async fn compose_batch(
    tx: &mut Transaction<'_, Postgres>,
    results: &[DialogResult],
    transport: &TransportFile,
) -> Result<Vec<Composed>> {
    let ids: Vec<&str> = results.iter().map(|r| r.result_id.as_str()).collect();
    // A result redelivered to another compositor while the first still composes it: wait for that
    // transaction (one lock per result id, taken in a fixed order before any scene is locked), so that the
    // check below sees its row and no sequence number is reserved for a result that turns out to be a
    // duplicate (a gap in the scene).
    sqlx::query(
        "SELECT pg_advisory_xact_lock(h)
         FROM (SELECT DISTINCT hashtextextended(r, 0) AS h FROM unnest($1::text[]) AS r ORDER BY 1) AS s",
    )
    .bind(&ids)
    .execute(&mut **tx)
    .await?;
    let known: std::collections::HashSet<String> =
        sqlx::query_scalar("SELECT result_id FROM canon WHERE result_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&mut **tx)
            .await?
            .into_iter()
            .collect();
    let evs: Vec<&str> = results.iter().map(|r| r.uid.gm_event.as_str()).collect();
    let completed = completed_events(tx, &evs).await?;
    let mut out = vec![Composed::Duplicate; results.len()];
    let mut taken = std::collections::HashSet::new();
    let mut fresh = Vec::with_capacity(results.len());
    for (i, r) in results.iter().enumerate() {
        if known.contains(&r.result_id) || !taken.insert(&r.result_id) {
            continue;
        }
        if completed.contains(&r.uid.gm_event) {
            out[i] = Composed::Rejected(format!("event {} is completed", r.uid.gm_event));
            continue;
        }
        fresh.push(i);
    }
    if fresh.is_empty() {
        return Ok(out);
    }
    let events: std::collections::BTreeSet<&str> = fresh
        .iter()
        .map(|&i| results[i].uid.gm_event.as_str())
        .collect();
    sqlx::query("INSERT INTO events (gm_event) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING")
        .bind(events.into_iter().collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    // Rows per scene, in a fixed (sorted) order so concurrent compositors lock scenes alike.
    let mut scenes: std::collections::BTreeMap<(&str, &str, &str), i64> = Default::default();
    for &i in &fresh {
        let u = &results[i].uid;
        *scenes
            .entry((u.gm_event.as_str(), u.district.as_str(), u.scene.as_str()))
            .or_default() += 1;
    }
    let (mut se, mut sd, mut ss, mut sk) = (vec![], vec![], vec![], vec![]);
    for ((e, d, s), k) in &scenes {
        se.push(*e);
        sd.push(*d);
        ss.push(*s);
        sk.push(*k);
    }
    let last: Vec<(String, String, String, i64)> = sqlx::query_as(
        "INSERT INTO scenes (gm_event, district, scene, last_seq)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
         ON CONFLICT (gm_event, district, scene)
         DO UPDATE SET last_seq = scenes.last_seq + excluded.last_seq, last_at = now()
         RETURNING gm_event, district, scene, last_seq",
    )
    .bind(&se)
    .bind(&sd)
    .bind(&ss)
    .bind(&sk)
    .fetch_all(&mut **tx)
    .await?;
    // Next sequence number per scene: the first of the reserved range.
    let mut next: std::collections::HashMap<(String, String, String), i64> = last
        .into_iter()
        .map(|(e, d, s, l)| {
            let k = scenes[&(e.as_str(), d.as_str(), s.as_str())];
            ((e, d, s), l - k + 1)
        })
        .collect();
    let mut canons = Vec::with_capacity(fresh.len());
    for &i in &fresh {
        let u = &results[i].uid;
        let key = (u.gm_event.clone(), u.district.clone(), u.scene.clone());
        let seq = next.get_mut(&key).expect("scene reserved");
        canons.push((i, canon_of(&results[i], *seq)));
        *seq += 1;
    }
    let col = |f: &dyn Fn(&Canon) -> String| canons.iter().map(|(_, c)| f(c)).collect::<Vec<_>>();
    let opt =
        |f: &dyn Fn(&Canon) -> Option<String>| canons.iter().map(|(_, c)| f(c)).collect::<Vec<_>>();
    let inserted: std::collections::HashMap<String, i64> = sqlx::query_as(
        "INSERT INTO canon (canon_uid, result_id, gm_event, district, scene, slot, seq, zone, kind, tier,
                            npc, text, participants, faction, adapters, finished_at)
         SELECT u, r, e, d, s, sl, q, z, k, t, n, x, string_to_array(p, E'\\x1f'), f,
                string_to_array(a, E'\\x1f'), to_timestamp(ms::double precision / 1000)
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[],
                     $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[],
                     $15::text[], $16::bigint[])
              AS v(u, r, e, d, s, sl, q, z, k, t, n, x, p, f, a, ms)
         ON CONFLICT (result_id) DO NOTHING
         RETURNING result_id, id",
    )
    .bind(col(&|c| c.canon_uid.clone()))
    .bind(col(&|c| c.result_id.clone()))
    .bind(col(&|c| c.gm_event.clone()))
    .bind(col(&|c| c.district.clone()))
    .bind(col(&|c| c.scene.clone()))
    .bind(col(&|c| c.slot.clone()))
    .bind(canons.iter().map(|(_, c)| c.seq).collect::<Vec<_>>())
    .bind(col(&|c| c.zone.clone()))
    .bind(col(&|c| c.kind.clone()))
    .bind(col(&|c| c.tier.clone()))
    .bind(opt(&|c| c.npc.clone()))
    .bind(col(&|c| c.text.clone()))
    .bind(col(&|c| c.participants.join(SEP)))
    .bind(opt(&|c| c.faction.clone()))
    .bind(col(&|c| c.adapters.join(SEP)))
    .bind(canons.iter().map(|(_, c)| c.finished_at_ms).collect::<Vec<_>>())
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .collect();
    let (mut mids, mut subs, mut pays) = (vec![], vec![], vec![]);
    let mut deliveries = Deliveries::default();
    for (i, c) in canons {
        let Some(&canon_id) = inserted.get(&c.result_id) else {
            continue; // a concurrent compositor composed it first
        };
        let payload = serde_json::to_vec(&c).expect("canon serializes");
        deliveries.add(canon_id, &c, &payload, transport);
        let (m, s) = outbox_rows(&c, transport);
        for (m, s) in m.into_iter().zip(s) {
            mids.push(m);
            subs.push(s);
            pays.push(payload.clone());
        }
        out[i] = Composed::New(Box::new(c));
    }
    sqlx::query(
        "INSERT INTO outbox (msg_id, subject, payload)
         SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[])",
    )
    .bind(&mids)
    .bind(&subs)
    .bind(&pays)
    .execute(&mut **tx)
    .await?;
    deliveries.insert(tx).await?;
    Ok(out)
}

/// Delivery rows of the district fallback (none in JetStream mode): one per distinct participant.
#[derive(Default)]
struct Deliveries {
    players: Vec<String>,
    districts: Vec<String>,
    canon_ids: Vec<i64>,
    payloads: Vec<Vec<u8>>,
}

impl Deliveries {
    fn add(&mut self, canon_id: i64, c: &Canon, payload: &[u8], t: &TransportFile) {
        if t.delivery.mode != DeliveryMode::District {
            return;
        }
        for p in distinct(&c.participants) {
            self.players.push(p.to_string());
            self.districts.push(c.district.clone());
            self.canon_ids.push(canon_id);
            self.payloads.push(payload.to_vec());
        }
    }

    async fn insert(self, tx: &mut Transaction<'_, Postgres>) -> Result<()> {
        if self.players.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO deliveries (player, district, canon_id, payload)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bytea[])",
        )
        .bind(&self.players)
        .bind(&self.districts)
        .bind(&self.canon_ids)
        .bind(&self.payloads)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

fn distinct(v: &[String]) -> Vec<&str> {
    let mut seen = std::collections::BTreeSet::new();
    v.iter()
        .map(String::as_str)
        .filter(|p| seen.insert(*p))
        .collect()
}

//! One director: drives one held event from its recorded progress to completion.
//!
//! Each round it takes the walk's actions (one per running scene, performed concurrently), asks the gateway
//! through [`Services`] (every line as a draft, under the idempotency key `<uid>#<attempt>`, so a respawned
//! director asking again gets the same answer), applies the answers, publishes each newly accepted slot as
//! that slot's result (its `result_id` derives from the slot's UID alone: a repeat is a no-op downstream),
//! then records the progress under its lease. Publishing before recording is what makes a crash harmless: a
//! successor redoes at most the last round and publishes nothing new. The event completes once every
//! accepted slot is a canon row, after opening the events it raises on their shards. A lost lease ends the
//! director.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::time::Duration;

use nimmer_config::EventTemplate;
use nimmer_wire::dialog::{DialogResponse, DialogResult, Npc, Uid};
use nimmer_wire::gm::{OpenEvent, Opened, raised_event_id};

use crate::error::{GmError, Result};
use crate::open::Templates;
use crate::register::{Lease, Register};
use crate::walk::{Action, Outcome, SlotRequest};

/// One request a director makes.
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    pub uid: Uid,
    pub zone: &'a str,
    /// Idempotency key: the same key gets the same answer.
    pub key: String,
    pub request: &'a SlotRequest,
}

/// What a director needs from the rest of the system (the gateway and RESULTS; fakes in tests).
pub trait Services: Sync {
    /// A slot's answer, asked as a draft (a line, or a classify slot's classification).
    fn ask(&self, ask: &Ask<'_>) -> impl Future<Output = Result<DialogResponse>> + Send;
    /// A gate's or branch's label for `input` (a draft classification).
    fn classify(
        &self,
        uid: &Uid,
        zone: &str,
        key: &str,
        classifier: &str,
        input: &str,
    ) -> impl Future<Output = Result<String>> + Send;
    /// Publishes a slot's accepted answer to the compositors.
    fn publish(&self, result: &DialogResult) -> impl Future<Output = Result<()>> + Send;
    /// Asks shard `shard` to open an event (a raise: the GM's cross-shard message).
    fn open(&self, shard: &str, req: &OpenEvent) -> impl Future<Output = Result<Opened>> + Send;
}

/// How a director ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Finished {
    /// The event completed (its register rows are gone), with its final progress.
    Completed(crate::walk::Progress),
    /// Another process holds the event now.
    Lost,
}

/// The result id of a slot's canon line: one per slot, whatever the attempt or the director.
pub fn slot_result_id(uid: &Uid) -> String {
    nimmer_wire::dialog::result_id(&uid.to_string())
}

/// Drives `lease`'s event until it completes or the lease is lost. An error (a gateway or the database
/// failing) ends it with its last round unrecorded: the caller resumes it from the register.
pub async fn run<S: Services>(
    svc: &S,
    reg: &Register,
    templates: &Templates,
    mut lease: Lease,
) -> Result<Finished> {
    let t = templates
        .template(&lease.template)
        .map_err(|e| GmError::Service(format!("{}: {e}", lease.gm_event)))?;
    let mut values = lease.values.clone();
    values.insert("event".into(), lease.gm_event.clone());
    values.insert("district".into(), lease.district.clone());
    let zone = values
        .entry("zone".into())
        .or_insert_with(|| lease.district.clone())
        .clone();
    // Answers of this director's own asks, by slot (a successor asks again and gets the same).
    let mut answers: HashMap<String, (SlotRequest, DialogResponse)> = HashMap::new();
    loop {
        let actions = lease.progress.actions(t, &values);
        if actions.is_empty() {
            // Every accepted slot must be canon before the event completes (the compositors reject results of
            // completed events); a compositor that is down makes the director wait, never lose a line.
            let ids: Vec<String> = lease
                .progress
                .lines
                .keys()
                .map(|slot| slot_result_id(&slot_uid(&lease, scene_of(t, slot), slot)))
                .collect();
            // Polled with a growing pause (50 ms to 2 s): thousands of directors may wait at once.
            let (mut pause, since) = (Duration::from_millis(50), std::time::Instant::now());
            let mut warned = Duration::ZERO;
            while reg.composed(&ids).await? < ids.len() as i64 {
                if since.elapsed() >= warned + Duration::from_secs(30) {
                    warned = since.elapsed();
                    tracing::warn!(gm_event = %lease.gm_event, waited = ?warned, "waiting for the compositors to make the event's lines canon");
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            raise(svc, templates, &lease, t, &values).await?;
            return Ok(if reg.complete(&lease).await? {
                Finished::Completed(lease.progress)
            } else {
                Finished::Lost
            });
        }
        tracing::debug!(gm_event = %lease.gm_event, actions = ?actions.iter().map(Action::name).collect::<Vec<_>>(), "round");
        let done =
            futures::future::join_all(actions.iter().map(|a| perform(svc, &lease, &zone, a))).await;
        for (a, r) in actions.iter().zip(done) {
            let (outcome, answer) = r?;
            if let (Action::Ask { slot, request, .. }, Some(resp)) = (a, answer) {
                answers.insert(slot.clone(), (request.clone(), resp));
            }
            let before: BTreeSet<String> = lease.progress.lines.keys().cloned().collect();
            lease.progress.apply(t, outcome)?;
            let accepted: Vec<String> = lease
                .progress
                .lines
                .keys()
                .filter(|k| !before.contains(*k))
                .cloned()
                .collect();
            for slot in accepted {
                let (request, resp) = match answers.get(&slot) {
                    Some(x) => x.clone(),
                    // A line its predecessor asked and this director's gate accepted: the same key gets
                    // the same answer again (the text is the accepted line whatever comes back).
                    None => reask(svc, &lease, &zone, t, &values, a, &slot).await?,
                };
                let uid = slot_uid(&lease, scene_of(t, &slot), &slot);
                svc.publish(&result(&uid, &zone, &request, resp)).await?;
            }
        }
        if !reg.record(&lease).await? {
            return Ok(Finished::Lost);
        }
    }
}

/// Opens the events `t` raises on their shards (before completing: a director respawned after this opens
/// nothing new, the raised ids being derived from this event's).
async fn raise<S: Services>(
    svc: &S,
    templates: &Templates,
    lease: &Lease,
    t: &EventTemplate,
    values: &std::collections::BTreeMap<String, String>,
) -> Result<()> {
    for (id, template, values) in lease.progress.raises(t, values) {
        let req = OpenEvent {
            gm_event: Some(raised_event_id(&lease.gm_event, &id)),
            template,
            district: None,
            zone: None,
            values,
        };
        let shard = templates
            .route(&req)
            .map_err(|e| GmError::Service(format!("raise `{id}` of {}: {e}", lease.gm_event)))?;
        let opened = svc.open(&shard, &req).await?;
        tracing::info!(gm_event = %lease.gm_event, raised = %opened.gm_event, %shard, new = opened.opened, "raised an event");
    }
    Ok(())
}

/// Asks again for the accepted line of `slot` (a gate's `action`) under the key it was first asked with.
async fn reask<S: Services>(
    svc: &S,
    lease: &Lease,
    zone: &str,
    t: &EventTemplate,
    values: &std::collections::BTreeMap<String, String>,
    action: &Action,
    slot: &str,
) -> Result<(SlotRequest, DialogResponse)> {
    let Action::Gate { scene, attempt, .. } = action else {
        return Err(GmError::Service(format!(
            "{slot}: accepted without a gate and without its answer"
        )));
    };
    let request = lease
        .progress
        .slot_request(t, values, slot)
        .ok_or_else(|| GmError::Service(format!("{slot}: its request no longer renders")))?;
    let uid = slot_uid(lease, scene, slot);
    let key = format!("{uid}#{attempt}");
    let mut resp = svc
        .ask(&Ask {
            uid,
            zone,
            key,
            request: &request,
        })
        .await?;
    resp.text = lease.progress.lines[slot].clone();
    Ok((request, resp))
}

/// Performs one action: the outcome to apply, and for an ask the gateway's whole answer.
async fn perform<S: Services>(
    svc: &S,
    lease: &Lease,
    zone: &str,
    a: &Action,
) -> Result<(Outcome, Option<DialogResponse>)> {
    Ok(match a {
        Action::Ask {
            scene,
            slot,
            attempt,
            request,
        } => {
            let uid = slot_uid(lease, scene, slot);
            let key = format!("{uid}#{attempt}");
            let asked = std::time::Instant::now();
            let resp = svc
                .ask(&Ask {
                    uid,
                    zone,
                    key,
                    request,
                })
                .await?;
            metrics::histogram!("nimmer_gm_slot_seconds", "kind" => request.kind.as_str())
                .record(asked.elapsed().as_secs_f64());
            let text = resp
                .classification
                .as_ref()
                .map_or_else(|| resp.text.clone(), |c| c.label.clone());
            (
                Outcome::Line {
                    scene: scene.clone(),
                    text,
                },
                Some(resp),
            )
        }
        Action::Gate {
            scene,
            slot,
            attempt,
            classifier,
            input,
        } => {
            let uid = slot_uid(lease, scene, &format!("{slot}-gate"));
            let key = format!("{uid}#{attempt}");
            let label = svc.classify(&uid, zone, &key, classifier, input).await?;
            (
                Outcome::Label {
                    scene: scene.clone(),
                    label,
                },
                None,
            )
        }
        Action::Branch {
            scene,
            classifier,
            input,
        } => {
            let uid = slot_uid(lease, scene, &format!("{scene}-branch"));
            let key = uid.to_string();
            let label = svc.classify(&uid, zone, &key, classifier, input).await?;
            (
                Outcome::Label {
                    scene: scene.clone(),
                    label,
                },
                None,
            )
        }
    })
}

fn slot_uid(lease: &Lease, scene: &str, slot: &str) -> Uid {
    Uid {
        gm_event: lease.gm_event.clone(),
        district: lease.district.clone(),
        scene: scene.to_string(),
        slot: slot.to_string(),
    }
}

fn scene_of<'a>(t: &'a EventTemplate, slot: &str) -> &'a str {
    t.scenes
        .iter()
        .find(|s| s.slots.iter().any(|x| x.id == slot))
        .map_or("", |s| s.id.as_str())
}

/// A slot's accepted answer as the result the compositors make canon.
fn result(
    uid: &Uid,
    zone: &str,
    request: &SlotRequest,
    mut response: DialogResponse,
) -> DialogResult {
    response.uid = uid.clone();
    let finished_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    DialogResult {
        result_id: slot_result_id(uid),
        uid: uid.clone(),
        zone: zone.to_string(),
        kind: request.kind,
        npc: request.npc.as_ref().map(|id| Npc {
            id: id.clone(),
            traits: request.traits.clone(),
        }),
        participants: request.participants.clone(),
        faction: request.faction.clone(),
        finished_at_ms,
        response,
    }
}

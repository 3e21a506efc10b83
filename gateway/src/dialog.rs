//! Running a validated dialog to its response, shared by the HTTP and NATS fronts: generation kinds run to
//! the end on their tier, classify kinds go through Saturn; every finished dialog is handed to the results
//! publisher (when NATS is configured) for the compositors.

use std::time::Instant;

use nimmer_tiers::{Completion, Event};

use crate::api::{Dialog, DialogResponse, SlotInfo, Timings, Usage, Work};
use crate::core::{Gateway, Running, Tier};
use crate::error::ApiError;

pub fn usage(c: &Completion) -> Usage {
    Usage {
        prompt_tokens: c.prompt_tokens,
        completion_tokens: c.completion_tokens,
        total_tokens: c.prompt_tokens + c.completion_tokens,
    }
}

/// Where a generation ran: what a response reports besides the text and the completion.
pub struct Served {
    tier: Tier,
    slot: SlotInfo,
    slot_wait_ms: f64,
    adapters: Vec<String>,
    degraded_reason: Option<String>,
}

impl Served {
    pub fn of(r: &Running) -> Self {
        Self {
            tier: r.tier,
            slot: SlotInfo {
                zone: r.permit.zone.clone(),
                id: r.permit.id,
            },
            slot_wait_ms: r.slot_wait.as_secs_f64() * 1e3,
            adapters: r.adapters.clone(),
            degraded_reason: r.degraded_reason.clone(),
        }
    }
}

pub fn response(d: &Dialog, s: &Served, text: String, done: &Completion) -> DialogResponse {
    DialogResponse {
        uid: d.uid.clone(),
        text,
        tier: s.tier.as_str().into(),
        adapters: s.adapters.clone(),
        finish_reason: Some(done.finish_reason),
        usage: usage(done),
        timings: Timings {
            slot_wait_ms: s.slot_wait_ms,
            queue_ms: done.queue_ms,
            ttft_ms: done.ttft_ms,
            total_ms: done.total_ms,
        },
        slot: s.slot.clone(),
        degraded: s.degraded_reason.is_some(),
        degraded_reason: s.degraded_reason.clone(),
        classification: None,
    }
}

/// Runs a generation to its end, returning the text and the completion.
pub async fn finish(r: &mut Running) -> Result<(String, Completion), ApiError> {
    let mut text = String::new();
    loop {
        match r.next().await {
            Some(Event::Token { text: t, .. }) => text.push_str(&t),
            Some(Event::Done(c)) => return Ok((text, c)),
            Some(Event::Error(e)) => return Err(ApiError::Internal(e)),
            None => {
                return Err(ApiError::Unavailable {
                    tier: r.tier.as_str().into(),
                });
            }
        }
    }
}

/// Runs a dialog to its end (no streaming) and publishes its result.
pub async fn complete(gw: &Gateway, d: &Dialog) -> Result<DialogResponse, ApiError> {
    let resp = match &d.work {
        Work::Classify { classifier, input } => {
            let permit = gw
                .slot(Tier::Saturn, &d.zone, d.priority, d.deadline_ms)
                .await?;
            let wait_ms = permit.granted.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            let mut out = gw
                .saturn()
                .classify(classifier, vec![input.clone()])
                .await?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let classification = out
                .pop()
                .ok_or_else(|| ApiError::Internal("saturn returned no result".into()))?;
            DialogResponse {
                uid: d.uid.clone(),
                text: classification.label.clone(),
                tier: Tier::Saturn.as_str().into(),
                adapters: Vec::new(),
                finish_reason: None,
                usage: Usage {
                    prompt_tokens: 0,
                    completion_tokens: 0,
                    total_tokens: 0,
                },
                timings: Timings {
                    slot_wait_ms: wait_ms,
                    queue_ms: 0.0,
                    ttft_ms: ms,
                    total_ms: ms,
                },
                slot: SlotInfo {
                    zone: permit.zone.clone(),
                    id: permit.id,
                },
                degraded: false,
                degraded_reason: None,
                classification: Some(classification),
            }
        }
        Work::Generate { .. } => {
            let mut running = gw.dialog(d).await?;
            let (text, done) = finish(&mut running).await?;
            response(d, &Served::of(&running), text, &done)
        }
    };
    gw.publish_result(d, &resp);
    Ok(resp)
}

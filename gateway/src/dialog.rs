//! The dialog use case, shared by the HTTP and NATS fronts: a validated request is admitted
//! ([`crate::admission`]), submitted to its tier (never after its deadline passed), and run to a response or a
//! stream. `end` is the one place a dialog ends: it builds the response and publishes the result for the
//! compositors, whether the dialog was answered whole, streamed, or classified.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::Stream;
use nimmer_config::RequestBudget;
use nimmer_tiers::{Completion, Event, GenerateRequest, Prompt, SamplingParams, Share};

use crate::Tier;
use crate::admission::{self, Admitted, Ask, Deadline, Target};
use crate::api::{Dialog, DialogResponse, DialogResult, SlotInfo, Timings, Usage, Work};
use crate::error::ApiError;
use crate::idempotency::{self, Claim, Ticket};
use crate::metrics;
use crate::requests::{Cancel, Handle};
use crate::shared_answers::Shared;
use crate::slots::SlotPermit;
use crate::state::Gateway;
use crate::tier::{Events, LlmTier};
use crate::zones::ZoneTable;

/// Charges a generation's tokens to its zone's bucket when dropped, however the generation ends.
struct Meter {
    zones: Arc<Mutex<ZoneTable>>,
    zone: String,
    tier: Tier,
    budget: RequestBudget,
    prompt_tokens: usize,
    cached_tokens: usize,
    completion_tokens: usize,
    /// Whether the generation finished (only those count in the zone's prefix-cache figures).
    done: bool,
    /// Slot wait plus the engine's time to first token, once finished.
    ttft_ms: f64,
    /// Other gateways' share of the charge (`budget_sync.rs`).
    shared: Option<tokio::sync::mpsc::UnboundedSender<crate::zones::Charge>>,
}

impl Drop for Meter {
    fn drop(&mut self) {
        let tokens = self.prompt_tokens + self.completion_tokens;
        if let Some(tx) = &self.shared
            && self.budget.tokens_per_s > 0.0
            && tokens > 0
        {
            let _ = tx.send(crate::zones::Charge {
                from: String::new(),
                zone: self.zone.clone(),
                tier: self.tier,
                tokens,
            });
        }
        let mut zones = self.zones.lock().expect("zones lock");
        zones.charge(&self.zone, self.tier, tokens, &self.budget, Instant::now());
        if self.done {
            zones.record_done(
                &self.zone,
                self.prompt_tokens,
                self.cached_tokens,
                self.ttft_ms,
            );
        }
    }
}

/// A generation in flight: its slot, its event stream and its token meter. Dropping it cancels the
/// generation and frees the slot.
pub struct Running {
    pub tier: Tier,
    pub degraded_reason: Option<String>,
    /// Adapters it runs with, as `name@vN`.
    pub adapters: Vec<String>,
    pub permit: SlotPermit,
    /// Time spent waiting for the slot.
    pub slot_wait: Duration,
    events: Events,
    /// The tier it runs on (its health tells a failure from a tier that went away).
    llm: Arc<dyn LlmTier>,
    /// The first event, already received (so a failure before it could still become the status code).
    first: Option<Event>,
    meter: Meter,
    /// Its place in the registry of stoppable requests, once registered.
    handle: Option<Handle>,
    /// Why it was stopped, if it was (then [`Running::next`] gives `None`).
    pub cancelled: Option<Cancel>,
    /// Each token's log probabilities, gathered by [`Running::collect`] when the request asked for them.
    pub logprobs: Vec<nimmer_tiers::TokenLogprobs>,
}

impl Running {
    /// Makes the generation stoppable through `handle` (`DELETE /v1/requests/{id}`, supersession).
    pub fn watch(&mut self, handle: Handle) {
        self.handle = Some(handle);
    }

    /// The next event; `None` when the tier went away without finishing, or the request was stopped
    /// ([`Running::cancelled`] says why).
    pub async fn next(&mut self) -> Option<Event> {
        let ev = match (self.first.take(), self.handle.as_mut()) {
            (Some(e), _) => Some(e),
            (None, None) => self.events.recv().await,
            (None, Some(h)) => tokio::select! {
                ev = self.events.recv() => ev,
                why = h.cancelled() => {
                    self.cancelled = Some(why);
                    None
                }
            },
        };
        match &ev {
            Some(Event::Token { .. }) => self.meter.completion_tokens += 1,
            Some(Event::Done(c)) => {
                self.meter.prompt_tokens = c.prompt_tokens;
                self.meter.cached_tokens = c.cached_tokens;
                self.meter.completion_tokens = c.completion_tokens;
                self.meter.done = true;
                self.meter.ttft_ms = self.slot_wait.as_secs_f64() * 1e3 + c.ttft_ms;
                metrics::finished(
                    self.tier,
                    &self.permit.class,
                    c.prompt_tokens,
                    c.completion_tokens,
                    c.ttft_ms / 1e3,
                );
            }
            _ => {}
        }
        ev
    }

    /// Runs the generation to its end: the text and the completion.
    pub async fn collect(&mut self) -> Result<(String, Completion), ApiError> {
        let mut text = String::new();
        loop {
            match self.next().await {
                Some(Event::Token {
                    text: t, logprobs, ..
                }) => {
                    text.push_str(&t);
                    if let Some(l) = logprobs {
                        self.logprobs.push(*l);
                    }
                }
                Some(Event::Done(c)) => return Ok((text, c)),
                Some(Event::Error(e)) => return Err(failed(&*self.llm, self.tier, e)),
                None if self.cancelled.is_some() => {
                    return Err(ApiError::Cancelled {
                        why: self
                            .cancelled
                            .as_ref()
                            .map(Cancel::to_string)
                            .unwrap_or_default(),
                    });
                }
                Some(Event::Expired) | None => {
                    return Err(ApiError::Unavailable {
                        tier: self.tier.as_str().into(),
                    });
                }
            }
        }
    }
}

/// Admits a generation, submits it and waits for its first event.
pub async fn start(gw: &Gateway, ask: Ask<'_>) -> Result<Running, ApiError> {
    crate::api::check_prompt(ask.prompt, &gw.live().config.budgets.dialogs)?;
    let params = ask.params.clone();
    let source = ask.prompt;
    let admitted = admission::admit(gw, ask).await?;
    submit(gw, admitted, source, params).await
}

/// Submits an admitted generation: its token ids, or `source` to a tier that tokenizes for itself.
async fn submit(
    gw: &Gateway,
    admitted: Admitted,
    source: &Prompt,
    params: SamplingParams,
) -> Result<Running, ApiError> {
    let tier = admitted.tier();
    let class = admitted.snapshot.class.clone();
    let deadline = admitted.deadline;
    // A request that cannot start before its deadline never reaches the tier.
    if let Some(d) = deadline.filter(|d| d.passed(Instant::now())) {
        metrics::rejected(tier, &class, "deadline");
        return Err(d.error());
    }
    let llm = gw
        .tiers()
        .llm(tier)
        .ok_or_else(|| ApiError::Internal("generation admitted on saturn".into()))?;
    let meter = Meter {
        zones: gw.zone_table().clone(),
        zone: admitted.permit.zone.clone(),
        tier,
        budget: admitted.budget(),
        prompt_tokens: admitted.prompt.len(),
        cached_tokens: 0,
        completion_tokens: 0,
        done: false,
        ttft_ms: 0.0,
        shared: gw.charge_sink(),
    };
    let slot_wait = admitted.started.elapsed();
    let (lora, adapters) = match admitted.voice {
        Some(v) => (Some(v.blend), v.names),
        None => (None, Vec::new()),
    };
    // The engine's steps share their rows by zone: the zone, its class weight and the priority travel along.
    let share = Share::zone(
        &admitted.permit.zone,
        &class,
        admitted.snapshot.weight,
        admitted.priority,
    );
    let prompt = if llm.takes_source_prompt() {
        source.clone()
    } else {
        Prompt::Tokens(admitted.prompt)
    };
    let mut events = llm
        .submit(GenerateRequest {
            prompt,
            params,
            lora,
            deadline: deadline.map(|d| d.at),
            share,
        })
        .await?;
    let first = match events.recv().await {
        None => {
            return Err(ApiError::Unavailable {
                tier: tier.as_str().into(),
            });
        }
        Some(Event::Expired) => {
            metrics::rejected(tier, &class, "deadline");
            return Err(deadline.map_or(ApiError::Deadline { deadline_ms: 0 }, |d| d.error()));
        }
        Some(Event::Error(e)) => return Err(failed(&**llm, tier, e)),
        Some(ev) => ev,
    };
    Ok(Running {
        tier,
        degraded_reason: admitted.degraded,
        adapters,
        permit: admitted.permit,
        slot_wait,
        events,
        llm: llm.clone(),
        first: Some(first),
        meter,
        handle: None,
        cancelled: None,
        logprobs: Vec::new(),
    })
}

/// A generation that failed: a 503 when its tier is down now (its worker or server went away and none is
/// left), else an internal error (logged, not sent).
fn failed(llm: &dyn LlmTier, tier: Tier, e: String) -> ApiError {
    if llm.health().is_ready() {
        ApiError::Internal(e)
    } else {
        tracing::warn!(tier = tier.as_str(), error = %e, "generation failed: the tier is down");
        ApiError::Unavailable {
            tier: tier.as_str().into(),
        }
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

/// How a dialog is answered.
pub enum Reply {
    /// Whole (already ended and published).
    Whole(Box<DialogResponse>),
    /// As a stream of [`Streamed`] items; it ends (and publishes) when its generation does.
    Stream(std::pin::Pin<Box<dyn Stream<Item = Streamed> + Send>>),
}

/// One item of a streamed dialog.
pub enum Streamed {
    Token {
        id: u32,
        text: String,
    },
    Done(Box<DialogResponse>),
    /// The generation failed mid-stream (logged).
    Failed,
    /// The request was stopped (`DELETE`, or superseded): why.
    Cancelled(String),
}

/// Runs a validated dialog: classify on Saturn, generate whole, or generate as a stream (`d.stream`).
pub async fn run(gw: &Arc<Gateway>, d: Dialog) -> Result<Reply, ApiError> {
    crate::api::check_limits(
        d.participants.len(),
        &d.work,
        &gw.live().config.budgets.dialogs,
    )?;
    let window = Duration::from_secs(gw.live().config.budgets.dialogs.idempotency_window_s);
    if window.is_zero() {
        return fresh(gw, d, None).await;
    }
    loop {
        let mut rx = match gw.idempotency().claim(&d.key, window) {
            Claim::First(mut ticket) => {
                if let Some(shared) = gw.shared_answers() {
                    match shared.claim(&idempotency::result_id(&d.key)).await {
                        Shared::Owner(lease) => ticket.share(lease),
                        Shared::Answer(answer) => {
                            ticket.finish(answer.clone());
                            return Ok(repeat(&answer, d.stream));
                        }
                        Shared::Unavailable(why) => {
                            tracing::debug!(why, "answering from this gateway alone");
                        }
                    }
                }
                return fresh(gw, d, Some(ticket)).await;
            }
            Claim::Done(answer) => return Ok(repeat(&answer, d.stream)),
            Claim::Running(rx) => rx,
        };
        // The first is running: its answer, or (it failed and freed the key) a claim of our own.
        loop {
            if let Some(answer) = rx.borrow_and_update().clone() {
                return Ok(repeat(&answer, d.stream));
            }
            if rx.changed().await.is_err() {
                break;
            }
        }
    }
}

/// A repeat's reply: the first answer, whole or as a stream of just its final event.
fn repeat(answer: &DialogResponse, stream: bool) -> Reply {
    let answer = Box::new(answer.clone());
    if stream {
        Reply::Stream(Box::pin(futures::stream::once(async move {
            Streamed::Done(answer)
        })))
    } else {
        Reply::Whole(answer)
    }
}

/// Runs a dialog (not a repeat); its answer settles `ticket`.
async fn fresh(gw: &Arc<Gateway>, d: Dialog, ticket: Option<Ticket>) -> Result<Reply, ApiError> {
    let settle = |ticket: Option<Ticket>, resp: &DialogResponse| {
        if let Some(t) = ticket {
            t.finish(Arc::new(resp.clone()));
        }
    };
    let Work::Generate { prompt, params } = &d.work else {
        let resp = classify(gw, &d).await?;
        settle(ticket, &resp);
        return Ok(Reply::Whole(Box::new(resp)));
    };
    // Stoppable from here on, by its key or (supersede) by a newer line of its NPC, also while it waits.
    let mut handle = gw.requests().register(
        &d.key,
        d.npc.as_ref().map(|n| (d.zone.as_str(), n.id.as_str())),
        d.supersede,
    );
    let started = start(
        gw,
        Ask {
            target: Target::Kind(d.kind),
            zone: &d.zone,
            priority: d.priority,
            deadline: Deadline::after(d.deadline_ms, Instant::now()),
            prompt,
            params,
            traits: d.npc.as_ref().map(|n| &n.traits),
        },
    );
    let mut running = tokio::select! {
        r = started => r?,
        why = handle.cancelled() => return Err(ApiError::Cancelled { why: why.to_string() }),
    };
    running.watch(handle);
    if !d.stream {
        let (text, done) = running.collect().await?;
        let served = Served::of(&running);
        drop(running);
        let resp = end(gw, &d, &served, text, &done).await;
        settle(ticket, &resp);
        return Ok(Reply::Whole(Box::new(resp)));
    }
    let gw = gw.clone();
    Ok(Reply::Stream(Box::pin(async_stream::stream! {
        let served = Served::of(&running);
        let mut text = String::new();
        while let Some(ev) = running.next().await {
            match ev {
                Event::Token { id, text: t, .. } => {
                    text.push_str(&t);
                    yield Streamed::Token { id, text: t };
                }
                Event::Done(c) => {
                    drop(running);
                    let resp = end(&gw, &d, &served, text, &c).await;
                    settle(ticket, &resp);
                    yield Streamed::Done(Box::new(resp));
                    return;
                }
                Event::Error(e) => {
                    tracing::error!(error = %e, "generation failed mid-stream");
                    yield Streamed::Failed;
                    return;
                }
                Event::Expired => break,
            }
        }
        if let Some(why) = &running.cancelled {
            yield Streamed::Cancelled(why.to_string());
            return;
        }
        tracing::error!("the tier went away mid-stream");
        yield Streamed::Failed;
    })))
}

/// A classification on Saturn, in a Saturn slot.
async fn classify(gw: &Gateway, d: &Dialog) -> Result<DialogResponse, ApiError> {
    let Work::Classify { classifier, input } = &d.work else {
        return Err(ApiError::Internal("generation routed to classify".into()));
    };
    let deadline = Deadline::after(d.deadline_ms, Instant::now());
    let permit = admission::slot(gw, Tier::Saturn, &d.zone, d.priority, deadline).await?;
    let wait_ms = permit.granted.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let mut out = gw
        .tiers()
        .saturn
        .classify(classifier, vec![input.clone()])
        .await?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let classification = out
        .pop()
        .ok_or_else(|| ApiError::Internal("saturn returned no result".into()))?;
    let resp = DialogResponse {
        uid: d.uid.clone(),
        text: classification.label.clone(),
        tier: Tier::Saturn.as_str().into(),
        adapters: Vec::new(),
        finish_reason: None,
        usage: Usage::default(),
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
    };
    drop(permit);
    publish(gw, d, &resp).await;
    Ok(resp)
}

/// Ends a generated dialog: its response, published as a result.
async fn end(
    gw: &Gateway,
    d: &Dialog,
    s: &Served,
    text: String,
    done: &Completion,
) -> DialogResponse {
    let resp = DialogResponse {
        uid: d.uid.clone(),
        text,
        tier: s.tier.as_str().into(),
        adapters: s.adapters.clone(),
        finish_reason: Some(done.finish_reason),
        usage: Usage::of(
            done.prompt_tokens,
            done.cached_tokens,
            done.completion_tokens,
        ),
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
    };
    publish(gw, d, &resp).await;
    resp
}

/// Hands a finished dialog to the results publisher, if there is one (waiting while its queue is full); a
/// draft is answered only.
async fn publish(gw: &Gateway, d: &Dialog, resp: &DialogResponse) {
    if d.draft {
        return;
    }
    let Some(sink) = gw.results() else { return };
    let finished_at_ms = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.as_millis() as u64);
    let result = DialogResult {
        // The same for every repeat, on every gateway: canon keeps one row.
        result_id: idempotency::result_id(&d.key),
        uid: d.uid.clone(),
        zone: d.zone.clone(),
        kind: d.kind,
        npc: d.npc.clone(),
        participants: d.participants.clone(),
        faction: d.faction.clone(),
        finished_at_ms,
        response: resp.clone(),
    };
    if let Err(e) = sink.send(&result).await {
        tracing::error!(error = %e, uid = %d.uid, result_id = %result.result_id, "a finished dialog was not published");
    }
}

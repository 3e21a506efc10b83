//! Admission: from a request's ask to a slot on a tier, under ONE [`Snapshot`] of the configuration. It
//! routes by kind (`[routing]`), checks the zone's budgets (max new tokens, prompt tokens after tokenizing on
//! the tier, token rate), and waits in the tier's fair queue ([`crate::slots`]) for at most the deadline or
//! the queue timeout. A full queue or a zone over its token rate is a 429 with Retry-After; a deadline that
//! passes first is a 504; a tier that is down is a 503. Deep and moment work routed to Theia runs on the
//! Driver, `degraded`, when Theia is down, saturated past `theia_wait_ms` or the zone is over its Theia rate
//! (if the policy allows and the request fits the Driver's budget).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nimmer_config::{BudgetsFile, RequestBudget};
use nimmer_tiers::{Prompt, SamplingParams};
use nimmer_wire::Kind;

use crate::Tier;
use crate::error::ApiError;
use crate::metrics;
use crate::slots::{NoSlot, SlotPermit};
use crate::state::{Gateway, Snapshot};
use crate::voice::{self, Voice};

/// What a generation asks for: a kind (routed by `[routing]`, may degrade) or a tier by name (OpenAI
/// `model`; waits for that tier).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Kind(Kind),
    Tier(Tier),
}

/// A request's deadline: the instant it must have started by, and the `deadline_ms` it was given as.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub at: Instant,
    pub ms: u64,
}

impl Deadline {
    pub fn after(ms: Option<u64>, from: Instant) -> Option<Self> {
        ms.map(|ms| Self {
            at: from + Duration::from_millis(ms),
            ms,
        })
    }

    pub fn passed(&self, now: Instant) -> bool {
        self.at <= now
    }

    pub fn error(&self) -> ApiError {
        ApiError::Deadline {
            deadline_ms: self.ms,
        }
    }
}

/// One generation's ask: what, for which zone, how urgent, with which NPC traits.
pub struct Ask<'a> {
    pub target: Target,
    pub zone: &'a str,
    pub priority: i32,
    pub deadline: Option<Deadline>,
    pub prompt: &'a Prompt,
    pub params: &'a SamplingParams,
    /// `npc.traits`: selects and weighs trait-LoRA adapters (Driver only).
    pub traits: Option<&'a BTreeMap<String, f32>>,
}

/// An admitted generation: its slot, the prompt as the serving tier tokenized it, its voice, and the
/// snapshot it was admitted under.
pub struct Admitted {
    pub permit: SlotPermit,
    /// Why it runs on the Driver instead of Theia, if it does.
    pub degraded: Option<String>,
    pub prompt: Vec<u32>,
    pub voice: Option<Voice>,
    pub snapshot: Snapshot,
    pub started: Instant,
    pub deadline: Option<Deadline>,
    pub priority: i32,
}

impl Admitted {
    pub fn tier(&self) -> Tier {
        self.permit.tier
    }

    /// The serving tier's budget for the zone's class, from the admission snapshot.
    pub fn budget(&self) -> RequestBudget {
        self.snapshot
            .live
            .config
            .budgets
            .tier(self.tier(), &self.snapshot.class)
    }
}

/// The tier a target runs on: `[routing]` names the tier of each kind.
pub fn routed_tier(b: &BudgetsFile, target: Target) -> Tier {
    let r = &b.routing;
    match target {
        Target::Kind(Kind::Dialog) => r.dialog,
        Target::Kind(Kind::Deep) => r.deep,
        Target::Kind(Kind::Moment) => r.moment,
        Target::Kind(Kind::Classify) => Tier::Saturn,
        Target::Tier(t) => t,
    }
}

/// Admits a generation: budgets, routing (and degradation), a slot, the voice.
pub async fn admit(gw: &Gateway, ask: Ask<'_>) -> Result<Admitted, ApiError> {
    let started = Instant::now();
    let snap = gw.touch(ask.zone);
    let b = &snap.live.config.budgets;
    let tier = routed_tier(b, ask.target);
    let checked = check(gw, &snap, tier, &ask);
    let checked = match checked {
        Ok(v) => compile_format(gw, tier, ask.params).await.map(|()| v),
        Err(e) => Err(e),
    };
    let (parts, prompt) = match checked {
        Ok(v) => v,
        Err(e) => {
            metrics::rejected(tier, &snap.class, "invalid");
            return Err(e);
        }
    };
    let driver_rb = b.tier(Tier::Driver, &snap.class);
    let may_degrade = tier == Tier::Theia
        && matches!(ask.target, Target::Kind(_))
        && b.routing.degrade
        && fits(&driver_rb, ask.params.max_tokens, prompt.len());
    let (permit, degraded) = if may_degrade {
        route_degradable(gw, &snap, &ask).await?
    } else {
        (
            slot_for(gw, &snap, tier, ask.zone, ask.priority, ask.deadline).await?,
            None,
        )
    };
    let served = permit.tier;
    let prompt = if served == tier {
        prompt
    } else {
        compile_format(gw, served, ask.params).await?;
        llm(gw, served)?.tokenize(ask.prompt)?
    };
    // Trait-LoRAs voice the Driver; deep work on Theia runs its own weights.
    let voice = if served == Tier::Driver {
        voice::fetch(gw.loras(), parts).await?
    } else {
        None
    };
    Ok(Admitted {
        permit,
        degraded,
        prompt,
        voice,
        snapshot: snap,
        started,
        deadline: ask.deadline,
        priority: ask.priority,
    })
}

/// The request against the routed tier's budget: its traits' adapters and its prompt's tokens.
fn check(
    gw: &Gateway,
    snap: &Snapshot,
    tier: Tier,
    ask: &Ask<'_>,
) -> Result<(Vec<voice::Part>, Vec<u32>), ApiError> {
    let b = &snap.live.config.budgets;
    let parts = match ask.traits {
        Some(t) if !t.is_empty() => voice::choose(b, t)?,
        _ => Vec::new(),
    };
    let rb = b.tier(tier, &snap.class);
    let class = &snap.class;
    if let Some(max) = rb.max_new_tokens
        && ask.params.max_tokens > max
    {
        return Err(ApiError::invalid(
            "max_tokens",
            format!(
                "{} exceeds the {} budget of {max} new tokens for zone class `{class}`",
                ask.params.max_tokens,
                tier.as_str()
            ),
        ));
    }
    let ids = llm(gw, tier)?.tokenize(ask.prompt)?;
    if let Some(max) = rb.max_prompt_tokens
        && ids.len() > max
    {
        return Err(ApiError::invalid(
            match ask.prompt {
                Prompt::Chat(_) => "messages",
                _ => "prompt",
            },
            format!(
                "the prompt has {} tokens; the {} budget for zone class `{class}` allows {max}",
                ids.len(),
                tier.as_str()
            ),
        ));
    }
    Ok((parts, ids))
}

/// Compiles the request's `response_format` on `tier` (cached there, so the tier finds it compiled): a
/// schema that does not compile is a 422 before any slot is taken. Off the runtime: a first compile of a
/// large schema, or of the tier's token trie, takes milliseconds to a tenth of a second.
async fn compile_format(gw: &Gateway, tier: Tier, params: &SamplingParams) -> Result<(), ApiError> {
    let Some(format) = params.response_format.clone() else {
        return Ok(());
    };
    let llm = llm(gw, tier)?.clone();
    tokio::task::spawn_blocking(move || llm.grammars()?.compile(&format).map(drop))
        .await
        .map_err(|e| ApiError::Internal(format!("compiling a response format: {e}")))?
        .map_err(ApiError::from)
}

fn fits(rb: &RequestBudget, max_tokens: usize, prompt_len: usize) -> bool {
    rb.max_new_tokens.is_none_or(|m| max_tokens <= m)
        && rb.max_prompt_tokens.is_none_or(|m| prompt_len <= m)
}

fn llm(gw: &Gateway, tier: Tier) -> Result<&std::sync::Arc<dyn crate::tier::LlmTier>, ApiError> {
    gw.tiers()
        .llm(tier)
        .ok_or_else(|| ApiError::Internal(format!("generation routed to {}", tier.as_str())))
}

/// Theia if it can take the work soon, else the Driver, degraded.
async fn route_degradable(
    gw: &Gateway,
    snap: &Snapshot,
    ask: &Ask<'_>,
) -> Result<(SlotPermit, Option<String>), ApiError> {
    let b = &snap.live.config.budgets;
    let rb = b.tier(Tier::Theia, &snap.class);
    let (reason, label) = if !gw.tiers().health(Tier::Theia).is_ready() {
        ("theia is down", "down")
    } else if gw
        .zone_table()
        .lock()
        .expect("zones lock")
        .check_rate(ask.zone, Tier::Theia, &rb, Instant::now())
        .is_err()
    {
        ("zone over its theia token rate", "token_rate")
    } else {
        let mut wait = Duration::from_millis(b.routing.theia_wait_ms);
        if let Some(d) = ask.deadline {
            wait = wait.min(d.at.saturating_duration_since(Instant::now()) / 2);
        }
        let slots = gw.slots(Tier::Theia);
        let got = if wait.is_zero() {
            slots.try_take(ask.zone, &snap.class, snap.weight)
        } else {
            slots
                .acquire(ask.zone, &snap.class, snap.weight, ask.priority, wait)
                .await
                .ok()
        };
        if let Some(permit) = got {
            metrics::admitted(Tier::Theia, &snap.class);
            return Ok((permit, None));
        }
        ("theia saturated", "saturated")
    };
    metrics::degraded(&snap.class, label);
    let permit = slot_for(gw, snap, Tier::Driver, ask.zone, ask.priority, ask.deadline).await?;
    Ok((permit, Some(format!("{reason}: served by driver"))))
}

/// A slot of `tier` for a classification (Saturn).
pub async fn slot(
    gw: &Gateway,
    tier: Tier,
    zone: &str,
    priority: i32,
    deadline: Option<Deadline>,
) -> Result<SlotPermit, ApiError> {
    let snap = gw.touch(zone);
    slot_for(gw, &snap, tier, zone, priority, deadline).await
}

/// A slot of `tier`: 503 when the tier is down, 429 when the zone is over its token rate or the queue is
/// full, 504 when the deadline passes first, 429 after the queue timeout.
async fn slot_for(
    gw: &Gateway,
    snap: &Snapshot,
    tier: Tier,
    zone: &str,
    priority: i32,
    deadline: Option<Deadline>,
) -> Result<SlotPermit, ApiError> {
    let class = &snap.class;
    if let crate::tier::Health::Down { reason } = gw.tiers().health(tier) {
        metrics::rejected(tier, class, "unavailable");
        tracing::warn!(tier = tier.as_str(), %reason, "request to a tier that is down");
        return Err(ApiError::Unavailable {
            tier: tier.as_str().into(),
        });
    }
    let rb = snap.live.config.budgets.tier(tier, class);
    let now = Instant::now();
    let rate = gw
        .zone_table()
        .lock()
        .expect("zones lock")
        .check_rate(zone, tier, &rb, now);
    if let Err(retry_after_s) = rate {
        metrics::rejected(tier, class, "token_rate");
        return Err(ApiError::OverRate {
            tier: tier.as_str().into(),
            zone: zone.into(),
            retry_after_s,
        });
    }
    let timeout = Duration::from_millis(rb.queue_timeout_ms);
    let wait = deadline.map_or(timeout, |d| {
        d.at.saturating_duration_since(now).min(timeout)
    });
    let slots = gw.slots(tier);
    let saturated = |reason: &'static str| {
        metrics::rejected(tier, class, reason);
        ApiError::Saturated {
            tier: tier.as_str().into(),
            capacity: slots.capacity(),
            retry_after_s: 1,
        }
    };
    match slots
        .acquire(zone, class, snap.weight, priority, wait)
        .await
    {
        Ok(p) => {
            metrics::admitted(tier, class);
            metrics::slot_wait(tier, class, now.elapsed().as_secs_f64());
            Ok(p)
        }
        Err(NoSlot::Timeout) => match deadline {
            Some(d) if d.at <= now + timeout => {
                metrics::rejected(tier, class, "deadline");
                Err(d.error())
            }
            _ => Err(saturated("queue_timeout")),
        },
        Err(NoSlot::Full) => Err(saturated("queue_full")),
    }
}

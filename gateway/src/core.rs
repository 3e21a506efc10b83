//! The gateway core, independent of HTTP and NATS: the three tiers, the active configuration (hot-swapped
//! as a whole), zones, slots, budgets, routing and degradation.
//!
//! Every running request holds a [`SlotPermit`] (an RAII value that lives as long as its response stream):
//! a tier's capacity is its `slots` budget. Requests without a free slot wait in the tier's fair queue
//! ([`crate::fair`]): per zone, by priority, and a freed slot goes to the zone holding the fewest per unit of
//! its class's weight. A full queue or a zone over its token rate answers 429 with Retry-After; a request
//! that cannot start before its deadline answers 504 without spending compute. Deep and moment requests go
//! where `[routing]` says (Theia); when Theia cannot take them they run on the Driver, `degraded: true`.
//! A [`Running`] generation charges its tokens to its zone's bucket when it ends, however it ends.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use nimmer_config::{Config, RequestBudget};
use nimmer_loras::{Blend, Registry};
use nimmer_tiers::fetch::{Verify, ensure_llm, ensure_model};
use nimmer_tiers::{EngineLimits, Event, GenerateRequest, LlmHandle, Prompt, SaturnHandle};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::api::{Dialog, DialogResponse, DialogResult, Kind, Work};
use crate::error::ApiError;
use crate::metrics;
use crate::nats::ResultsSink;
pub use crate::slots::SlotPermit;
use crate::slots::{NoSlot, TierSlots};
use crate::zones::{ZoneInfo, ZoneTable};

/// A model tier (the names config files use).
pub use nimmer_config::TierName as Tier;

/// What `GET /v1/zones` shows about one zone.
#[derive(Debug, Clone, Serialize)]
pub struct ZoneView {
    #[serde(flatten)]
    pub info: Option<ZoneInfo>,
    pub slots_in_use: BTreeMap<Tier, usize>,
    pub queued: BTreeMap<Tier, usize>,
}

/// The configuration in effect and its version (1 at start, +1 per applied reload).
pub struct Live {
    pub config: Config,
    pub version: u64,
    pub applied_at: SystemTime,
}

/// Charges a generation's tokens to its zone's bucket when dropped, and records its metrics once done.
struct Meter {
    zones: Arc<Mutex<ZoneTable>>,
    zone: String,
    tier: Tier,
    budget: RequestBudget,
    prompt_tokens: usize,
    completion_tokens: usize,
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.zones.lock().expect("zones lock").charge(
            &self.zone,
            self.tier,
            self.prompt_tokens + self.completion_tokens,
            &self.budget,
            Instant::now(),
        );
    }
}

/// A generation in flight: its slot, its event stream and its token meter.
pub struct Running {
    pub tier: Tier,
    pub degraded_reason: Option<String>,
    /// Adapters it runs with, as `name@vN`.
    pub adapters: Vec<String>,
    pub permit: SlotPermit,
    /// Time spent waiting for the slot.
    pub slot_wait: Duration,
    events: mpsc::UnboundedReceiver<Event>,
    /// The first event, already received (so the deadline could be checked).
    first: Option<Event>,
    meter: Meter,
}

impl Running {
    /// The next event; `None` when the engine went away without finishing.
    pub async fn next(&mut self) -> Option<Event> {
        let ev = match self.first.take() {
            Some(e) => Some(e),
            None => self.events.recv().await,
        };
        match &ev {
            Some(Event::Token { .. }) => self.meter.completion_tokens += 1,
            Some(Event::Done(c)) => {
                self.meter.prompt_tokens = c.prompt_tokens;
                self.meter.completion_tokens = c.completion_tokens;
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
}

/// What a generation asks for: a kind (routed by `[routing]`, may degrade) or a tier by name (OpenAI
/// `model`; waits for that tier).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Kind(Kind),
    Tier(Tier),
}

/// One generation to run: what, for which zone, how urgent, with which NPC traits.
pub struct Generation<'a> {
    pub target: Target,
    pub zone: &'a str,
    pub priority: i32,
    pub deadline_ms: Option<u64>,
    pub prompt: Prompt,
    pub params: nimmer_tiers::SamplingParams,
    /// `npc.traits`: selects and weighs trait-LoRA adapters.
    pub traits: Option<&'a BTreeMap<String, f32>>,
}

/// The adapters a request's traits select: the blend and the `name@vN` of each part.
struct Voice {
    blend: Arc<Blend>,
    names: Vec<String>,
}

/// A slot and whether it is a degraded one.
struct Routed {
    permit: SlotPermit,
    degraded: Option<String>,
}

/// The three tiers, their slots, the zones and the configuration in effect.
pub struct Gateway {
    driver: LlmHandle,
    theia: LlmHandle,
    saturn: SaturnHandle,
    slots: BTreeMap<Tier, Arc<TierSlots>>,
    live: RwLock<Arc<Live>>,
    zones: Arc<Mutex<ZoneTable>>,
    /// Where finished dialogs go (set when NATS is configured).
    results: Mutex<Option<ResultsSink>>,
    /// The Driver's trait-LoRA adapters.
    loras: Registry,
    loras_dir: Option<std::path::PathBuf>,
}

impl Gateway {
    /// Fetches what is missing and loads the three tiers (blocking; minutes on a first run).
    pub fn start(config: Config, config_dir: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let t = &config.tiers;
        let b = &config.budgets.tiers;
        let driver = LlmHandle::start(
            "driver",
            &t.tiers.driver,
            EngineLimits::of(&b.driver),
            &ensure_llm(t, &t.tiers.driver.model, Verify::Cached)?,
        )?;
        let theia = LlmHandle::start(
            "theia",
            &t.tiers.theia,
            EngineLimits::of(&b.theia),
            &ensure_llm(t, &t.tiers.theia.model, Verify::Cached)?,
        )?;
        let saturn_dir = ensure_model(t, &t.tiers.saturn.model, Verify::Cached)?;
        let saturn = SaturnHandle::start(
            &t.tiers.saturn,
            &saturn_dir,
            &config.classifiers,
            config_dir,
        )?;
        let slots = Tier::ALL
            .into_iter()
            .map(|tier| {
                let tb = config.budgets.tier_budget(tier);
                (tier, TierSlots::new(tier, tb.slots, tb.queue))
            })
            .collect();
        let _ = metrics::handle();
        metrics::config_version(1);
        let spec = &config.budgets.loras;
        let loras = Registry::new(driver.info().model.lora_base(), spec.memory_mib << 20);
        // The adapters directory is relative to the config directory (`config/` for the embedded config).
        let dir = config_dir
            .unwrap_or(std::path::Path::new("config"))
            .join(&spec.dir);
        let loras_dir = dir.is_dir().then_some(dir);
        match &loras_dir {
            Some(d) => {
                for (name, e) in loras.scan(d) {
                    tracing::error!(adapter = %name, error = %e, "adapter rejected");
                }
                tracing::info!(dir = %d.display(), adapters = loras.list().len(), "trait-LoRA adapters loaded");
            }
            None => {
                tracing::info!(dir = %spec.dir, "no adapters directory: trait-LoRAs only by API")
            }
        }
        metrics::loras(&loras.stats());
        Ok(Self {
            driver,
            theia,
            saturn,
            slots,
            live: RwLock::new(Arc::new(Live {
                config,
                version: 1,
                applied_at: SystemTime::now(),
            })),
            zones: Arc::new(Mutex::new(ZoneTable::default())),
            results: Mutex::new(None),
            loras,
            loras_dir,
        })
    }

    /// Sends finished dialogs to `sink` from now on (`None` stops and returns the old sink).
    pub fn set_results(&self, sink: Option<ResultsSink>) -> Option<ResultsSink> {
        std::mem::replace(&mut *self.results.lock().expect("results lock"), sink)
    }

    /// Hands a finished dialog to the results publisher, if there is one.
    pub fn publish_result(&self, d: &Dialog, resp: &DialogResponse) {
        let Some(sink) = self.results.lock().expect("results lock").clone() else {
            return;
        };
        let finished_at_ms = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_millis() as u64);
        sink.send(&DialogResult {
            result_id: format!("{:032x}", rand::random::<u128>()),
            uid: d.uid.clone(),
            zone: d.zone.clone(),
            kind: d.kind,
            npc: d.npc.clone(),
            participants: d.participants.clone(),
            faction: d.faction.clone(),
            finished_at_ms,
            response: resp.clone(),
        });
    }

    /// The configuration in effect.
    pub fn live(&self) -> Arc<Live> {
        self.live.read().expect("config lock").clone()
    }

    pub fn saturn(&self) -> &SaturnHandle {
        &self.saturn
    }

    pub fn llm(&self, tier: Tier) -> Option<&LlmHandle> {
        match tier {
            Tier::Driver => Some(&self.driver),
            Tier::Theia => Some(&self.theia),
            Tier::Saturn => None,
        }
    }

    /// Applies a new configuration's budgets (a hot reload) and returns the new version. Requests in flight
    /// keep their slots; new capacity is handed to waiters at once. Models, devices and classifiers are
    /// fixed while running: edits to them are logged and wait for a restart.
    pub fn apply(&self, next: Config) -> u64 {
        let mut live = self.live.write().expect("config lock");
        let old = &live.config;
        if next.sources.tiers != old.sources.tiers
            || next.sources.classifiers != old.sources.classifiers
        {
            tracing::warn!(
                "tiers.toml or classifiers.toml changed: models and classifiers apply on restart; only budgets.toml was applied"
            );
        }
        let mut next = next;
        next.tiers = old.tiers.clone();
        next.classifiers = old.classifiers.clone();
        next.sources.tiers = old.sources.tiers.clone();
        next.sources.classifiers = old.sources.classifiers.clone();
        self.loras.set_budget(next.budgets.loras.memory_mib << 20);
        if next.budgets.loras.dir != old.budgets.loras.dir {
            tracing::warn!("[loras] dir changed: the adapters directory applies on restart");
        }
        for tier in Tier::ALL {
            let tb = next.budgets.tier_budget(tier);
            self.slots[&tier].set_limits(tb.slots, tb.queue);
            if let Some(h) = self.llm(tier) {
                h.set_limits(EngineLimits::of(tb));
            }
        }
        let version = live.version + 1;
        *live = Arc::new(Live {
            config: next,
            version,
            applied_at: SystemTime::now(),
        });
        metrics::config_version(version);
        version
    }

    /// Activates `zone` (or marks it seen) and returns its class, its weight and the budgets in effect.
    fn touch(&self, zone: &str) -> (String, f64, Arc<Live>) {
        let live = self.live();
        let b = &live.config.budgets;
        let class = self
            .zones
            .lock()
            .expect("zones lock")
            .touch(zone, b, Instant::now());
        (class.clone(), b.weight(&class), live)
    }

    /// `PUT /v1/zones/{id}`: activates a zone, optionally setting its class.
    pub fn put_zone(&self, zone: &str, class: Option<&str>) -> Result<String, ApiError> {
        crate::api::check_token("zone", zone)?;
        let live = self.live();
        let b = &live.config.budgets;
        if let Some(c) = class
            && !b.classes.contains_key(c)
        {
            return Err(ApiError::invalid(
                "class",
                format!(
                    "unknown zone class `{c}` ({})",
                    b.classes.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        let mut zones = self.zones.lock().expect("zones lock");
        zones.put(zone, class, b, Instant::now());
        metrics::zones_active(zones.len());
        Ok(zones.class(zone).unwrap_or_default().to_string())
    }

    /// Prunes zones idle past the TTL that hold and wait for nothing; returns how many went.
    pub fn prune_zones(&self) -> usize {
        let ttl = Duration::from_secs(self.live().config.budgets.zones.idle_ttl_s);
        let busy = |z: &str| self.slots.values().any(|s| s.holds(z));
        let mut zones = self.zones.lock().expect("zones lock");
        let n = zones.prune(ttl, Instant::now(), busy).len();
        metrics::zones_active(zones.len());
        n
    }

    /// A slot of `tier` for `zone`: 429 when the zone is over its token rate or the queue is full, 504 when
    /// the deadline passes first, 429 after the queue timeout.
    pub async fn slot(
        &self,
        tier: Tier,
        zone: &str,
        priority: i32,
        deadline_ms: Option<u64>,
    ) -> Result<SlotPermit, ApiError> {
        let (class, weight, live) = self.touch(zone);
        let rb = live.config.budgets.tier(tier, &class);
        self.slot_for(tier, zone, &class, weight, &rb, priority, deadline_ms)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn slot_for(
        &self,
        tier: Tier,
        zone: &str,
        class: &str,
        weight: f64,
        rb: &RequestBudget,
        priority: i32,
        deadline_ms: Option<u64>,
    ) -> Result<SlotPermit, ApiError> {
        let rate =
            self.zones
                .lock()
                .expect("zones lock")
                .check_rate(zone, tier, rb, Instant::now());
        if let Err(retry_after_s) = rate {
            metrics::rejected(tier, class, "token_rate");
            return Err(ApiError::OverRate {
                tier: tier.as_str().into(),
                zone: zone.into(),
                retry_after_s,
            });
        }
        let timeout = Duration::from_millis(rb.queue_timeout_ms);
        let wait = deadline_ms.map_or(timeout, |ms| Duration::from_millis(ms).min(timeout));
        let slots = &self.slots[&tier];
        let started = Instant::now();
        match slots.acquire(zone, class, weight, priority, wait).await {
            Ok(p) => {
                metrics::admitted(tier, class);
                metrics::slot_wait(tier, class, started.elapsed().as_secs_f64());
                Ok(p)
            }
            Err(NoSlot::Timeout)
                if deadline_ms.is_some_and(|ms| Duration::from_millis(ms) <= timeout) =>
            {
                metrics::rejected(tier, class, "deadline");
                Err(ApiError::Deadline {
                    deadline_ms: deadline_ms.unwrap_or_default(),
                })
            }
            Err(e) => {
                metrics::rejected(
                    tier,
                    class,
                    match e {
                        NoSlot::Full => "queue_full",
                        NoSlot::Timeout => "queue_timeout",
                    },
                );
                Err(ApiError::Saturated {
                    tier: tier.as_str().into(),
                    capacity: slots.capacity(),
                    retry_after_s: 1,
                })
            }
        }
    }

    /// The tier a target runs on: `[routing]` names the tier of each kind.
    pub fn tier_for(&self, target: Target) -> Tier {
        let r = &self.live().config.budgets.routing;
        match target {
            Target::Kind(Kind::Dialog) => r.dialog,
            Target::Kind(Kind::Deep) => r.deep,
            Target::Kind(Kind::Moment) => r.moment,
            Target::Kind(Kind::Classify) => Tier::Saturn,
            Target::Tier(t) => t,
        }
    }

    /// Picks the tier for a kind and gets a slot. Work routed to Theia runs on the Driver (degraded) when
    /// Theia has no slot within `theia_wait_ms` or the zone is over its Theia token rate, if the policy allows
    /// and `fits_driver` (the prompt and max_tokens fit the Driver's budget).
    async fn route(
        &self,
        target: Target,
        zone: &str,
        priority: i32,
        deadline_ms: Option<u64>,
        fits_driver: impl Fn(&RequestBudget) -> bool,
    ) -> Result<Routed, ApiError> {
        let started = Instant::now();
        let (class, weight, live) = self.touch(zone);
        let b = &live.config.budgets;
        let tier = self.tier_for(target);
        let rb = b.tier(tier, &class);
        let driver_rb = b.tier(Tier::Driver, &class);
        let may_degrade = tier == Tier::Theia
            && matches!(target, Target::Kind(_))
            && b.routing.degrade
            && fits_driver(&driver_rb);
        if !may_degrade {
            let permit = self
                .slot_for(tier, zone, &class, weight, &rb, priority, deadline_ms)
                .await?;
            return Ok(Routed {
                permit,
                degraded: None,
            });
        }
        let over_rate = self
            .zones
            .lock()
            .expect("zones lock")
            .check_rate(zone, tier, &rb, Instant::now())
            .is_err();
        let reason = if over_rate {
            "zone over its theia token rate"
        } else {
            let wait = Duration::from_millis(b.routing.theia_wait_ms);
            let wait = deadline_ms.map_or(wait, |ms| wait.min(Duration::from_millis(ms / 2)));
            let got = if wait.is_zero() {
                self.slots[&tier].try_take(zone, &class, weight)
            } else {
                self.slots[&tier]
                    .acquire(zone, &class, weight, priority, wait)
                    .await
                    .ok()
            };
            if let Some(permit) = got {
                metrics::admitted(tier, &class);
                return Ok(Routed {
                    permit,
                    degraded: None,
                });
            }
            "theia saturated"
        };
        metrics::degraded(&class, if over_rate { "token_rate" } else { "saturated" });
        let waited = started.elapsed().as_millis() as u64;
        let deadline_ms = deadline_ms.map(|ms| ms.saturating_sub(waited).max(1));
        let permit = self
            .slot_for(
                Tier::Driver,
                zone,
                &class,
                weight,
                &driver_rb,
                priority,
                deadline_ms,
            )
            .await?;
        Ok(Routed {
            permit,
            degraded: Some(format!("{reason}: served by driver")),
        })
    }

    /// Checks a prompt and `max_tokens` against a tier's budget for a zone class; returns the prompt's tokens.
    fn check_budget(
        &self,
        tier: Tier,
        class: &str,
        rb: &RequestBudget,
        prompt: &Prompt,
        max_tokens: usize,
    ) -> Result<Vec<u32>, ApiError> {
        let handle = self
            .llm(tier)
            .ok_or_else(|| ApiError::Internal("generation routed to saturn".into()))?;
        if let Some(max) = rb.max_new_tokens
            && max_tokens > max
        {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "{max_tokens} exceeds the {} budget of {max} new tokens for zone class `{class}`",
                    tier.as_str()
                ),
            ));
        }
        let ids = handle.tokenize(prompt)?;
        if let Some(max) = rb.max_prompt_tokens
            && ids.len() > max
        {
            return Err(ApiError::invalid(
                match prompt {
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
        Ok(ids)
    }

    /// Checks budgets, routes, waits for a slot and starts the generation; returns once its first event
    /// arrived (at most until the deadline).
    pub async fn generate(&self, g: Generation<'_>) -> Result<Running, ApiError> {
        let Generation {
            target,
            zone,
            priority,
            deadline_ms,
            prompt,
            params,
            traits,
        } = g;
        let started = Instant::now();
        let tier = self.tier_for(target);
        let (class, _, live) = self.touch(zone);
        let b = &live.config.budgets;
        // Traits → adapters before waiting for a slot (an unknown trait is the caller's error).
        let lora = match traits {
            Some(t) if !t.is_empty() => self.blend(t, b)?,
            _ => None,
        };
        let rb = b.tier(tier, &class);
        let ids = match self.check_budget(tier, &class, &rb, &prompt, params.max_tokens) {
            Ok(ids) => ids,
            Err(e) => {
                metrics::rejected(tier, &class, "invalid");
                return Err(e);
            }
        };
        let prompt_len = ids.len();
        let fits_driver = |d: &RequestBudget| {
            d.max_new_tokens.is_none_or(|m| params.max_tokens <= m)
                && d.max_prompt_tokens.is_none_or(|m| prompt_len <= m)
        };
        let routed = self
            .route(target, zone, priority, deadline_ms, fits_driver)
            .await?;
        let served_by = routed.permit.tier;
        let ids = if served_by == tier {
            ids
        } else {
            self.llm(served_by)
                .ok_or_else(|| ApiError::Internal("degraded to saturn".into()))?
                .tokenize(&prompt)?
        };
        let slot_wait = started.elapsed();
        let deadline_left =
            deadline_ms.map(|ms| ms.saturating_sub(slot_wait.as_millis() as u64).max(1));
        let budget = live.config.budgets.tier(served_by, &class);
        // Trait-LoRAs voice the Driver; deep work on Theia runs its own weights.
        let (lora, adapters) = match lora {
            Some(v) if served_by == Tier::Driver => (Some(v.blend), v.names),
            _ => (None, Vec::new()),
        };
        let mut running = self
            .run(
                routed,
                GenerateRequest {
                    prompt: Prompt::Tokens(ids),
                    params,
                    lora,
                },
                deadline_left,
                slot_wait,
                budget,
                prompt_len,
            )
            .await?;
        running.adapters = adapters;
        Ok(running)
    }

    /// The blend of a request's traits: each trait's adapter (by `[traits]`) at the trait's weight, with the
    /// names and versions used. Unknown traits get 422 (or are skipped, per `unknown_trait`).
    fn blend(
        &self,
        traits: &BTreeMap<String, f32>,
        b: &nimmer_config::BudgetsFile,
    ) -> Result<Option<Voice>, ApiError> {
        let mut parts = Vec::new();
        let mut names = Vec::new();
        for (t, &w) in traits {
            if w == 0.0 {
                continue;
            }
            let Some(adapter) = b.traits.get(t) else {
                if b.loras.unknown_trait == nimmer_config::UnknownTrait::Ignore {
                    continue;
                }
                return Err(ApiError::invalid(
                    "npc.traits",
                    format!(
                        "unknown trait `{t}` (known: {})",
                        b.traits.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            };
            let (a, version) = self
                .loras
                .get_versioned(adapter)
                .map_err(|e| {
                    ApiError::Internal(format!("loading adapter `{adapter}` for trait `{t}`: {e}"))
                })?
                .ok_or_else(|| {
                    ApiError::invalid(
                        "npc.traits",
                        format!("trait `{t}` maps to adapter `{adapter}`, which is not loaded"),
                    )
                })?;
            names.push(format!("{adapter}@v{version}"));
            parts.push((a, w));
        }
        if parts.is_empty() {
            return Ok(None);
        }
        Ok(Some(Voice {
            blend: Arc::new(Blend { parts }),
            names,
        }))
    }

    /// The adapter registry.
    pub fn loras(&self) -> &Registry {
        &self.loras
    }

    /// The adapters directory, if it exists.
    pub fn loras_dir(&self) -> Option<&std::path::Path> {
        self.loras_dir.as_deref()
    }

    /// Rescans the adapters directory; logs (and returns) what failed to load.
    pub fn rescan_loras(&self) -> usize {
        let Some(dir) = &self.loras_dir else { return 0 };
        let errors = self.loras.scan(dir);
        for (name, e) in &errors {
            tracing::error!(adapter = %name, error = %e, "adapter rejected; the previous version (if any) stays");
        }
        metrics::loras(&self.loras.stats());
        errors.len()
    }

    async fn run(
        &self,
        routed: Routed,
        req: GenerateRequest,
        deadline_ms: Option<u64>,
        slot_wait: Duration,
        budget: RequestBudget,
        prompt_tokens: usize,
    ) -> Result<Running, ApiError> {
        let permit = routed.permit;
        let tier = permit.tier;
        let handle = self
            .llm(tier)
            .ok_or_else(|| ApiError::Internal("generate on saturn".into()))?;
        let meter = Meter {
            zones: self.zones.clone(),
            zone: permit.zone.clone(),
            tier,
            budget,
            prompt_tokens,
            completion_tokens: 0,
        };
        let mut events = handle.generate(req)?;
        let first = match deadline_ms {
            Some(ms) => tokio::time::timeout(Duration::from_millis(ms), events.recv())
                .await
                .map_err(|_| ApiError::Deadline { deadline_ms: ms })?,
            None => events.recv().await,
        };
        let first = first.ok_or_else(|| ApiError::Unavailable {
            tier: tier.as_str().into(),
        })?;
        if let Event::Error(e) = &first {
            return Err(ApiError::Internal(e.clone()));
        }
        Ok(Running {
            tier,
            degraded_reason: routed.degraded,
            adapters: Vec::new(),
            permit,
            slot_wait,
            events,
            first: Some(first),
            meter,
        })
    }

    /// Validated dialog → running generation (classify kinds are answered by the caller through Saturn).
    pub async fn dialog(&self, d: &Dialog) -> Result<Running, ApiError> {
        let Work::Generate {
            messages,
            prompt,
            params,
        } = &d.work
        else {
            return Err(ApiError::Internal("classify routed to generate".into()));
        };
        let prompt = match (messages, prompt) {
            (Some(m), _) => Prompt::Chat(m.clone()),
            (None, Some(p)) => Prompt::Text(p.clone()),
            (None, None) => {
                return Err(ApiError::invalid("messages", "give `messages` or `prompt`"));
            }
        };
        self.generate(Generation {
            target: Target::Kind(d.kind),
            zone: &d.zone,
            priority: d.priority,
            deadline_ms: d.deadline_ms,
            prompt,
            params: params.clone(),
            traits: d.npc.as_ref().map(|n| &n.traits),
        })
        .await
    }

    /// Zones with their class, activity, token buckets, slots in use and queue lengths per tier.
    pub fn zones(&self) -> BTreeMap<String, ZoneView> {
        let mut zones = BTreeMap::new();
        for slots in self.slots.values() {
            slots.view(&mut zones);
        }
        let live = self.live();
        let infos = self
            .zones
            .lock()
            .expect("zones lock")
            .info(&live.config.budgets, Instant::now());
        for (name, info) in infos {
            zones
                .entry(name)
                .or_insert_with(|| ZoneView {
                    info: None,
                    slots_in_use: BTreeMap::new(),
                    queued: BTreeMap::new(),
                })
                .info = Some(info);
        }
        zones
    }
}

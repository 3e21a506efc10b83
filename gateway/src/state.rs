//! The gateway's state, independent of HTTP and NATS: the tiers (behind [`crate::tier`]), their slots, the
//! configuration in effect (replaced as a whole by a budgets reload), the zone table, the trait-LoRA
//! registry and where finished dialogs go. Admission and the dialog use case read it; the fronts and the
//! watchers call into it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use nimmer_config::{Config, ConfigError};
use nimmer_loras::Registry;
use nimmer_tiers::EngineLimits;

use crate::Tier;
use crate::error::{ApiError, GatewayError};
use crate::metrics;
use crate::results::ResultsSink;
use crate::slots::TierSlots;
use crate::tier::{Health, Tiers};
use crate::zones::{EngineShare, ZoneTable, ZoneView};

/// The configuration in effect and its version (1 at start, +1 per applied reload).
pub struct Live {
    pub config: Config,
    pub version: u64,
    pub applied_at: SystemTime,
}

/// One tier as `GET /v1/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TierStatus {
    pub health: Health,
    pub slots_in_use: usize,
    pub slots: usize,
    pub queued: usize,
    /// Sequences running, resident and waiting in the engine, and its KV use (`None`: remote or fake).
    pub engine: Option<nimmer_tiers::EngineLoad>,
    pub prefix_cache: Option<nimmer_tiers::PrefixSnapshot>,
    /// The workers of a tier served over NATS (empty when it runs in this process).
    pub workers: Vec<String>,
}

/// What one request is admitted under, read once: the configuration in effect and its zone's class and
/// weight. Carried as a value, so a reload in the middle of a request cannot mix two budget versions.
#[derive(Clone)]
pub struct Snapshot {
    pub live: Arc<Live>,
    pub class: String,
    pub weight: f64,
}

/// The tiers, their slots, the zones and the configuration in effect.
pub struct Gateway {
    tiers: Tiers,
    /// One fair queue of slots per tier; sized by `budgets.toml`.
    slots: BTreeMap<Tier, Arc<TierSlots>>,
    /// Replaced whole by [`Gateway::apply_budgets`].
    live: RwLock<Arc<Live>>,
    /// Shared with running generations' meters, which charge tokens when they end.
    zones: Arc<Mutex<ZoneTable>>,
    /// Where finished dialogs go (set while NATS is configured).
    results: Mutex<Option<ResultsSink>>,
    /// The Driver's trait-LoRA adapters.
    loras: Arc<Registry>,
    loras_dir: Option<PathBuf>,
    /// Requests in flight that `DELETE /v1/requests/{id}` or supersession may stop.
    requests: Arc<crate::requests::Requests>,
    /// Where `budgets.toml` lives (an edit over the API is written there); `None` on the embedded config.
    config_dir: Option<PathBuf>,
    /// Per zone, the NPC personas pinned in a tier's prefix cache while the zone is active.
    pins: Mutex<BTreeMap<String, Vec<PinnedNpc>>>,
    next_pin: AtomicU64,
    /// Where this gateway's zone charges go to the other gateways (`budget_sync.rs`; set while NATS is).
    charges: Mutex<Option<tokio::sync::mpsc::UnboundedSender<crate::zones::Charge>>>,
    /// Dialogs by idempotency key: repeats get the first answer.
    idempotency: Arc<crate::idempotency::Idempotency>,
    /// The same across gateways (set while NATS is).
    shared_answers: std::sync::OnceLock<crate::shared_answers::SharedAnswers>,
    /// GM events opened through this gateway, handed to their shards (set while NATS is).
    events: std::sync::OnceLock<crate::events::EventsFront>,
}

/// An NPC persona pinned in an LLM tier's prefix cache (`PUT /v1/zones/{id}` with `npcs`).
#[derive(Debug, Clone)]
pub struct PinnedNpc {
    pub npc: String,
    pub tier: Tier,
    pub id: u64,
}

impl Gateway {
    /// Fetches what is missing and loads the three tiers in this process (blocking; minutes on a first run).
    pub fn start(config: Config, config_dir: Option<&Path>) -> Result<Self, GatewayError> {
        Self::start_with(config, config_dir, None)
    }

    /// [`Gateway::start`], with the tiers that `tiers.toml` puts on NATS workers reached through `nats`
    /// (blocking; call it from a blocking thread of a tokio runtime).
    pub fn start_with(
        config: Config,
        config_dir: Option<&Path>,
        nats: Option<&str>,
    ) -> Result<Self, GatewayError> {
        // The recorder must exist before the engines take their metric handles.
        let _ = metrics::handle();
        let tiers = crate::tier::start(&config, config_dir, nats)?;
        Ok(Self::with_tiers(config, config_dir, tiers))
    }

    /// A gateway over `tiers` (in process, remote or fake). The adapters directory is `[loras] dir`,
    /// relative to `config_dir` (`config/` for the embedded config).
    pub fn with_tiers(config: Config, config_dir: Option<&Path>, tiers: Tiers) -> Self {
        let _ = metrics::handle();
        let slots = Tier::ALL
            .into_iter()
            .map(|tier| {
                let tb = config.budgets.tier_budget(tier);
                (
                    tier,
                    TierSlots::new(tier, tb.slots, tb.queue, tb.reserved_slots()),
                )
            })
            .collect();
        metrics::config_version(1);
        let spec = &config.budgets.loras;
        let loras = Arc::new(Registry::new(
            tiers.driver.lora_base(),
            spec.memory_mib << 20,
        ));
        let dir = config_dir.unwrap_or(Path::new("config")).join(&spec.dir);
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
        Self {
            tiers,
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
            config_dir: config_dir.map(Path::to_path_buf),
            requests: Default::default(),
            pins: Mutex::new(BTreeMap::new()),
            next_pin: AtomicU64::new(1),
            charges: Mutex::new(None),
            idempotency: Default::default(),
            shared_answers: std::sync::OnceLock::new(),
            events: std::sync::OnceLock::new(),
        }
    }

    /// Dialogs by idempotency key.
    pub fn idempotency(&self) -> &Arc<crate::idempotency::Idempotency> {
        &self.idempotency
    }

    /// Shares first answers with the other gateways on the same NATS (once; later calls are ignored).
    pub fn share_answers(&self, shared: crate::shared_answers::SharedAnswers) {
        let _ = self.shared_answers.set(shared);
    }

    pub fn set_events(&self, front: crate::events::EventsFront) {
        let _ = self.events.set(front);
    }

    /// Where `POST /v1/events` hands events to their shards, when NATS is configured.
    pub fn events(&self) -> Option<&crate::events::EventsFront> {
        self.events.get()
    }

    /// First answers shared across gateways, when NATS is configured.
    pub fn shared_answers(&self) -> Option<&crate::shared_answers::SharedAnswers> {
        self.shared_answers.get()
    }

    /// A fresh id for [`crate::tier::LlmTier::pin`].
    pub fn next_pin_id(&self) -> u64 {
        self.next_pin.fetch_add(1, Ordering::Relaxed)
    }

    /// Makes `pinned` the zone's pinned NPCs, releasing the ones it had.
    pub fn replace_pins(&self, zone: &str, pinned: Vec<PinnedNpc>) {
        let old = {
            let mut pins = self.pins.lock().expect("pins lock");
            if pinned.is_empty() {
                pins.remove(zone)
            } else {
                pins.insert(zone.to_string(), pinned)
            }
        };
        self.unpin_all(old.unwrap_or_default());
    }

    /// Releases pins (of a zone replaced or gone, or of a PUT that failed half-way).
    pub fn unpin_all(&self, pins: Vec<PinnedNpc>) {
        for p in pins {
            if let Some(llm) = self.tiers.llm(p.tier) {
                llm.unpin(p.id);
            }
        }
    }

    pub fn tiers(&self) -> &Tiers {
        &self.tiers
    }

    pub(crate) fn slots(&self, tier: Tier) -> &Arc<TierSlots> {
        &self.slots[&tier]
    }

    pub(crate) fn zone_table(&self) -> &Arc<Mutex<ZoneTable>> {
        &self.zones
    }

    /// Sets where this gateway's zone charges are shared (`None`: kept to itself).
    pub fn set_charge_sink(
        &self,
        tx: Option<tokio::sync::mpsc::UnboundedSender<crate::zones::Charge>>,
    ) {
        *self.charges.lock().expect("charges lock") = tx;
    }

    pub(crate) fn charge_sink(
        &self,
    ) -> Option<tokio::sync::mpsc::UnboundedSender<crate::zones::Charge>> {
        self.charges.lock().expect("charges lock").clone()
    }

    /// Charges tokens another gateway's generation used to the zone's bucket here (activating the zone).
    pub fn apply_charge(&self, zone: &str, tier: Tier, tokens: usize) {
        let live = self.live();
        let b = &live.config.budgets;
        let now = std::time::Instant::now();
        let mut zones = self.zones.lock().expect("zones lock");
        let class = zones.touch(zone, b, now);
        zones.charge(zone, tier, tokens, &b.tier(tier, &class), now);
    }

    /// Each tier's health.
    pub fn health(&self) -> BTreeMap<Tier, Health> {
        Tier::ALL
            .into_iter()
            .map(|t| (t, self.tiers.health(t)))
            .collect()
    }

    /// Sends finished dialogs to `sink` from now on (`None` stops and returns the old sink).
    pub fn set_results(&self, sink: Option<ResultsSink>) -> Option<ResultsSink> {
        std::mem::replace(&mut *self.results.lock().expect("results lock"), sink)
    }

    /// Where finished dialogs go, if anywhere.
    pub fn results(&self) -> Option<ResultsSink> {
        self.results.lock().expect("results lock").clone()
    }

    /// The configuration in effect.
    pub fn live(&self) -> Arc<Live> {
        self.live.read().expect("config lock").clone()
    }

    /// Applies an edited `budgets.toml` (the one way budgets change while running) and returns the new
    /// version; an invalid text changes nothing. Requests in flight keep their slots; new capacity is handed
    /// to waiters at once.
    pub fn apply_budgets(&self, text: &str) -> Result<u64, ConfigError> {
        let mut live = self.live.write().expect("config lock");
        let next = live.config.with_budgets(text)?;
        let old = &live.config.budgets;
        if next.budgets.loras.dir != old.loras.dir {
            tracing::warn!("[loras] dir changed: the adapters directory applies on restart");
        }
        self.loras.set_budget(next.budgets.loras.memory_mib << 20);
        for tier in Tier::ALL {
            let tb = next.budgets.tier_budget(tier);
            self.slots[&tier].set_limits(tb.slots, tb.queue, tb.reserved_slots());
            if let Some(h) = self.tiers.llm(tier) {
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
        Ok(version)
    }

    /// Activates `zone` (or marks it seen) and takes the request's [`Snapshot`].
    pub(crate) fn touch(&self, zone: &str) -> Snapshot {
        let live = self.live();
        let b = &live.config.budgets;
        let class = self
            .zones
            .lock()
            .expect("zones lock")
            .touch(zone, b, Instant::now());
        let weight = b.weight(&class);
        Snapshot {
            live,
            class,
            weight,
        }
    }

    /// `PUT /v1/zones/{id}`: activates a zone, optionally setting its class.
    pub fn put_zone(&self, zone: &str, class: Option<&str>) -> Result<String, ApiError> {
        crate::api::check_token("zone", zone)?;
        self.check_class(class)?;
        let live = self.live();
        let b = &live.config.budgets;
        let mut zones = self.zones.lock().expect("zones lock");
        zones.put(zone, class, b, Instant::now());
        metrics::zones_active(zones.len());
        Ok(zones.class(zone).unwrap_or_default().to_string())
    }

    /// A 422 unless `class` (when given) is a zone class of the budgets in effect.
    pub fn check_class(&self, class: Option<&str>) -> Result<(), ApiError> {
        let live = self.live();
        let b = &live.config.budgets;
        match class {
            Some(c) if !b.classes.contains_key(c) => Err(ApiError::invalid(
                "class",
                format!(
                    "unknown zone class `{c}` ({})",
                    b.classes.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Prunes zones idle past the TTL that hold and wait for nothing; returns how many went.
    pub fn prune_zones(&self) -> usize {
        let ttl = Duration::from_secs(self.live().config.budgets.zones.idle_ttl_s);
        let busy = |z: &str| self.slots.values().any(|s| s.holds(z));
        let gone = {
            let mut zones = self.zones.lock().expect("zones lock");
            let gone = zones.prune(ttl, Instant::now(), busy);
            metrics::zones_active(zones.len());
            gone
        };
        for zone in &gone {
            let pins = self.pins.lock().expect("pins lock").remove(zone);
            if let Some(pins) = pins {
                tracing::info!(zone = %zone, npcs = pins.len(), "zone idled out: personas unpinned");
                self.unpin_all(pins);
            }
        }
        gone.len()
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
            zones.entry(name).or_default().info = Some(info);
        }
        for (name, pins) in self.pins.lock().expect("pins lock").iter() {
            zones.entry(name.clone()).or_default().npcs_pinned =
                pins.iter().map(|p| p.npc.clone()).collect();
        }
        for tier in [Tier::Driver, Tier::Theia] {
            let Some(llm) = self.tiers().llm(tier) else {
                continue;
            };
            for s in llm.zone_service() {
                // Only zones the gateway knows (the engine also books requests that name no zone).
                if let Some(z) = zones.get_mut(&s.zone) {
                    z.engine_share.insert(
                        tier,
                        EngineShare {
                            tokens_served: s.tokens_served,
                            tokens_owed: s.tokens_owed,
                            share_ratio: s.share_ratio,
                        },
                    );
                }
            }
        }
        zones
    }

    /// Each tier at a glance (the ops console's tier panel): health, slots, and for LLM tiers what the engine
    /// holds and its prefix cache.
    pub fn tier_status(&self) -> BTreeMap<Tier, TierStatus> {
        Tier::ALL
            .into_iter()
            .map(|tier| {
                let (slots_in_use, slots, queued) = self.slots[&tier].usage();
                let llm = self.tiers().llm(tier);
                let status = TierStatus {
                    health: self.tiers().health(tier),
                    slots_in_use,
                    slots,
                    queued,
                    engine: llm.and_then(|l| l.load()),
                    prefix_cache: llm.and_then(|l| l.prefix_cache()),
                    workers: match llm {
                        Some(l) => l.workers(),
                        None => self.tiers().saturn.workers(),
                    },
                };
                (tier, status)
            })
            .collect()
    }

    /// Each LLM tier's prefix-cache figures (hit rate, cached tokens, evictions, pinned blocks).
    pub fn prefix_caches(&self) -> BTreeMap<Tier, nimmer_tiers::PrefixSnapshot> {
        [Tier::Driver, Tier::Theia]
            .into_iter()
            .filter_map(|t| Some((t, self.tiers().llm(t)?.prefix_cache()?)))
            .collect()
    }

    /// The adapter registry.
    pub fn loras(&self) -> &Arc<Registry> {
        &self.loras
    }

    /// Requests in flight that a caller may stop.
    pub fn requests(&self) -> &Arc<crate::requests::Requests> {
        &self.requests
    }

    /// The configuration directory, if the gateway runs on one (not the embedded config).
    pub fn config_dir(&self) -> Option<&Path> {
        self.config_dir.as_deref()
    }

    /// The adapters directory, if it exists.
    pub fn loras_dir(&self) -> Option<&Path> {
        self.loras_dir.as_deref()
    }

    /// Rescans the adapters directory; logs (and returns how many) failed to load.
    pub fn rescan_loras(&self) -> usize {
        let Some(dir) = &self.loras_dir else { return 0 };
        let errors = self.loras.scan(dir);
        for (name, e) in &errors {
            tracing::error!(adapter = %name, error = %e, "adapter rejected; the previous version (if any) stays");
        }
        metrics::loras(&self.loras.stats());
        errors.len()
    }
}

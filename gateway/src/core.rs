//! The gateway core, independent of HTTP: the three tiers, routing by kind, slots and degradation.
//!
//! Every running request holds a [`SlotPermit`] (an RAII value that lives as long as its response stream):
//! a tier's capacity is its `max_batch`. Deep and moment requests go to Theia; when Theia has no free slot they
//! run on the Driver with `degraded: true`. A saturated tier answers 429 at once.
//! (Weighted fair queuing across zones, budgets and hot reload come in the next step of the gateway issue.)

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nimmer_config::Config;
use nimmer_tiers::fetch::{Verify, ensure_llm, ensure_model};
use nimmer_tiers::{Event, GenerateRequest, LlmHandle, Prompt, SaturnHandle};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::api::{Dialog, Kind, Work};
use crate::error::ApiError;

/// A model tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Driver,
    Theia,
    Saturn,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Driver => "driver",
            Tier::Theia => "theia",
            Tier::Saturn => "saturn",
        }
    }
}

/// What `GET /v1/zones` shows about one zone.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ZoneView {
    pub slots_in_use: BTreeMap<Tier, usize>,
    pub requests: u64,
    pub idle_ms: u64,
}

#[derive(Default)]
struct ZoneState {
    in_use: BTreeMap<Tier, usize>,
    requests: u64,
    last_seen: Option<Instant>,
}

/// A slot of a tier, held by one request; returned on drop.
pub struct SlotPermit {
    pub tier: Tier,
    pub id: u64,
    pub zone: String,
    _permit: OwnedSemaphorePermit,
    zones: Arc<Mutex<BTreeMap<String, ZoneState>>>,
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        let mut zones = self.zones.lock().expect("zones lock");
        if let Some(n) = zones
            .get_mut(&self.zone)
            .and_then(|z| z.in_use.get_mut(&self.tier))
        {
            *n = n.saturating_sub(1);
        }
    }
}

/// A generation in flight.
pub struct Running {
    pub tier: Tier,
    pub degraded_reason: Option<String>,
    pub permit: SlotPermit,
    pub events: mpsc::UnboundedReceiver<Event>,
    /// The first event, already received (so the deadline could be checked).
    pub first: Event,
    pub started: Instant,
}

/// The three tiers and their slots.
pub struct Gateway {
    driver: LlmHandle,
    theia: LlmHandle,
    saturn: SaturnHandle,
    /// Free slots per tier.
    slots: BTreeMap<Tier, (Arc<Semaphore>, usize)>,
    next_slot: AtomicU64,
    /// Active zones, shared with permits (which decrement on drop).
    zones: Arc<Mutex<BTreeMap<String, ZoneState>>>,
    config: Config,
}

impl Gateway {
    /// Fetches what is missing and loads the three tiers (blocking; minutes on a first run).
    pub fn start(config: Config, config_dir: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let t = &config.tiers;
        let driver = LlmHandle::start(
            "driver",
            &t.tiers.driver,
            &ensure_llm(t, &t.tiers.driver.model, Verify::Cached)?,
        )?;
        let theia = LlmHandle::start(
            "theia",
            &t.tiers.theia,
            &ensure_llm(t, &t.tiers.theia.model, Verify::Cached)?,
        )?;
        let saturn_dir = ensure_model(t, &t.tiers.saturn.model, Verify::Cached)?;
        let saturn = SaturnHandle::start(
            &t.tiers.saturn,
            &saturn_dir,
            &config.classifiers,
            config_dir,
        )?;
        let slots = [
            (Tier::Driver, t.tiers.driver.max_batch),
            (Tier::Theia, t.tiers.theia.max_batch),
            (Tier::Saturn, t.tiers.saturn.queue),
        ]
        .into_iter()
        .map(|(tier, n)| (tier, (Arc::new(Semaphore::new(n)), n)))
        .collect();
        Ok(Self {
            driver,
            theia,
            saturn,
            slots,
            next_slot: AtomicU64::new(1),
            zones: Arc::default(),
            config,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
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

    /// Takes a free slot of `tier` for `zone`, or `None` when the tier is saturated.
    pub fn try_slot(&self, tier: Tier, zone: &str) -> Option<SlotPermit> {
        let (sem, _) = &self.slots[&tier];
        let permit = sem.clone().try_acquire_owned().ok()?;
        let mut zones = self.zones.lock().expect("zones lock");
        let z = zones.entry(zone.to_string()).or_default();
        *z.in_use.entry(tier).or_default() += 1;
        z.requests += 1;
        z.last_seen = Some(Instant::now());
        Some(SlotPermit {
            tier,
            id: self.next_slot.fetch_add(1, Ordering::Relaxed),
            zone: zone.to_string(),
            _permit: permit,
            zones: self.zones.clone(),
        })
    }

    fn saturated(&self, tier: Tier) -> ApiError {
        ApiError::Saturated {
            tier: tier.name().into(),
            capacity: self.slots[&tier].1,
            retry_after_s: 1,
        }
    }

    /// Picks the tier for a kind and takes a slot, degrading deep work to the Driver when Theia is full.
    pub fn route(&self, kind: Kind, zone: &str) -> Result<(SlotPermit, Option<String>), ApiError> {
        match kind {
            Kind::Classify => self
                .try_slot(Tier::Saturn, zone)
                .map(|p| (p, None))
                .ok_or_else(|| self.saturated(Tier::Saturn)),
            Kind::Dialog => self
                .try_slot(Tier::Driver, zone)
                .map(|p| (p, None))
                .ok_or_else(|| self.saturated(Tier::Driver)),
            Kind::Deep | Kind::Moment => {
                if let Some(p) = self.try_slot(Tier::Theia, zone) {
                    return Ok((p, None));
                }
                self.try_slot(Tier::Driver, zone)
                    .map(|p| (p, Some("theia saturated: served by driver".to_string())))
                    .ok_or_else(|| self.saturated(Tier::Theia))
            }
        }
    }

    /// Starts a generation and waits for its first event (at most until the deadline).
    pub async fn generate(
        &self,
        permit: SlotPermit,
        degraded_reason: Option<String>,
        req: GenerateRequest,
        deadline_ms: Option<u64>,
    ) -> Result<Running, ApiError> {
        let started = Instant::now();
        let tier = permit.tier;
        let handle = self
            .llm(tier)
            .ok_or_else(|| ApiError::Internal("generate on saturn".into()))?;
        let mut events = handle.generate(req)?;
        let first = match deadline_ms {
            Some(ms) => tokio::time::timeout(Duration::from_millis(ms), events.recv())
                .await
                .map_err(|_| ApiError::Deadline { deadline_ms: ms })?,
            None => events.recv().await,
        };
        let first = first.ok_or_else(|| ApiError::Unavailable {
            tier: tier.name().into(),
        })?;
        if let Event::Error(e) = &first {
            return Err(ApiError::Internal(e.clone()));
        }
        Ok(Running {
            tier,
            degraded_reason,
            permit,
            events,
            first,
            started,
        })
    }

    /// Validated dialog → running generation (classify kinds are answered by [`Self::classify_one`]).
    pub async fn dialog(&self, d: &Dialog) -> Result<Running, ApiError> {
        let Work::Generate {
            messages,
            prompt,
            params,
        } = &d.work
        else {
            return Err(ApiError::Internal("classify routed to generate".into()));
        };
        let (permit, degraded) = self.route(d.kind, &d.zone)?;
        let prompt = match (messages, prompt) {
            (Some(m), _) => Prompt::Chat(m.clone()),
            (None, Some(p)) => Prompt::Text(p.clone()),
            (None, None) => {
                return Err(ApiError::invalid("messages", "give `messages` or `prompt`"));
            }
        };
        self.generate(
            permit,
            degraded,
            GenerateRequest {
                prompt,
                params: params.clone(),
            },
            d.deadline_ms,
        )
        .await
    }

    /// Zones with their slot use.
    pub fn zones(&self) -> BTreeMap<String, ZoneView> {
        let zones = self.zones.lock().expect("zones lock");
        zones
            .iter()
            .map(|(k, z)| {
                let idle_ms = z.last_seen.map_or(0, |t| t.elapsed().as_millis() as u64);
                (
                    k.clone(),
                    ZoneView {
                        slots_in_use: z.in_use.clone(),
                        requests: z.requests,
                        idle_ms,
                    },
                )
            })
            .collect()
    }
}

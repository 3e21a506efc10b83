//! The gateway core, independent of HTTP: the three tiers, routing by kind, slots and degradation.
//!
//! Every running request holds a [`SlotPermit`] (an RAII value that lives as long as its response stream):
//! a tier's capacity is its `max_batch`. Requests without a free slot wait in the tier's fair queue
//! ([`crate::fair`]): per zone, by priority, and a freed slot goes to the zone holding the fewest. A full queue
//! answers 429; a request that cannot start before its deadline answers 504 without spending compute.
//! Deep and moment requests go to Theia; when Theia has no free slot they run on the Driver, `degraded: true`.
//! (Zone classes and weights, budgets and hot reload come in the next step of the gateway issue.)

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nimmer_config::Config;
use nimmer_tiers::fetch::{Verify, ensure_llm, ensure_model};
use nimmer_tiers::{Event, GenerateRequest, LlmHandle, Prompt, SaturnHandle};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::api::{Dialog, Kind, Work};
use crate::error::ApiError;
use crate::fair::FairQueue;

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

/// What `GET /v1/zones` shows about one zone, per tier.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ZoneView {
    pub slots_in_use: BTreeMap<Tier, usize>,
    pub queued: BTreeMap<Tier, usize>,
}

/// How long a request may wait for a slot when it sets no deadline.
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

/// One tier's slots: a fair queue of waiters, each waiting for its permit on a oneshot channel.
pub struct TierSlots {
    tier: Tier,
    queue: Mutex<FairQueue<oneshot::Sender<SlotPermit>>>,
    next_id: AtomicU64,
}

/// Why no slot could be had.
enum NoSlot {
    Full,
    Timeout,
}

impl TierSlots {
    fn new(tier: Tier, capacity: usize, queue: usize) -> Arc<Self> {
        Arc::new(Self {
            tier,
            queue: Mutex::new(FairQueue::new(capacity, queue)),
            next_id: AtomicU64::new(1),
        })
    }

    fn permit(self: &Arc<Self>, zone: &str) -> SlotPermit {
        SlotPermit {
            tier: self.tier,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            zone: zone.to_string(),
            slots: Some(self.clone()),
        }
    }

    /// A slot now, if one is free and nobody is waiting.
    fn try_take(self: &Arc<Self>, zone: &str) -> Option<SlotPermit> {
        self.queue
            .lock()
            .expect("slots lock")
            .try_take(zone, 1.0)
            .then(|| self.permit(zone))
    }

    /// A slot now or after waiting in the fair queue for at most `wait`.
    async fn acquire(
        self: &Arc<Self>,
        zone: &str,
        priority: i32,
        wait: Duration,
    ) -> Result<SlotPermit, NoSlot> {
        let rx = {
            let mut q = self.queue.lock().expect("slots lock");
            if q.try_take(zone, 1.0) {
                return Ok(self.permit(zone));
            }
            let (tx, rx) = oneshot::channel();
            q.push(zone, 1.0, priority, tx).map_err(|_| NoSlot::Full)?;
            rx
        };
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(p)) => Ok(p),
            _ => {
                // Our sender (if still queued) is closed now; drop it so it takes no slot.
                self.queue
                    .lock()
                    .expect("slots lock")
                    .retain(|tx| !tx.is_closed());
                Err(NoSlot::Timeout)
            }
        }
    }

    /// Hands free slots to waiters until none is free or nobody waits.
    fn dispatch(self: &Arc<Self>) {
        loop {
            let Some((zone, tx)) = self.queue.lock().expect("slots lock").pop_next() else {
                return;
            };
            if let Err(mut p) = tx.send(self.permit(&zone)) {
                // The waiter left: give the slot back without re-entering dispatch from Drop.
                p.slots = None;
                self.queue.lock().expect("slots lock").release(&zone);
            }
        }
    }

    fn view(&self, zones: &mut BTreeMap<String, ZoneView>) {
        let q = self.queue.lock().expect("slots lock");
        for (name, (in_use, queued)) in q.zones() {
            let z = zones.entry(name).or_default();
            z.slots_in_use.insert(self.tier, in_use);
            z.queued.insert(self.tier, queued);
        }
    }
}

/// A slot of a tier, held by one request; returned (and handed to the next waiter) on drop.
pub struct SlotPermit {
    pub tier: Tier,
    pub id: u64,
    pub zone: String,
    slots: Option<Arc<TierSlots>>,
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.take() {
            slots.queue.lock().expect("slots lock").release(&self.zone);
            slots.dispatch();
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
    /// Slots and fair queue per tier.
    slots: BTreeMap<Tier, Arc<TierSlots>>,
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
            (Tier::Driver, t.tiers.driver.max_batch, t.tiers.driver.queue),
            (Tier::Theia, t.tiers.theia.max_batch, t.tiers.theia.queue),
            (Tier::Saturn, t.tiers.saturn.max_batch, t.tiers.saturn.queue),
        ]
        .into_iter()
        .map(|(tier, n, q)| (tier, TierSlots::new(tier, n, q)))
        .collect();
        Ok(Self {
            driver,
            theia,
            saturn,
            slots,
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

    /// A slot of `tier` for `zone`, waiting in the fair queue up to the deadline (504) or the queue timeout
    /// (429); a full queue answers 429 at once.
    pub async fn slot(
        &self,
        tier: Tier,
        zone: &str,
        priority: i32,
        deadline_ms: Option<u64>,
    ) -> Result<SlotPermit, ApiError> {
        let wait = deadline_ms.map_or(QUEUE_TIMEOUT, |ms| {
            Duration::from_millis(ms).min(QUEUE_TIMEOUT)
        });
        let slots = &self.slots[&tier];
        slots
            .acquire(zone, priority, wait)
            .await
            .map_err(|e| match (e, deadline_ms) {
                (NoSlot::Timeout, Some(ms)) if Duration::from_millis(ms) <= QUEUE_TIMEOUT => {
                    ApiError::Deadline { deadline_ms: ms }
                }
                _ => ApiError::Saturated {
                    tier: tier.name().into(),
                    capacity: slots.queue.lock().expect("slots lock").capacity(),
                    retry_after_s: 1,
                },
            })
    }

    /// Picks the tier for a kind and gets a slot; deep work runs on the Driver when Theia has no free slot.
    pub async fn route(
        &self,
        kind: Kind,
        zone: &str,
        priority: i32,
        deadline_ms: Option<u64>,
    ) -> Result<(SlotPermit, Option<String>), ApiError> {
        match kind {
            Kind::Classify => Ok((
                self.slot(Tier::Saturn, zone, priority, deadline_ms).await?,
                None,
            )),
            Kind::Dialog => Ok((
                self.slot(Tier::Driver, zone, priority, deadline_ms).await?,
                None,
            )),
            Kind::Deep | Kind::Moment => match self.slots[&Tier::Theia].try_take(zone) {
                Some(p) => Ok((p, None)),
                None => Ok((
                    self.slot(Tier::Driver, zone, priority, deadline_ms).await?,
                    Some("theia saturated: served by driver".to_string()),
                )),
            },
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
        let started = Instant::now();
        let (permit, degraded) = self
            .route(d.kind, &d.zone, d.priority, d.deadline_ms)
            .await?;
        let deadline_ms = d.deadline_ms.map(|ms| {
            ms.saturating_sub(started.elapsed().as_millis() as u64)
                .max(1)
        });
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
            deadline_ms,
        )
        .await
    }

    /// Zones with their slots in use and queue lengths, per tier.
    pub fn zones(&self) -> BTreeMap<String, ZoneView> {
        let mut zones = BTreeMap::new();
        for slots in self.slots.values() {
            slots.view(&mut zones);
        }
        zones
    }
}

//! A tier's slots: its `slots` budget of concurrent sequences, a fair queue of waiters ([`crate::fair`]) and
//! the [`SlotPermit`] each running request holds (RAII: dropping it frees the slot and hands it to the next
//! waiter).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::Tier;
use crate::fair::FairQueue;
use crate::metrics;
use crate::zones::ZoneView;

/// One tier's slots: a fair queue of waiters, each waiting for its permit on a oneshot channel.
pub struct TierSlots {
    tier: Tier,
    queue: Mutex<FairQueue<oneshot::Sender<SlotPermit>>>,
    next_id: AtomicU64,
}

/// Why no slot could be had.
pub enum NoSlot {
    Full,
    Timeout,
}

impl TierSlots {
    pub(crate) fn new(tier: Tier, capacity: usize, queue: usize, reserve: usize) -> Arc<Self> {
        let mut q = FairQueue::new(capacity, queue);
        q.set_reserve(reserve);
        Arc::new(Self {
            tier,
            queue: Mutex::new(q),
            next_id: AtomicU64::new(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FairQueue<oneshot::Sender<SlotPermit>>> {
        self.queue.lock().expect("slots lock")
    }

    fn permit(self: &Arc<Self>, zone: &str, class: &str) -> SlotPermit {
        SlotPermit {
            tier: self.tier,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            zone: zone.to_string(),
            class: class.to_string(),
            granted: Instant::now(),
            slots: Some(self.clone()),
        }
    }

    fn gauges(&self, q: &FairQueue<oneshot::Sender<SlotPermit>>) {
        metrics::slots(self.tier, q.in_use(), q.capacity(), q.waiting());
    }

    /// A slot now, if one is free and nobody is waiting.
    pub(crate) fn try_take(
        self: &Arc<Self>,
        zone: &str,
        class: &str,
        weight: f64,
    ) -> Option<SlotPermit> {
        let mut q = self.lock();
        let ok = q.try_take(zone, weight);
        self.gauges(&q);
        ok.then(|| self.permit(zone, class))
    }

    /// A slot now or after waiting in the fair queue for at most `wait`.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        zone: &str,
        class: &str,
        weight: f64,
        priority: i32,
        wait: Duration,
    ) -> Result<SlotPermit, NoSlot> {
        let rx = {
            let mut q = self.lock();
            if q.try_take(zone, weight) {
                self.gauges(&q);
                return Ok(self.permit(zone, class));
            }
            let (tx, rx) = oneshot::channel();
            q.push(zone, weight, priority, tx)
                .map_err(|_| NoSlot::Full)?;
            self.gauges(&q);
            rx
        };
        // Leaving the queue without a slot (timed out, or the caller went away and this future was dropped)
        // takes our entry out at once, so a gone caller holds no place in the queue.
        let mut waiting = Waiting {
            slots: self.clone(),
            rx: Some(rx),
        };
        // A slot held in the reserve may be ours (a zone under its share waits only behind others' turns).
        self.dispatch();
        let rx = waiting.rx.as_mut().expect("waiting");
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(mut p)) => {
                waiting.rx = None;
                p.class = class.to_string();
                Ok(p)
            }
            _ => Err(NoSlot::Timeout),
        }
    }

    /// Hands free slots to waiters until none is free or nobody waits.
    pub(crate) fn dispatch(self: &Arc<Self>) {
        loop {
            let next = {
                let mut q = self.lock();
                let n = q.pop_next();
                self.gauges(&q);
                n
            };
            let Some((zone, tx)) = next else { return };
            if let Err(mut p) = tx.send(self.permit(&zone, "")) {
                // The waiter left: give the slot back without re-entering dispatch from Drop.
                p.slots = None;
                self.lock().release(&zone);
            }
        }
    }

    pub(crate) fn set_limits(self: &Arc<Self>, capacity: usize, queue: usize, reserve: usize) {
        {
            let mut q = self.lock();
            q.set_limits(capacity, queue);
            q.set_reserve(reserve);
        }
        self.dispatch();
    }

    /// (slots in use, slots, requests waiting).
    pub(crate) fn usage(&self) -> (usize, usize, usize) {
        let q = self.lock();
        (q.in_use(), q.capacity(), q.waiting())
    }

    /// Slots this tier has.
    pub(crate) fn capacity(&self) -> usize {
        self.lock().capacity()
    }

    /// Whether `zone` holds or waits for a slot of this tier.
    pub(crate) fn holds(&self, zone: &str) -> bool {
        self.lock().zone(zone) != (0, 0)
    }

    pub(crate) fn view(&self, zones: &mut BTreeMap<String, ZoneView>) {
        let q = self.lock();
        for (name, (in_use, queued)) in q.zones() {
            let z = zones.entry(name).or_default();
            z.slots_in_use.insert(self.tier, in_use);
            z.queued.insert(self.tier, queued);
        }
    }
}

/// A caller's place in a tier's queue: dropped before a slot came, it closes the channel and removes the
/// closed entry (a slot sent at that instant finds the channel closed and goes back, see `dispatch`).
struct Waiting {
    slots: Arc<TierSlots>,
    rx: Option<oneshot::Receiver<SlotPermit>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(rx) = self.rx.take() {
            drop(rx);
            let mut q = self.slots.lock();
            q.retain(|tx| !tx.is_closed());
            self.slots.gauges(&q);
        }
    }
}

/// A slot of a tier, held by one request; returned (and handed to the next waiter) on drop.
pub struct SlotPermit {
    pub tier: Tier,
    pub id: u64,
    pub zone: String,
    /// The zone's class when the slot was granted.
    pub class: String,
    pub granted: Instant,
    slots: Option<Arc<TierSlots>>,
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.take() {
            slots.lock().release(&self.zone);
            slots.dispatch();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiter_whose_caller_went_away_leaves_the_queue_at_once() {
        let slots = TierSlots::new(Tier::Driver, 1, 1, 0);
        let held = slots.try_take("z", "street", 1.0).expect("a free slot");
        let waiter = tokio::spawn({
            let slots = slots.clone();
            async move {
                let r = slots.acquire("z", "street", 1.0, 0, Duration::from_secs(60));
                r.await.is_ok()
            }
        });
        while slots.lock().waiting() == 0 {
            tokio::task::yield_now().await;
        }
        // The queue (one place) is full; the caller goes away: its place is free again at once.
        assert!(matches!(
            slots.acquire("y", "street", 1.0, 0, Duration::ZERO).await,
            Err(NoSlot::Full)
        ));
        waiter.abort();
        assert!(waiter.await.unwrap_err().is_cancelled());
        assert_eq!(slots.lock().waiting(), 0);
        // The slot freed later goes to the next caller, not the gone one.
        let next = tokio::spawn({
            let slots = slots.clone();
            async move {
                let r = slots.acquire("y", "street", 1.0, 0, Duration::from_secs(60));
                r.await.map(|p| p.zone.clone()).ok()
            }
        });
        while slots.lock().waiting() == 0 {
            tokio::task::yield_now().await;
        }
        drop(held);
        assert_eq!(next.await.unwrap().as_deref(), Some("y"));
    }
}

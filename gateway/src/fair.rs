//! Fair slot allocation across zones, as a pure structure (no clocks, no channels) so the policy is unit-tested.
//!
//! A tier has `capacity` slots. Requests wait per zone; within a zone the highest `priority` goes first, then
//! arrival order. When a slot frees, it goes to the waiting zone with the fewest slots in use per unit of
//! weight (ties: the zone whose head request arrived first). So a zone that holds nothing is served at the next
//! free slot however busy another zone is (no starvation), a zone's guaranteed share is `capacity · w / Σw` over
//! the zones competing, and a lone zone borrows every idle slot. The last `reserve` free slots are lent only
//! to zones under their weighted share, so a zone that floods the tier leaves room for a quiet zone's request
//! to enter at once (the engine's fair step then gives it a row).

use std::collections::{BTreeMap, BinaryHeap};

/// A waiting request: ordered by priority, then arrival.
struct Waiter<T> {
    priority: i32,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Waiter<T> {
    fn eq(&self, o: &Self) -> bool {
        self.priority == o.priority && self.seq == o.seq
    }
}
impl<T> Eq for Waiter<T> {}
impl<T> PartialOrd for Waiter<T> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<T> Ord for Waiter<T> {
    /// Max-heap: higher priority first, then lower sequence (earlier).
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.priority.cmp(&o.priority).then(o.seq.cmp(&self.seq))
    }
}

struct Zone<T> {
    weight: f64,
    in_use: usize,
    waiting: BinaryHeap<Waiter<T>>,
}

/// The queue is full: the caller answers 429.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

/// Per-tier fair queue of `T` (the waiter's reply handle).
pub struct FairQueue<T> {
    capacity: usize,
    /// Free slots kept for zones under their share.
    reserve: usize,
    in_use: usize,
    max_waiting: usize,
    waiting: usize,
    seq: u64,
    zones: BTreeMap<String, Zone<T>>,
}

impl<T> FairQueue<T> {
    pub fn new(capacity: usize, max_waiting: usize) -> Self {
        Self {
            capacity,
            reserve: 0,
            in_use: 0,
            max_waiting,
            waiting: 0,
            seq: 0,
            zones: BTreeMap::new(),
        }
    }

    /// New capacity and queue length (a hot reload). Slots held beyond a lower capacity are not taken back:
    /// no new slot is handed out until the count is under it. Requests already queued stay queued.
    pub fn set_limits(&mut self, capacity: usize, max_waiting: usize) {
        self.capacity = capacity;
        self.max_waiting = max_waiting;
    }

    /// How many of the free slots only zones under their weighted share may take.
    pub fn set_reserve(&mut self, reserve: usize) {
        self.reserve = reserve;
    }

    /// Whether `zone` may take a free slot now: any zone while more than `reserve` are free, else only a
    /// zone holding less than its weighted share of the capacity among the zones holding or waiting and one
    /// more of weight 1 (the next zone to come, whom the reserve is for: two flooding zones, each under half
    /// the capacity, would otherwise share the reserve out between them), and less than
    /// `capacity - reserve`.
    fn may_take(&self, zone: &str, weight: f64) -> bool {
        let free = self.capacity.saturating_sub(self.in_use);
        if free == 0 {
            return false;
        }
        if free > self.reserve {
            return true;
        }
        let held = self.zones.get(zone).map_or(0, |z| z.in_use);
        let others: f64 = self
            .zones
            .iter()
            .filter(|(n, _)| n.as_str() != zone)
            .map(|(_, z)| z.weight)
            .sum();
        let share = self.capacity as f64 * weight / (weight + others + 1.0);
        (held as f64) < share.min(self.capacity.saturating_sub(self.reserve) as f64)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub fn in_use(&self) -> usize {
        self.in_use
    }
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Every zone with its slots in use and queue length.
    pub fn zones(&self) -> impl Iterator<Item = (String, (usize, usize))> + '_ {
        self.zones
            .iter()
            .map(|(n, z)| (n.clone(), (z.in_use, z.waiting.len())))
    }

    /// Slots and queue length of a zone.
    pub fn zone(&self, zone: &str) -> (usize, usize) {
        self.zones
            .get(zone)
            .map_or((0, 0), |z| (z.in_use, z.waiting.len()))
    }

    /// Takes a slot at once if one is free and nobody waits; otherwise `None`.
    pub fn try_take(&mut self, zone: &str, weight: f64) -> bool {
        if self.waiting == 0 && self.may_take(zone, weight) {
            self.take(zone, weight);
            true
        } else {
            false
        }
    }

    fn take(&mut self, zone: &str, weight: f64) {
        let z = self.zones.entry(zone.to_string()).or_insert_with(|| Zone {
            weight,
            in_use: 0,
            waiting: BinaryHeap::new(),
        });
        z.weight = weight;
        z.in_use += 1;
        self.in_use += 1;
    }

    /// Queues a request.
    pub fn push(&mut self, zone: &str, weight: f64, priority: i32, item: T) -> Result<(), Full> {
        if self.waiting >= self.max_waiting {
            return Err(Full);
        }
        self.seq += 1;
        let z = self.zones.entry(zone.to_string()).or_insert_with(|| Zone {
            weight,
            in_use: 0,
            waiting: BinaryHeap::new(),
        });
        z.weight = weight;
        z.waiting.push(Waiter {
            priority,
            seq: self.seq,
            item,
        });
        self.waiting += 1;
        Ok(())
    }

    /// Hands a free slot to the next waiter by the fairness rule (unless the slot is in the reserve and that
    /// zone is at its share); the slot is counted as taken by its zone.
    pub fn pop_next(&mut self) -> Option<(String, T)> {
        if self.in_use >= self.capacity {
            return None;
        }
        let zone = self
            .zones
            .iter()
            .filter_map(|(name, z)| {
                z.waiting
                    .peek()
                    .map(|w| (z.in_use as f64 / z.weight, w.seq, name))
            })
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
            .map(|(_, _, name)| name.clone())?;
        let weight = self.zones[&zone].weight;
        if !self.may_take(&zone, weight) {
            return None;
        }
        let z = self.zones.get_mut(&zone).expect("chosen zone exists");
        let w = z.waiting.pop().expect("chosen zone has a waiter");
        z.in_use += 1;
        self.in_use += 1;
        self.waiting -= 1;
        Some((zone, w.item))
    }

    /// Returns a slot of `zone`; forgets zones that hold and wait for nothing.
    pub fn release(&mut self, zone: &str) {
        if let Some(z) = self.zones.get_mut(zone) {
            z.in_use = z.in_use.saturating_sub(1);
            self.in_use = self.in_use.saturating_sub(1);
            if z.in_use == 0 && z.waiting.is_empty() {
                self.zones.remove(zone);
            }
        }
    }

    /// Drops waiters for which `gone` is true (their client left or timed out).
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        let mut removed = 0;
        for z in self.zones.values_mut() {
            let before = z.waiting.len();
            let kept: BinaryHeap<Waiter<T>> = std::mem::take(&mut z.waiting)
                .into_iter()
                .filter(|w| keep(&w.item))
                .collect();
            removed += before - kept.len();
            z.waiting = kept;
        }
        self.waiting -= removed;
        self.zones
            .retain(|_, z| z.in_use > 0 || !z.waiting.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_contention_slots_follow_the_weights() {
        let mut q = FairQueue::new(6, 100);
        for i in 0..10 {
            q.push("heavy", 2.0, 0, i).unwrap();
            q.push("light", 1.0, 0, i).unwrap();
        }
        let mut got = std::collections::BTreeMap::new();
        while let Some((zone, _)) = q.pop_next() {
            *got.entry(zone).or_insert(0) += 1;
        }
        assert_eq!(got["heavy"], 4);
        assert_eq!(got["light"], 2);
    }

    #[test]
    fn a_raised_capacity_hands_out_more_slots() {
        let mut q = FairQueue::new(1, 100);
        assert!(q.try_take("a", 1.0));
        q.push("a", 1.0, 0, 1).unwrap();
        assert!(q.pop_next().is_none());
        q.set_limits(2, 100);
        assert_eq!(q.pop_next(), Some(("a".to_string(), 1)));
    }

    #[test]
    fn a_free_slot_is_taken_at_once() {
        let mut q = FairQueue::<u32>::new(2, 10);
        assert!(q.try_take("a", 1.0));
        assert!(q.try_take("a", 1.0));
        assert!(!q.try_take("b", 1.0));
    }

    #[test]
    fn a_quiet_zone_is_served_before_a_flooding_one() {
        let mut q = FairQueue::new(2, 100);
        q.try_take("flood", 1.0);
        q.try_take("flood", 1.0);
        for i in 0..50 {
            q.push("flood", 1.0, 0, i).unwrap();
        }
        q.push("quiet", 1.0, 0, 999).unwrap();
        q.release("flood");
        assert_eq!(q.pop_next(), Some(("quiet".to_string(), 999)));
    }

    #[test]
    fn a_lone_zone_borrows_every_idle_slot() {
        let mut q = FairQueue::new(4, 100);
        for i in 0..4 {
            q.push("a", 1.0, 0, i).unwrap();
        }
        let served: Vec<_> = std::iter::from_fn(|| q.pop_next()).collect();
        assert_eq!(served.len(), 4);
        assert_eq!(q.in_use(), 4);
    }

    #[test]
    fn slots_alternate_between_equally_weighted_zones() {
        let mut q = FairQueue::new(4, 100);
        for i in 0..4 {
            q.push("a", 1.0, 0, i).unwrap();
            q.push("b", 1.0, 0, i).unwrap();
        }
        std::iter::from_fn(|| q.pop_next()).count();
        assert_eq!((q.zone("a").0, q.zone("b").0), (2, 2));
    }

    #[test]
    fn a_heavier_zone_gets_a_larger_share() {
        let mut q = FairQueue::new(6, 100);
        for i in 0..6 {
            q.push("market", 2.0, 0, i).unwrap();
            q.push("alley", 1.0, 0, i).unwrap();
        }
        std::iter::from_fn(|| q.pop_next()).count();
        assert_eq!((q.zone("market").0, q.zone("alley").0), (4, 2));
    }

    #[test]
    fn higher_priority_goes_first_within_a_zone() {
        let mut q = FairQueue::new(1, 100);
        q.try_take("a", 1.0);
        q.push("a", 1.0, 0, "low").unwrap();
        q.push("a", 1.0, 5, "high").unwrap();
        q.push("a", 1.0, 0, "low2").unwrap();
        q.release("a");
        assert_eq!(q.pop_next().unwrap().1, "high");
        q.release("a");
        assert_eq!(q.pop_next().unwrap().1, "low");
    }

    #[test]
    fn a_full_queue_refuses() {
        let mut q = FairQueue::new(1, 1);
        q.try_take("a", 1.0);
        q.push("a", 1.0, 0, 1).unwrap();
        assert_eq!(q.push("b", 1.0, 0, 2), Err(Full));
    }

    #[test]
    fn nobody_jumps_the_queue_while_others_wait() {
        let mut q = FairQueue::new(1, 10);
        q.try_take("a", 1.0);
        q.push("b", 1.0, 0, 1).unwrap();
        q.release("a");
        assert!(
            !q.try_take("c", 1.0),
            "a waiter exists: the free slot is theirs"
        );
        assert_eq!(q.pop_next().unwrap().0, "b");
    }

    #[test]
    fn a_flooding_zone_leaves_the_reserve_to_zones_under_their_share() {
        let mut q = FairQueue::new(8, 100);
        q.set_reserve(2);
        for i in 0..10 {
            if !q.try_take("flood", 1.0) {
                q.push("flood", 1.0, 0, i).unwrap();
            }
        }
        while q.pop_next().is_some() {}
        assert_eq!(
            q.zone("flood"),
            (6, 4),
            "a lone zone borrows all but the reserve"
        );
        assert!(!q.try_take("quiet", 1.0), "flood waiters are queued first");
        q.push("quiet", 1.0, 0, 99).unwrap();
        assert_eq!(q.pop_next(), Some(("quiet".to_string(), 99)), "at once");
        assert_eq!(
            q.pop_next(),
            None,
            "the flood is over its share: the last slot stays free"
        );
        q.push("quiet2", 1.0, 0, 98).unwrap();
        assert_eq!(q.pop_next(), Some(("quiet2".to_string(), 98)));
    }

    #[test]
    fn two_flooding_zones_leave_the_reserve_to_the_next_zone() {
        let mut q = FairQueue::new(8, 100);
        q.set_reserve(2);
        for i in 0..20 {
            let zone = ["a", "b"][i % 2];
            if !q.try_take(zone, 1.0) {
                q.push(zone, 1.0, 0, i).unwrap();
            }
        }
        while q.pop_next().is_some() {}
        assert_eq!(
            (q.zone("a").0, q.zone("b").0),
            (3, 3),
            "the reserve stays free"
        );
        q.push("quiet", 1.0, 0, 99).unwrap();
        assert_eq!(q.pop_next(), Some(("quiet".to_string(), 99)), "at once");
    }

    #[test]
    fn gone_waiters_are_dropped() {
        let mut q = FairQueue::new(1, 10);
        q.try_take("a", 1.0);
        q.push("b", 1.0, 0, 1).unwrap();
        q.push("c", 1.0, 0, 2).unwrap();
        q.retain(|&i| i != 1);
        assert_eq!(q.waiting(), 1);
        q.release("a");
        assert_eq!(q.pop_next().unwrap().0, "c");
    }
}

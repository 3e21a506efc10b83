//! The engine's queue state, free of models and threads so it is unit-tested on its own: requests accepted
//! from the channel wait in order; between two steps cancelled requests (their receiver dropped) leave, waiting
//! requests whose deadline passed leave with [`Event::Expired`] (they never reach the model), and waiting
//! requests become resident within the `resident` count and the KV budget, the zone with the fewest resident
//! sequences per unit of weight first. An admitted sequence holds a [`KvLease`] for its worst case (prompt +
//! `max_tokens`): dropping the sequence, however it ends, returns its bytes (as TGI's blocks do), so the books
//! cannot drift. Each step's rows are planned over the resident sequences: by weighted fair share
//! ([`FairClock`]) or oldest first.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use nimmer_loras::Blend;
use tokio::sync::mpsc;

use super::fair::{Candidate, FairClock, owed};
use super::prefix::BlockHash;
use super::sched::{SeqState, plan_step};
use super::service::ZoneStep;
use super::{Event, Schedule, Share};
use crate::grammar::Constraint;
use crate::sampling::{Sampler, SamplingParams, TextStream};

/// A request as it arrives from a handle: validated and tokenized.
pub(crate) struct NewSeq {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub lora: Option<Arc<Blend>>,
    pub events: mpsc::UnboundedSender<Event>,
    pub enqueued: Instant,
    /// Not admitted by then: dropped with [`Event::Expired`].
    pub deadline: Option<Instant>,
    /// The root of its prefix-cache hash chain (model and blend).
    pub root: BlockHash,
    /// A pin ([`super::LlmHandle::pin`]): nobody reads its events; its prompt's blocks are pinned when it ends.
    pub pin: Option<u64>,
    pub share: Share,
    /// Its `response_format`'s grammar, which masks every step's logits.
    pub constraint: Option<Constraint>,
}

/// KV bytes reserved by one admitted sequence; returned to the budget on drop.
pub(crate) struct KvLease {
    bytes: usize,
    used: Rc<Cell<usize>>,
}

impl Drop for KvLease {
    fn drop(&mut self) {
        self.used.set(self.used.get() - self.bytes);
    }
}

/// A sequence owned by the engine: waiting (no cache, no lease) or running.
pub(crate) struct Seq<C> {
    pub new: NewSeq,
    /// Order of arrival in the engine.
    arrival: u64,
    /// KV bytes its worst case needs.
    kv_need: usize,
    /// Prompt tokens already in the KV cache.
    pub prefilled: usize,
    /// Positions in the KV cache (prompt, then every generated token fed back).
    pub kv_len: usize,
    /// Prompt tokens taken from the prefix cache at admission.
    pub cached: usize,
    /// Hashes of its first full blocks (prompt, then generated tokens), and how many of them are known to
    /// the prefix cache.
    pub chain: Vec<BlockHash>,
    pub shared: usize,
    pub generated: Vec<u32>,
    /// Last sampled token, fed on the next decode step.
    pub last: u32,
    pub kv: Option<C>,
    _lease: Option<KvLease>,
    pub sampler: Sampler,
    pub text: TextStream,
    pub admitted: Option<Instant>,
    pub first_token: Option<Instant>,
}

impl<C> Seq<C> {
    pub fn prefilling(&self) -> bool {
        self.prefilled < self.new.prompt.len()
    }
}

/// What [`Queue::drop_gone`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gone {
    pub cancelled: usize,
    pub expired: usize,
}

/// How the next step may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StepLimits {
    /// Most sequences it runs.
    pub rows: usize,
    /// Most tokens it runs (raised to `rows` so every row can decode).
    pub tokens: usize,
    /// Tokens that fit the step's target time (`pace.rs`): while zones compete, the fair schedule runs at
    /// most this many rows and tokens besides the prompts of zones with nothing decoding yet.
    pub target: Option<usize>,
    pub schedule: Schedule,
}

/// Waiting and resident ("running": in the batch or paused for a step) sequences and the KV bytes the
/// resident ones hold.
pub(crate) struct Queue<C> {
    waiting: VecDeque<Seq<C>>,
    running: Vec<Seq<C>>,
    kv_used: Rc<Cell<usize>>,
    kv_bytes_per_token: usize,
    arrivals: u64,
    clock: FairClock<Arc<str>>,
}

impl<C> Queue<C> {
    pub fn new(kv_bytes_per_token: usize) -> Self {
        Self {
            waiting: VecDeque::new(),
            running: Vec::new(),
            kv_used: Rc::new(Cell::new(0)),
            kv_bytes_per_token,
            arrivals: 0,
            clock: FairClock::new(),
        }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// KV bytes the running sequences hold.
    pub fn kv_used(&self) -> usize {
        self.kv_used.get()
    }

    /// The KV bytes missing for the next waiting sequence when there is room for one more resident but
    /// `kv_budget` has not (the engine may evict prefix-cache blocks to find them).
    pub fn shortfall(&self, max_resident: usize, kv_budget: usize) -> Option<usize> {
        if self.running.len() >= max_resident {
            return None;
        }
        let head = &self.waiting[self.next_waiting()?];
        let free = kv_budget.saturating_sub(self.kv_used.get());
        (head.kv_need > free).then(|| head.kv_need - free)
    }

    /// The waiting sequence to admit next: of the zone with the fewest resident sequences per unit of weight
    /// (ties: the earliest arrival), its highest priority, then earliest arrival.
    fn next_waiting(&self) -> Option<usize> {
        let mut resident: HashMap<&str, usize> = HashMap::new();
        for s in &self.running {
            *resident.entry(&s.new.share.zone).or_default() += 1;
        }
        let key = |s: &Seq<C>| {
            let n = resident.get(&*s.new.share.zone).copied().unwrap_or(0);
            (
                (n + 1) as f64 / s.new.share.weight,
                std::cmp::Reverse(s.new.share.priority),
                s.arrival,
            )
        };
        (0..self.waiting.len()).min_by(|&a, &b| {
            let (ka, kb) = (key(&self.waiting[a]), key(&self.waiting[b]));
            ka.0.total_cmp(&kb.0).then((ka.1, ka.2).cmp(&(kb.1, kb.2)))
        })
    }

    pub fn running(&self) -> &[Seq<C>] {
        &self.running
    }

    pub fn running_mut(&mut self) -> &mut [Seq<C>] {
        &mut self.running
    }

    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether the pin `id` is still waiting or running.
    pub fn holds_pin(&self, id: u64) -> bool {
        self.waiting
            .iter()
            .chain(&self.running)
            .any(|s| s.new.pin == Some(id))
    }

    /// Queues a new request at the back.
    pub fn accept(&mut self, new: NewSeq) {
        let kv_need = (new.prompt.len() + new.params.max_tokens) * self.kv_bytes_per_token;
        let sampler = Sampler::new(new.params.clone());
        let text = TextStream::new(new.params.stop.clone());
        self.arrivals += 1;
        self.waiting.push_back(Seq {
            new,
            arrival: self.arrivals,
            kv_need,
            prefilled: 0,
            kv_len: 0,
            cached: 0,
            chain: Vec::new(),
            shared: 0,
            generated: Vec::new(),
            last: 0,
            kv: None,
            _lease: None,
            sampler,
            text,
            admitted: None,
            first_token: None,
        });
    }

    /// Drops cancelled sequences (waiting or running) and waiting ones whose deadline passed by `now`.
    pub fn drop_gone(&mut self, now: Instant) -> Gone {
        let mut gone = Gone::default();
        self.waiting.retain(|s| {
            if s.new.events.is_closed() && s.new.pin.is_none() {
                gone.cancelled += 1;
                false
            } else if s.new.deadline.is_some_and(|d| d <= now) {
                let _ = s.new.events.send(Event::Expired);
                gone.expired += 1;
                false
            } else {
                true
            }
        });
        let before = self.running.len();
        self.running
            .retain(|s| !s.new.events.is_closed() || s.new.pin.is_some());
        gone.cancelled += before - self.running.len();
        gone
    }

    /// Admits waiting sequences ([`Queue::next_waiting`] order) while the resident count (`max_resident`)
    /// and KV bytes (`kv_budget`) allow; the next one in order is never skipped for a smaller one. `new_cache`
    /// makes each one's KV cache for `tokens` positions. Returns how many were admitted (at the end of
    /// [`Queue::running`]).
    pub fn admit(
        &mut self,
        max_resident: usize,
        kv_budget: usize,
        now: Instant,
        mut new_cache: impl FnMut(usize) -> C,
    ) -> usize {
        let mut n = 0;
        while self.running.len() < max_resident {
            let Some(i) = self.next_waiting() else {
                break;
            };
            if self.waiting[i].kv_need > kv_budget.saturating_sub(self.kv_used.get()) {
                break;
            }
            let mut s = self.waiting.remove(i).expect("index of a waiting sequence");
            n += 1;
            s.kv = Some(new_cache(s.new.prompt.len() + s.new.params.max_tokens));
            self.kv_used.set(self.kv_used.get() + s.kv_need);
            s._lease = Some(KvLease {
                bytes: s.kv_need,
                used: self.kv_used.clone(),
            });
            s.admitted = Some(now);
            self.running.push(s);
        }
        n
    }

    /// Tokens each resident sequence runs next step (same order as [`Queue::running`]; 0 = paused), and
    /// what each zone with a resident sequence was served and owed by the plan.
    pub fn plan(&mut self, limits: StepLimits) -> (Vec<usize>, Vec<ZoneStep>) {
        let rows = limits.rows.max(1);
        // Every row decodes, whatever the (possibly just lowered) budget.
        let tokens = limits.tokens.max(rows);
        let left = |s: &Seq<C>| s.new.prompt.len() - s.prefilled;
        let plan = match limits.schedule {
            Schedule::Fair => {
                let cands: Vec<Candidate<Arc<str>>> = self
                    .running
                    .iter()
                    .map(|s| Candidate {
                        zone: s.new.share.zone.clone(),
                        weight: s.new.share.weight,
                        priority: s.new.share.priority,
                        arrival: s.arrival,
                        prefill_left: left(s),
                    })
                    .collect();
                self.clock.plan(&cands, rows, tokens, limits.target)
            }
            Schedule::Fcfs => {
                let n = rows.min(self.running.len());
                let states: Vec<SeqState> = self.running[..n]
                    .iter()
                    .map(|s| SeqState {
                        prefill_left: left(s),
                    })
                    .collect();
                let mut plan = plan_step(&states, tokens);
                plan.resize(self.running.len(), 0);
                plan
            }
        };
        // Per zone: weight, tokens it could have used this step, tokens it got.
        let mut zones: Vec<(&Share, usize, usize)> = Vec::new();
        let mut at: HashMap<&str, usize> = HashMap::new();
        for (s, &n) in self.running.iter().zip(&plan) {
            let k = *at.entry(&s.new.share.zone).or_insert_with(|| {
                zones.push((&s.new.share, 0, 0));
                zones.len() - 1
            });
            zones[k].1 += left(s).max(1).min(tokens);
            zones[k].2 += n;
        }
        let total = plan.iter().sum();
        let demand: Vec<(f64, usize)> = zones.iter().map(|z| (z.0.weight, z.1)).collect();
        let steps = zones
            .iter()
            .zip(owed(&demand, total))
            .map(|(z, owed)| ZoneStep {
                zone: z.0.zone.clone(),
                class: z.0.class.clone(),
                served: z.2,
                owed,
            })
            .collect();
        (plan, steps)
    }

    /// Removes the running sequences flagged in `finished` (their KV returns to the budget).
    pub fn retire(&mut self, finished: &[bool]) {
        let mut i = 0;
        self.running.retain(|_| {
            let done = finished[i];
            i += 1;
            !done
        });
    }

    /// Fails every running sequence with `error` (a failed forward pass).
    pub fn fail_running(&mut self, error: &str) {
        for s in self.running.drain(..) {
            let _ = s.new.events.send(Event::Error(error.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn seq(
        prompt: usize,
        max_tokens: usize,
        deadline: Option<Instant>,
    ) -> (NewSeq, mpsc::UnboundedReceiver<Event>) {
        let (events, rx) = mpsc::unbounded_channel();
        let new = NewSeq {
            prompt: vec![1; prompt],
            params: SamplingParams::greedy(max_tokens),
            lora: None,
            events,
            enqueued: Instant::now(),
            deadline,
            root: [0; 16],
            pin: None,
            share: Share::default(),
            constraint: None,
        };
        (new, rx)
    }

    /// A cache that records the positions it was made for (the fake decoder's cache).
    fn cache(tokens: usize) -> usize {
        tokens
    }

    #[test]
    fn a_waiting_request_past_its_deadline_leaves_with_expired_and_never_runs() {
        let mut q = Queue::<usize>::new(1);
        let now = Instant::now();
        let (late, mut late_rx) = seq(4, 4, Some(now));
        let (fine, _fine_rx) = seq(4, 4, Some(now + Duration::from_secs(60)));
        q.accept(late);
        q.accept(fine);
        assert_eq!(
            q.drop_gone(now),
            Gone {
                cancelled: 0,
                expired: 1
            }
        );
        assert!(matches!(late_rx.try_recv(), Ok(Event::Expired)));
        assert_eq!(q.admit(8, 1000, now, cache), 1);
        assert_eq!(q.running().len(), 1);
        assert_eq!(q.running()[0].kv, Some(8));
    }

    #[test]
    fn a_running_request_is_not_expired_by_its_deadline() {
        let mut q = Queue::<usize>::new(1);
        let now = Instant::now();
        let (s, _rx) = seq(4, 4, Some(now + Duration::from_millis(1)));
        q.accept(s);
        q.admit(8, 1000, now, cache);
        assert_eq!(q.drop_gone(now + Duration::from_secs(1)), Gone::default());
        assert_eq!(q.running().len(), 1);
    }

    #[test]
    fn a_cancelled_sequence_returns_its_kv_so_the_next_is_admitted() {
        let mut q = Queue::<usize>::new(10);
        let now = Instant::now();
        let (a, a_rx) = seq(5, 5, None);
        let (b, _b_rx) = seq(5, 5, None);
        q.accept(a);
        q.accept(b);
        assert_eq!(q.admit(8, 150, now, cache), 1, "only one fits 150 bytes");
        assert_eq!(q.kv_used(), 100);
        drop(a_rx);
        assert_eq!(q.drop_gone(now).cancelled, 1);
        assert_eq!(q.kv_used(), 0);
        assert_eq!(q.admit(8, 150, now, cache), 1);
        assert_eq!(q.kv_used(), 100);
    }

    #[test]
    fn finished_and_failed_sequences_return_their_kv() {
        let mut q = Queue::<usize>::new(1);
        let now = Instant::now();
        let mut rxs = Vec::new();
        for _ in 0..3 {
            let (s, rx) = seq(2, 2, None);
            rxs.push(rx);
            q.accept(s);
        }
        assert_eq!(q.admit(8, 1000, now, cache), 3);
        assert_eq!(q.kv_used(), 12);
        q.retire(&[false, true, false]);
        assert_eq!(q.kv_used(), 8);
        q.fail_running("boom");
        assert_eq!(q.kv_used(), 0);
        assert!(q.is_idle());
        assert!(matches!(rxs[0].try_recv(), Ok(Event::Error(_))));
    }

    #[test]
    fn the_shortfall_is_what_the_head_of_the_queue_misses_when_a_row_is_free() {
        let mut q = Queue::<usize>::new(10);
        let now = Instant::now();
        let (a, _a) = seq(5, 5, None);
        let (b, _b) = seq(5, 5, None);
        q.accept(a);
        q.accept(b);
        assert_eq!(q.shortfall(8, 1000), None, "fits");
        assert_eq!(q.admit(8, 150, now, cache), 1);
        assert_eq!(q.shortfall(8, 150), Some(50));
        assert_eq!(
            q.shortfall(1, 150),
            None,
            "no free row: memory would not help"
        );
    }

    #[test]
    fn a_pin_is_held_while_it_waits_or_runs_and_not_after() {
        let mut q = Queue::<usize>::new(1);
        let now = Instant::now();
        let (mut p, _rx) = seq(2, 1, None);
        p.pin = Some(9);
        q.accept(p);
        assert!(q.holds_pin(9) && !q.holds_pin(8));
        q.admit(8, 1000, now, cache);
        assert!(q.holds_pin(9), "running");
        q.fail_running("boom");
        assert!(!q.holds_pin(9));
    }

    #[test]
    fn admission_stops_at_free_batch_rows() {
        let mut q = Queue::<usize>::new(1);
        let now = Instant::now();
        let _rxs: Vec<_> = (0..3)
            .map(|_| {
                let (s, rx) = seq(1, 1, None);
                q.accept(s);
                rx
            })
            .collect();
        assert_eq!(q.admit(2, 1000, now, cache), 2);
        assert_eq!(q.waiting_len(), 1);
        assert_eq!(q.admit(2, 1000, now, cache), 0);
    }

    #[test]
    fn every_running_sequence_decodes_even_under_a_lowered_budget() {
        let mut q = Queue::<usize>::new(1);
        let now = Instant::now();
        let _rxs: Vec<_> = (0..3)
            .map(|_| {
                let (s, rx) = seq(3, 1, None);
                q.accept(s);
                rx
            })
            .collect();
        q.admit(8, 1000, now, cache);
        for s in q.running_mut() {
            s.prefilled = 3;
        }
        let step = |schedule| StepLimits {
            rows: 8,
            tokens: 1,
            target: None,
            schedule,
        };
        assert_eq!(q.plan(step(Schedule::Fair)).0, vec![1, 1, 1]);
        assert_eq!(q.plan(step(Schedule::Fcfs)).0, vec![1, 1, 1]);
    }

    fn zoned(zone: &str, weight: f64) -> (NewSeq, mpsc::UnboundedReceiver<Event>) {
        let (mut s, rx) = seq(2, 8, None);
        s.share = Share::zone(zone, "street", weight, 0);
        (s, rx)
    }

    #[test]
    fn admission_takes_the_zone_with_the_fewest_resident_per_weight_first() {
        let mut q = Queue::<usize>::new(1);
        let now = Instant::now();
        let mut rxs = Vec::new();
        for _ in 0..6 {
            let (s, rx) = zoned("flood", 1.0);
            q.accept(s);
            rxs.push(rx);
        }
        assert_eq!(q.admit(4, 1000, now, cache), 4);
        let (quiet, _q) = zoned("quiet", 1.0);
        q.accept(quiet);
        // Two flood sequences arrived first, but the quiet zone holds nothing.
        assert_eq!(q.admit(5, 1000, now, cache), 1);
        assert_eq!(&*q.running()[4].new.share.zone, "quiet");
    }

    #[test]
    fn a_step_pauses_a_flooding_zone_s_extra_rows_for_a_newcomer_and_books_what_each_was_owed() {
        let mut q = Queue::<usize>::new(1);
        let now = Instant::now();
        let mut rxs = Vec::new();
        for _ in 0..4 {
            let (s, rx) = zoned("flood", 1.0);
            q.accept(s);
            rxs.push(rx);
        }
        q.admit(8, 1000, now, cache);
        for s in q.running_mut() {
            s.prefilled = 2;
        }
        let limits = StepLimits {
            rows: 2,
            tokens: 64,
            target: None,
            schedule: Schedule::Fair,
        };
        assert_eq!(q.plan(limits).0, vec![1, 1, 0, 0]);
        let (quiet, _q) = zoned("quiet", 1.0);
        q.accept(quiet);
        q.admit(8, 1000, now, cache);
        q.running_mut()[4].prefilled = 2;
        let (plan, steps) = q.plan(limits);
        assert_eq!(plan[4], 1, "the newcomer runs at once: {plan:?}");
        assert_eq!(plan.iter().sum::<usize>(), 2);
        assert_eq!(steps.len(), 2);
        for z in &steps {
            assert_eq!((z.served, z.owed), (1, 1.0), "{z:?}");
        }
        let fcfs = q.plan(StepLimits {
            schedule: Schedule::Fcfs,
            ..limits
        });
        assert_eq!(fcfs.0, vec![1, 1, 0, 0, 0], "oldest first");
    }
}

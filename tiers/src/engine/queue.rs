//! The engine's queue state, free of models and threads so it is unit-tested on its own: requests accepted
//! from the channel wait in order; between two steps cancelled requests (their receiver dropped) leave, waiting
//! requests whose deadline passed leave with [`Event::Expired`] (they never reach the model), and waiting
//! requests are admitted in order within the free batch rows and the KV budget. An admitted sequence holds a
//! [`KvLease`] for its worst case (prompt + `max_tokens`): dropping the sequence, however it ends, returns its
//! bytes (as TGI's blocks do), so the books cannot drift.

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use nimmer_loras::Blend;
use tokio::sync::mpsc;

use super::Event;
use super::prefix::BlockHash;
use super::sched::{SeqState, admit_count, plan_step};
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

/// Waiting and running sequences and the KV bytes the running ones hold.
pub(crate) struct Queue<C> {
    waiting: VecDeque<Seq<C>>,
    running: Vec<Seq<C>>,
    kv_used: Rc<Cell<usize>>,
    kv_bytes_per_token: usize,
}

impl<C> Queue<C> {
    pub fn new(kv_bytes_per_token: usize) -> Self {
        Self {
            waiting: VecDeque::new(),
            running: Vec::new(),
            kv_used: Rc::new(Cell::new(0)),
            kv_bytes_per_token,
        }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// KV bytes the running sequences hold.
    #[cfg(test)]
    pub fn kv_used(&self) -> usize {
        self.kv_used.get()
    }

    /// The KV bytes missing for the first waiting sequence when a batch row is free for it but `kv_budget`
    /// is not (the engine may evict prefix-cache blocks to find them).
    pub fn shortfall(&self, max_batch: usize, kv_budget: usize) -> Option<usize> {
        let head = self.waiting.front()?;
        if self.running.len() >= max_batch {
            return None;
        }
        let free = kv_budget.saturating_sub(self.kv_used.get());
        (head.kv_need > free).then(|| head.kv_need - free)
    }

    pub fn running(&self) -> &[Seq<C>] {
        &self.running
    }

    pub fn running_mut(&mut self) -> &mut [Seq<C>] {
        &mut self.running
    }

    #[cfg(test)]
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
        self.waiting.push_back(Seq {
            new,
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

    /// Admits waiting sequences in order while batch rows (`max_batch`) and KV bytes (`kv_budget`) allow;
    /// `new_cache` makes each one's KV cache for `tokens` positions. Returns how many were admitted.
    pub fn admit(
        &mut self,
        max_batch: usize,
        kv_budget: usize,
        now: Instant,
        mut new_cache: impl FnMut(usize) -> C,
    ) -> usize {
        let needs: Vec<usize> = self.waiting.iter().map(|s| s.kv_need).collect();
        let free_rows = max_batch.saturating_sub(self.running.len());
        let n = admit_count(
            &needs,
            free_rows,
            kv_budget.saturating_sub(self.kv_used.get()),
        );
        for mut s in self.waiting.drain(..n) {
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

    /// Tokens each running sequence runs next step (same order as [`Queue::running`]).
    pub fn plan(&self, token_budget: usize) -> Vec<usize> {
        let states: Vec<SeqState> = self
            .running
            .iter()
            .map(|s| SeqState {
                prefill_left: s.new.prompt.len() - s.prefilled,
            })
            .collect();
        // Every running sequence decodes each step, whatever the (possibly just lowered) budget.
        plan_step(&states, token_budget.max(self.running.len()))
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
        assert_eq!(q.plan(1), vec![1, 1, 1]);
    }
}

//! Repeats of a dialog get the first answer. A dialog's idempotency key (its `idempotency_key`, else its UID:
//! one line of one slot) is claimed before any tier work: the first claim runs the dialog and holds a
//! [`Ticket`]; a repeat while it runs waits for its answer, a repeat after it returns the stored answer for
//! `budgets.toml [dialogs] idempotency_window_s`. A first that fails (refused, cut off) leaves nothing behind,
//! so its retry runs afresh. The result id a dialog publishes is derived from the same key
//! ([`result_id`]), so a repeat through another gateway is still one canon row (JetStream drops the
//! duplicate message, canon's unique `result_id` the duplicate row); with NATS, the first answer is shared
//! with the other gateways too ([`crate::shared_answers`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::api::DialogResponse;

/// A dialog's answer once it has one (`None` while it runs).
type Answer = Option<Arc<DialogResponse>>;

enum Entry {
    Running(watch::Sender<Answer>),
    Done {
        answer: Arc<DialogResponse>,
        at: Instant,
    },
}

/// Answers kept at most (about 1 KB each): past it the oldest are forgotten first, so a repeat that late runs
/// again (canon still keeps one row: the result id is the same).
pub const MAX_ANSWERS: usize = 100_000;

/// The keys claimed within the window, and their answers.
pub struct Idempotency {
    entries: Mutex<HashMap<String, Entry>>,
    cap: usize,
}

impl Default for Idempotency {
    fn default() -> Self {
        Self::with_cap(MAX_ANSWERS)
    }
}

/// What a claim found.
pub enum Claim {
    /// Nobody ran this key within the window: run it, and [`Ticket::finish`] with its answer.
    First(Ticket),
    /// It is running: its answer comes here (the channel closes if it fails).
    Running(watch::Receiver<Answer>),
    /// It ran: its answer.
    Done(Arc<DialogResponse>),
}

/// The right to answer a key; dropped without [`Ticket::finish`] (a failure), it frees the key.
pub struct Ticket {
    table: Arc<Idempotency>,
    key: String,
    finished: bool,
    /// The claim across gateways, when this gateway holds it: finished and freed with this one.
    shared: Option<crate::shared_answers::Lease>,
}

impl Idempotency {
    /// A store that keeps at most `cap` answers.
    pub fn with_cap(cap: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            cap: cap.max(1),
        }
    }

    /// Claims `key`; answers older than `window` no longer count (and are dropped once the table is full).
    pub fn claim(self: &Arc<Self>, key: &str, window: Duration) -> Claim {
        let now = Instant::now();
        let mut e = self.entries.lock().expect("idempotency lock");
        match e.get(key) {
            Some(Entry::Running(tx)) => return Claim::Running(tx.subscribe()),
            Some(Entry::Done { answer, at }) if now.duration_since(*at) <= window => {
                return Claim::Done(answer.clone());
            }
            _ => {}
        }
        if e.len() >= self.cap {
            // Full: expired answers go, then the oldest (down to 90% of the cap); running dialogs stay.
            e.retain(
                |_, v| !matches!(v, Entry::Done { at, .. } if now.duration_since(*at) > window),
            );
            let mut done: Vec<(Instant, String)> = e
                .iter()
                .filter_map(|(k, v)| match v {
                    Entry::Done { at, .. } => Some((*at, k.clone())),
                    Entry::Running(_) => None,
                })
                .collect();
            done.sort_unstable();
            let excess = (e.len() + 1).saturating_sub(self.cap * 9 / 10);
            for (_, k) in done.into_iter().take(excess) {
                e.remove(&k);
            }
        }
        e.insert(key.to_string(), Entry::Running(watch::channel(None).0));
        Claim::First(Ticket {
            table: self.clone(),
            key: key.to_string(),
            finished: false,
            shared: None,
        })
    }

    /// Keys held (running or answered; expired answers until the table fills).
    pub fn len(&self) -> usize {
        self.entries.lock().expect("idempotency lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Ticket {
    /// Holds the claim across gateways too: [`Ticket::finish`] puts the answer there, a drop frees it.
    pub fn share(&mut self, lease: crate::shared_answers::Lease) {
        self.shared = Some(lease);
    }

    /// Stores the answer for repeats and hands it to those waiting (on other gateways too, when shared).
    pub fn finish(mut self, answer: Arc<DialogResponse>) {
        self.finished = true;
        if let Some(lease) = self.shared.take() {
            lease.finish(&answer);
        }
        let mut e = self.table.entries.lock().expect("idempotency lock");
        let done = Entry::Done {
            answer: answer.clone(),
            at: Instant::now(),
        };
        if let Some(Entry::Running(tx)) = e.insert(self.key.clone(), done) {
            tx.send_replace(Some(answer));
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.finished {
            // Dropping the sender closes the waiters' channels: they claim again.
            self.table
                .entries
                .lock()
                .expect("idempotency lock")
                .remove(&self.key);
        }
    }
}

/// The result id of the dialog with idempotency key `key`: the same on every gateway, for every repeat.
pub fn result_id(key: &str) -> String {
    nimmer_wire::dialog::result_id(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(text: &str) -> Arc<DialogResponse> {
        let v = serde_json::json!({
            "uid": { "gm_event": "e", "district": "d", "scene": "s", "slot": "k" },
            "text": text, "tier": "driver", "adapters": [], "finish_reason": "stop",
            "usage": { "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2 },
            "timings": { "slot_wait_ms": 0.0, "queue_ms": 0.0, "ttft_ms": 0.0, "total_ms": 0.0 },
            "slot": { "zone": "z", "id": 1 }, "degraded": false,
        });
        Arc::new(serde_json::from_value(v).expect("a response"))
    }

    #[tokio::test]
    async fn a_repeat_waits_for_the_first_answer_then_gets_it_until_the_window_ends() {
        let t = Arc::new(Idempotency::default());
        let w = Duration::from_secs(60);
        let Claim::First(ticket) = t.claim("k", w) else {
            panic!("first")
        };
        let Claim::Running(mut rx) = t.claim("k", w) else {
            panic!("running")
        };
        ticket.finish(answer("hello"));
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow().as_ref().unwrap().text, "hello");
        assert!(matches!(t.claim("k", w), Claim::Done(a) if a.text == "hello"));
        // Past the window the key is free again.
        assert!(matches!(t.claim("k", Duration::ZERO), Claim::First(_)));
    }

    #[tokio::test]
    async fn a_first_that_fails_frees_the_key_and_its_waiters_see_it() {
        let t = Arc::new(Idempotency::default());
        let w = Duration::from_secs(60);
        let Claim::First(ticket) = t.claim("k", w) else {
            panic!("first")
        };
        let Claim::Running(mut rx) = t.claim("k", w) else {
            panic!("running")
        };
        drop(ticket);
        assert!(rx.changed().await.is_err(), "the waiter's channel closed");
        assert!(t.is_empty());
        assert!(matches!(t.claim("k", w), Claim::First(_)));
    }

    #[test]
    fn past_the_cap_the_oldest_answers_are_forgotten() {
        let t = Arc::new(Idempotency::with_cap(10));
        let w = Duration::from_secs(60);
        for i in 0..25 {
            let Claim::First(ticket) = t.claim(&format!("k{i}"), w) else {
                panic!("first")
            };
            ticket.finish(answer(&format!("a{i}")));
            assert!(t.len() <= 10, "{}", t.len());
        }
        assert!(matches!(t.claim("k24", w), Claim::Done(a) if a.text == "a24"));
        assert!(matches!(t.claim("k0", w), Claim::First(_)));
    }

    #[test]
    fn result_ids_are_a_function_of_the_key() {
        assert_eq!(result_id("e/d/s/k"), result_id("e/d/s/k"));
        assert_ne!(result_id("e/d/s/k"), result_id("e/d/s/k2"));
        assert_eq!(result_id("x").len(), 32);
    }
}

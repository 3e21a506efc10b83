//! Repeats of a dialog get the first answer. A dialog's idempotency key (its `idempotency_key`, else its UID:
//! one line of one slot) is claimed before any tier work: the first claim runs the dialog and holds a
//! [`Ticket`]; a repeat while it runs waits for its answer, a repeat after it returns the stored answer for
//! `budgets.toml [dialogs] idempotency_window_s`. A first that fails (refused, cut off) leaves nothing behind,
//! so its retry runs afresh. The result id a dialog publishes is derived from the same key
//! ([`result_id`]), so a repeat through another gateway is still one canon row (JetStream drops the
//! duplicate message, canon's unique `result_id` the duplicate row).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
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

/// The keys claimed within the window, and their answers.
#[derive(Default)]
pub struct Idempotency {
    entries: Mutex<HashMap<String, Entry>>,
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
}

impl Idempotency {
    /// Claims `key`; answers older than `window` are forgotten.
    pub fn claim(self: &Arc<Self>, key: &str, window: Duration) -> Claim {
        let now = Instant::now();
        let mut e = self.entries.lock().expect("idempotency lock");
        // Expired answers go on the way (amortized: only when the table grew since the last sweep).
        if e.len() >= 1024 && e.len().is_power_of_two() {
            e.retain(
                |_, v| !matches!(v, Entry::Done { at, .. } if now.duration_since(*at) > window),
            );
        }
        match e.get(key) {
            Some(Entry::Running(tx)) => return Claim::Running(tx.subscribe()),
            Some(Entry::Done { answer, at }) if now.duration_since(*at) <= window => {
                return Claim::Done(answer.clone());
            }
            _ => {}
        }
        e.insert(key.to_string(), Entry::Running(watch::channel(None).0));
        Claim::First(Ticket {
            table: self.clone(),
            key: key.to_string(),
            finished: false,
        })
    }

    /// Keys held (running or answered within their window, until swept).
    pub fn len(&self) -> usize {
        self.entries.lock().expect("idempotency lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Ticket {
    /// Stores the answer for repeats and hands it to those waiting.
    pub fn finish(mut self, answer: Arc<DialogResponse>) {
        self.finished = true;
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
    let d = Sha256::digest(format!("nimmer/result/{key}").as_bytes());
    d[..16].iter().map(|b| format!("{b:02x}")).collect()
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
    fn result_ids_are_a_function_of_the_key() {
        assert_eq!(result_id("e/d/s/k"), result_id("e/d/s/k"));
        assert_ne!(result_id("e/d/s/k"), result_id("e/d/s/k2"));
        assert_eq!(result_id("x").len(), 32);
    }
}

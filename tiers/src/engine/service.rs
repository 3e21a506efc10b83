//! What each zone received from the engine's steps against what it was owed: per zone in the JSON view
//! (`GET /v1/zones`), per zone class in `/metrics` (bounded label cardinality). The engine records every step;
//! zones unseen for ten minutes are forgotten.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How long a zone's figures outlive its last step.
const KEEP: Duration = Duration::from_secs(600);

/// One zone's part of one step.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ZoneStep {
    pub zone: Arc<str>,
    pub class: Arc<str>,
    pub served: usize,
    pub owed: f64,
}

struct Entry {
    class: Arc<str>,
    served: u64,
    owed: f64,
    seen: Instant,
}

struct ClassCounters {
    served: metrics::Counter,
    owed: metrics::Counter,
    owed_sum: f64,
}

struct Book {
    zones: HashMap<Arc<str>, Entry>,
    classes: HashMap<Arc<str>, ClassCounters>,
    pruned: Instant,
}

/// Tokens served and owed per zone of one tier's engine.
pub struct ZoneService {
    tier: String,
    book: Mutex<Book>,
}

/// A zone's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZoneServiceView {
    pub zone: String,
    pub class: String,
    /// Tokens the engine's steps ran for the zone (prefill and decode).
    pub tokens_served: u64,
    /// Its weighted fair share of the same steps' tokens, given what it had ready to run.
    pub tokens_owed: f64,
    /// `tokens_served / tokens_owed` (1 = exactly its share; below 1 = it received less).
    pub share_ratio: Option<f64>,
}

impl ZoneService {
    pub(crate) fn new(tier: &str) -> Self {
        Self {
            tier: tier.to_string(),
            book: Mutex::new(Book {
                zones: HashMap::new(),
                classes: HashMap::new(),
                pruned: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds one step's figures.
    pub(crate) fn record(&self, step: &[ZoneStep], now: Instant) {
        let mut book = self.lock();
        let book = &mut *book;
        for z in step {
            let e = book.zones.entry(z.zone.clone()).or_insert_with(|| Entry {
                class: z.class.clone(),
                served: 0,
                owed: 0.0,
                seen: now,
            });
            e.class = z.class.clone();
            e.served += z.served as u64;
            e.owed += z.owed;
            e.seen = now;
            let c = book.classes.entry(z.class.clone()).or_insert_with(|| {
                let labels = [("tier", self.tier.clone()), ("class", z.class.to_string())];
                ClassCounters {
                    served: metrics::counter!("nimmer_zone_tokens_served_total", &labels),
                    owed: metrics::counter!("nimmer_zone_tokens_owed_total", &labels),
                    owed_sum: 0.0,
                }
            });
            c.served.increment(z.served as u64);
            c.owed_sum += z.owed;
            c.owed.absolute(c.owed_sum.round() as u64);
        }
        if now.duration_since(book.pruned) > Duration::from_secs(10) {
            book.pruned = now;
            book.zones.retain(|_, e| now.duration_since(e.seen) < KEEP);
        }
    }

    /// Every zone's figures, by zone name.
    pub fn snapshot(&self) -> Vec<ZoneServiceView> {
        let book = self.lock();
        let mut v: Vec<ZoneServiceView> = book
            .zones
            .iter()
            .map(|(zone, e)| ZoneServiceView {
                zone: zone.to_string(),
                class: e.class.to_string(),
                tokens_served: e.served,
                tokens_owed: e.owed,
                share_ratio: (e.owed > 0.0).then(|| e.served as f64 / e.owed),
            })
            .collect();
        v.sort_by(|a, b| a.zone.cmp(&b.zone));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_add_up_per_zone() {
        let s = ZoneService::new("t");
        let now = Instant::now();
        let step = |zone: &str, served, owed| ZoneStep {
            zone: zone.into(),
            class: "street".into(),
            served,
            owed,
        };
        s.record(&[step("a", 3, 2.0), step("b", 1, 2.0)], now);
        s.record(&[step("a", 1, 2.0)], now);
        let v = s.snapshot();
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].tokens_served, v[0].tokens_owed), (4, 4.0));
        assert_eq!(v[0].share_ratio, Some(1.0));
        assert_eq!(v[1].share_ratio, Some(0.5));
    }
}

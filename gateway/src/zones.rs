//! The active zones: when each was activated and last seen, its class (set by `PUT /v1/zones/{id}` or by
//! the class prefixes in budgets.toml) and its token buckets, one per tier. A pure structure (time is passed
//! in) so activation, pruning and rate limiting are unit-tested.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nimmer_config::{BudgetsFile, RequestBudget, TierName};
use serde::{Deserialize, Serialize};

/// What `GET /v1/zones` shows about one zone: its table entry (once activated) and, per tier, the slots it
/// holds and the requests it has waiting.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ZoneView {
    #[serde(flatten)]
    pub info: Option<ZoneInfo>,
    pub slots_in_use: BTreeMap<TierName, usize>,
    pub queued: BTreeMap<TierName, usize>,
    /// NPCs whose personas are pinned in the prefix cache while the zone is active.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub npcs_pinned: Vec<String>,
    /// Per LLM tier: the tokens its engine's steps ran for the zone against the zone's weighted fair share.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub engine_share: BTreeMap<TierName, EngineShare>,
}

/// A zone's service from one engine (the engine's own books: see `nimmer_tiers::ZoneServiceView`).
#[derive(Debug, Clone, Serialize)]
pub struct EngineShare {
    pub tokens_served: u64,
    pub tokens_owed: f64,
    /// `tokens_served / tokens_owed`: 1 is exactly the zone's share, below 1 less than it was owed.
    pub share_ratio: Option<f64>,
}

/// A token bucket in debt form: a request may start while the level is above zero; its tokens are charged
/// when known (after it ran), so the level may go negative and refills at `rate` up to `burst`.
#[derive(Debug, Clone)]
struct Bucket {
    level: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + rate * dt).min(burst);
        self.at = now;
    }
}

#[derive(Debug, Clone)]
struct Zone {
    class: String,
    /// Set by `PUT /v1/zones/{id}`; otherwise the class follows the prefixes of the budgets in effect.
    pinned: bool,
    activated: Instant,
    last_seen: Instant,
    buckets: BTreeMap<TierName, Bucket>,
    prefix: PrefixUse,
    /// Recent time to first token (slot wait included), exponentially weighted.
    ttft_ms: Option<f64>,
}

/// A zone's prompt tokens and how many of them the tiers' prefix caches served (not computed again).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PrefixUse {
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
}

/// What `GET /v1/zones` shows of a zone's own state.
#[derive(Debug, Clone, Serialize)]
pub struct ZoneInfo {
    pub class: String,
    pub class_pinned: bool,
    pub weight: f64,
    pub active_s: f64,
    pub idle_s: f64,
    /// Token bucket levels of tiers with a token rate (may be negative: in debt).
    pub tokens: BTreeMap<TierName, f64>,
    pub prefix_cache: PrefixUse,
    /// Recent time to first token of its generations (slot wait included; each new one weighs 0.2).
    pub ttft_ms: Option<f64>,
}

#[derive(Default)]
pub struct ZoneTable {
    zones: BTreeMap<String, Zone>,
}

impl ZoneTable {
    /// Activates `zone` on first sight and marks it seen; returns its class.
    pub fn touch(&mut self, zone: &str, b: &BudgetsFile, now: Instant) -> String {
        let z = self.zones.entry(zone.to_string()).or_insert_with(|| {
            tracing::info!(zone, "zone activated");
            Zone {
                class: b.class_of(zone).to_string(),
                pinned: false,
                activated: now,
                last_seen: now,
                buckets: BTreeMap::new(),
                prefix: PrefixUse::default(),
                ttft_ms: None,
            }
        });
        if !z.pinned || !b.classes.contains_key(&z.class) {
            z.class = b.class_of(zone).to_string();
        }
        z.last_seen = now;
        z.class.clone()
    }

    /// Activates `zone` (or refreshes it), pinning its class when one is given.
    pub fn put(&mut self, zone: &str, class: Option<&str>, b: &BudgetsFile, now: Instant) {
        self.touch(zone, b, now);
        let z = self.zones.get_mut(zone).expect("touched");
        if let Some(c) = class {
            z.class = c.to_string();
            z.pinned = true;
        }
    }

    /// Whether `zone` may start another request on `tier`; otherwise the seconds until it may.
    pub fn check_rate(
        &mut self,
        zone: &str,
        tier: TierName,
        rb: &RequestBudget,
        now: Instant,
    ) -> Result<(), u64> {
        if rb.tokens_per_s <= 0.0 {
            return Ok(());
        }
        let Some(z) = self.zones.get_mut(zone) else {
            return Ok(());
        };
        let b = z.buckets.entry(tier).or_insert(Bucket {
            level: rb.burst_tokens,
            at: now,
        });
        b.refill(rb.tokens_per_s, rb.burst_tokens, now);
        if b.level > 0.0 {
            Ok(())
        } else {
            Err(((-b.level + 1.0) / rb.tokens_per_s).ceil().max(1.0) as u64)
        }
    }

    /// Charges `tokens` a request used on `tier` to the zone's bucket.
    pub fn charge(
        &mut self,
        zone: &str,
        tier: TierName,
        tokens: usize,
        rb: &RequestBudget,
        now: Instant,
    ) {
        if rb.tokens_per_s <= 0.0 {
            return;
        }
        if let Some(z) = self.zones.get_mut(zone) {
            let b = z.buckets.entry(tier).or_insert(Bucket {
                level: rb.burst_tokens,
                at: now,
            });
            b.refill(rb.tokens_per_s, rb.burst_tokens, now);
            b.level -= tokens as f64;
        }
    }

    /// Counts a finished generation: its prompt tokens, the part of them served from a prefix cache, and
    /// its time to first token.
    pub fn record_done(
        &mut self,
        zone: &str,
        prompt_tokens: usize,
        cached_tokens: usize,
        ttft_ms: f64,
    ) {
        if let Some(z) = self.zones.get_mut(zone) {
            z.prefix.prompt_tokens += prompt_tokens as u64;
            z.prefix.cached_tokens += cached_tokens as u64;
            z.ttft_ms = Some(z.ttft_ms.map_or(ttft_ms, |t| 0.8 * t + 0.2 * ttft_ms));
        }
    }

    /// Removes zones not seen for `ttl` for which `busy` (slots held or requests queued) is false.
    pub fn prune(
        &mut self,
        ttl: Duration,
        now: Instant,
        busy: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let gone: Vec<String> = self
            .zones
            .iter()
            .filter(|(name, z)| now.saturating_duration_since(z.last_seen) >= ttl && !busy(name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in &gone {
            self.zones.remove(name);
            tracing::info!(zone = %name, "idle zone pruned");
        }
        gone
    }

    pub fn len(&self) -> usize {
        self.zones.len()
    }

    pub fn is_empty(&self) -> bool {
        self.zones.is_empty()
    }

    pub fn class(&self, zone: &str) -> Option<&str> {
        self.zones.get(zone).map(|z| z.class.as_str())
    }

    pub fn info(&self, b: &BudgetsFile, now: Instant) -> BTreeMap<String, ZoneInfo> {
        self.zones
            .iter()
            .map(|(name, z)| {
                let tokens = z
                    .buckets
                    .iter()
                    .map(|(t, bucket)| {
                        let rb = b.tier(*t, &z.class);
                        let mut bucket = bucket.clone();
                        bucket.refill(rb.tokens_per_s, rb.burst_tokens, now);
                        (*t, bucket.level)
                    })
                    .collect();
                let info = ZoneInfo {
                    class: z.class.clone(),
                    class_pinned: z.pinned,
                    weight: b.weight(&z.class),
                    active_s: now.saturating_duration_since(z.activated).as_secs_f64(),
                    idle_s: now.saturating_duration_since(z.last_seen).as_secs_f64(),
                    tokens,
                    prefix_cache: z.prefix,
                    ttft_ms: z.ttft_ms,
                };
                (name.clone(), info)
            })
            .collect()
    }
}

/// Tokens a zone spent on a tier, as one gateway charged them (shared with the other gateways by
/// `budget_sync.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Charge {
    /// The gateway that charged it (its own charges come back and are skipped).
    #[serde(default)]
    pub from: String,
    pub zone: String,
    pub tier: TierName,
    pub tokens: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets() -> BudgetsFile {
        nimmer_config::Config::embedded().budgets
    }

    #[test]
    fn first_touch_activates_with_the_prefix_class_and_put_pins_a_class() {
        let (b, now) = (budgets(), Instant::now());
        let mut t = ZoneTable::default();
        assert_eq!(t.touch("plaza-1", &b, now), "plaza");
        assert_eq!(t.touch("alley", &b, now), "street");
        t.put("alley", Some("landmark"), &b, now);
        assert_eq!(t.touch("alley", &b, now), "landmark");
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn idle_zones_are_pruned_after_the_ttl_unless_busy() {
        let (b, now) = (budgets(), Instant::now());
        let mut t = ZoneTable::default();
        t.touch("a", &b, now);
        t.touch("b", &b, now);
        let later = now + Duration::from_secs(10);
        t.touch("c", &b, later);
        let gone = t.prune(Duration::from_secs(5), later, |z| z == "b");
        assert_eq!(gone, vec!["a".to_string()]);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn the_token_bucket_refuses_while_in_debt_and_refills_at_its_rate() {
        let (b, now) = (budgets(), Instant::now());
        let rb = RequestBudget {
            queue_timeout_ms: 1000,
            max_prompt_tokens: None,
            max_new_tokens: None,
            tokens_per_s: 100.0,
            burst_tokens: 200.0,
        };
        let mut t = ZoneTable::default();
        t.touch("z", &b, now);
        assert!(t.check_rate("z", TierName::Driver, &rb, now).is_ok());
        t.charge("z", TierName::Driver, 500, &rb, now);
        // 300 tokens in debt at 100/s: about 3 s.
        assert_eq!(t.check_rate("z", TierName::Driver, &rb, now), Err(4));
        let later = now + Duration::from_millis(3100);
        assert!(t.check_rate("z", TierName::Driver, &rb, later).is_ok());
        // Another tier has its own bucket.
        assert!(t.check_rate("z", TierName::Theia, &rb, now).is_ok());
    }
}

//! `budgets.toml`: what ops tune live — zone classes and their weights, routing and degradation, and per-tier
//! budgets (slots, queue, timeouts, token limits and rates, engine step and KV budgets) with per-class overrides.
//! [`BudgetsFile::tier`] resolves one tier's budget for one zone class.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ConfigError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetsFile {
    pub zones: ZonesSpec,
    pub classes: BTreeMap<String, ZoneClass>,
    pub routing: Routing,
    pub tiers: TierBudgets,
    #[serde(default)]
    pub loras: LorasSpec,
    /// NPC trait → adapter name.
    #[serde(default)]
    pub traits: BTreeMap<String, String>,
    #[serde(default)]
    pub dialogs: DialogLimits,
}

/// Limits on what one dialog may carry into canon (a request over them is refused with a 422 naming the
/// field): every participant gets the line on their own feed, so their number bounds a result's fan-out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DialogLimits {
    /// Most participants one dialog may name.
    pub max_participants: usize,
    /// Most chat messages one dialog may carry.
    #[serde(default = "max_messages")]
    pub max_messages: usize,
    /// Most characters of prompt one dialog may carry: its messages' contents (or its raw prompt, or its
    /// classifier input) together; a prompt of token ids counts one per token.
    #[serde(default = "max_prompt_chars")]
    pub max_prompt_chars: usize,
    /// How long a repeat of a dialog (same idempotency key: by default its UID) gets the first answer
    /// instead of running again; 0 turns it off.
    #[serde(default = "idempotency_window_s")]
    pub idempotency_window_s: u64,
}

fn idempotency_window_s() -> u64 {
    600
}

fn max_messages() -> usize {
    256
}

fn max_prompt_chars() -> usize {
    65_536
}

impl Default for DialogLimits {
    fn default() -> Self {
        Self {
            max_participants: 64,
            max_messages: max_messages(),
            max_prompt_chars: max_prompt_chars(),
            idempotency_window_s: idempotency_window_s(),
        }
    }
}

/// Where the Driver's trait-LoRA adapters live and how much memory they may hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LorasSpec {
    /// Adapters directory, relative to the config directory (or the working directory for the embedded config).
    pub dir: String,
    pub memory_mib: usize,
    #[serde(default)]
    pub unknown_trait: UnknownTrait,
}

impl Default for LorasSpec {
    fn default() -> Self {
        Self {
            dir: "loras".into(),
            memory_mib: 256,
            unknown_trait: UnknownTrait::Reject,
        }
    }
}

/// What a request naming a trait that `[traits]` does not map gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownTrait {
    /// 422 naming the trait.
    #[default]
    Reject,
    /// The trait is skipped.
    Ignore,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZonesSpec {
    /// Seconds without a request after which an idle zone is pruned.
    pub idle_ttl_s: u64,
    pub default_class: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneClass {
    /// Share of slots against other waiting zones.
    pub weight: f64,
    /// Zone ids starting with one of these belong to the class.
    #[serde(default)]
    pub prefixes: Vec<String>,
    #[serde(default)]
    pub driver: Option<ClassOverride>,
    #[serde(default)]
    pub theia: Option<ClassOverride>,
    #[serde(default)]
    pub saturn: Option<ClassOverride>,
}

/// Per-request budgets a zone class may set differently for one tier.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassOverride {
    pub queue_timeout_ms: Option<u64>,
    pub max_prompt_tokens: Option<usize>,
    pub max_new_tokens: Option<usize>,
    pub tokens_per_s: Option<f64>,
    pub burst_tokens: Option<f64>,
}

/// A tier name as config files spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TierName {
    Driver,
    Theia,
    Saturn,
}

impl TierName {
    pub const ALL: [TierName; 3] = [TierName::Driver, TierName::Theia, TierName::Saturn];

    pub fn as_str(self) -> &'static str {
        match self {
            TierName::Driver => "driver",
            TierName::Theia => "theia",
            TierName::Saturn => "saturn",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    pub dialog: TierName,
    pub deep: TierName,
    pub moment: TierName,
    /// Deep and moment requests run on the Driver when Theia cannot take them.
    pub degrade: bool,
    /// How long they wait for a Theia slot before degrading.
    #[serde(default)]
    pub theia_wait_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierBudgets {
    pub driver: TierBudget,
    pub theia: TierBudget,
    pub saturn: TierBudget,
}

/// One tier's budget. The token and engine fields apply to LLM tiers only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierBudget {
    pub slots: usize,
    /// Free slots lent only to zones under their weighted share (absent: a quarter of `slots`).
    #[serde(default)]
    pub reserved_slots: Option<usize>,
    pub queue: usize,
    pub queue_timeout_ms: u64,
    #[serde(default)]
    pub max_prompt_tokens: Option<usize>,
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
    /// Token bucket per zone: refill rate (0 = unlimited) and capacity.
    #[serde(default)]
    pub tokens_per_s: f64,
    #[serde(default)]
    pub burst_tokens: f64,
    #[serde(default)]
    pub batch_token_budget: Option<usize>,
    #[serde(default)]
    pub kv_memory_mib: Option<usize>,
    /// The engine's prefix KV cache, within `kv_memory_mib` (0 turns it off; absent: a quarter of it).
    #[serde(default)]
    pub prefix_cache_mib: Option<usize>,
    /// Sequences the engine holds with their KV at once (absent: `slots`); more than a step runs, so a
    /// step can pause a borrowed row for a zone under its share without losing its cache.
    #[serde(default)]
    pub resident: Option<usize>,
    /// Most sequences one engine step runs (absent: the tier's `max_batch` in tiers.toml, its ceiling).
    #[serde(default)]
    pub step_rows: Option<usize>,
    /// Wall time (ms) an engine step aims to stay within: rows and prefill tokens are sized from the
    /// measured cost of recent steps, so a request arriving mid-step waits at most about this long for the
    /// engine to take it in (absent or 0: no bound but `step_rows` and `batch_token_budget`).
    #[serde(default)]
    pub step_target_ms: Option<u64>,
    /// How a step chooses its rows among the resident sequences.
    #[serde(default)]
    pub schedule: Schedule,
}

/// How an engine step chooses its rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Weighted fair share of the tokens served, per zone (virtual token counters).
    #[default]
    Fair,
    /// The oldest resident sequences first (the engine before issue 13; kept for comparison).
    Fcfs,
}

impl TierBudget {
    /// Free slots kept for zones under their weighted share.
    pub fn reserved_slots(&self) -> usize {
        self.reserved_slots.unwrap_or(self.slots / 4)
    }

    /// MiB the prefix cache may hold.
    pub fn prefix_cache_mib(&self) -> usize {
        self.prefix_cache_mib
            .unwrap_or(self.kv_memory_mib.unwrap_or(1024) / 4)
    }
}

/// One tier's per-request budget for one zone class (tier values with the class's overrides applied).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestBudget {
    pub queue_timeout_ms: u64,
    pub max_prompt_tokens: Option<usize>,
    pub max_new_tokens: Option<usize>,
    pub tokens_per_s: f64,
    pub burst_tokens: f64,
}

impl BudgetsFile {
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let b: Self = toml::from_str(text).map_err(|e| ConfigError::parse(file, e))?;
        b.validate(file)?;
        Ok(b)
    }

    pub fn tier_budget(&self, tier: TierName) -> &TierBudget {
        match tier {
            TierName::Driver => &self.tiers.driver,
            TierName::Theia => &self.tiers.theia,
            TierName::Saturn => &self.tiers.saturn,
        }
    }

    /// The class a zone id belongs to: the longest matching prefix, else the default class.
    pub fn class_of(&self, zone: &str) -> &str {
        self.classes
            .iter()
            .flat_map(|(name, c)| c.prefixes.iter().map(move |p| (p, name)))
            .filter(|(p, _)| zone.starts_with(p.as_str()))
            .max_by_key(|(p, _)| p.len())
            .map_or(self.zones.default_class.as_str(), |(_, name)| name.as_str())
    }

    /// A class's weight (1.0 for a class that no longer exists).
    pub fn weight(&self, class: &str) -> f64 {
        self.classes.get(class).map_or(1.0, |c| c.weight)
    }

    /// `tier`'s per-request budget for zones of `class`.
    pub fn tier(&self, tier: TierName, class: &str) -> RequestBudget {
        let t = self.tier_budget(tier);
        let o = self
            .classes
            .get(class)
            .and_then(|c| match tier {
                TierName::Driver => c.driver.as_ref(),
                TierName::Theia => c.theia.as_ref(),
                TierName::Saturn => c.saturn.as_ref(),
            })
            .cloned()
            .unwrap_or_default();
        RequestBudget {
            queue_timeout_ms: o.queue_timeout_ms.unwrap_or(t.queue_timeout_ms),
            max_prompt_tokens: o.max_prompt_tokens.or(t.max_prompt_tokens),
            max_new_tokens: o.max_new_tokens.or(t.max_new_tokens),
            tokens_per_s: o.tokens_per_s.unwrap_or(t.tokens_per_s),
            burst_tokens: o.burst_tokens.unwrap_or(t.burst_tokens),
        }
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let bad = |key: String, rule: &str| Err(ConfigError::invalid(file, key, rule));
        if self.loras.memory_mib == 0 {
            return bad("loras.memory_mib".into(), "must be greater than 0");
        }
        for (key, v) in [
            ("dialogs.max_participants", self.dialogs.max_participants),
            ("dialogs.max_messages", self.dialogs.max_messages),
            ("dialogs.max_prompt_chars", self.dialogs.max_prompt_chars),
        ] {
            if v == 0 {
                return bad(key.into(), "must be greater than 0");
            }
        }
        for (t, a) in &self.traits {
            if a.is_empty() || a.contains('/') || a.contains("..") {
                return bad(
                    format!("traits.{t}"),
                    "must name an adapter folder (a plain name)",
                );
            }
        }
        if self.zones.idle_ttl_s == 0 {
            return bad("zones.idle_ttl_s".into(), "must be greater than 0");
        }
        if !self.classes.contains_key(&self.zones.default_class) {
            return bad(
                "zones.default_class".into(),
                "must name a class under [classes]",
            );
        }
        for (name, c) in &self.classes {
            if !(c.weight.is_finite() && c.weight > 0.0) {
                return bad(
                    format!("classes.{name}.weight"),
                    "must be a positive number",
                );
            }
            if c.prefixes.iter().any(String::is_empty) {
                return bad(
                    format!("classes.{name}.prefixes"),
                    "a prefix must not be empty",
                );
            }
            for (tier, o) in [
                ("driver", &c.driver),
                ("theia", &c.theia),
                ("saturn", &c.saturn),
            ] {
                if let Some(o) = o {
                    check_rate(
                        file,
                        &format!("classes.{name}.{tier}"),
                        o.tokens_per_s,
                        o.burst_tokens,
                    )?;
                    if tier == "saturn"
                        && (o.max_prompt_tokens.is_some()
                            || o.max_new_tokens.is_some()
                            || o.tokens_per_s.is_some()
                            || o.burst_tokens.is_some())
                    {
                        return bad(
                            format!("classes.{name}.saturn"),
                            "saturn takes only queue_timeout_ms (token budgets apply to LLM tiers)",
                        );
                    }
                    for (k, v) in [
                        ("max_prompt_tokens", o.max_prompt_tokens),
                        ("max_new_tokens", o.max_new_tokens),
                    ] {
                        if v == Some(0) {
                            return bad(
                                format!("classes.{name}.{tier}.{k}"),
                                "must be greater than 0",
                            );
                        }
                    }
                }
            }
        }
        for (k, t) in [("deep", self.routing.deep), ("moment", self.routing.moment)] {
            if t == TierName::Saturn {
                return bad(
                    format!("routing.{k}"),
                    "must be an LLM tier (driver or theia)",
                );
            }
        }
        if self.routing.dialog == TierName::Saturn {
            return bad(
                "routing.dialog".into(),
                "must be an LLM tier (driver or theia)",
            );
        }
        for tier in TierName::ALL {
            let t = self.tier_budget(tier);
            let key = |k: &str| format!("tiers.{}.{k}", tier.as_str());
            for (k, v) in [("slots", t.slots), ("queue", t.queue)] {
                if v == 0 {
                    return bad(key(k), "must be greater than 0");
                }
            }
            if t.queue_timeout_ms == 0 {
                return bad(key("queue_timeout_ms"), "must be greater than 0");
            }
            if t.reserved_slots() >= t.slots {
                return bad(key("reserved_slots"), "must be below `slots`");
            }
            check_rate(
                file,
                &format!("tiers.{}", tier.as_str()),
                Some(t.tokens_per_s),
                Some(t.burst_tokens),
            )?;
            if tier == TierName::Saturn {
                if t.max_prompt_tokens.is_some()
                    || t.max_new_tokens.is_some()
                    || t.tokens_per_s != 0.0
                    || t.batch_token_budget.is_some()
                    || t.kv_memory_mib.is_some()
                    || t.prefix_cache_mib.is_some()
                    || t.resident.is_some()
                    || t.step_rows.is_some()
                    || t.step_target_ms.is_some()
                    || t.schedule != Schedule::Fair
                {
                    return bad(
                        "tiers.saturn".into(),
                        "saturn takes only slots, queue and queue_timeout_ms",
                    );
                }
                continue;
            }
            for k in [
                "max_prompt_tokens",
                "max_new_tokens",
                "batch_token_budget",
                "kv_memory_mib",
            ] {
                let v = match k {
                    "max_prompt_tokens" => t.max_prompt_tokens,
                    "max_new_tokens" => t.max_new_tokens,
                    "batch_token_budget" => t.batch_token_budget,
                    _ => t.kv_memory_mib,
                };
                match v {
                    None => return bad(key(k), "is required for an LLM tier"),
                    Some(0) => return bad(key(k), "must be greater than 0"),
                    Some(_) => {}
                }
            }
            if t.prefix_cache_mib() > t.kv_memory_mib.unwrap_or(0) {
                return bad(
                    key("prefix_cache_mib"),
                    "must be at most kv_memory_mib (the prefix cache is part of the KV memory)",
                );
            }
            for (k, v) in [("resident", t.resident), ("step_rows", t.step_rows)] {
                if v == Some(0) {
                    return bad(key(k), "must be greater than 0");
                }
            }
            if t.step_rows.is_some() && t.batch_token_budget < t.step_rows {
                return bad(
                    key("batch_token_budget"),
                    "must be at least `step_rows` so every row of a step can decode",
                );
            }
        }
        Ok(())
    }
}

fn check_rate(
    file: &str,
    at: &str,
    rate: Option<f64>,
    burst: Option<f64>,
) -> Result<(), ConfigError> {
    for (k, v) in [("tokens_per_s", rate), ("burst_tokens", burst)] {
        if let Some(v) = v
            && !(v.is_finite() && v >= 0.0)
        {
            return Err(ConfigError::invalid(
                file,
                format!("{at}.{k}"),
                "must be a number >= 0",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(edit: impl Fn(&str) -> String) -> Result<BudgetsFile, ConfigError> {
        BudgetsFile::parse("budgets.toml", &edit(crate::DEFAULT_BUDGETS_TOML))
    }

    fn key(e: ConfigError) -> String {
        match e {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("expected Invalid, got {other}"),
        }
    }

    #[test]
    fn classes_by_longest_prefix_else_default() {
        let b = with(|s| s.to_string()).unwrap();
        assert_eq!(b.class_of("plaza-7"), "plaza");
        assert_eq!(b.class_of("landmark-tower"), "landmark");
        assert_eq!(b.class_of("alley-3"), "street");
        assert_eq!(b.weight("plaza"), 2.0);
    }

    #[test]
    fn class_overrides_apply_to_their_tier_only() {
        let b = with(|s| s.to_string()).unwrap();
        assert_eq!(
            b.tier(TierName::Theia, "landmark").max_new_tokens,
            Some(1024)
        );
        assert_eq!(b.tier(TierName::Theia, "street").max_new_tokens, Some(512));
        assert_eq!(
            b.tier(TierName::Driver, "landmark").max_new_tokens,
            Some(512)
        );
    }

    #[test]
    fn invalid_values_name_their_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("slots = 128", "slots = 0", "tiers.driver.slots"),
            ("weight = 2.0", "weight = -1.0", "classes.plaza.weight"),
            (
                "default_class = \"street\"",
                "default_class = \"nope\"",
                "zones.default_class",
            ),
            ("deep = \"theia\"", "deep = \"saturn\"", "routing.deep"),
            (
                "batch_token_budget = 256",
                "batch_token_budget = 8",
                "tiers.driver.batch_token_budget",
            ),
            ("step_rows = 32", "step_rows = 0", "tiers.driver.step_rows"),
            (
                "reserved_slots = 32",
                "reserved_slots = 128",
                "tiers.driver.reserved_slots",
            ),
            ("resident = 128", "resident = 0", "tiers.driver.resident"),
            (
                "max_messages = 256",
                "max_messages = 0",
                "dialogs.max_messages",
            ),
            (
                "max_prompt_chars = 65536",
                "max_prompt_chars = 0",
                "dialogs.max_prompt_chars",
            ),
            (
                "max_new_tokens = 1024",
                "max_new_tokens = 0",
                "classes.landmark.theia.max_new_tokens",
            ),
        ];
        for (from, to, want) in cases {
            let e = with(|s| s.replacen(from, to, 1)).unwrap_err();
            assert_eq!(key(e), *want, "{from} -> {to}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_types_are_parse_errors_naming_the_file() {
        let e = with(|s| s.replacen("slots = 128", "slots = \"many\"", 1)).unwrap_err();
        assert!(e.to_string().starts_with("budgets.toml:"), "{e}");
        let e = with(|s| s.replacen("[tiers.driver]", "[tiers.driver]\nbogus = 1", 1)).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }
}

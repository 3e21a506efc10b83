//! The TOML files ops edit, parsed and validated.
//!
//! `Config::load(dir)` reads `tiers.toml` (models, tiers and their engines), `classifiers.toml` (Saturn's
//! classifiers) and `budgets.toml` (zone classes, routing, per-tier budgets: what `nimmer serve` hot-reloads)
//! from one directory, rejects unknown keys, then checks fields against each other and across files. Every
//! error names the file, the key and the rule. The repository's `config/` folder holds the defaults; they are
//! also embedded in the binary ([`Config::embedded`]) so `nimmer` runs with no files at all.

mod budgets;
mod catalog;
mod classifiers;
mod error;
mod events;
mod gm;
pub mod template;
mod tiers;
mod transport;

pub use budgets::{
    BudgetsFile, ClassOverride, DialogLimits, LorasSpec, RequestBudget, Routing, Schedule,
    TierBudget, TierBudgets, TierName, UnknownTrait, ZoneClass, ZonesSpec,
};
pub use catalog::EventCatalog;
pub use classifiers::{ClassifierSpec, ClassifiersFile, LabelSpec};
pub use error::ConfigError;
pub use events::{
    BUILTIN_VALUES, Branch, DEFAULT_EVENTS, EventTemplate, EventTier, Gate, Raise, SceneTemplate,
    SlotTemplate, SlotWork,
};
pub use gm::{DEFAULT_GM_TOML, GmFile, LeaseSpec, ShardRoute, ShardsSpec};
pub use tiers::{
    Backend, Device, FileSpec, LlmTierSpec, ModelFormat, ModelSpec, Precision, SaturnTierSpec,
    TiersFile, Via, WheelSource,
};
pub use transport::{
    CanonSpec, DEFAULT_TRANSPORT_TOML, DeliveryMode, DeliverySpec, FactionsSpec, FeedSpec,
    PlayersSpec, PostgresSpec, PruneRule, RelaySpec, ReplicasSpec, ResultsSpec, TransportFile,
    valid_subject, valid_token,
};

use std::path::Path;

/// Default `tiers.toml`, compiled into the binary.
pub const DEFAULT_TIERS_TOML: &str = include_str!("../tiers.toml");
/// Default `classifiers.toml`, compiled into the binary.
pub const DEFAULT_CLASSIFIERS_TOML: &str = include_str!("../classifiers.toml");
/// Default `budgets.toml`, compiled into the binary.
pub const DEFAULT_BUDGETS_TOML: &str = include_str!("../budgets.toml");

/// The three files' texts, as read (or embedded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    pub tiers: String,
    pub classifiers: String,
    pub budgets: String,
}

impl Sources {
    pub fn embedded() -> Self {
        Self {
            tiers: DEFAULT_TIERS_TOML.into(),
            classifiers: DEFAULT_CLASSIFIERS_TOML.into(),
            budgets: DEFAULT_BUDGETS_TOML.into(),
        }
    }

    /// Reads the three files from `dir`.
    pub fn read(dir: &Path) -> Result<Self, ConfigError> {
        let read = |name: &str| -> Result<String, ConfigError> {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
                file: path.display().to_string(),
                source,
            })
        };
        Ok(Self {
            tiers: read("tiers.toml")?,
            classifiers: read("classifiers.toml")?,
            budgets: read("budgets.toml")?,
        })
    }
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from (a directory, or `<embedded>`), for messages.
    pub origin: String,
    pub tiers: TiersFile,
    pub classifiers: ClassifiersFile,
    pub budgets: BudgetsFile,
    /// The texts it was parsed from.
    pub sources: Sources,
}

impl Config {
    /// Loads and validates the three files from `dir`.
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        Self::parse(Sources::read(dir)?, &dir.display().to_string())
    }

    /// The defaults compiled into the binary.
    pub fn embedded() -> Self {
        Self::parse(Sources::embedded(), "<embedded>")
            .expect("embedded config is validated by its own unit test")
    }

    /// Parses and validates the three texts; errors name the files as `{origin}/tiers.toml` and so on.
    pub fn parse(sources: Sources, origin: &str) -> Result<Self, ConfigError> {
        let file = |name: &str| format!("{}/{name}", origin.trim_end_matches('/'));
        let tiers = TiersFile::parse(&file("tiers.toml"), &sources.tiers)?;
        let classifiers = ClassifiersFile::parse(&file("classifiers.toml"), &sources.classifiers)?;
        let budgets = BudgetsFile::parse(&file("budgets.toml"), &sources.budgets)?;
        check_budgets_fit(&file("budgets.toml"), &budgets, &tiers)?;
        Ok(Self {
            origin: origin.to_string(),
            tiers,
            classifiers,
            budgets,
            sources,
        })
    }

    /// This configuration with `budgets.toml` replaced by `text` (what a hot reload applies). The other files
    /// keep their parsed values; the budgets must still fit the tiers.
    pub fn with_budgets(&self, text: &str) -> Result<Self, ConfigError> {
        let file = format!("{}/budgets.toml", self.origin.trim_end_matches('/'));
        let budgets = BudgetsFile::parse(&file, text)?;
        check_budgets_fit(&file, &budgets, &self.tiers)?;
        let mut next = self.clone();
        next.budgets = budgets;
        next.sources.budgets = text.to_string();
        Ok(next)
    }

    /// The model a tier runs.
    pub fn model(&self, name: &str) -> Option<&ModelSpec> {
        self.tiers.models.get(name)
    }
}

/// Budgets that only make sense against the tiers: a step's rows within the engine's batch capacity, token
/// limits within the context.
fn check_budgets_fit(file: &str, b: &BudgetsFile, t: &TiersFile) -> Result<(), ConfigError> {
    let llm = [
        (
            TierName::Driver,
            t.tiers.driver.max_batch,
            Some(t.tiers.driver.context),
        ),
        (
            TierName::Theia,
            t.tiers.theia.max_batch,
            Some(t.tiers.theia.context),
        ),
        (TierName::Saturn, t.tiers.saturn.max_batch, None),
    ];
    for (tier, max_batch, context) in llm {
        let tb = b.tier_budget(tier);
        let name = tier.as_str();
        if tier != TierName::Saturn {
            let rows = tb.step_rows.unwrap_or(max_batch);
            if rows > max_batch {
                return Err(ConfigError::invalid(
                    file,
                    format!("tiers.{name}.step_rows"),
                    format!("must not exceed the tier's max_batch ({max_batch}) in tiers.toml"),
                ));
            }
            if tb.batch_token_budget.is_some_and(|b| b < rows) {
                return Err(ConfigError::invalid(
                    file,
                    format!("tiers.{name}.batch_token_budget"),
                    format!("must be at least the step's rows ({rows}) so every row can decode"),
                ));
            }
        }
        if let Some(ctx) = context {
            let mut limits = vec![(
                format!("tiers.{name}"),
                tb.max_prompt_tokens,
                tb.max_new_tokens,
            )];
            for (cname, c) in &b.classes {
                let o = match tier {
                    TierName::Driver => c.driver.as_ref(),
                    _ => c.theia.as_ref(),
                };
                if let Some(o) = o {
                    limits.push((
                        format!("classes.{cname}.{name}"),
                        o.max_prompt_tokens,
                        o.max_new_tokens,
                    ));
                }
            }
            for (at, prompt, new) in limits {
                for (k, v) in [("max_prompt_tokens", prompt), ("max_new_tokens", new)] {
                    if let Some(v) = v
                        && v >= ctx
                    {
                        return Err(ConfigError::invalid(
                            file,
                            format!("{at}.{k}"),
                            format!("must be below the tier's context ({ctx}) in tiers.toml"),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_load_and_validate() {
        let c = Config::embedded();
        assert!(c.model(&c.tiers.tiers.driver.model).is_some());
        assert!(c.model(&c.tiers.tiers.theia.model).is_some());
        assert!(c.model(&c.tiers.tiers.saturn.model).is_some());
        for name in [
            "voice-selection",
            "trait-salience",
            "audit-overseer",
            "ternary-gate",
        ] {
            assert!(c.classifiers.classifiers.contains_key(name), "{name}");
        }
    }

    #[test]
    fn step_rows_beyond_max_batch_are_rejected_naming_budgets_toml() {
        let mut s = Sources::embedded();
        s.budgets = s.budgets.replacen("step_rows = 32", "step_rows = 64", 1);
        let e = Config::parse(s, "cfg").unwrap_err().to_string();
        assert!(
            e.starts_with("cfg/budgets.toml: `tiers.driver.step_rows`"),
            "{e}"
        );
    }

    #[test]
    fn slots_may_exceed_max_batch_as_admission() {
        let mut s = Sources::embedded();
        s.budgets = s.budgets.replacen("slots = 128", "slots = 512", 1);
        assert_eq!(
            Config::parse(s, "cfg").unwrap().budgets.tiers.driver.slots,
            512
        );
    }

    #[test]
    fn with_budgets_keeps_the_old_config_on_error() {
        let c = Config::embedded();
        let bad = c.sources.budgets.replacen("queue = 256", "queue = -1", 1);
        assert!(c.with_budgets(&bad).is_err());
        let good = c.sources.budgets.replacen("queue = 256", "queue = 8", 1);
        assert_eq!(c.with_budgets(&good).unwrap().budgets.tiers.driver.queue, 8);
    }

    #[test]
    fn repository_config_dir_matches_embedded() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let c = Config::load(dir).unwrap();
        assert_eq!(c.sources, Sources::embedded());
    }
}

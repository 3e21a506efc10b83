//! `gm.toml`: the shard map (which GM shard opens and directs an event, by its district, theme, tier and
//! faction), the directors' leases and their limits.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::events::{EventTemplate, EventTier};
use crate::{ConfigError, valid_token};

/// Default `gm.toml`, compiled into the binary.
pub const DEFAULT_GM_TOML: &str = include_str!("../gm.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GmFile {
    pub lease: LeaseSpec,
    pub directors: DirectorsSpec,
    pub shards: ShardsSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseSpec {
    pub ttl_ms: u64,
    pub renew_ms: u64,
    pub takeover_ms: u64,
    pub takeover_batch: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectorsSpec {
    pub max_per_process: usize,
    pub request_timeout_s: u64,
    pub retry_ms: u64,
    pub retry_max_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardsSpec {
    pub default: String,
    #[serde(default)]
    pub route: Vec<ShardRoute>,
}

/// One route of the shard map: every key it gives must match.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardRoute {
    #[serde(default)]
    pub district: Option<String>,
    #[serde(default)]
    pub theme: Option<String>,
    #[serde(default)]
    pub tier: Option<EventTier>,
    #[serde(default)]
    pub faction: Option<String>,
    pub shard: String,
}

impl ShardRoute {
    fn matches(&self, t: &EventTemplate, district: &str) -> bool {
        self.district.as_deref().is_none_or(|d| d == district)
            && self.theme.as_deref().is_none_or(|x| x == t.theme)
            && self.tier.is_none_or(|x| x == t.tier)
            && self
                .faction
                .as_deref()
                .is_none_or(|f| t.faction.as_deref() == Some(f))
    }
}

impl GmFile {
    /// Reads `gm.toml` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("gm.toml");
        let file = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
            file: file.clone(),
            source,
        })?;
        Self::parse(&file, &text)
    }

    /// The defaults compiled into the binary.
    pub fn embedded() -> Self {
        Self::parse("<embedded>/gm.toml", DEFAULT_GM_TOML)
            .expect("embedded gm.toml is validated by its own unit test")
    }

    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let g: Self = toml::from_str(text).map_err(|e| ConfigError::parse(file, e))?;
        let bad = |key: String, rule: &str| Err(ConfigError::invalid(file, key, rule));
        let l = &g.lease;
        if l.renew_ms == 0 || l.takeover_ms == 0 || l.takeover_batch == 0 {
            return bad(
                "lease".into(),
                "renew_ms, takeover_ms and takeover_batch must be at least 1",
            );
        }
        if l.ttl_ms < 2 * l.renew_ms {
            return bad(
                "lease.ttl_ms".into(),
                "must be at least twice renew_ms (one late renewal must not lose every lease)",
            );
        }
        let d = &g.directors;
        if d.max_per_process == 0 || d.request_timeout_s == 0 || d.retry_ms == 0 {
            return bad(
                "directors".into(),
                "max_per_process, request_timeout_s and retry_ms must be at least 1",
            );
        }
        if d.retry_max_ms < d.retry_ms {
            return bad("directors.retry_max_ms".into(), "must be at least retry_ms");
        }
        if !valid_token(&g.shards.default) {
            return bad(
                "shards.default".into(),
                "must be a subject token (letters, digits, `-`, `_`)",
            );
        }
        for (i, r) in g.shards.route.iter().enumerate() {
            if !valid_token(&r.shard) {
                return bad(
                    format!("shards.route[{i}].shard"),
                    "must be a subject token (letters, digits, `-`, `_`)",
                );
            }
            if r.district.is_none() && r.theme.is_none() && r.tier.is_none() && r.faction.is_none()
            {
                return bad(
                    format!("shards.route[{i}]"),
                    "needs at least one of district, theme, tier, faction (the default is `shards.default`)",
                );
            }
        }
        Ok(g)
    }

    /// The shard of an event of template `t` happening in `district`: the first route that matches, else
    /// the default.
    pub fn route(&self, t: &EventTemplate, district: &str) -> &str {
        self.shards
            .route
            .iter()
            .find(|r| r.matches(t, district))
            .map_or(self.shards.default.as_str(), |r| r.shard.as_str())
    }

    /// Every shard the map names.
    pub fn shard_names(&self) -> BTreeSet<&str> {
        self.shards
            .route
            .iter()
            .map(|r| r.shard.as_str())
            .chain([self.shards.default.as_str()])
            .collect()
    }

    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.lease.ttl_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, EventCatalog};

    #[test]
    fn the_embedded_map_routes_the_shipped_events() {
        let g = GmFile::embedded();
        let cat = EventCatalog::embedded(&Config::embedded()).unwrap();
        let shard = |name: &str, district: Option<&str>| {
            let t = &cat.events[name];
            g.route(t, district.unwrap_or(&t.district)).to_string()
        };
        assert_eq!(shard("harbour-arrival", None), "docks");
        // The docks route comes before the guild's: a rumour in the docks is the docks shard's.
        assert_eq!(shard("faction-rumour", None), "docks");
        assert_eq!(shard("guild-inquiry", None), "guild");
        assert_eq!(shard("market-quarrel", None), "market");
        // Geography first: the same template elsewhere goes where that district goes.
        assert_eq!(shard("market-quarrel", Some("docks")), "docks");
        assert_eq!(shard("landmark-moment", None), "city");
        assert_eq!(
            g.shard_names(),
            ["city", "docks", "guild", "market"].into_iter().collect()
        );
    }

    #[test]
    fn bad_maps_name_the_key() {
        let cases = [
            (
                "shard = \"docks\"",
                "shard = \"do.cks\"",
                "shards.route[0].shard",
            ),
            ("default = \"city\"", "default = \"\"", "shards.default"),
            ("ttl_ms = 3000", "ttl_ms = 1500", "lease.ttl_ms"),
            (
                "retry_max_ms = 5000",
                "retry_max_ms = 10",
                "directors.retry_max_ms",
            ),
            ("district = \"docks\"\n", "", "shards.route[0]"),
        ];
        for (from, to, key) in cases {
            let text = DEFAULT_GM_TOML.replacen(from, to, 1);
            let e = GmFile::parse("gm.toml", &text).unwrap_err().to_string();
            assert!(e.contains(key), "{from} -> {to}: {e}");
        }
        let e = GmFile::parse("gm.toml", &DEFAULT_GM_TOML.replace("[shards]", "[shard]"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("gm.toml: "), "{e}");
    }
}

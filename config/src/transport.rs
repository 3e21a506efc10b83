//! `transport.toml`: where canon lives (PostgreSQL), how compositors consume results, the `CANON` stream and its
//! subject template, and the relay's pacing. Read by `nimmer compositor` at start.

use std::path::Path;

use serde::Deserialize;

use crate::error::ConfigError;

/// Default `transport.toml`, compiled into the binary.
pub const DEFAULT_TRANSPORT_TOML: &str = include_str!("../transport.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportFile {
    pub postgres: PostgresSpec,
    pub results: ResultsSpec,
    pub canon: CanonSpec,
    pub players: PlayersSpec,
    pub factions: FactionsSpec,
    pub delivery: DeliverySpec,
    pub relay: RelaySpec,
    #[serde(default)]
    pub replicas: ReplicasSpec,
    #[serde(default)]
    pub feeds: Vec<FeedSpec>,
}

/// How many copies a JetStream cluster keeps of each stream (`[replicas]`): 1 on a single server, 3 on a
/// 3-node cluster so that a stream survives the loss of any one node (its leader included). JetStream allows
/// 1 to 5, and at most the number of servers in the cluster. Applied when the streams are created or updated
/// (gateway and compositor start, `nimmer feeds apply`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicasSpec {
    pub results: usize,
    pub canon: usize,
    pub players: usize,
    pub factions: usize,
    /// Every `[[feeds]]` stream.
    pub feeds: usize,
    /// The dead-letter stream.
    pub dead_letter: usize,
}

impl Default for ReplicasSpec {
    fn default() -> Self {
        Self {
            results: 1,
            canon: 1,
            players: 1,
            factions: 1,
            feeds: 1,
            dead_letter: 1,
        }
    }
}

impl ReplicasSpec {
    /// Every stream at `n` replicas.
    pub fn all(n: usize) -> Self {
        Self {
            results: n,
            canon: n,
            players: n,
            factions: n,
            feeds: n,
            dead_letter: n,
        }
    }
}

/// How canon reaches players.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// Players replay their JetStream subject from their checkpoint.
    Jetstream,
    /// District distributors push from PostgreSQL (the fallback).
    District,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySpec {
    pub mode: DeliveryMode,
    pub push_subject: String,
    pub presence_subject: String,
    pub sweep_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FactionsSpec {
    pub stream: String,
    pub subject: String,
    pub max_age_h: u64,
}

/// A derived feed: a stream sourced from `CANON` (one district) or `FACTIONS` (one faction).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FeedSpec {
    pub name: String,
    #[serde(default)]
    pub district: Option<String>,
    #[serde(default)]
    pub faction: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSpec {
    pub url: String,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultsSpec {
    pub stream: String,
    pub consumer: String,
    pub batch: usize,
    pub ack_wait_s: u64,
    pub dead_letter: String,
    /// How long a gateway's answer waits for JetStream to acknowledge its result before the result is synced
    /// to the gateway's spool instead (the answer goes out once either holds it).
    #[serde(default = "default_durable_wait_ms")]
    pub durable_wait_ms: u64,
    /// Attempts a result gets when composing it fails for a reason that is not the database being away; then
    /// it is dead-lettered with that reason.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u64,
}

fn default_durable_wait_ms() -> u64 {
    500
}

fn default_max_attempts() -> u64 {
    5
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanonSpec {
    pub stream: String,
    pub subject: String,
    pub duplicate_window_s: u64,
    pub max_age_h: u64,
    pub max_msgs_per_subject: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlayersSpec {
    pub stream: String,
    pub subject: String,
    pub max_age_h: u64,
    pub duplicate_window_s: u64,
    pub max_consumers: i32,
    /// Where a player client asks the compositors for canon its feed no longer holds (a gap: its checkpoint
    /// fell behind the stream's first message, or the stream was recreated). `{player}` is the player id.
    #[serde(default = "default_resync_subject")]
    pub resync_subject: String,
    #[serde(default)]
    pub prune: Vec<PruneRule>,
}

fn default_resync_subject() -> String {
    "nimmerverse.player.{player}.resync".into()
}

/// Player store pruning: rows of `kind` ("*": any kind without its own rule) older than `max_age_h`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PruneRule {
    pub kind: String,
    pub max_age_h: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySpec {
    pub batch: usize,
    pub poll_ms: u64,
    /// A relay whose PostgreSQL does not answer within this gives up its leadership (drops its connection,
    /// so the advisory lock is released once the server notices) instead of holding it while stalled.
    #[serde(default = "default_db_timeout_ms")]
    pub db_timeout_ms: u64,
}

fn default_db_timeout_ms() -> u64 {
    5000
}

const PLACEHOLDERS: [&str; 3] = ["{gm_event}", "{district}", "{scene}"];

impl TransportFile {
    /// Reads `transport.toml` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("transport.toml");
        let file = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
            file: file.clone(),
            source,
        })?;
        Self::parse(&file, &text)
    }

    /// The defaults compiled into the binary.
    pub fn embedded() -> Self {
        Self::parse("<embedded>/transport.toml", DEFAULT_TRANSPORT_TOML)
            .expect("embedded transport.toml is validated by its own unit test")
    }

    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let t: Self = toml::from_str(text).map_err(|e| ConfigError::parse(file, e))?;
        let bad = |key: &str, rule: &str| Err(ConfigError::invalid(file, key, rule));
        if t.postgres.max_connections == 0 {
            return bad("postgres.max_connections", "must be at least 1");
        }
        for (key, v) in [
            ("results.stream", &t.results.stream),
            ("results.consumer", &t.results.consumer),
            ("canon.stream", &t.canon.stream),
            ("players.stream", &t.players.stream),
            ("factions.stream", &t.factions.stream),
        ]
        .into_iter()
        .chain(t.feeds.iter().map(|f| ("feeds.name", &f.name)))
        {
            if v.is_empty()
                || !v
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
            {
                return bad(
                    key,
                    "must be a non-empty name of letters, digits, `_` or `-`",
                );
            }
        }
        if t.results.batch == 0 || t.relay.batch == 0 {
            return bad("results.batch / relay.batch", "must be at least 1");
        }
        if t.results.ack_wait_s == 0 {
            return bad("results.ack_wait_s", "must be at least 1");
        }
        if t.relay.db_timeout_ms == 0 {
            return bad("relay.db_timeout_ms", "must be at least 1");
        }
        if t.results.durable_wait_ms == 0 {
            return bad("results.durable_wait_ms", "must be at least 1");
        }
        if t.results.max_attempts == 0 {
            return bad("results.max_attempts", "must be at least 1");
        }
        if !valid_subject(&t.results.dead_letter) {
            return bad(
                "results.dead_letter",
                "must be a NATS subject without wildcards",
            );
        }
        let sample = t.canon_subject("e", "d", "s");
        if PLACEHOLDERS.iter().any(|p| !t.canon.subject.contains(p)) || !valid_subject(&sample) {
            return bad(
                "canon.subject",
                "must be a NATS subject without wildcards using {gm_event}, {district} and {scene}",
            );
        }
        if t.canon.duplicate_window_s == 0 || t.canon.max_age_h == 0 {
            return bad(
                "canon.duplicate_window_s / canon.max_age_h",
                "must be at least 1",
            );
        }
        if t.canon.duplicate_window_s > t.canon.max_age_h * 3600 {
            return bad(
                "canon.duplicate_window_s",
                "must not exceed max_age_h (JetStream rule)",
            );
        }
        if !t.players.subject.contains("{player}") || !valid_subject(&t.player_subject("p")) {
            return bad(
                "players.subject",
                "must be a NATS subject without wildcards using {player}",
            );
        }
        if t.players.duplicate_window_s == 0
            || t.players.duplicate_window_s > t.players.max_age_h * 3600
        {
            return bad(
                "players.duplicate_window_s",
                "must be at least 1 and not exceed max_age_h",
            );
        }
        let mut kinds = std::collections::BTreeSet::new();
        for r in &t.players.prune {
            if !["dialog", "deep", "moment", "classify", "*"].contains(&r.kind.as_str())
                || !kinds.insert(r.kind.as_str())
                || r.max_age_h == 0
            {
                return Err(ConfigError::invalid(
                    file,
                    format!("players.prune.{}", r.kind),
                    "kind must be dialog, deep, moment, classify or \"*\", once each, with max_age_h at least 1",
                ));
            }
        }
        if t.players.max_consumers < 1 {
            return bad("players.max_consumers", "must be at least 1");
        }
        if !t.factions.subject.contains("{faction}")
            || !valid_subject(&t.faction_subject("f"))
            || t.factions.max_age_h == 0
        {
            return bad(
                "factions.subject",
                "must be a NATS subject without wildcards using {faction} (and max_age_h at least 1)",
            );
        }
        for (key, v) in [
            ("delivery.push_subject", &t.delivery.push_subject),
            ("delivery.presence_subject", &t.delivery.presence_subject),
            ("players.resync_subject", &t.players.resync_subject),
        ] {
            if !v.contains("{player}") || !valid_subject(&v.replace("{player}", "p")) {
                return bad(
                    key,
                    "must be a NATS subject without wildcards using {player}",
                );
            }
        }
        if t.players.resync_subject == t.players.subject {
            return bad(
                "players.resync_subject",
                "must differ from players.subject (PLAYERS would store the requests)",
            );
        }
        if t.delivery.sweep_s == 0 {
            return bad("delivery.sweep_s", "must be at least 1");
        }
        let mut names = std::collections::BTreeSet::new();
        for s in [
            &t.results.stream,
            &t.canon.stream,
            &t.players.stream,
            &t.factions.stream,
        ] {
            if !names.insert(s.as_str()) {
                return bad(
                    "stream names",
                    "results, canon, players and factions streams must differ",
                );
            }
        }
        for f in &t.feeds {
            if !names.insert(f.name.as_str()) {
                return Err(ConfigError::invalid(
                    file,
                    format!("feeds.{}", f.name),
                    "the name is used by another stream or feed",
                ));
            }
            match (&f.district, &f.faction) {
                (Some(v), None) | (None, Some(v)) if valid_token(v) => {}
                _ => {
                    return Err(ConfigError::invalid(
                        file,
                        format!("feeds.{}", f.name),
                        "needs exactly one of `district` or `faction`, a subject token (no `.`, `*`, `>`, spaces)",
                    ));
                }
            }
        }
        if t.relay.poll_ms == 0 {
            return bad("relay.poll_ms", "must be at least 1");
        }
        let r = t.replicas;
        for (key, n) in [
            ("replicas.results", r.results),
            ("replicas.canon", r.canon),
            ("replicas.players", r.players),
            ("replicas.factions", r.factions),
            ("replicas.feeds", r.feeds),
            ("replicas.dead_letter", r.dead_letter),
        ] {
            if !(1..=5).contains(&n) {
                return bad(
                    key,
                    "must be 1 to 5 (JetStream's limit; at most the cluster's servers)",
                );
            }
        }
        Ok(t)
    }

    /// The `CANON` subject of a scene.
    pub fn canon_subject(&self, gm_event: &str, district: &str, scene: &str) -> String {
        self.canon
            .subject
            .replace("{gm_event}", gm_event)
            .replace("{district}", district)
            .replace("{scene}", scene)
    }

    /// The delivery subject of a player.
    pub fn player_subject(&self, player: &str) -> String {
        self.players.subject.replace("{player}", player)
    }

    /// The subject a faction's copy of a canon row goes to.
    pub fn faction_subject(&self, faction: &str) -> String {
        self.factions.subject.replace("{faction}", faction)
    }

    /// The subjects `FACTIONS` stores.
    pub fn factions_filter(&self) -> String {
        self.factions.subject.replace("{faction}", "*")
    }

    /// Where a district distributor pushes a player's canon (fallback mode).
    pub fn push_subject(&self, player: &str) -> String {
        self.delivery.push_subject.replace("{player}", player)
    }

    /// Where a player announces it is online (fallback mode).
    pub fn presence_subject(&self, player: &str) -> String {
        self.delivery.presence_subject.replace("{player}", player)
    }

    /// Where `player` asks for canon its feed no longer holds.
    pub fn resync_subject(&self, player: &str) -> String {
        self.players.resync_subject.replace("{player}", player)
    }

    /// Every player's resync subject (what the compositors serve).
    pub fn resync_filter(&self) -> String {
        self.resync_subject("*")
    }

    /// The subjects `PLAYERS` stores.
    pub fn players_filter(&self) -> String {
        self.players.subject.replace("{player}", "*")
    }

    /// The subjects `CANON` stores: the template with each placeholder as `*`.
    pub fn canon_filter(&self) -> String {
        PLACEHOLDERS
            .iter()
            .fold(self.canon.subject.clone(), |s, p| s.replace(p, "*"))
    }
}

/// A subject a message may be published on: dot-separated non-empty tokens, no wildcards or whitespace.
pub fn valid_subject(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|t| !t.is_empty() && t != "*" && t != ">" && !t.chars().any(|c| c.is_whitespace()))
}

/// Whether `s` may be one token of a subject: the one rule, [`nimmer_wire::check_token`].
pub use nimmer_wire::valid_token;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let t = TransportFile::embedded();
        assert_eq!(
            t.canon_subject("e1", "docks", "s9"),
            "nimmerverse.events.e1.district.docks.scene.s9"
        );
        assert_eq!(t.canon_filter(), "nimmerverse.events.*.district.*.scene.*");
    }

    #[test]
    fn feeds_need_one_valid_selector_and_a_unique_name() {
        for (feed, key) in [
            ("name = \"F1\"\n", "feeds.F1"),
            ("name = \"F1\"\ndistrict = \"a.b\"\n", "feeds.F1"),
            (
                "name = \"F1\"\ndistrict = \"a\"\nfaction = \"b\"\n",
                "feeds.F1",
            ),
            ("name = \"CANON\"\ndistrict = \"a\"\n", "feeds.CANON"),
            (
                "name = \"DISTRICT_DOCKS\"\nfaction = \"a\"\n",
                "feeds.DISTRICT_DOCKS",
            ),
        ] {
            let text = format!("{DEFAULT_TRANSPORT_TOML}\n[[feeds]]\n{feed}");
            match TransportFile::parse("t.toml", &text) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{feed}"),
                other => panic!("{feed}: {other:?}"),
            }
        }
        let t = TransportFile::embedded();
        assert_eq!(t.feeds.len(), 2);
        assert_eq!(
            t.faction_subject("dockers"),
            "nimmerverse.faction.dockers.canon"
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        for (from, to, key) in [
            ("batch = 128", "batch = 0", "results.batch / relay.batch"),
            (
                "durable_wait_ms = 500",
                "durable_wait_ms = 0",
                "results.durable_wait_ms",
            ),
            (
                "max_attempts = 5",
                "max_attempts = 0",
                "results.max_attempts",
            ),
            (
                "db_timeout_ms = 5000",
                "db_timeout_ms = 0",
                "relay.db_timeout_ms",
            ),
            ("scene.{scene}\"", "scene\"", "canon.subject"),
            (
                "resync_subject = \"nimmerverse.player.{player}.resync\"",
                "resync_subject = \"nimmerverse.player.{player}.canon\"",
                "players.resync_subject",
            ),
            (
                "resync_subject = \"nimmerverse.player.{player}.resync\"",
                "resync_subject = \"nimmerverse.resync\"",
                "players.resync_subject",
            ),
            (
                "dead_letter = \"nimmerverse.deadletter.results\"",
                "dead_letter = \"a.>\"",
                "results.dead_letter",
            ),
            (
                "max_connections = 8",
                "max_connections = 0",
                "postgres.max_connections",
            ),
            ("canon = 1", "canon = 6", "replicas.canon"),
            ("results = 1", "results = 0", "replicas.results"),
        ] {
            let text = DEFAULT_TRANSPORT_TOML.replace(from, to);
            assert_ne!(text, DEFAULT_TRANSPORT_TOML, "{from}");
            match TransportFile::parse("t.toml", &text) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{from}: {other:?}"),
            }
        }
        let err = TransportFile::parse("t.toml", "[postgres]\nurl = 1\n").unwrap_err();
        assert!(err.to_string().starts_with("t.toml:"), "{err}");
    }
}

//! Event templates (`events/*.toml`, one event per file, named by the file): what a GM shard's director walks.
//!
//! An event has shard keys (district, theme, tier, faction: what the shard map matches), the values a caller
//! gives when opening it (`values`), and scenes. A scene runs its slots in order; it starts when the event
//! opens, or once every scene in its `after` is done, or when another scene's branch picks it. A slot asks the
//! gateway for one line (an NPC's dialog, a Theia moment, a classification) from templates with placeholders
//! (see [`crate::template`]) and may be gated by a Saturn classifier: a label in `accept` keeps the line, any
//! other asks again, up to `attempts`. A scene's branch classifies a rendered text and maps each label to the
//! next scene (or `end`). Everything a file names is checked when it loads: ids, references, cycles,
//! classifiers and their labels (against `classifiers.toml`), placeholders (declared values, slots of the event).

use std::collections::{BTreeMap, BTreeSet};

use nimmer_wire::dialog::Kind;
use serde::Deserialize;

use crate::template::Template;
use crate::{ClassifiersFile, Config, ConfigError, UnknownTrait};

/// The event templates shipped with nimmer (`config/events/`), embedded in the binary.
pub const DEFAULT_EVENTS: &[(&str, &str)] = &[
    (
        "harbour-arrival",
        include_str!("../events/harbour-arrival.toml"),
    ),
    (
        "market-quarrel",
        include_str!("../events/market-quarrel.toml"),
    ),
    (
        "faction-rumour",
        include_str!("../events/faction-rumour.toml"),
    ),
    (
        "guild-inquiry",
        include_str!("../events/guild-inquiry.toml"),
    ),
    (
        "landmark-moment",
        include_str!("../events/landmark-moment.toml"),
    ),
];

/// Values every event has without declaring them: its UID, its district and the zone its dialog is billed to.
pub const BUILTIN_VALUES: [&str; 3] = ["event", "district", "zone"];

/// Which arc an event belongs to (one of the shard keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventTier {
    Everyday,
    Major,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    description: String,
    district: String,
    theme: String,
    tier: EventTier,
    #[serde(default)]
    faction: Option<String>,
    #[serde(default)]
    values: Vec<String>,
    scene: Vec<RawScene>,
    #[serde(default)]
    raise: Vec<RawRaise>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRaise {
    id: String,
    template: String,
    #[serde(default)]
    values: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScene {
    id: String,
    #[serde(default)]
    after: Vec<String>,
    slot: Vec<RawSlot>,
    #[serde(default)]
    branch: Option<RawBranch>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlot {
    id: String,
    kind: Kind,
    #[serde(default)]
    npc: Option<String>,
    #[serde(default)]
    traits: BTreeMap<String, f32>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    classifier: Option<String>,
    #[serde(default)]
    input: Option<String>,
    #[serde(default)]
    participants: Vec<String>,
    #[serde(default)]
    faction: Option<String>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    gate: Option<RawGate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGate {
    classifier: String,
    accept: Vec<String>,
    #[serde(default)]
    input: Option<String>,
    #[serde(default = "default_attempts")]
    attempts: u32,
}

fn default_attempts() -> u32 {
    3
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBranch {
    classifier: String,
    input: String,
    on: BTreeMap<String, String>,
}

/// A validated event template.
#[derive(Debug, Clone)]
pub struct EventTemplate {
    pub name: String,
    pub description: String,
    pub district: String,
    pub theme: String,
    pub tier: EventTier,
    pub faction: Option<String>,
    /// Values the caller must give when opening the event.
    pub values: Vec<String>,
    pub scenes: Vec<SceneTemplate>,
    /// Events this one opens when it completes (on whichever shard the map assigns them).
    pub raises: Vec<Raise>,
}

/// An event that an event opens when it completes: the GM's cross-shard message (a rumour in the docks
/// raises an inquiry in the guild's shard). Skipped when a value quotes a slot that has no line.
#[derive(Debug, Clone)]
pub struct Raise {
    pub id: String,
    /// The template of the event it opens (checked against the catalog).
    pub template: String,
    /// The raised event's values, rendered with this event's values and lines.
    pub values: BTreeMap<String, Template>,
}

#[derive(Debug, Clone)]
pub struct SceneTemplate {
    pub id: String,
    /// Scenes that must be done before this one starts (empty: at the start, unless a branch targets it).
    pub after: Vec<String>,
    /// Whether a branch of another scene picks this one (then it never starts on its own).
    pub branch_target: bool,
    pub slots: Vec<SlotTemplate>,
    pub branch: Option<Branch>,
}

/// What a slot asks the gateway for.
#[derive(Debug, Clone)]
pub enum SlotWork {
    /// A generated line (`dialog`, `deep`, `moment`): a system message and a user prompt.
    Line {
        system: Option<Template>,
        prompt: Template,
        max_tokens: Option<usize>,
    },
    /// A classification of a rendered input.
    Classify { classifier: String, input: Template },
}

#[derive(Debug, Clone)]
pub struct SlotTemplate {
    pub id: String,
    pub kind: Kind,
    pub npc: Option<String>,
    pub traits: BTreeMap<String, f32>,
    pub work: SlotWork,
    pub participants: Vec<Template>,
    pub faction: Option<String>,
    pub gate: Option<Gate>,
}

/// A classifier that keeps a slot's line (its label is in `accept`) or asks for it again.
#[derive(Debug, Clone)]
pub struct Gate {
    pub classifier: String,
    pub accept: BTreeSet<String>,
    /// What it classifies (default: the line itself).
    pub input: Option<Template>,
    /// Lines asked for at most; when none is accepted the slot is given up (no canon line).
    pub attempts: u32,
}

/// A classifier whose label picks the scene that follows.
#[derive(Debug, Clone)]
pub struct Branch {
    pub classifier: String,
    pub input: Template,
    /// Label -> scene id, or `None` for `end`.
    pub on: BTreeMap<String, Option<String>>,
}

impl EventTemplate {
    /// Parses and validates one event file against `config` (its classifiers and, unless `unknown_trait =
    /// "ignore"`, its `[traits]`); `name` is its file stem.
    pub fn parse(file: &str, name: &str, text: &str, config: &Config) -> Result<Self, ConfigError> {
        let classifiers = &config.classifiers;
        let raw: RawEvent = toml::from_str(text).map_err(|e| ConfigError::parse(file, e))?;
        let bad = |key: String, rule: String| ConfigError::invalid(file, key, rule);
        if !crate::valid_token(name) {
            return Err(bad(
                "<file name>".into(),
                format!("`{name}` must be a subject token (letters, digits, `-`, `_`)"),
            ));
        }
        let mut values = BTreeSet::new();
        for v in &raw.values {
            if BUILTIN_VALUES.contains(&v.as_str()) || !values.insert(v.as_str()) {
                return Err(bad(
                    "values".into(),
                    format!("`{v}` is declared twice or is built in ({BUILTIN_VALUES:?})"),
                ));
            }
        }
        if raw.scene.is_empty() {
            return Err(bad(
                "scene".into(),
                "an event needs at least one scene".into(),
            ));
        }
        let scene_ids: BTreeSet<&str> = raw.scene.iter().map(|s| s.id.as_str()).collect();
        let slot_ids: BTreeSet<&str> = raw
            .scene
            .iter()
            .flat_map(|s| s.slot.iter().map(|x| x.id.as_str()))
            .collect();
        if scene_ids.len() != raw.scene.len() {
            return Err(bad("scene.id".into(), "scene ids must be unique".into()));
        }
        if slot_ids.len() != raw.scene.iter().map(|s| s.slot.len()).sum::<usize>() {
            return Err(bad(
                "scene.slot.id".into(),
                "slot ids must be unique within the event".into(),
            ));
        }
        let known_traits = (config.budgets.loras.unknown_trait == UnknownTrait::Reject)
            .then(|| config.budgets.traits.keys().cloned().collect());
        let ck = Checker {
            file,
            values: &values,
            slot_ids: &slot_ids,
            classifiers,
            known_traits,
        };
        let template = |key: &str, text: &str| ck.template(key, text);
        let labels = |key: &str, classifier: &str| ck.labels(key, classifier);
        let targets: BTreeSet<&str> = raw
            .scene
            .iter()
            .filter_map(|s| s.branch.as_ref())
            .flat_map(|b| b.on.values().map(String::as_str))
            .filter(|t| *t != "end")
            .collect();
        let mut scenes = Vec::new();
        for s in &raw.scene {
            let key = |k: &str| format!("scene.{}.{k}", s.id);
            if !crate::valid_token(&s.id) {
                return Err(bad(key("id"), "must be a subject token".into()));
            }
            if let Some(a) = s.after.iter().find(|a| !scene_ids.contains(a.as_str())) {
                return Err(bad(
                    key("after"),
                    format!("`{a}` names no scene of this event"),
                ));
            }
            if s.slot.is_empty() {
                return Err(bad(key("slot"), "a scene needs at least one slot".into()));
            }
            let mut slots = Vec::new();
            for x in &s.slot {
                slots.push(slot(&ck, &key(&format!("slot.{}", x.id)), x)?);
            }
            let branch = match &s.branch {
                None => None,
                Some(b) => {
                    let have = labels(&key("branch.classifier"), &b.classifier)?;
                    let given: BTreeSet<String> = b.on.keys().cloned().collect();
                    if given != have {
                        return Err(bad(
                            key("branch.on"),
                            format!("must map every label of `{}` ({have:?})", b.classifier),
                        ));
                    }
                    let mut on = BTreeMap::new();
                    for (label, to) in &b.on {
                        if to != "end" && !scene_ids.contains(to.as_str()) {
                            return Err(bad(
                                key("branch.on"),
                                format!("`{to}` is neither a scene of this event nor `end`"),
                            ));
                        }
                        on.insert(label.clone(), (to != "end").then(|| to.clone()));
                    }
                    Some(Branch {
                        classifier: b.classifier.clone(),
                        input: template(&key("branch.input"), &b.input)?,
                        on,
                    })
                }
            };
            let branch_target = targets.contains(s.id.as_str());
            if branch_target && !s.after.is_empty() {
                return Err(bad(
                    key("after"),
                    "a scene a branch picks starts when picked; it cannot also wait for `after`"
                        .into(),
                ));
            }
            scenes.push(SceneTemplate {
                id: s.id.clone(),
                after: s.after.clone(),
                branch_target,
                slots,
                branch,
            });
        }
        if let Some(cycle) = after_cycle(&scenes) {
            return Err(bad(
                format!("scene.{cycle}.after"),
                "scenes wait for each other in a circle".into(),
            ));
        }
        if !scenes
            .iter()
            .any(|s| s.after.is_empty() && !s.branch_target)
        {
            return Err(bad(
                "scene".into(),
                "no scene starts when the event opens (each waits for `after` or a branch)".into(),
            ));
        }
        let mut raises = Vec::new();
        for r in &raw.raise {
            let key = |k: &str| format!("raise.{}.{k}", r.id);
            if !crate::valid_token(&r.id) || raw.raise.iter().filter(|x| x.id == r.id).count() > 1 {
                return Err(bad(key("id"), "must be a unique subject token".into()));
            }
            raises.push(Raise {
                id: r.id.clone(),
                template: r.template.clone(),
                values: r
                    .values
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), template(&key(&format!("values.{k}")), v)?)))
                    .collect::<Result<_, ConfigError>>()?,
            });
        }
        Ok(Self {
            name: name.to_string(),
            description: raw.description,
            district: raw.district,
            theme: raw.theme,
            tier: raw.tier,
            faction: raw.faction,
            values: raw.values,
            scenes,
            raises,
        })
    }

    pub fn scene(&self, id: &str) -> Option<&SceneTemplate> {
        self.scenes.iter().find(|s| s.id == id)
    }
}

/// What an event's templates and classifier names are checked against.
struct Checker<'a> {
    file: &'a str,
    values: &'a BTreeSet<&'a str>,
    slot_ids: &'a BTreeSet<&'a str>,
    classifiers: &'a ClassifiersFile,
    /// Traits `[traits]` maps to adapters (`None`: unknown traits are ignored by the gateways).
    known_traits: Option<BTreeSet<String>>,
}

impl Checker<'_> {
    fn bad(&self, key: &str, rule: String) -> ConfigError {
        ConfigError::invalid(self.file, key, rule)
    }

    /// A template whose placeholders name declared (or built-in) values and slots of the event.
    fn template(&self, key: &str, text: &str) -> Result<Template, ConfigError> {
        let t = Template::parse(text).map_err(|e| self.bad(key, e))?;
        if let Some(v) = t
            .values()
            .find(|v| !self.values.contains(v) && !BUILTIN_VALUES.contains(v))
        {
            return Err(self.bad(
                key,
                format!("`{{{v}}}` is not a declared value (add it to `values`)"),
            ));
        }
        if let Some(s) = t.slots().find(|s| !self.slot_ids.contains(s)) {
            return Err(self.bad(key, format!("`{{slot.{s}}}` names no slot of this event")));
        }
        Ok(t)
    }

    /// The labels of a classifier of classifiers.toml.
    fn labels(&self, key: &str, classifier: &str) -> Result<BTreeSet<String>, ConfigError> {
        self.classifiers
            .classifiers
            .get(classifier)
            .map(|c| c.labels.iter().map(|l| l.name.clone()).collect())
            .ok_or_else(|| {
                self.bad(
                    key,
                    format!("no classifier `{classifier}` in classifiers.toml"),
                )
            })
    }
}

/// One slot, validated.
fn slot(ck: &Checker<'_>, key: &str, x: &RawSlot) -> Result<SlotTemplate, ConfigError> {
    let k = |f: &str| format!("{key}.{f}");
    let bad = |key: String, rule: String| ConfigError::invalid(ck.file, key, rule);
    let template = |key: &str, text: &str| ck.template(key, text);
    let labels = |key: &str, classifier: &str| ck.labels(key, classifier);
    if !crate::valid_token(&x.id) {
        return Err(bad(k("id"), "must be a subject token".into()));
    }
    let work = match x.kind {
        Kind::Classify => {
            let (Some(c), Some(input)) = (&x.classifier, &x.input) else {
                return Err(bad(
                    k("kind"),
                    "a classify slot needs `classifier` and `input`".into(),
                ));
            };
            if x.prompt.is_some() || x.system.is_some() || x.gate.is_some() {
                return Err(bad(
                    k("kind"),
                    "a classify slot has no `prompt`, `system` or `gate`".into(),
                ));
            }
            labels(&k("classifier"), c)?;
            SlotWork::Classify {
                classifier: c.clone(),
                input: template(&k("input"), input)?,
            }
        }
        _ => {
            let Some(prompt) = &x.prompt else {
                return Err(bad(k("prompt"), "a line needs a `prompt`".into()));
            };
            if x.classifier.is_some() || x.input.is_some() {
                return Err(bad(
                    k("classifier"),
                    "only a classify slot names a classifier (a line's check is its `gate`)".into(),
                ));
            }
            if x.max_tokens == Some(0) {
                return Err(bad(k("max_tokens"), "must be at least 1".into()));
            }
            SlotWork::Line {
                system: x
                    .system
                    .as_deref()
                    .map(|s| template(&k("system"), s))
                    .transpose()?,
                prompt: template(&k("prompt"), prompt)?,
                max_tokens: x.max_tokens,
            }
        }
    };
    if let Some((t, w)) = x.traits.iter().find(|(_, w)| !(0.0..=1.0).contains(*w)) {
        return Err(bad(
            k(&format!("traits.{t}")),
            format!("{w} is outside 0..=1"),
        ));
    }
    if let Some(known) = &ck.known_traits
        && let Some(t) = x.traits.keys().find(|t| !known.contains(*t))
    {
        return Err(bad(
            k(&format!("traits.{t}")),
            format!("unknown trait (budgets.toml `[traits]` maps {known:?})"),
        ));
    }
    let gate = match &x.gate {
        None => None,
        Some(g) => {
            let have = labels(&k("gate.classifier"), &g.classifier)?;
            if let Some(l) = g.accept.iter().find(|l| !have.contains(*l)) {
                return Err(bad(
                    k("gate.accept"),
                    format!("`{l}` is not a label of `{}` ({have:?})", g.classifier),
                ));
            }
            if g.accept.is_empty() || g.attempts == 0 {
                return Err(bad(
                    k("gate"),
                    "needs at least one accepted label and one attempt".into(),
                ));
            }
            Some(Gate {
                classifier: g.classifier.clone(),
                accept: g.accept.iter().cloned().collect(),
                input: g
                    .input
                    .as_deref()
                    .map(|i| template(&k("gate.input"), i))
                    .transpose()?,
                attempts: g.attempts,
            })
        }
    };
    Ok(SlotTemplate {
        id: x.id.clone(),
        kind: x.kind,
        npc: x.npc.clone(),
        traits: x.traits.clone(),
        work,
        participants: x
            .participants
            .iter()
            .map(|p| template(&k("participants"), p))
            .collect::<Result<_, _>>()?,
        faction: x.faction.clone(),
        gate,
    })
}

/// A scene on a circle of `after` waits, if any.
fn after_cycle(scenes: &[SceneTemplate]) -> Option<String> {
    let mut done: BTreeSet<&str> = BTreeSet::new();
    loop {
        let ready: Vec<&str> = scenes
            .iter()
            .filter(|s| !done.contains(s.id.as_str()))
            .filter(|s| s.after.iter().all(|a| done.contains(a.as_str())))
            .map(|s| s.id.as_str())
            .collect();
        if ready.is_empty() {
            return scenes
                .iter()
                .find(|s| !done.contains(s.id.as_str()))
                .map(|s| s.id.clone());
        }
        done.extend(ready);
    }
}

#[cfg(test)]
#[path = "events_tests.rs"]
mod tests;

//! The event catalog: every template a GM shard can open, by name (`events/*.toml` or the embedded ones), and
//! what only the whole catalog can check: that each `[[raise]]` names a template of the catalog and gives
//! exactly the values that template declares.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::events::{DEFAULT_EVENTS, EventTemplate};
use crate::{Config, ConfigError};

/// Every event template a GM shard can open, by name.
#[derive(Debug, Clone, Default)]
pub struct EventCatalog {
    pub events: BTreeMap<String, EventTemplate>,
}

impl EventCatalog {
    /// The templates shipped with nimmer, checked against `config`.
    pub fn embedded(config: &Config) -> Result<Self, ConfigError> {
        let mut events = BTreeMap::new();
        for (name, text) in DEFAULT_EVENTS {
            let file = format!("<embedded>/events/{name}.toml");
            events.insert(
                name.to_string(),
                EventTemplate::parse(&file, name, text, config)?,
            );
        }
        Self::checked(events)
    }

    /// Every `*.toml` in `dir` (a studio adds an event by adding a file), checked against `config`.
    pub fn load(dir: &Path, config: &Config) -> Result<Self, ConfigError> {
        let io = |source| ConfigError::Io {
            file: dir.display().to_string(),
            source,
        };
        let mut events = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let file = path.display().to_string();
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
                file: file.clone(),
                source,
            })?;
            events.insert(
                name.to_string(),
                EventTemplate::parse(&file, name, &text, config)?,
            );
        }
        Self::checked(events)
    }

    /// The catalog once every raise names a template of it with exactly its declared values.
    fn checked(events: BTreeMap<String, EventTemplate>) -> Result<Self, ConfigError> {
        for t in events.values() {
            for r in &t.raises {
                let file = format!("events/{}.toml", t.name);
                let key = |k: &str| format!("raise.{}.{k}", r.id);
                let Some(target) = events.get(&r.template) else {
                    return Err(ConfigError::invalid(
                        &file,
                        key("template"),
                        format!("no event template `{}` in the catalog", r.template),
                    ));
                };
                let want: BTreeSet<&String> = target.values.iter().collect();
                let given: BTreeSet<&String> = r.values.keys().collect();
                if given != want {
                    return Err(ConfigError::invalid(
                        &file,
                        key("values"),
                        format!(
                            "`{}` is opened with exactly the values {want:?} (given {given:?})",
                            r.template
                        ),
                    ));
                }
            }
        }
        Ok(Self { events })
    }
}

//! What a shard needs to open events: the catalog of templates and the shard map ([`Templates`]), and the
//! check that turns a caller's [`OpenEvent`] into an [`OpenPlan`] (a known template, exactly its declared
//! values, tokens where they become subjects) or a 4xx that says what is wrong.

use std::collections::{BTreeMap, BTreeSet};

use nimmer_config::{EventCatalog, EventTemplate, GmFile};
use nimmer_wire::gm::OpenEvent;

/// Why an open request is refused (the HTTP status its answer carries: 404 or 422).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OpenError {
    #[error("no event template `{0}` (see `nimmer events templates`)")]
    UnknownTemplate(String),
    #[error("`{field}`: {why}")]
    Invalid { field: String, why: String },
}

impl OpenError {
    pub fn status(&self) -> u16 {
        match self {
            Self::UnknownTemplate(_) => 404,
            Self::Invalid { .. } => 422,
        }
    }
}

/// An open request that can be opened as it is.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenPlan {
    pub gm_event: String,
    pub template: String,
    pub district: String,
    /// The declared values, and `zone` (the zone its dialog is billed to).
    pub values: BTreeMap<String, String>,
}

/// The templates and the shard map one process works with.
#[derive(Debug, Clone)]
pub struct Templates {
    pub catalog: EventCatalog,
    pub map: GmFile,
}

impl Templates {
    pub fn template(&self, name: &str) -> Result<&EventTemplate, OpenError> {
        self.catalog
            .events
            .get(name)
            .ok_or_else(|| OpenError::UnknownTemplate(name.to_string()))
    }

    /// The shard an open request goes to (the map applied to its template and district).
    pub fn route(&self, req: &OpenEvent) -> Result<String, OpenError> {
        let t = self.template(&req.template)?;
        Ok(self
            .map
            .route(t, req.district.as_deref().unwrap_or(&t.district))
            .to_string())
    }

    /// Checks `req`; an event without an id gets a fresh one.
    pub fn plan(&self, req: OpenEvent) -> Result<OpenPlan, OpenError> {
        let t = self.template(&req.template)?;
        let invalid = |field: &str, why: String| OpenError::Invalid {
            field: field.to_string(),
            why,
        };
        let token = |field: &str, v: &str| {
            nimmer_wire::check_token(v).map_err(|e| invalid(field, format!("`{v}`: {e}")))
        };
        let gm_event = match req.gm_event {
            Some(id) => {
                token("gm_event", &id)?;
                id
            }
            None => fresh_event_id(),
        };
        let district = req.district.unwrap_or_else(|| t.district.clone());
        token("district", &district)?;
        let zone = req.zone.unwrap_or_else(|| district.clone());
        token("zone", &zone)?;
        let declared: BTreeSet<&str> = t.values.iter().map(String::as_str).collect();
        if let Some(k) = req.values.keys().find(|k| !declared.contains(k.as_str())) {
            return Err(invalid(
                &format!("values.{k}"),
                format!(
                    "`{}` declares no such value (it takes {:?})",
                    t.name, t.values
                ),
            ));
        }
        if let Some(k) = t.values.iter().find(|k| !req.values.contains_key(*k)) {
            return Err(invalid(
                &format!("values.{k}"),
                format!("`{}` needs it", t.name),
            ));
        }
        if let Some((k, _)) = req.values.iter().find(|(_, v)| v.trim().is_empty()) {
            return Err(invalid(&format!("values.{k}"), "must not be empty".into()));
        }
        let mut values = req.values;
        values.insert("zone".into(), zone);
        Ok(OpenPlan {
            gm_event,
            template: t.name.clone(),
            district,
            values,
        })
    }
}

/// A new event id: `ev-` and 16 random hex digits.
fn fresh_event_id() -> String {
    format!("ev-{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimmer_config::Config;

    fn templates() -> Templates {
        Templates {
            catalog: EventCatalog::embedded(&Config::embedded()).unwrap(),
            map: GmFile::embedded(),
        }
    }

    fn req(template: &str, values: &[(&str, &str)]) -> OpenEvent {
        OpenEvent {
            template: template.into(),
            gm_event: None,
            district: None,
            zone: None,
            values: values
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn a_request_with_its_values_plans_with_a_fresh_id_and_routes_by_the_map() {
        let t = templates();
        let r = req("market-quarrel", &[("player", "p1")]);
        assert_eq!(t.route(&r).unwrap(), "market");
        let p = t.plan(r.clone()).unwrap();
        assert!(p.gm_event.starts_with("ev-") && p.gm_event.len() == 19);
        assert_eq!(p.district, "market");
        assert_eq!(p.values["zone"], "market");
        assert_ne!(t.plan(r).unwrap().gm_event, p.gm_event);
        let mut r = req("market-quarrel", &[("player", "p1")]);
        r.district = Some("docks".into());
        r.zone = Some("docks-pier-3".into());
        assert_eq!(t.route(&r).unwrap(), "docks");
        assert_eq!(t.plan(r).unwrap().values["zone"], "docks-pier-3");
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let t = templates();
        let e = t.plan(req("nope", &[])).unwrap_err();
        assert_eq!(e.status(), 404);
        for (r, field) in [
            (req("market-quarrel", &[]), "values.player"),
            (
                req("market-quarrel", &[("player", "p"), ("ship", "x")]),
                "values.ship",
            ),
            (req("market-quarrel", &[("player", " ")]), "values.player"),
            (
                OpenEvent {
                    gm_event: Some("a.b".into()),
                    ..req("market-quarrel", &[("player", "p")])
                },
                "gm_event",
            ),
            (
                OpenEvent {
                    district: Some("".into()),
                    ..req("market-quarrel", &[("player", "p")])
                },
                "district",
            ),
        ] {
            let e = t.plan(r).unwrap_err();
            assert_eq!(e.status(), 422);
            assert!(e.to_string().starts_with(&format!("`{field}`")), "{e}");
        }
    }
}

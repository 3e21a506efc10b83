//! Opening a GM event, as it crosses processes: the request a caller (`POST /v1/events`, another shard's
//! director) sends to a shard on `nimmerverse.gm.<shard>.open`, and the shard's answer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Opens one event from a template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenEvent {
    /// The template's name (its file name under `events/`).
    pub template: String,
    /// The event's UID (a token). Opening the same id twice opens it once; none: the shard makes one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gm_event: Option<String>,
    /// Where it happens; none: the template's district.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub district: Option<String>,
    /// The zone its dialog is served and billed under (its fair share); none: the district.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Exactly the values the template declares.
    #[serde(default)]
    pub values: BTreeMap<String, String>,
}

/// A shard's answer to [`OpenEvent`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Opened {
    pub gm_event: String,
    pub shard: String,
    /// `false` when an event of that id was opened before (this request changed nothing).
    pub opened: bool,
}

/// The id of the event that `raise` of event `parent` opens: the same on every attempt and every director,
/// so a raise repeated by a respawned director opens nothing new.
pub fn raised_event_id(parent: &str, raise: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("nimmer/raise/{parent}/{raise}").as_bytes());
    let hex: String = d[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("ev-{hex}")
}

//! A dialog as it crosses processes: its UID and kind, the response the caller gets, and the result the gateway
//! publishes to `RESULTS` for the compositors. The compositors read the same [`DialogResult`]; fields canon does
//! not need have defaults, so a result from an older or newer gateway still composes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::subjects;

/// The hierarchical routing key `gm_event/district/scene/slot` (each segment a token).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Uid {
    pub gm_event: String,
    pub district: String,
    pub scene: String,
    pub slot: String,
}

impl Uid {
    /// The JetStream subject of this dialog's result.
    pub fn results_subject(&self) -> String {
        subjects::results(self)
    }
}

impl std::fmt::Display for Uid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}",
            self.gm_event, self.district, self.scene, self.slot
        )
    }
}

/// What a dialog asks for: `dialog` runs on the Driver, `deep` and `moment` on Theia, `classify` on Saturn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Dialog,
    Deep,
    Moment,
    Classify,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Dialog, Kind::Deep, Kind::Moment, Kind::Classify];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Dialog => "dialog",
            Kind::Deep => "deep",
            Kind::Moment => "moment",
            Kind::Classify => "classify",
        }
    }

    /// The kind a subject token or a JSON string names.
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// The NPC that speaks, and the traits that voice it (trait-LoRA weights in 0..=1).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Npc {
    pub id: String,
    #[serde(default)]
    pub traits: BTreeMap<String, f32>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
}

/// One classification by Saturn.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Classification {
    pub label: String,
    /// Probability per label, in the classifier's label order.
    pub scores: BTreeMap<String, f32>,
    pub latency_ms: f64,
}

/// One text's sentence embedding by Saturn's encoder (L2-normalized) and the tokens it read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    pub vector: Vec<f32>,
    pub tokens: usize,
}

/// Token counts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache (a persona, scene or earlier turn seen before).
    #[serde(default)]
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn of(prompt_tokens: usize, cached_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            cached_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }

    /// OpenAI's shape: the cached count under `prompt_tokens_details`.
    pub fn openai(&self) -> serde_json::Value {
        serde_json::json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": { "cached_tokens": self.cached_tokens },
        })
    }
}

/// Where a request's time went, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timings {
    /// Waiting for a slot in the gateway's fair queue.
    #[serde(default)]
    pub slot_wait_ms: f64,
    /// Waiting for admission into the engine's running batch.
    pub queue_ms: f64,
    pub ttft_ms: f64,
    pub total_ms: f64,
}

/// The slot a request ran in.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SlotInfo {
    pub zone: String,
    pub id: u64,
}

/// A finished dialog as its caller gets it (`POST /v1/dialog`, the final SSE event, a NATS reply).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DialogResponse {
    #[serde(default)]
    pub uid: Uid,
    pub text: String,
    /// The tier that served it.
    pub tier: String,
    /// Trait-LoRA adapters it ran with, as `name@vN`.
    #[serde(default)]
    pub adapters: Vec<String>,
    #[serde(default)]
    pub finish_reason: Option<FinishReason>,
    #[serde(default)]
    pub usage: Usage,
    #[serde(default)]
    pub timings: Timings,
    #[serde(default)]
    pub slot: SlotInfo,
    #[serde(default)]
    pub degraded: bool,
    #[serde(default)]
    pub degraded_reason: Option<String>,
    /// For `kind = "classify"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classification: Option<Classification>,
}

/// The result id of a dialog with idempotency key `key` (its UID unless the caller gave one): the same on
/// every gateway and for every repeat, so canon keeps one row per key.
pub fn result_id(key: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("nimmer/result/{key}").as_bytes());
    d[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// A finished dialog as published to JetStream (`RESULTS`) for the compositors: the request's routing facts
/// and the response. `result_id` is unique per result (the JetStream message id, for deduplication).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DialogResult {
    pub result_id: String,
    pub uid: Uid,
    pub zone: String,
    pub kind: Kind,
    #[serde(default)]
    pub npc: Option<Npc>,
    #[serde(default)]
    pub participants: Vec<String>,
    #[serde(default)]
    pub faction: Option<String>,
    /// Unix time in milliseconds when the gateway finished the dialog.
    pub finished_at_ms: u64,
    pub response: DialogResponse,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_round_trips_through_json() {
        let r = DialogResult {
            result_id: "r1".into(),
            uid: Uid {
                gm_event: "e".into(),
                district: "d".into(),
                scene: "s".into(),
                slot: "k".into(),
            },
            zone: "z".into(),
            kind: Kind::Deep,
            npc: Some(Npc {
                id: "mira".into(),
                traits: BTreeMap::new(),
            }),
            participants: vec!["p1".into()],
            faction: None,
            finished_at_ms: 7,
            response: DialogResponse {
                uid: Uid::default(),
                text: "hi".into(),
                tier: "theia".into(),
                adapters: vec![],
                finish_reason: Some(FinishReason::Stop),
                usage: Usage::of(3, 0, 1),
                timings: Timings::default(),
                slot: SlotInfo::default(),
                degraded: false,
                degraded_reason: None,
                classification: None,
            },
        };
        let back: DialogResult = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back.kind, Kind::Deep);
        assert_eq!(back.response.usage.total_tokens, 4);
        assert_eq!(back.uid.to_string(), "e/d/s/k");
    }

    #[test]
    fn a_response_needs_only_its_text_and_tier() {
        let r: DialogResponse =
            serde_json::from_str(r#"{"text": "aye", "tier": "driver", "extra": 1}"#).unwrap();
        assert_eq!(r.text, "aye");
        assert!(serde_json::from_str::<DialogResponse>(r#"{"tier": "driver"}"#).is_err());
    }

    #[test]
    fn kinds_parse_from_their_names() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Kind::parse("bogus"), None);
    }
}

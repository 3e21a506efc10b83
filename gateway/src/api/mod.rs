//! Requests as the fronts receive them. Incoming JSON is parsed into `*Request` types (unknown fields
//! rejected), then turned into a validated [`Dialog`] ("parse, don't validate"): UID segments and zone ids are
//! checked against the wire crate's token rule because they become subject tokens, and a generation holds
//! exactly one prompt. What goes back out (responses, results) is the wire crate's.

use nimmer_tiers::tokenizer::Message;
use nimmer_tiers::{Prompt, SamplingParams};
use serde::Deserialize;

pub use nimmer_wire::{DialogResponse, DialogResult, Kind, Npc, SlotInfo, Timings, Uid, Usage};

use crate::error::ApiError;
use crate::response_format::ResponseFormatInput;

mod openai;

pub use openai::{ChatRequest, CompletionRequest, OneOrMany, StreamOptions};

/// A NATS-safe token (the wire crate's one rule), or a 422 naming `field`.
pub fn check_token(field: &'static str, value: &str) -> Result<(), ApiError> {
    nimmer_wire::check_token(value).map_err(|e| ApiError::invalid(field, e.to_string()))
}

/// A UID as sent: `"ev/district/scene/slot"` or an object.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum UidInput {
    Path(String),
    Object(Uid),
}

impl UidInput {
    fn parse(self) -> Result<Uid, ApiError> {
        let uid = match self {
            UidInput::Path(p) => {
                let parts: Vec<&str> = p.split('/').collect();
                if parts.len() != 4 {
                    return Err(ApiError::invalid(
                        "uid",
                        "must be gm_event/district/scene/slot",
                    ));
                }
                Uid {
                    gm_event: parts[0].into(),
                    district: parts[1].into(),
                    scene: parts[2].into(),
                    slot: parts[3].into(),
                }
            }
            UidInput::Object(u) => u,
        };
        check_token("uid.gm_event", &uid.gm_event)?;
        check_token("uid.district", &uid.district)?;
        check_token("uid.scene", &uid.scene)?;
        check_token("uid.slot", &uid.slot)?;
        Ok(uid)
    }
}

/// Sampling options of a request (all optional).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence (benchmarks and load tests that need a fixed length).
    #[serde(default)]
    pub ignore_eos: bool,
}

/// `POST /v1/dialog` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DialogRequest {
    pub uid: UidInput,
    pub zone: String,
    pub kind: Kind,
    #[serde(default)]
    pub npc: Option<Npc>,
    #[serde(default)]
    pub messages: Option<Vec<Message>>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub sampling: Sampling,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    #[serde(default)]
    pub participants: Vec<String>,
    #[serde(default)]
    pub faction: Option<String>,
    /// For `kind = "classify"`: which classifier.
    #[serde(default)]
    pub classifier: Option<String>,
    /// Repeats with the same key get the first answer (default: the UID, one line of one slot).
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Answer without publishing the result to the compositors (no canon row): a director's line before its
    /// gate accepts it (the director publishes the accepted line itself).
    #[serde(default)]
    pub draft: bool,
    /// Structured output (OpenAI's shape): the line as JSON the game can act on, enforced while decoding.
    #[serde(default)]
    pub response_format: Option<ResponseFormatInput>,
    /// Cancel the line still running for the same NPC (`npc.id`) in the same zone: this one replaces it.
    #[serde(default)]
    pub supersede: bool,
}

/// What a dialog request asks for, validated.
#[derive(Debug, Clone)]
pub enum Work {
    Generate {
        prompt: Prompt,
        params: SamplingParams,
    },
    Classify {
        classifier: String,
        input: String,
    },
}

/// A validated dialog request.
#[derive(Debug, Clone)]
pub struct Dialog {
    pub uid: Uid,
    pub zone: String,
    pub kind: Kind,
    pub npc: Option<Npc>,
    pub work: Work,
    pub stream: bool,
    pub priority: i32,
    pub deadline_ms: Option<u64>,
    pub participants: Vec<String>,
    pub faction: Option<String>,
    /// The idempotency key: the request's `idempotency_key`, else the UID.
    pub key: String,
    /// Not published as a result (see [`DialogRequest::draft`]).
    pub draft: bool,
    /// Stops the line running for the same NPC (see [`DialogRequest::supersede`]).
    pub supersede: bool,
}

/// Checks what a dialog carries against budgets.toml `[dialogs]`: participants, chat messages and characters
/// of prompt (a classifier's input counts as its prompt). The error names the field.
pub fn check_limits(
    participants: usize,
    work: &Work,
    limits: &nimmer_config::DialogLimits,
) -> Result<(), ApiError> {
    if participants > limits.max_participants {
        return Err(ApiError::invalid(
            "participants",
            format!(
                "{participants} participants; a dialog may name at most {} (budgets.toml [dialogs] max_participants)",
                limits.max_participants
            ),
        ));
    }
    match work {
        Work::Generate { prompt, .. } => check_prompt(prompt, limits),
        Work::Classify { input, .. } => check_chars("input", input.chars().count(), limits),
    }
}

/// Checks a prompt against budgets.toml `[dialogs]` `max_messages` and `max_prompt_chars`.
pub fn check_prompt(prompt: &Prompt, limits: &nimmer_config::DialogLimits) -> Result<(), ApiError> {
    match prompt {
        Prompt::Chat(m) => {
            if m.len() > limits.max_messages {
                return Err(ApiError::invalid(
                    "messages",
                    format!(
                        "{} messages; a dialog may carry at most {} (budgets.toml [dialogs] max_messages)",
                        m.len(),
                        limits.max_messages
                    ),
                ));
            }
            check_chars(
                "messages",
                m.iter().map(|m| m.content.chars().count()).sum(),
                limits,
            )
        }
        Prompt::Text(t) => check_chars("prompt", t.chars().count(), limits),
        Prompt::Tokens(t) => check_chars("prompt", t.len(), limits),
    }
}

fn check_chars(
    field: &str,
    n: usize,
    limits: &nimmer_config::DialogLimits,
) -> Result<(), ApiError> {
    if n > limits.max_prompt_chars {
        return Err(ApiError::invalid(
            field,
            format!(
                "{n} characters of prompt; a dialog may carry at most {} (budgets.toml [dialogs] max_prompt_chars)",
                limits.max_prompt_chars
            ),
        ));
    }
    Ok(())
}

/// Largest `max_tokens` a request may ask for (tiers may cap lower by context).
pub const MAX_NEW_TOKENS: usize = 4096;

impl Sampling {
    pub fn params(self, max_tokens: Option<usize>) -> Result<SamplingParams, ApiError> {
        let d = SamplingParams::default();
        let max_tokens = max_tokens.unwrap_or(d.max_tokens);
        if max_tokens == 0 || max_tokens > MAX_NEW_TOKENS {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("must be between 1 and {MAX_NEW_TOKENS}"),
            ));
        }
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
            seed: self.seed,
            max_tokens,
            stop: self.stop,
            ignore_eos: self.ignore_eos,
            response_format: None,
            logprobs: None,
        };
        p.validate().map_err(ApiError::from)?;
        Ok(p)
    }
}

impl DialogRequest {
    pub fn validate(self) -> Result<Dialog, ApiError> {
        let uid = self.uid.parse()?;
        check_token("zone", &self.zone)?;
        if let Some(f) = &self.faction {
            check_token("faction", f)?;
        }
        for p in &self.participants {
            check_token("participants", p)?;
        }
        if let Some(npc) = &self.npc {
            check_token("npc.id", &npc.id)?;
            if let Some((name, _)) = npc
                .traits
                .iter()
                .find(|(_, w)| !w.is_finite() || **w < 0.0 || **w > 1.0)
            {
                return Err(ApiError::invalid(
                    "npc.traits",
                    format!("weight of `{name}` must be between 0 and 1"),
                ));
            }
        }
        if self.deadline_ms == Some(0) {
            return Err(ApiError::invalid("deadline_ms", "must be greater than 0"));
        }
        if matches!(&self.messages, Some(m) if m.is_empty()) {
            return Err(ApiError::invalid("messages", "must not be empty"));
        }
        if matches!(&self.prompt, Some(p) if p.trim().is_empty()) {
            return Err(ApiError::invalid("prompt", "must not be empty"));
        }
        let work = match self.kind {
            Kind::Classify => {
                if self.response_format.is_some() {
                    return Err(ApiError::invalid(
                        "response_format",
                        "not for kind \"classify\" (its answer is a label)",
                    ));
                }
                let classifier = self.classifier.ok_or_else(|| {
                    ApiError::invalid("classifier", "required for kind \"classify\"")
                })?;
                let input = match (self.prompt, &self.messages) {
                    (Some(p), _) => p,
                    (None, Some(m)) => m
                        .iter()
                        .rev()
                        .find(|m| m.role == "user")
                        .map(|m| m.content.clone())
                        .ok_or_else(|| {
                            ApiError::invalid("messages", "needs a user message to classify")
                        })?,
                    (None, None) => {
                        return Err(ApiError::invalid("prompt", "give `prompt` or `messages`"));
                    }
                };
                Work::Classify { classifier, input }
            }
            _ => {
                if self.classifier.is_some() {
                    return Err(ApiError::invalid(
                        "classifier",
                        "only for kind \"classify\"",
                    ));
                }
                let prompt = match (self.messages, self.prompt) {
                    (Some(m), None) => Prompt::Chat(m),
                    (None, Some(p)) => Prompt::Text(p),
                    _ => {
                        return Err(ApiError::invalid(
                            "messages",
                            "give exactly one of `messages` or `prompt`",
                        ));
                    }
                };
                let mut params = self.sampling.params(self.max_tokens)?;
                params.response_format = match &self.response_format {
                    Some(f) => f.parse()?,
                    None => None,
                };
                Work::Generate { params, prompt }
            }
        };
        let key = match self.idempotency_key {
            Some(k) if k.is_empty() || k.len() > 256 => {
                return Err(ApiError::invalid(
                    "idempotency_key",
                    "must be 1 to 256 bytes",
                ));
            }
            Some(k) => k,
            None => uid.to_string(),
        };
        Ok(Dialog {
            key,
            uid,
            zone: self.zone,
            kind: self.kind,
            npc: self.npc,
            work,
            stream: self.stream,
            priority: self.priority,
            deadline_ms: self.deadline_ms,
            participants: self.participants,
            faction: self.faction,
            draft: self.draft,
            supersede: self.supersede,
        })
    }
}

/// `POST /v1/classify` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    pub classifier: String,
    pub inputs: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: serde_json::Value) -> Result<Dialog, ApiError> {
        serde_json::from_value::<DialogRequest>(json)
            .map_err(|e| ApiError::invalid("body", e.to_string()))?
            .validate()
    }

    #[test]
    fn a_uid_path_and_object_are_the_same() {
        let a = req(serde_json::json!({"uid": "e1/d1/s1/k1", "zone": "z", "kind": "dialog", "prompt": "hi"})).unwrap();
        let b = req(serde_json::json!({"uid": {"gm_event": "e1", "district": "d1", "scene": "s1", "slot": "k1"}, "zone": "z", "kind": "dialog", "prompt": "hi"})).unwrap();
        assert_eq!(a.uid, b.uid);
    }

    #[test]
    fn nats_wildcards_in_a_uid_or_zone_are_rejected_by_field() {
        for (json, field) in [
            (
                serde_json::json!({"uid": "e1/d*/s1/k1", "zone": "z", "kind": "dialog", "prompt": "hi"}),
                "uid.district",
            ),
            (
                serde_json::json!({"uid": "e1/d1/s1/k1", "zone": "z.>", "kind": "dialog", "prompt": "hi"}),
                "zone",
            ),
            (
                serde_json::json!({"uid": "e1/d1/s 1/k1", "zone": "z", "kind": "dialog", "prompt": "hi"}),
                "uid.scene",
            ),
        ] {
            assert_eq!(req(json).unwrap_err().field(), Some(field));
        }
    }

    #[test]
    fn classify_needs_a_classifier() {
        let e = req(
            serde_json::json!({"uid": "e/d/s/k", "zone": "z", "kind": "classify", "prompt": "hi"}),
        )
        .unwrap_err();
        assert_eq!(e.field(), Some("classifier"));
    }
}

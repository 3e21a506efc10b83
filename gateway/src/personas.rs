//! The NPCs present in a zone (`PUT /v1/zones/{id}` with `npcs`): each one's persona is prefilled into the
//! dialog tier's prefix cache, in the NPC's own voice (its traits' blend: the cache keys KV by adapter
//! content), and pinned there while the zone is active, so the first line an NPC speaks is already warm and
//! eviction pressure from other zones never pushes it out. A PUT with `npcs` states who is present: NPCs
//! left out are released; a zone that idles out releases all of its NPCs.

use std::collections::{BTreeMap, BTreeSet};

use nimmer_tiers::Prompt;
use nimmer_tiers::tokenizer::Message;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::admission::{Target, routed_tier};
use crate::api::check_token;
use crate::error::ApiError;
use crate::state::{Gateway, PinnedNpc};
use crate::voice;

/// Most NPCs one zone may pin.
pub const MAX_NPCS: usize = 64;

/// One NPC present in a zone, as `PUT /v1/zones/{id}` lists it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneNpc {
    pub id: String,
    /// The system message every dialog of this NPC starts with (name, backstory, traits, speech).
    pub persona: String,
    #[serde(default)]
    pub traits: BTreeMap<String, f32>,
}

/// A zone's activation (`PUT /v1/zones/{id}` and `nimmerverse.gateway.zones.<id>`): its class, and the
/// NPCs present (absent: the pinned NPCs stay as they are; empty: all are released).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZonePut {
    #[serde(default)]
    pub class: Option<String>,
    #[serde(default)]
    pub npcs: Option<Vec<ZoneNpc>>,
}

impl ZonePut {
    /// An empty body is a plain activation; otherwise JSON (a 422 names the field, a 400 is malformed).
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        let de = &mut serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(de).map_err(|e| ApiError::from_json(e, "class"))
    }
}

/// Activates `zone` (pinning its class when given) and, when `npcs` is given, makes them its pinned NPCs.
/// A bad body changes nothing: the class is checked before the NPCs are pinned (all or none), and applied
/// after.
pub async fn put_zone(gw: &Gateway, zone: &str, req: ZonePut) -> Result<Value, ApiError> {
    check_token("zone", zone)?;
    gw.check_class(req.class.as_deref())?;
    let pinned = match req.npcs {
        Some(npcs) => Some(put_npcs(gw, zone, npcs).await?),
        None => None,
    };
    let class = gw.put_zone(zone, req.class.as_deref())?;
    let mut body = json!({ "zone": zone, "class": class });
    if let Some(p) = pinned {
        body["npcs_pinned"] = json!(p);
    }
    Ok(body)
}

/// Validates `npcs`, pins each persona on the dialog tier and makes them the zone's pinned NPCs (releasing
/// the ones it had). On any error nothing changes: what was pinned by this call is released again.
pub async fn put_npcs(
    gw: &Gateway,
    zone: &str,
    npcs: Vec<ZoneNpc>,
) -> Result<Vec<String>, ApiError> {
    if npcs.len() > MAX_NPCS {
        return Err(ApiError::invalid(
            "npcs",
            format!("at most {MAX_NPCS} NPCs per zone"),
        ));
    }
    let mut seen = BTreeSet::new();
    for n in &npcs {
        check_token("npcs.id", &n.id)?;
        if !seen.insert(n.id.as_str()) {
            return Err(ApiError::invalid(
                "npcs.id",
                format!("NPC `{}` is listed twice", n.id),
            ));
        }
        if n.persona.trim().is_empty() {
            return Err(ApiError::invalid("npcs.persona", "must not be empty"));
        }
    }
    let live = gw.live();
    let b = &live.config.budgets;
    let tier = routed_tier(b, Target::Kind(nimmer_wire::Kind::Dialog));
    let llm = gw
        .tiers()
        .llm(tier)
        .ok_or_else(|| ApiError::Internal(format!("dialog routed to {}", tier.as_str())))?;
    let mut pinned: Vec<PinnedNpc> = Vec::with_capacity(npcs.len());
    for n in npcs {
        let step = async {
            let parts = voice::choose(b, &n.traits).map_err(in_npcs)?;
            let voice = voice::fetch(gw.loras(), parts).await.map_err(in_npcs)?;
            let id = gw.next_pin_id();
            let prompt = Prompt::Chat(vec![Message::new("system", &n.persona)]);
            llm.pin(id, prompt, voice.map(|v| v.blend))
                .map_err(|e| in_npcs(e.into()))?;
            Ok::<_, ApiError>(PinnedNpc {
                npc: n.id.clone(),
                tier,
                id,
            })
        };
        match step.await {
            Ok(p) => pinned.push(p),
            Err(e) => {
                gw.unpin_all(pinned);
                return Err(e);
            }
        }
    }
    let ids = pinned.iter().map(|p| p.npc.clone()).collect();
    gw.replace_pins(zone, pinned);
    Ok(ids)
}

/// An error about a request's `npc`/`messages` as an error about this body's `npcs`.
fn in_npcs(e: ApiError) -> ApiError {
    match e {
        ApiError::Invalid { field, message } => ApiError::Invalid {
            field: match field.strip_prefix("npc.") {
                Some(rest) => format!("npcs.{rest}"),
                None => "npcs.persona".into(),
            },
            message,
        },
        other => other,
    }
}

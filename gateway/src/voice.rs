//! An NPC's voice: the trait-LoRA blend its `npc.traits` select. `[traits]` in `budgets.toml` maps each trait
//! to an adapter; the blend weighs each adapter by its trait's weight. Choosing is pure; fetching the adapters
//! reads files when one was evicted, so [`fetch`] runs that case on a blocking thread, never on the runtime.

use std::collections::BTreeMap;
use std::sync::Arc;

use nimmer_config::{BudgetsFile, UnknownTrait};
use nimmer_loras::{Adapter, Blend, LoraError, Registry};

use crate::error::ApiError;

/// The adapters a request's traits select: the blend and the `name@vN` of each part.
pub struct Voice {
    pub blend: Arc<Blend>,
    pub names: Vec<String>,
}

/// One selected part: `(trait, adapter, weight)`.
pub type Part = (String, String, f32);

/// The adapters `traits` select by `[traits]` (weight-0 traits skipped); an unknown trait is a 422 (or
/// skipped, per `unknown_trait`).
pub fn choose(b: &BudgetsFile, traits: &BTreeMap<String, f32>) -> Result<Vec<Part>, ApiError> {
    let mut parts = Vec::new();
    for (t, &w) in traits {
        if w == 0.0 {
            continue;
        }
        match b.traits.get(t) {
            Some(adapter) => parts.push((t.clone(), adapter.clone(), w)),
            None if b.loras.unknown_trait == UnknownTrait::Ignore => {}
            None => {
                return Err(ApiError::invalid(
                    "npc.traits",
                    format!(
                        "unknown trait `{t}` (known: {})",
                        b.traits.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
    }
    Ok(parts)
}

/// The voice of `parts`: at once when every adapter is resident, else on a blocking thread (cold loads).
pub async fn fetch(registry: &Arc<Registry>, parts: Vec<Part>) -> Result<Option<Voice>, ApiError> {
    if parts.is_empty() {
        return Ok(None);
    }
    let resident = parts
        .iter()
        .map(|(_, a, w)| registry.get_resident(a).map(|(ad, v)| (ad, v, *w)))
        .collect::<Option<Vec<_>>>();
    if let Some(found) = resident {
        return Ok(Some(assemble(&parts, found)));
    }
    let reg = registry.clone();
    tokio::task::spawn_blocking(move || {
        let mut found = Vec::with_capacity(parts.len());
        for (t, a, w) in &parts {
            let (ad, v) = reg
                .get_versioned(a)
                .map_err(|e| load_error(t, a, e))?
                .ok_or_else(|| {
                    ApiError::invalid(
                        "npc.traits",
                        format!("trait `{t}` maps to adapter `{a}`, which is not loaded"),
                    )
                })?;
            found.push((ad, v, *w));
        }
        Ok(Some(assemble(&parts, found)))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("adapter load task: {e}")))?
}

fn assemble(parts: &[Part], found: Vec<(Arc<Adapter>, u64, f32)>) -> Voice {
    let names = parts
        .iter()
        .zip(&found)
        .map(|((_, a, _), (_, v, _))| format!("{a}@v{v}"))
        .collect();
    Voice {
        blend: Arc::new(Blend {
            parts: found.into_iter().map(|(a, _, w)| (a, w)).collect(),
        }),
        names,
    }
}

fn load_error(t: &str, a: &str, e: LoraError) -> ApiError {
    ApiError::Internal(format!("loading adapter `{a}` for trait `{t}`: {e}"))
}

//! The in-process tiers: the engine threads of `nimmer-tiers` ([`LlmHandle`], [`SaturnHandle`]) behind the
//! tier interface, and starting each from the configuration (fetching missing models first).

use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;
use nimmer_config::{Config, LlmTierSpec};
use nimmer_loras::{BaseShape, Blend};
use nimmer_tiers::fetch::{Verify, ensure_llm, ensure_model};
use nimmer_tiers::{
    Classification, Embedding, EngineLimits, GenerateRequest, LlmHandle, PrefixSnapshot, Prompt,
    SaturnHandle, TierError, ZoneServiceView,
};

use super::{ClassifierTier, Events, Health, LlmTier};
use crate::Tier;

impl LlmTier for LlmHandle {
    fn lora_base(&self) -> BaseShape {
        self.info().model.lora_base()
    }

    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, TierError> {
        LlmHandle::tokenize(self, prompt)
    }

    fn submit(&self, req: GenerateRequest) -> BoxFuture<'static, Result<Events, TierError>> {
        Box::pin(std::future::ready(self.generate(req)))
    }

    fn limits(&self) -> EngineLimits {
        LlmHandle::limits(self)
    }

    fn set_limits(&self, limits: EngineLimits) {
        LlmHandle::set_limits(self, limits)
    }

    fn health(&self) -> Health {
        if self.is_running() {
            Health::Ready
        } else {
            Health::Down {
                reason: format!("the {} engine thread has stopped", self.info().name),
            }
        }
    }

    fn pin(&self, id: u64, prompt: Prompt, lora: Option<Arc<Blend>>) -> Result<(), TierError> {
        LlmHandle::pin(self, id, prompt, lora)
    }

    fn unpin(&self, id: u64) {
        LlmHandle::unpin(self, id)
    }

    fn prefix_cache(&self) -> Option<PrefixSnapshot> {
        Some(LlmHandle::prefix_cache(self))
    }

    fn zone_service(&self) -> Vec<ZoneServiceView> {
        LlmHandle::zone_service(self)
    }

    fn load(&self) -> Option<nimmer_tiers::EngineLoad> {
        Some(LlmHandle::load(self))
    }

    fn grammars(&self) -> Result<Arc<nimmer_tiers::Grammars>, TierError> {
        LlmHandle::grammars(self)
    }
}

impl ClassifierTier for SaturnHandle {
    fn classify(
        &self,
        classifier: &str,
        inputs: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<Classification>, TierError>> {
        let (me, name) = (self.clone(), classifier.to_string());
        Box::pin(async move { me.classify(&name, inputs).await })
    }

    fn embed(&self, inputs: Vec<String>) -> BoxFuture<'static, Result<Vec<Embedding>, TierError>> {
        let me = self.clone();
        Box::pin(async move { SaturnHandle::embed(&me, inputs).await })
    }

    fn health(&self) -> Health {
        if self.is_running() {
            Health::Ready
        } else {
            Health::Down {
                reason: "the saturn engine thread has stopped".into(),
            }
        }
    }
}

/// Fetches the tier's model when missing and starts its engine in this process (blocking).
pub fn start_llm(config: &Config, tier: Tier) -> Result<Arc<dyn LlmTier>, TierError> {
    let t = &config.tiers;
    let (spec, budget) = llm_spec(config, tier);
    let handle = LlmHandle::start(
        tier.as_str(),
        spec,
        EngineLimits::of(budget),
        &ensure_llm(t, &spec.model, Verify::Cached)?,
    )?;
    Ok(Arc::new(handle))
}

/// An LLM tier's spec (tiers.toml) and budget (budgets.toml).
pub fn llm_spec(config: &Config, tier: Tier) -> (&LlmTierSpec, &nimmer_config::TierBudget) {
    let (t, b) = (&config.tiers.tiers, &config.budgets.tiers);
    match tier {
        Tier::Theia => (&t.theia, &b.theia),
        _ => (&t.driver, &b.driver),
    }
}

/// Fetches Saturn's model when missing and starts it in this process (blocking).
pub fn start_saturn(
    config: &Config,
    config_dir: Option<&Path>,
) -> Result<Arc<dyn ClassifierTier>, TierError> {
    let t = &config.tiers;
    let saturn_dir = ensure_model(t, &t.tiers.saturn.model, Verify::Cached)?;
    let saturn = SaturnHandle::start(
        &t.tiers.saturn,
        &saturn_dir,
        &config.classifiers,
        config_dir,
    )?;
    Ok(Arc::new(saturn))
}

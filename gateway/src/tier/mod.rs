//! The tiers as the gateway sees them: one interface for LLM tiers ([`LlmTier`]: tokenize, submit → a stream
//! of events that cancels when dropped, engine limits, health) and one for classifier tiers
//! ([`ClassifierTier`]). Admission, fairness and budgets only ever talk to these traits, so a tier may run in
//! this process ([`local`]), on another host behind a NATS tier worker ([`remote`]), on an external
//! OpenAI-compatible server ([`openai`]), or be a scripted fake in tests ([`fake`]).

pub mod fake;
pub mod local;
pub mod openai;
pub mod remote;

use std::sync::Arc;

use futures::future::BoxFuture;
use nimmer_loras::BaseShape;
use nimmer_tiers::{
    Classification, Embedding, EngineLimits, Event, GenerateRequest, Grammars, PrefixSnapshot,
    Prompt, TierError, ZoneServiceView,
};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::Tier;

/// A submitted generation's events: tokens, then `Done`, `Expired` or `Error`. Dropping it cancels the
/// generation (the tier frees its row and KV).
pub type Events = mpsc::UnboundedReceiver<Event>;

/// Whether a tier can take work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Health {
    Ready,
    Down { reason: String },
}

impl Health {
    pub fn is_ready(&self) -> bool {
        matches!(self, Health::Ready)
    }
}

/// An LLM tier (Driver, Theia).
pub trait LlmTier: Send + Sync {
    /// The shape trait-LoRA adapters must fit (the tier's base model).
    fn lora_base(&self) -> BaseShape;
    /// The prompt's token ids as the tier will run them.
    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, TierError>;
    /// Queues a generation; errors (invalid, full, down) come back before any event (a remote tier answers
    /// over the network first, hence the future).
    fn submit(&self, req: GenerateRequest) -> BoxFuture<'static, Result<Events, TierError>>;
    /// The engine limits in effect.
    fn limits(&self) -> EngineLimits;
    /// Changes the engine limits (a budgets reload).
    fn set_limits(&self, limits: EngineLimits);
    fn health(&self) -> Health;
    /// Prefills `prompt` (with `lora`) into the tier's prefix cache and pins it under `id` until
    /// [`LlmTier::unpin`] (queued like a one-token generation; errors come back at once).
    fn pin(
        &self,
        id: u64,
        prompt: Prompt,
        lora: Option<Arc<nimmer_loras::Blend>>,
    ) -> Result<(), TierError>;
    /// Releases what `id` pinned.
    fn unpin(&self, id: u64);
    /// What the tier's prefix KV cache holds and did (`None` for a tier without one).
    fn prefix_cache(&self) -> Option<PrefixSnapshot> {
        None
    }
    /// Tokens each zone was served by the tier's steps against its weighted fair share.
    fn zone_service(&self) -> Vec<ZoneServiceView> {
        Vec::new()
    }
    /// What the tier's engine holds now (`None` where the tier does not say: a fake, or remote workers).
    fn load(&self) -> Option<nimmer_tiers::EngineLoad> {
        None
    }
    /// The workers serving a remote tier, as last heard from (empty for a tier in this process).
    fn workers(&self) -> Vec<String> {
        Vec::new()
    }
    /// The tier's structured-output grammars (compiling a `response_format` here checks it before a slot is
    /// taken, and the tier finds it compiled). Blocking on first use. A tier that cannot enforce one says so.
    fn grammars(&self) -> Result<Arc<Grammars>, TierError> {
        Err(TierError::InvalidRequest {
            field: "response_format",
            message: "this tier does not enforce structured output".into(),
        })
    }
    /// Whether [`LlmTier::submit`] wants the prompt as the caller gave it (messages or text) rather than
    /// the token ids [`LlmTier::tokenize`] made of it: a server that tokenizes for itself.
    fn takes_source_prompt(&self) -> bool {
        false
    }
}

/// A classifier tier (Saturn).
pub trait ClassifierTier: Send + Sync {
    /// Classifies each input with the named classifier.
    fn classify(
        &self,
        classifier: &str,
        inputs: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<Classification>, TierError>>;
    /// The encoder's sentence embedding of each input (`/v1/embeddings`).
    fn embed(&self, inputs: Vec<String>) -> BoxFuture<'static, Result<Vec<Embedding>, TierError>>;
    fn health(&self) -> Health;
    /// The workers serving a remote Saturn (empty in this process).
    fn workers(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The three tiers a gateway serves.
#[derive(Clone)]
pub struct Tiers {
    pub driver: Arc<dyn LlmTier>,
    pub theia: Arc<dyn LlmTier>,
    pub saturn: Arc<dyn ClassifierTier>,
}

impl Tiers {
    /// The LLM tier of that name (`None` for Saturn).
    pub fn llm(&self, tier: Tier) -> Option<&Arc<dyn LlmTier>> {
        match tier {
            Tier::Driver => Some(&self.driver),
            Tier::Theia => Some(&self.theia),
            Tier::Saturn => None,
        }
    }

    pub fn health(&self, tier: Tier) -> Health {
        match tier {
            Tier::Driver => self.driver.health(),
            Tier::Theia => self.theia.health(),
            Tier::Saturn => self.saturn.health(),
        }
    }
}

/// Starts the three tiers as `tiers.toml` says (blocking; minutes on a first run): each LLM tier in this
/// process (`via = "local"`) or through its NATS tier workers (`via = "nats"`, on the server at `nats`;
/// only the model's tokenizer and shape are read here). Runs on a blocking thread of a tokio runtime.
pub fn start(
    config: &nimmer_config::Config,
    config_dir: Option<&std::path::Path>,
    nats: Option<&str>,
) -> Result<Tiers, crate::GatewayError> {
    let llm = |tier: Tier| -> Result<Arc<dyn LlmTier>, crate::GatewayError> {
        let (spec, budget) = local::llm_spec(config, tier);
        match spec.via {
            nimmer_config::Via::Local => return Ok(local::start_llm(config, tier)?),
            nimmer_config::Via::OpenAi => return start_openai(config, tier),
            nimmer_config::Via::Nats => {}
        }
        let url = nats.ok_or_else(|| crate::GatewayError::RemoteWithoutNats {
            tier: tier.as_str().into(),
        })?;
        let path = nimmer_tiers::fetch::ensure_llm(
            &config.tiers,
            &spec.model,
            nimmer_tiers::fetch::Verify::Cached,
        )?;
        let shape = remote::client::RemoteShape::new(nimmer_tiers::llama::ModelShape::read(&path)?);
        let limits = EngineLimits::of(budget);
        let rt = tokio::runtime::Handle::try_current().map_err(|e| {
            crate::GatewayError::NatsConnect {
                url: url.into(),
                message: format!("no async runtime to connect from: {e}"),
            }
        })?;
        rt.block_on(async {
            let client = connect(url).await?;
            tracing::info!(
                tier = tier.as_str(),
                nats = url,
                "tier served by NATS workers"
            );
            let tier: Arc<dyn LlmTier> =
                remote::client::NatsLlm::connect(client, tier.as_str(), Arc::new(shape), limits)
                    .await?;
            Ok(tier)
        })
    };
    let saturn: Arc<dyn ClassifierTier> = match config.tiers.tiers.saturn.via {
        nimmer_config::Via::Local => local::start_saturn(config, config_dir)?,
        // Refused by the configuration's validation.
        nimmer_config::Via::OpenAi | nimmer_config::Via::Nats => {
            let url = nats.ok_or_else(|| crate::GatewayError::RemoteWithoutNats {
                tier: Tier::Saturn.as_str().into(),
            })?;
            let rt = tokio::runtime::Handle::try_current().map_err(|e| {
                crate::GatewayError::NatsConnect {
                    url: url.into(),
                    message: format!("no async runtime to connect from: {e}"),
                }
            })?;
            tracing::info!(tier = "saturn", nats = url, "tier served by NATS workers");
            rt.block_on(async { remote::saturn::NatsSaturn::connect(connect(url).await?).await })?
        }
    };
    Ok(Tiers {
        driver: llm(Tier::Driver)?,
        theia: llm(Tier::Theia)?,
        saturn,
    })
}

/// An LLM tier on an OpenAI-compatible server: only the `tokenizer` model's header is read, when named.
fn start_openai(
    config: &nimmer_config::Config,
    tier: Tier,
) -> Result<Arc<dyn LlmTier>, crate::GatewayError> {
    let (spec, budget) = local::llm_spec(config, tier);
    let shape = match &spec.tokenizer {
        Some(model) => {
            let path = nimmer_tiers::fetch::ensure_llm(
                &config.tiers,
                model,
                nimmer_tiers::fetch::Verify::Cached,
            )?;
            let shape = nimmer_tiers::llama::ModelShape::read(&path)?;
            Some(Arc::new(remote::client::RemoteShape::new(shape)) as Arc<dyn remote::client::Shape>)
        }
        None => None,
    };
    tracing::info!(
        tier = tier.as_str(),
        url = spec.url.as_deref().unwrap_or_default(),
        model = %spec.model,
        tokens = if shape.is_some() { "counted" } else { "estimated" },
        "tier served by an OpenAI-compatible server"
    );
    let rt = tokio::runtime::Handle::try_current().map_err(|e| {
        crate::GatewayError::Tiers(nimmer_tiers::TierError::Spawn {
            what: format!("the {} tier's health probe", tier.as_str()),
            message: format!("no async runtime: {e}"),
        })
    })?;
    let _in_rt = rt.enter();
    let llm = openai::OpenAiLlm::start(tier.as_str(), spec, shape, EngineLimits::of(budget))?;
    Ok(Arc::new(llm))
}

/// A NATS connection for remote tiers (`url`: one URL or several separated by commas).
async fn connect(url: &str) -> Result<async_nats::Client, crate::GatewayError> {
    async_nats::connect(nimmer_wire::nats_urls(url))
        .await
        .map_err(|e| crate::GatewayError::NatsConnect {
            url: url.into(),
            message: e.to_string(),
        })
}

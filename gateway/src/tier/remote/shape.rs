//! What the gateway knows of a remote tier's model without running it ([`Shape`]): its tokenizer (to count
//! and check prompts), its adapter shape, and its structured-output grammars (to refuse a broken schema
//! before a worker sees it); from a tier in this process ([`ShapeOf`]) or from the GGUF's metadata alone
//! ([`RemoteShape`]: no weights loaded).

use std::sync::Arc;

use nimmer_loras::BaseShape;
use nimmer_tiers::{Grammars, Prompt, TierError};

use crate::tier::LlmTier;

/// What the gateway knows of a remote tier's model without running it: its tokenizer and shape.
pub trait Shape: Send + Sync {
    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, TierError>;
    fn lora_base(&self) -> BaseShape;
    /// Structured-output grammars over the tokenizer (the gateway checks formats; workers compile their own).
    fn grammars(&self) -> Result<Arc<Grammars>, TierError>;
}

/// The shape of a tier the gateway also runs (or loads) in process: tokenizer and adapter shape.
pub struct ShapeOf(pub Arc<dyn LlmTier>);

impl Shape for ShapeOf {
    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, TierError> {
        self.0.tokenize(prompt)
    }

    fn lora_base(&self) -> BaseShape {
        self.0.lora_base()
    }

    fn grammars(&self) -> Result<Arc<Grammars>, TierError> {
        self.0.grammars()
    }
}

/// A remote tier's model as the gateway reads it: the GGUF's tokenizer and configuration, no weights.
pub struct RemoteShape {
    model: nimmer_tiers::llama::ModelShape,
    grammars: std::sync::OnceLock<Arc<Grammars>>,
}

impl RemoteShape {
    pub fn new(model: nimmer_tiers::llama::ModelShape) -> Self {
        Self {
            model,
            grammars: std::sync::OnceLock::new(),
        }
    }
}

impl Shape for RemoteShape {
    fn grammars(&self) -> Result<Arc<Grammars>, TierError> {
        if let Some(g) = self.grammars.get() {
            return Ok(g.clone());
        }
        let built = Arc::new(Grammars::new(
            &self.model.tokenizer,
            self.model.config.vocab,
        )?);
        Ok(self.grammars.get_or_init(|| built).clone())
    }

    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, TierError> {
        nimmer_tiers::tokenize(&self.model.tokenizer, self.model.config.vocab, prompt)
    }

    fn lora_base(&self) -> BaseShape {
        self.model.config.lora_base()
    }
}

//! Shared helpers for the end-to-end tests: the default config and its models, fetched (and verified) through
//! the same code path `nimmer models fetch` uses.

use std::path::PathBuf;

use nimmer_config::Config;
use nimmer_tiers::fetch::{ensure_model, Verify};

/// The embedded default configuration.
pub fn config() -> Config {
    Config::embedded()
}

/// Path of a model file of the default config, fetched on first use.
pub fn model_file(model: &str, file: &str) -> PathBuf {
    let c = config();
    let dir = ensure_model(&c.tiers, model, Verify::Cached).unwrap_or_else(|e| panic!("fetching {model}: {e}"));
    dir.join(file)
}

/// The Driver's GGUF.
pub fn driver_gguf() -> PathBuf {
    let c = config();
    model_file(&c.tiers.tiers.driver.model, "model.gguf")
}

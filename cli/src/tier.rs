//! `nimmer tier`: one LLM tier worker. Loads the tier's model in process (fetching it when missing) and
//! serves it over NATS as the service `nimmer-<tier>` (see `nimmer_gateway::tier::remote`), until Ctrl-C or
//! SIGTERM. Several workers may serve one tier; each publishes its load.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use nimmer_config::Config;
use nimmer_tiers::fetch::{Verify, ensure_llm};
use nimmer_tiers::{EngineLimits, LlmHandle};

#[derive(clap::Args)]
pub struct TierArgs {
    /// driver or theia
    #[arg(long)]
    tier: String,
    /// NATS server URL.
    #[arg(long, env = "NIMMER_NATS")]
    nats: String,
    /// This worker's name (unique per tier; default: the host name and process id).
    #[arg(long)]
    worker: Option<String>,
}

pub fn run(cfg: &Config, a: TierArgs) -> Result<()> {
    let (spec, budget) = match a.tier.as_str() {
        "driver" => (&cfg.tiers.tiers.driver, &cfg.budgets.tiers.driver),
        "theia" => (&cfg.tiers.tiers.theia, &cfg.budgets.tiers.theia),
        other => bail!("unknown LLM tier `{other}` (driver, theia)"),
    };
    let worker = a
        .worker
        .unwrap_or_else(|| format!("w{}", std::process::id()));
    nimmer_wire::check_token(&worker).map_err(|e| anyhow::anyhow!("--worker `{worker}`: {e}"))?;
    let model = ensure_llm(&cfg.tiers, &spec.model, Verify::Cached)?;
    let handle = LlmHandle::start(&a.tier, spec, EngineLimits::of(budget), &model)
        .with_context(|| format!("starting the {} tier", a.tier))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client = async_nats::connect(&a.nats)
            .await
            .with_context(|| format!("connecting to NATS at {}", a.nats))?;
        nimmer_gateway::tier::remote::worker::serve(
            client,
            &a.tier,
            &worker,
            Arc::new(handle),
            crate::serve::shutdown_signal(),
        )
        .await?;
        Ok(())
    })
}

//! `nimmer tier`: one tier worker. Loads the tier's model in process (fetching it when missing) and serves it
//! over NATS as the service `nimmer-<tier>` (see `nimmer_gateway::tier::remote`), until Ctrl-C or SIGTERM.
//! Several workers may serve one tier; each publishes its load.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use nimmer_config::Config;
use nimmer_tiers::fetch::{Verify, ensure_llm};
use nimmer_tiers::{EngineLimits, LlmHandle};

#[derive(clap::Args)]
pub struct TierArgs {
    /// driver, theia or saturn
    #[arg(long)]
    tier: String,
    /// NATS server URL, or a cluster's URLs separated by commas.
    #[arg(long, env = "NIMMER_NATS")]
    nats: String,
    /// This worker's name (unique per tier; default: the host name and process id).
    #[arg(long)]
    worker: Option<String>,
}

pub fn run(cfg: &Config, config_dir: Option<&std::path::Path>, a: TierArgs) -> Result<()> {
    let worker = a
        .worker
        .clone()
        .unwrap_or_else(|| format!("w{}", std::process::id()));
    nimmer_wire::check_token(&worker).map_err(|e| anyhow::anyhow!("--worker `{worker}`: {e}"))?;
    let (spec, budget) = match a.tier.as_str() {
        "saturn" => return saturn(cfg, config_dir, &a.nats, &worker),
        "driver" | "theia" => crate::generate::local_llm(cfg, &a.tier)?,
        other => bail!("unknown tier `{other}` (driver, theia, saturn)"),
    };
    let model = ensure_llm(&cfg.tiers, &spec.model, Verify::Cached)?;
    let handle = LlmHandle::start(&a.tier, spec, EngineLimits::of(budget), &model)
        .with_context(|| format!("starting the {} tier", a.tier))?;
    let model_id = handle.info().model_id.clone();
    let llm: Arc<dyn nimmer_gateway::tier::LlmTier> = Arc::new(handle);
    // The Driver runs trait-LoRAs: the same adapters directory as a gateway's (`[loras] dir`).
    let loras = (a.tier == "driver").then(|| {
        let spec = &cfg.budgets.loras;
        let reg = Arc::new(nimmer_loras::Registry::new(
            llm.lora_base(),
            spec.memory_mib << 20,
        ));
        let dir = config_dir
            .unwrap_or(std::path::Path::new("config"))
            .join(&spec.dir);
        if dir.is_dir() {
            for (name, e) in reg.scan(&dir) {
                tracing::error!(adapter = %name, error = %e, "adapter rejected");
            }
            tracing::info!(dir = %dir.display(), adapters = reg.list().len(), "trait-LoRA adapters loaded");
        }
        reg
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // The engine's budgets follow budgets.toml, as a gateway's do.
        let _watch = match config_dir {
            Some(dir) => {
                let (engine, tier) = (llm.clone(), a.tier.clone());
                Some(nimmer_gateway::reload::watch_budgets(
                    dir,
                    cfg.clone(),
                    move |c| {
                        if let Ok((_, budget)) = crate::generate::local_llm(c, &tier) {
                            engine.set_limits(EngineLimits::of(budget));
                        }
                    },
                )?)
            }
            None => None,
        };
        let client = async_nats::connect(nimmer_wire::nats_urls(&a.nats))
            .await
            .with_context(|| format!("connecting to NATS at {}", a.nats))?;
        let w = nimmer_gateway::tier::remote::worker::Worker {
            tier: a.tier.clone(),
            name: worker,
            model: model_id,
            llm,
            loras,
        };
        nimmer_gateway::tier::remote::worker::serve(client, w, crate::serve::shutdown_signal())
            .await?;
        Ok(())
    })
}

/// `nimmer tier --tier saturn`: the classifiers.
fn saturn(
    cfg: &Config,
    config_dir: Option<&std::path::Path>,
    nats: &str,
    worker: &str,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (cfg2, dir) = (cfg.clone(), config_dir.map(std::path::Path::to_path_buf));
        let saturn = tokio::task::spawn_blocking(move || {
            nimmer_gateway::tier::local::start_saturn(&cfg2, dir.as_deref())
        })
        .await??;
        let client = async_nats::connect(nimmer_wire::nats_urls(nats))
            .await
            .with_context(|| format!("connecting to NATS at {nats}"))?;
        let model = cfg.tiers.tiers.saturn.model.clone();
        nimmer_gateway::tier::remote::saturn::serve(
            client,
            worker,
            &model,
            saturn,
            crate::serve::shutdown_signal(),
        )
        .await?;
        Ok(())
    })
}

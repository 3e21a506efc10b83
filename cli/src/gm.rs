//! `nimmer gm --shard NAME`: a GM shard process. It opens the events the shard map sends its shards
//! (`nimmerverse.gm.<shard>.open`), directs each with one task, renews their leases in PostgreSQL and takes
//! over the events of the shard's processes that died. Run two or more per shard for failover.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};

#[derive(clap::Args)]
pub struct GmArgs {
    /// A shard this process serves (repeat for several; gm.toml's shard map names them).
    #[arg(long = "shard", required = true)]
    shards: Vec<String>,
    /// NATS server URL, or a cluster's URLs separated by commas: the gateways, RESULTS and the shards.
    #[arg(long, env = "NIMMER_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// PostgreSQL URL (default: `[postgres] url` of transport.toml): the register of open events.
    #[arg(long, env = "NIMMER_POSTGRES")]
    postgres: Option<String>,
    /// This process's name in the register's leases (default: `<host>-<pid>`); unique per running process.
    #[arg(long)]
    name: Option<String>,
    /// Serve Prometheus metrics (`/metrics`: directors per shard, events opened and ended, takeovers, event
    /// durations) and `/healthz` on this address.
    #[arg(long, env = "NIMMER_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
}

/// The shard map, the templates and the transport settings of the config directory.
pub fn templates(config_dir: &Option<PathBuf>) -> Result<nimmer_gm::Templates> {
    let config = crate::files::load_config(config_dir)?;
    Ok(nimmer_gm::Templates {
        catalog: crate::files::event_catalog(config_dir, &config)?,
        map: crate::files::gm_config(config_dir)?,
    })
}

pub fn run(config_dir: Option<PathBuf>, a: GmArgs) -> Result<()> {
    let templates = Arc::new(templates(&config_dir)?);
    let known = templates.map.shard_names();
    if let Some(s) = a.shards.iter().find(|s| !known.contains(s.as_str())) {
        bail!("--shard {s}: gm.toml's shard map has no such shard (it has {known:?})");
    }
    let transport = crate::files::transport_config(&config_dir)?;
    let url = a.postgres.unwrap_or_else(|| transport.postgres.url.clone());
    let name = a.name.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "gm".into());
        format!("{}-{}", host.trim(), std::process::id())
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        if let Some(addr) = a.metrics_listen {
            crate::serve::metrics_endpoint(addr).await?;
        }
        let client = async_nats::ConnectOptions::new()
            .name(format!("nimmer-gm-{name}"))
            .retry_on_initial_connect()
            .connect(nimmer_wire::nats_urls(&a.nats))
            .await
            .with_context(|| format!("connecting to NATS at {}", a.nats))?;
        let pool = nimmer_compositor::connect(&url, transport.postgres.max_connections)
            .await
            .with_context(|| format!("connecting to PostgreSQL at {url}"))?;
        let svc = Arc::new(nimmer_gm::NatsServices::new(
            client.clone(),
            Duration::from_secs(templates.map.directors.request_timeout_s),
        ));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut shards = tokio::task::JoinSet::new();
        for shard in a.shards {
            let reg = nimmer_gm::Register::new(
                pool.clone(),
                &shard,
                &format!("{name}/{shard}"),
                templates.map.ttl(),
            );
            let loop_ = nimmer_gm::Shard {
                name: shard,
                reg,
                svc: svc.clone(),
                templates: templates.clone(),
            };
            let (client, mut stopped) = (client.clone(), stopped.clone());
            shards.spawn(async move {
                loop_
                    .serve(client, async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    })
                    .await
            });
        }
        tracing::info!(process = %name, nats = %a.nats, "GM shards started");
        tokio::select! {
            _ = crate::serve::shutdown_signal() => {}
            Some(r) = shards.join_next() => {
                tracing::error!(result = ?r, "a shard loop ended on its own; stopping");
            }
        }
        let _ = stop.send(true);
        while let Some(r) = shards.join_next().await {
            if let Ok(Err(e)) = r {
                tracing::error!(error = %e, "a shard loop failed");
            }
        }
        let _ = client.flush().await;
        tracing::info!("GM shards stopped");
        anyhow::Ok(())
    })
}

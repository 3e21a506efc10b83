//! `nimmer serve`: the gateway over the three tiers (HTTP, optionally NATS), with config hot reload; the
//! shutdown signal every long-running command waits for, and the metrics endpoint of those without HTTP.

use std::path::PathBuf;

use anyhow::{Context, Result};
use nimmer_config::Config;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "NIMMER_LISTEN", default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// NATS server URL, or a cluster's URLs separated by commas (e.g. nats://127.0.0.1:4222): serve
    /// requests on nimmerverse.gateway.<kind>.<zone> and publish finished dialogs to the JetStream results
    /// stream (named in transport.toml).
    #[arg(long, env = "NIMMER_NATS")]
    nats: Option<String>,
    /// Bearer tokens NPC services must send (comma-separated; none: open).
    #[arg(long, env = "NIMMER_API_TOKENS", value_delimiter = ',')]
    api_token: Vec<String>,
    /// Bearer tokens for ops endpoints: zones, config, metrics (comma-separated; none: open).
    #[arg(long, env = "NIMMER_OPS_TOKENS", value_delimiter = ',')]
    ops_token: Vec<String>,
    /// With --nats: the directory where finished dialogs wait, fsync'd, while JetStream does not acknowledge
    /// them (a dialog is answered only once JetStream or the spool holds its result); published from at the
    /// next start. One per gateway process (it is locked). Default: <cache_dir>/spool/gateway-<listen port>.
    #[arg(long, env = "NIMMER_SPOOL")]
    spool: Option<PathBuf>,
}

/// Loads the configuration and serves until Ctrl-C or SIGTERM.
pub fn run(config_dir: Option<PathBuf>, a: ServeArgs) -> Result<()> {
    let cfg = crate::files::load_config(&config_dir)?;
    let transport = crate::files::transport_config(&config_dir)?;
    let spool = a.nats.as_ref().map(|_| {
        a.spool.clone().unwrap_or_else(|| {
            let name = match a.listen.port() {
                0 => {
                    tracing::warn!("listening on port 0 without --spool: this process's spool is named by its pid, so a restart will not find it");
                    format!("gateway-pid-{}", std::process::id())
                }
                port => format!("gateway-{port}"),
            };
            nimmer_tiers::fetch::cache_dir(&cfg.tiers)
                .join("spool")
                .join(name)
        })
    });
    let opts = nimmer_gateway::Options {
        config_dir,
        auth: nimmer_gateway::Auth {
            npc: a.api_token.into_iter().filter(|t| !t.is_empty()).collect(),
            ops: a.ops_token.into_iter().filter(|t| !t.is_empty()).collect(),
        },
        nats: a.nats,
        transport,
        spool,
    };
    serve(cfg, opts, a.listen)
}

fn serve(cfg: Config, opts: nimmer_gateway::Options, listen: std::net::SocketAddr) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        tracing::info!(config = %cfg.origin, "loading tiers");
        let (dir, nats) = (opts.config_dir.clone(), opts.nats.clone());
        let gw = tokio::task::spawn_blocking(move || {
            nimmer_gateway::Gateway::start_with(cfg, dir.as_deref(), nats.as_deref())
        })
        .await??;
        tracing::info!(addr = %listener.local_addr()?, nats = ?opts.nats, "nimmer gateway listening");
        nimmer_gateway::run(listener, std::sync::Arc::new(gw), opts, shutdown_signal()).await?;
        tracing::info!("shut down");
        Ok(())
    })
}

/// Serves this process's Prometheus metrics (`/metrics`) and `/healthz` on `addr`, in the background (the
/// processes without the gateway's HTTP API: compositors, GM shards).
pub async fn metrics_endpoint(addr: std::net::SocketAddr) -> Result<()> {
    let handle = nimmer_gateway::metrics::handle();
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || async move { handle.render() }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, "metrics listening");
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

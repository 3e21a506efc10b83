//! The nimmer gateway: the front door NPC services talk to.
//!
//! - [`api`]: request/response types; parsing into validated requests (UIDs and zones are NATS-safe tokens).
//! - [`core`]: the three tiers, the live configuration, zones, slots, budgets, routing and degradation.
//! - [`dialog`]: a validated dialog run to its response (shared by both fronts).
//! - [`http`]: axum handlers (JSON and SSE), OpenAI-compatible chat completions, ops endpoints, bearer tokens.
//! - [`nats`]: the NATS request/reply front and the JetStream results publisher.
//! - [`fair`], [`zones`]: fair slot allocation and the zone table (pure, unit-tested).
//! - [`reload`]: config hot reload. [`metrics`]: Prometheus names. [`error`]: the error type.
//!
//! The `nimmer` binary (`src/main.rs`) parses arguments and calls [`run`].

pub mod api;
pub mod core;
pub mod dialog;
pub mod error;
pub mod fair;
pub mod http;
pub mod metrics;
pub mod nats;
pub mod reload;
pub mod slots;
pub mod zones;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use http::Auth;

/// How a gateway is served besides its HTTP listener.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The config directory to watch for edits (none: the embedded config, no reload).
    pub config_dir: Option<PathBuf>,
    pub auth: Auth,
    /// NATS server URL: enables the NATS front and the results publisher.
    pub nats: Option<String>,
}

/// Serves `gw` on `listener` (and NATS, when configured) until `shutdown` resolves; in-flight requests
/// finish and queued results are published before it returns.
pub async fn run(
    listener: tokio::net::TcpListener,
    gw: Arc<core::Gateway>,
    opts: Options,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let _watcher = match &opts.config_dir {
        Some(dir) => Some(reload::watch(dir, gw.clone())?),
        None => None,
    };
    let _adapters_watcher = match gw.loras_dir() {
        Some(dir) => Some(reload::watch_adapters(dir, gw.clone())?),
        None => None,
    };
    let pruner = {
        let gw = gw.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                gw.prune_zones();
            }
        })
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut nats_tasks = Vec::new();
    if let Some(url) = &opts.nats {
        let client = async_nats::ConnectOptions::new()
            .name("nimmer-gateway")
            .retry_on_initial_connect()
            .connect(url.as_str())
            .await
            .map_err(|e| anyhow::anyhow!("connecting to NATS at {url}: {e}"))?;
        let (sink, publisher) = nats::start_results(client.clone()).await?;
        gw.set_results(Some(sink));
        nats_tasks.push(publisher);
        let (gw2, mut rx) = (gw.clone(), stop_rx.clone());
        nats_tasks.push(tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = nats::serve_requests(client, gw2, stop).await {
                tracing::error!(error = %e, "NATS front stopped");
            }
        }));
    }
    let mut http_stop = stop_rx.clone();
    let server = axum::serve(listener, http::app(gw.clone(), opts.auth.clone()))
        .with_graceful_shutdown(async move {
            let _ = http_stop.wait_for(|s| *s).await;
        });
    let server = tokio::spawn(async move { server.await });
    shutdown.await;
    tracing::info!("shutting down: finishing in-flight requests");
    let _ = stop_tx.send(true);
    server.await??;
    pruner.abort();
    // Stop taking results, let the publisher drain what is queued.
    drop(gw.set_results(None));
    for t in nats_tasks {
        if tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .is_err()
        {
            tracing::error!("results still unpublished after 30 s at shutdown");
        }
    }
    Ok(())
}

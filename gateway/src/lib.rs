//! The nimmer gateway: the front door NPC services talk to. Its layers run one way, each a module with
//! one job (a module only uses the ones listed before it):
//!
//! 1. Wire types and limits: the `nimmer-wire` crate (UIDs, kinds, responses, results, subjects, the token
//!    rule, `BODY_LIMIT`); [`api`]: requests parsed into validated ones; [`error`]; [`metrics`].
//! 2. [`tier`]: the LLM-tier and classifier-tier interface; in-process engines, fakes for tests.
//! 3. [`fair`], [`zones`], [`slots`]: the fair queue, the zone table, each tier's slots (pure or RAII).
//! 4. [`results`]: the bounded JetStream results publisher; [`events`]: GM events handed to their shard.
//!    [`state`]: the [`Gateway`] (tiers, slots, the configuration in effect, zones, adapters, where results
//!    and events go).
//! 5. [`voice`], [`admission`]: traits → adapters; one config snapshot per request → routing, budgets,
//!    degradation, a slot; [`personas`]: the NPCs a zone reports present, pinned in the prefix cache.
//! 6. [`dialog`]: the use case: run a dialog to a response or a stream; the one place a dialog ends.
//! 7. The fronts, type conversion only: [`http`] (JSON, SSE, OpenAI, ops) and [`nats`] (request/reply);
//!    [`reload`] (config and adapter watchers); [`run`] serves them all.
//!
//! The `nimmer` binary (the `cli/` package) parses arguments and calls [`run`].

pub mod admission;
pub mod api;
pub mod budget_sync;
pub mod config_edit;
pub mod dialog;
pub mod error;
pub mod events;
pub mod fair;
pub mod http;
pub mod idempotency;
pub mod metrics;
pub mod nats;
pub mod personas;
pub mod reload;
pub mod requests;
pub mod response_format;
pub mod results;
pub mod shared_answers;
pub mod slots;
pub mod spool;
pub mod state;
pub mod tier;
pub mod voice;
pub mod zones;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use error::{ApiError, GatewayError};
pub use http::Auth;
/// A model tier (the names config files use).
pub use nimmer_config::TierName as Tier;
pub use state::Gateway;

/// How a gateway is served besides its HTTP listener.
#[derive(Debug, Clone)]
pub struct Options {
    /// The config directory to watch for edits (none: the embedded config, no reload).
    pub config_dir: Option<PathBuf>,
    pub auth: Auth,
    /// NATS server URL: enables the NATS front and the results publisher.
    pub nats: Option<String>,
    /// `transport.toml`: the results stream's name.
    pub transport: nimmer_config::TransportFile,
    /// Where finished dialogs wait, fsync'd, while JetStream does not acknowledge them (with `nats`); none:
    /// they wait in memory only and are lost if the process dies first.
    pub spool: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            config_dir: None,
            auth: Auth::default(),
            nats: None,
            transport: nimmer_config::TransportFile::embedded(),
            spool: None,
        }
    }
}

/// The event templates and the shard map: `events/` and `gm.toml` of the config directory where it has
/// them, else the embedded ones.
fn events_config(
    dir: Option<&std::path::Path>,
    config: &nimmer_config::Config,
) -> Result<(nimmer_config::EventCatalog, nimmer_config::GmFile), GatewayError> {
    let catalog = match dir.map(|d| d.join("events")) {
        Some(d) if d.is_dir() => nimmer_config::EventCatalog::load(&d, config)?,
        _ => nimmer_config::EventCatalog::embedded(config)?,
    };
    let map = match dir {
        Some(d) if d.join("gm.toml").is_file() => nimmer_config::GmFile::load(d)?,
        _ => nimmer_config::GmFile::embedded(),
    };
    Ok((catalog, map))
}

/// Serves `gw` on `listener` (and NATS, when configured) until `shutdown` resolves; in-flight requests
/// finish and queued results are published before it returns.
pub async fn run(
    listener: tokio::net::TcpListener,
    gw: Arc<Gateway>,
    opts: Options,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
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
            .connect(nimmer_wire::nats_urls(url))
            .await
            .map_err(|e| GatewayError::NatsConnect {
                url: url.clone(),
                message: e.to_string(),
            })?;
        let spool = match &opts.spool {
            Some(dir) => Some(results::Spool::open(dir)?),
            None => {
                tracing::warn!(
                    "no results spool: dialogs answered while JetStream is unreachable are held in memory only"
                );
                None
            }
        };
        let (sink, publisher) = results::start(
            client.clone(),
            results::PublisherConfig {
                stream: opts.transport.results.stream.clone(),
                replicas: opts.transport.replicas.results,
                durable_wait: Duration::from_millis(opts.transport.results.durable_wait_ms),
            },
            spool,
        );
        gw.set_results(Some(sink));
        nats_tasks.push(publisher);
        let window = gw.live().config.budgets.dialogs.idempotency_window_s;
        if window > 0 {
            gw.share_answers(shared_answers::SharedAnswers::start(
                client.clone(),
                Duration::from_secs(window),
                opts.transport.replicas.results,
            ));
        }
        let (catalog, map) = events_config(opts.config_dir.as_deref(), &gw.live().config)?;
        gw.set_events(events::EventsFront::new(client.clone(), catalog, map));
        let mut rx = stop_rx.clone();
        nats_tasks.push(
            budget_sync::start(client.clone(), gw.clone(), async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await?,
        );
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
    match server.await {
        Ok(r) => r?,
        Err(e) => tracing::error!(error = %e, "the HTTP server task failed"),
    }
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

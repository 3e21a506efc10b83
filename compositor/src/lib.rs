//! Compositors and the canon transport.
//!
//! - [`canon`]: a dialog result → one canon row (its place in the scene from the register) + its outbox row.
//! - [`worker`]: the compositor loop over the shared `RESULTS` consumer: one transaction per batch, ack after
//!   commit, dead letters for bad input, the queue-depth gauge.
//! - [`relay`]: outbox → JetStream `CANON`, one leader by advisory lock, woken by LISTEN/NOTIFY.
//! - [`district`]: the district-distribution fallback: per-district distributors push queued deliveries.
//! - [`player`]: the player client: a player's feed from its checkpoint into its SQLite file, idempotently,
//!   gaps (a checkpoint behind the stream's first message, a recreated stream) filled from canon.
//! - [`resync`]: canon a player's feed no longer holds, served by every compositor from PostgreSQL.
//! - [`streams`]: the streams and consumer, from `transport.toml`.
//!
//! The schema is in `migrations/` and applied by [`connect`].

pub mod canon;
pub mod district;
mod error;
pub mod player;
mod player_store;
pub mod relay;
pub mod resync;
pub mod streams;
pub mod worker;

pub use canon::{Canon, Composed, DialogResult, complete_event, complete_event_in};
pub use error::{CompositorError, Result};
pub use player::{Applied, Gap, PlayerStore, follow, follow_district};
pub use relay::Relay;
pub use worker::{BatchStats, Compositor};

use sqlx::postgres::{PgPool, PgPoolOptions};

/// The canon schema's migrations, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connects to PostgreSQL and brings the canon schema up to date (migrations take their own lock, so many
/// compositors may start at once).
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .connect(url)
        .await?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

/// Runs a compositor process until `shutdown`: the compositor loop, a relay candidate and the depth gauge.
/// The streams and the shared consumer, retried until JetStream answers: a cluster that is still electing
/// its leaders (or a server that is restarting) times requests out, and a compositor started beside it must
/// wait for it, not exit.
async fn ensure_streams(
    js: &async_nats::jetstream::Context,
    t: &nimmer_config::TransportFile,
) -> async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::Config> {
    let mut backoff = std::time::Duration::from_millis(250);
    loop {
        match streams::ensure(js, t).await {
            Ok(c) => return c,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "JetStream streams not ready; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
}

pub async fn serve(
    transport: nimmer_config::TransportFile,
    postgres_url: &str,
    nats: async_nats::Client,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let pool = connect(postgres_url, transport.postgres.max_connections).await?;
    let js = async_nats::jetstream::new(nats.clone());
    tokio::pin!(shutdown);
    let consumer = tokio::select! {
        c = ensure_streams(&js, &transport) => c,
        _ = &mut shutdown => return Ok(()),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let distributor = district::Distributor {
        pool: pool.clone(),
        url: postgres_url.to_string(),
        client: nats.clone(),
        transport: transport.clone(),
    };
    let relay = Relay {
        pool: pool.clone(),
        url: postgres_url.to_string(),
        js: js.clone(),
        transport: transport.clone(),
    };
    let resync_pool = pool.clone();
    let resync_transport = transport.clone();
    let compositor = Compositor {
        pool,
        js,
        transport,
    };
    // Everything runs inside this one future, so dropping it (a crash, in tests an abort) stops all of it.
    let work = async {
        let r = compositor
            .run(consumer.clone(), stopped(stop_rx.clone()))
            .await;
        let _ = stop_tx.send(true);
        r
    };
    let relay = async {
        let r = relay.run(stopped(stop_rx.clone())).await;
        let _ = stop_tx.send(true);
        r
    };
    let distribute = async {
        if distributor.transport.delivery.mode != nimmer_config::DeliveryMode::District {
            return Ok(());
        }
        let r = distributor.run(stopped(stop_rx.clone())).await;
        let _ = stop_tx.send(true);
        r
    };
    // Players' gap resyncs: served while the compositor runs; a failure to serve is logged, not fatal.
    let resync = async {
        if let Err(e) = resync::serve(
            resync_pool,
            nats.clone(),
            &resync_transport,
            stopped(stop_rx.clone()),
        )
        .await
        {
            tracing::warn!(error = %e, "compositor: not serving player resyncs");
        }
    };
    let depth = async {
        tokio::select! {
            _ = worker::report_depth(consumer.clone(), std::time::Duration::from_secs(2)) => {}
            _ = stopped(stop_rx.clone()) => {}
        }
    };
    let trigger = async {
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("compositor: shutting down after the batch in hand");
                let _ = stop_tx.send(true);
            }
            _ = stopped(stop_rx.clone()) => {}
        }
    };
    let (w, r, d, (), (), ()) = tokio::join!(work, relay, distribute, resync, depth, trigger);
    w?;
    r?;
    d?;
    Ok(())
}

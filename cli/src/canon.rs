//! The canon commands: `nimmer compositor` (results -> canon in PostgreSQL -> JetStream CANON), `nimmer
//! events complete`, `nimmer feeds apply` and `nimmer player`. They read only `transport.toml`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum EventsCmd {
    /// Check the event templates (`events/*.toml` in the config directory, else the embedded ones) and list
    /// them with their shard keys, scenes and slots; a broken file is an error naming its key.
    Templates,
    /// Mark an event completed: its register entries (scenes) are pruned and later results for it are
    /// dead-lettered.
    Complete {
        gm_event: String,
        /// PostgreSQL URL (default: `[postgres] url` of transport.toml).
        #[arg(long, env = "NIMMER_POSTGRES")]
        postgres: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum FeedsCmd {
    /// Create or update the streams of every `[[feeds]]` entry in transport.toml (running consumers continue).
    Apply {
        /// NATS server URL, or a cluster's URLs separated by commas.
        #[arg(long, env = "NIMMER_NATS", default_value = "nats://127.0.0.1:4222")]
        nats: String,
    },
}

/// `nimmer player`: a player client.
#[derive(clap::Args)]
pub struct PlayerArgs {
    /// Player id (a participant id in dialog requests).
    #[arg(long)]
    id: String,
    /// The player's SQLite file (default: players/<id>.sqlite).
    #[arg(long)]
    db: Option<PathBuf>,
    /// NATS server URL, or a cluster's URLs separated by commas.
    #[arg(long, env = "NIMMER_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
}

/// `nimmer compositor`: a compositor process.
#[derive(clap::Args)]
pub struct CompositorArgs {
    /// NATS server URL, or a cluster's URLs separated by commas.
    #[arg(long, env = "NIMMER_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// PostgreSQL URL (default: `[postgres] url` of transport.toml).
    #[arg(long, env = "NIMMER_POSTGRES")]
    postgres: Option<String>,
    /// Serve Prometheus metrics (`/metrics`; `nimmer_results_pending` is the autoscaling signal) and
    /// `/healthz` on this address.
    #[arg(long, env = "NIMMER_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
}

pub fn events(config_dir: Option<PathBuf>, cmd: EventsCmd) -> Result<()> {
    let (gm_event, postgres) = match cmd {
        EventsCmd::Templates => return templates(&config_dir),
        EventsCmd::Complete { gm_event, postgres } => (gm_event, postgres),
    };
    let transport = crate::files::transport_config(&config_dir)?;
    let url = postgres.unwrap_or_else(|| transport.postgres.url.clone());
    tokio::runtime::Runtime::new()?.block_on(async move {
        let pool = nimmer_compositor::connect(&url, 1).await?;
        let (known, pruned) = nimmer_compositor::complete_event(&pool, &gm_event).await?;
        if !known {
            bail!("no event `{gm_event}` in the register");
        }
        println!("{gm_event}: completed ({pruned} scene entries pruned)");
        anyhow::Ok(())
    })
}

/// `nimmer events templates`.
fn templates(config_dir: &Option<PathBuf>) -> Result<()> {
    let config = crate::files::load_config(config_dir)?;
    let catalog = crate::files::event_catalog(config_dir, &config)?;
    for (name, e) in &catalog.events {
        let faction = e.faction.as_deref().unwrap_or("-");
        println!(
            "{name}: district {}, theme {}, tier {:?}, faction {faction}; values {:?}",
            e.district, e.theme, e.tier, e.values
        );
        println!("  {}", e.description);
        for s in &e.scenes {
            let start = if s.branch_target {
                "when a branch picks it".to_string()
            } else if s.after.is_empty() {
                "at open".to_string()
            } else {
                format!("after {}", s.after.join(", "))
            };
            let slots: Vec<String> = s
                .slots
                .iter()
                .map(|x| {
                    let gate = x.gate.as_ref().map_or(String::new(), |g| {
                        format!(" [gate {}, {} attempts]", g.classifier, g.attempts)
                    });
                    format!("{} ({}){gate}", x.id, x.kind.as_str())
                })
                .collect();
            println!("  scene {} ({start}): {}", s.id, slots.join(", "));
            if let Some(b) = &s.branch {
                let on: Vec<String> =
                    b.on.iter()
                        .map(|(l, to)| format!("{l} -> {}", to.as_deref().unwrap_or("end")))
                        .collect();
                println!("    branch by {}: {}", b.classifier, on.join(", "));
            }
        }
    }
    Ok(())
}

pub fn feeds(config_dir: Option<PathBuf>, cmd: FeedsCmd) -> Result<()> {
    let FeedsCmd::Apply { nats } = cmd;
    let transport = crate::files::transport_config(&config_dir)?;
    tokio::runtime::Runtime::new()?.block_on(async move {
        let client = async_nats::connect(nimmer_wire::nats_urls(&nats))
            .await
            .with_context(|| format!("connecting to NATS at {nats}"))?;
        let js = async_nats::jetstream::new(client);
        for name in nimmer_compositor::streams::ensure_feeds(&js, &transport).await? {
            println!("{name}: applied");
        }
        anyhow::Ok(())
    })
}

pub fn player(config_dir: Option<PathBuf>, a: PlayerArgs) -> Result<()> {
    let PlayerArgs { id, db, nats } = a;
    let transport = crate::files::transport_config(&config_dir)?;
    let db = db.unwrap_or_else(|| PathBuf::from("players").join(format!("{id}.sqlite")));
    if let Some(parent) = db.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    tokio::runtime::Runtime::new()?.block_on(async move {
        let store = nimmer_compositor::PlayerStore::open(&db).await?;
        let feed = transport.player_subject(&id);
        let from = store.checkpoint(&feed).await?;
        eprintln!(
            "player {id}: {} canon rows in {}, replaying {feed} from sequence {}",
            store.count().await?,
            db.display(),
            from + 1
        );
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(nimmer_wire::nats_urls(&nats))
            .await
            .with_context(|| format!("connecting to NATS at {nats}"))?;
        let js = async_nats::jetstream::new(client);
        nimmer_compositor::follow(
            &js,
            &transport,
            &id,
            &store,
            crate::serve::shutdown_signal(),
            |a| {
                if let Some(g) = &a.gap {
                    eprintln!(
                        "player {id}: gap in {feed} (checkpoint {}, the stream now starts at {}{}): {} rows read back from canon",
                        g.checkpoint,
                        g.first_available,
                        if g.recreated { ", recreated" } else { "" },
                        a.new.len()
                    );
                }
                for c in &a.new {
                    println!(
                        "[{} #{}] {}: {}",
                        c.canon_uid,
                        a.checkpoint,
                        c.npc.as_deref().unwrap_or("-"),
                        c.text
                    );
                }
            },
        )
        .await?;
        store.close().await;
        anyhow::Ok(())
    })
}

pub fn compositor(config_dir: Option<PathBuf>, a: CompositorArgs) -> Result<()> {
    let CompositorArgs {
        nats,
        postgres,
        metrics_listen,
    } = a;
    let transport = crate::files::transport_config(&config_dir)?;
    let url = postgres.unwrap_or_else(|| transport.postgres.url.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client = async_nats::connect(nimmer_wire::nats_urls(&nats))
            .await
            .with_context(|| format!("connecting to NATS at {nats}"))?;
        if let Some(addr) = metrics_listen {
            crate::serve::metrics_endpoint(addr).await?;
        }
        tracing::info!(%nats, "compositor started");
        nimmer_compositor::serve(transport, &url, client, crate::serve::shutdown_signal()).await?;
        tracing::info!("compositor stopped");
        anyhow::Ok(())
    })
}

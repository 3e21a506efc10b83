//! `nimmer`: the gateway binary. This file only parses arguments and calls one module per command:
//!
//! - [`serve`]: `nimmer serve`, the gateway over the three tiers (HTTP, optionally NATS), with hot reload.
//! - [`tier`]: `nimmer tier`, one LLM tier worker served over NATS.
//! - [`models`]: `nimmer models fetch|list`: download, verify (pinned sha256) and cache the models.
//! - [`generate`]: `nimmer generate` (one request through a tier, streamed) and `nimmer classify`.
//! - [`train`]: `nimmer loras train`: a trait-LoRA for the Driver's model from chat examples.
//! - [`canon`]: `nimmer compositor`, `nimmer events complete`, `nimmer feeds apply`, `nimmer player`.
//! - [`gm`]: `nimmer gm --shard NAME`, a GM shard process (directors of open events, leases, takeovers).
//! - [`files`]: which configuration a command reads.

mod canon;
mod files;
mod generate;
mod gm;
mod models;
mod serve;
mod tier;
mod train;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "nimmer",
    version,
    about = "Inference-scheduling gateway for AI-NPC dialog"
)]
struct Cli {
    /// Directory with tiers.toml, classifiers.toml and budgets.toml (and optionally transport.toml); default:
    /// `./config` when it holds them, else the configuration embedded in the binary. `serve` watches it and
    /// applies budget edits live.
    #[arg(long, global = true, env = "NIMMER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Manage model files.
    Models {
        #[command(subcommand)]
        cmd: models::ModelsCmd,
    },
    /// Generate text with a tier (driver or theia), streamed to stdout.
    Generate(generate::GenerateArgs),
    /// Trait-LoRA adapters.
    Loras {
        #[command(subcommand)]
        cmd: train::LorasCmd,
    },
    /// Serve the HTTP API (loads the three tiers, fetching models when missing).
    Serve(serve::ServeArgs),
    /// Run one tier worker (driver, theia or saturn) served over NATS as the service `nimmer-<tier>`, for
    /// gateways on other hosts (`via = "nats"` in their tiers.toml; loads the model, fetching it when
    /// missing).
    Tier(tier::TierArgs),
    /// Run a compositor: results from JetStream RESULTS become canon rows in PostgreSQL (with an outbox in
    /// the same transaction), relayed to the JetStream stream CANON (settings in transport.toml).
    Compositor(canon::CompositorArgs),
    /// Run GM shards: open the events the shard map (gm.toml) assigns them, direct each (one task walking its
    /// template through the gateways), and take over the events of the shard's processes that die.
    Gm(gm::GmArgs),
    /// Game-master events in the canon register.
    Events {
        #[command(subcommand)]
        cmd: canon::EventsCmd,
    },
    /// Derived canon feeds.
    Feeds {
        #[command(subcommand)]
        cmd: canon::FeedsCmd,
    },
    /// Run a player client: replay the player's feed from its checkpoint into its SQLite file, then follow it
    /// live (prints each new canon row).
    Player(canon::PlayerArgs),
    /// Classify inputs with one of Saturn's classifiers; prints JSON.
    Classify {
        /// Classifier name from classifiers.toml.
        #[arg(long, short)]
        classifier: String,
        /// Texts to classify.
        #[arg(required = true)]
        inputs: Vec<String>,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let dir = files::config_dir(cli.config);
    match cli.cmd {
        Cmd::Models { cmd } => models::run(&files::load_config(&dir)?, cmd),
        Cmd::Generate(a) => generate::generate(&files::load_config(&dir)?, a),
        Cmd::Classify { classifier, inputs } => generate::classify(
            &files::load_config(&dir)?,
            dir.as_deref(),
            classifier,
            inputs,
        ),
        Cmd::Loras {
            cmd: train::LorasCmd::Train(a),
        } => train::train(&files::load_config(&dir)?, a),
        Cmd::Serve(a) => serve::run(dir, a),
        Cmd::Tier(a) => tier::run(&files::load_config(&dir)?, dir.as_deref(), a),
        Cmd::Compositor(a) => canon::compositor(dir, a),
        Cmd::Gm(a) => gm::run(dir, a),
        Cmd::Events { cmd } => canon::events(dir, cmd),
        Cmd::Feeds { cmd } => canon::feeds(dir, cmd),
        Cmd::Player(a) => canon::player(dir, a),
    }
}

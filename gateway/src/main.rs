//! `nimmer`: the gateway binary. This file only parses arguments and calls into the crates.
//!
//! - `nimmer models fetch|list`: download, verify (pinned sha256) and cache the configured models.
//! - `nimmer generate`: one request through a tier's engine, streamed to stdout.
//! - `nimmer classify`: Saturn classifiers over the given inputs, as JSON.
//!
//! - `nimmer loras train`: train a trait-LoRA for the Driver's model from a JSON Lines file of chat examples.
//!
//! - `nimmer compositor`: a compositor process (results -> canon in PostgreSQL -> JetStream CANON).
//! - `nimmer events complete E`: mark a game-master event completed (prunes its register entries).
//! - `nimmer feeds apply`: create or update the derived feeds of transport.toml.
//! - `nimmer player --id P`: a player client (its feed, from its checkpoint, into its SQLite file).
//!
//! - `nimmer serve`: the gateway over the three tiers (HTTP, optionally NATS), with config hot reload.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use nimmer_config::Config;
use nimmer_tiers::fetch::{Verify, ensure_llm, ensure_model, model_dir};
use nimmer_tiers::tokenizer::Message;
use nimmer_tiers::{
    EngineLimits, Event, GenerateRequest, LlmHandle, Prompt, SamplingParams, SaturnHandle,
};

#[derive(Parser)]
#[command(
    name = "nimmer",
    version,
    about = "Inference-scheduling gateway for AI-NPC dialog"
)]
struct Cli {
    /// Directory with tiers.toml, classifiers.toml and budgets.toml (default: `./config` when it holds
    /// them, else the configuration embedded in the binary). `serve` watches it and applies edits live.
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
        cmd: ModelsCmd,
    },
    /// Generate text with a tier (driver or theia), streamed to stdout.
    Generate(GenerateArgs),
    /// Trait-LoRA adapters.
    Loras {
        #[command(subcommand)]
        cmd: LorasCmd,
    },
    /// Serve the HTTP API (loads the three tiers, fetching models when missing).
    Serve {
        /// Address to listen on.
        #[arg(long, env = "NIMMER_LISTEN", default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// NATS server URL (e.g. nats://127.0.0.1:4222): serve requests on nimmerverse.gateway.<kind>.<zone>
        /// and publish finished dialogs to the JetStream stream RESULTS.
        #[arg(long, env = "NIMMER_NATS")]
        nats: Option<String>,
        /// Bearer tokens NPC services must send (comma-separated; none: open).
        #[arg(long, env = "NIMMER_API_TOKENS", value_delimiter = ',')]
        api_token: Vec<String>,
        /// Bearer tokens for ops endpoints: zones, config, metrics (comma-separated; none: open).
        #[arg(long, env = "NIMMER_OPS_TOKENS", value_delimiter = ',')]
        ops_token: Vec<String>,
    },
    /// Run a compositor: results from JetStream RESULTS become canon rows in PostgreSQL (with an outbox in
    /// the same transaction), relayed to the JetStream stream CANON (settings in transport.toml).
    Compositor {
        /// NATS server URL.
        #[arg(long, env = "NIMMER_NATS", default_value = "nats://127.0.0.1:4222")]
        nats: String,
        /// PostgreSQL URL (default: `[postgres] url` of transport.toml).
        #[arg(long, env = "NIMMER_POSTGRES")]
        postgres: Option<String>,
        /// Serve Prometheus metrics (`/metrics`; `nimmer_results_pending` is the autoscaling signal) and
        /// `/healthz` on this address.
        #[arg(long, env = "NIMMER_METRICS_LISTEN")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Game-master events in the canon register.
    Events {
        #[command(subcommand)]
        cmd: EventsCmd,
    },
    /// Derived canon feeds.
    Feeds {
        #[command(subcommand)]
        cmd: FeedsCmd,
    },
    /// Run a player client: replay the player's feed from its checkpoint into its SQLite file, then follow it
    /// live (prints each new canon row).
    Player {
        /// Player id (a participant id in dialog requests).
        #[arg(long)]
        id: String,
        /// The player's SQLite file (default: players/<id>.sqlite).
        #[arg(long)]
        db: Option<PathBuf>,
        #[arg(long, env = "NIMMER_NATS", default_value = "nats://127.0.0.1:4222")]
        nats: String,
    },
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

#[derive(Subcommand)]
enum ModelsCmd {
    /// Download, verify and cache models (all configured models by default); re-hashes present files.
    Fetch {
        /// Only these models.
        names: Vec<String>,
    },
    /// List configured models, where they live and whether they are present.
    List,
}

#[derive(Subcommand)]
enum EventsCmd {
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
enum FeedsCmd {
    /// Create or update the streams of every `[[feeds]]` entry in transport.toml (running consumers continue).
    Apply {
        #[arg(long, env = "NIMMER_NATS", default_value = "nats://127.0.0.1:4222")]
        nats: String,
    },
}

#[derive(Subcommand)]
enum LorasCmd {
    /// Train a LoRA for the Driver tier's model with candle's autograd over its dequantized weights and
    /// write it as a PEFT adapter (adapter_config.json + adapter_model.safetensors).
    Train(TrainArgs),
}

#[derive(clap::Args)]
struct TrainArgs {
    /// JSON Lines file: one {"system"?, "user", "reply"} object per line.
    #[arg(long)]
    data: PathBuf,
    /// Output directory (created; an existing adapter there is replaced).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha (scale = alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    alpha: f32,
    /// Target modules (PEFT names, comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    modules: Vec<String>,
    #[arg(long, default_value_t = 120)]
    steps: usize,
    /// Examples per step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Store f32 tensors instead of f16.
    #[arg(long)]
    f32: bool,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// driver or theia
    #[arg(long, default_value = "driver")]
    tier: String,
    /// System message.
    #[arg(long, default_value = "You are a helpful assistant.")]
    system: String,
    /// User message (rendered through the model's chat template).
    #[arg(long, conflicts_with = "raw")]
    user: Option<String>,
    /// Raw prompt text, not templated.
    #[arg(long)]
    raw: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop strings (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// A PEFT adapter directory to generate with (driver; repeatable: the adapters blend with weight 1).
    #[arg(long)]
    adapter: Vec<PathBuf>,
}

/// The config directory in effect: `--config`, else `./config` when it holds the three files.
fn config_dir(given: Option<PathBuf>) -> Option<PathBuf> {
    given.or_else(|| {
        let d = PathBuf::from("config");
        ["tiers.toml", "classifiers.toml", "budgets.toml"]
            .iter()
            .all(|f| d.join(f).is_file())
            .then_some(d)
    })
}

fn load_config(dir: &Option<PathBuf>) -> Result<Config> {
    Ok(match dir {
        Some(d) => Config::load(d)?,
        None => Config::embedded(),
    })
}

/// transport.toml from the config directory, else the embedded default.
fn transport_config(dir: &Option<PathBuf>) -> Result<nimmer_config::TransportFile> {
    Ok(match dir {
        Some(d) if d.join("transport.toml").is_file() => nimmer_config::TransportFile::load(d)?,
        _ => nimmer_config::TransportFile::embedded(),
    })
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

fn run(mut cli: Cli) -> Result<()> {
    cli.config = config_dir(cli.config);
    let cfg = load_config(&cli.config)?;
    match cli.cmd {
        Cmd::Models {
            cmd: ModelsCmd::Fetch { names },
        } => {
            let names: Vec<String> = if names.is_empty() {
                cfg.tiers.models.keys().cloned().collect()
            } else {
                names
            };
            for n in names {
                if !cfg.tiers.models.contains_key(&n) {
                    bail!(
                        "no model `{n}` in {} (known: {})",
                        cfg.origin,
                        cfg.tiers
                            .models
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                let dir = ensure_model(&cfg.tiers, &n, Verify::Full)?;
                println!("{n}: ok ({})", dir.display());
            }
            Ok(())
        }
        Cmd::Models {
            cmd: ModelsCmd::List,
        } => {
            for (name, spec) in &cfg.tiers.models {
                let dir = model_dir(&cfg.tiers, name, spec);
                let present = spec.files.iter().all(|f| dir.join(&f.name).exists());
                println!(
                    "{name}\t{:?}\t{}\t{}\n  {}",
                    spec.format,
                    if present { "present" } else { "missing" },
                    dir.display(),
                    spec.about
                );
            }
            Ok(())
        }
        Cmd::Generate(a) => generate(&cfg, a),
        Cmd::Loras {
            cmd: LorasCmd::Train(a),
        } => train(&cfg, a),
        Cmd::Serve {
            listen,
            nats,
            api_token,
            ops_token,
        } => {
            let opts = nimmer::Options {
                config_dir: cli.config,
                auth: nimmer::Auth {
                    npc: api_token.into_iter().filter(|t| !t.is_empty()).collect(),
                    ops: ops_token.into_iter().filter(|t| !t.is_empty()).collect(),
                },
                nats,
            };
            serve(cfg, opts, listen)
        }
        Cmd::Events {
            cmd: EventsCmd::Complete { gm_event, postgres },
        } => {
            let transport = transport_config(&cli.config)?;
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
        Cmd::Feeds {
            cmd: FeedsCmd::Apply { nats },
        } => {
            let transport = transport_config(&cli.config)?;
            tokio::runtime::Runtime::new()?.block_on(async move {
                let client = async_nats::connect(&nats)
                    .await
                    .with_context(|| format!("connecting to NATS at {nats}"))?;
                let js = async_nats::jetstream::new(client);
                for name in nimmer_compositor::streams::ensure_feeds(&js, &transport).await? {
                    println!("{name}: applied");
                }
                anyhow::Ok(())
            })
        }
        Cmd::Player { id, db, nats } => {
            let transport = transport_config(&cli.config)?;
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
                    .connect(&nats)
                    .await
                    .with_context(|| format!("connecting to NATS at {nats}"))?;
                let js = async_nats::jetstream::new(client);
                nimmer_compositor::follow(&js, &transport, &id, &store, shutdown_signal(), |a| {
                    for c in &a.new {
                        println!(
                            "[{} #{}] {}: {}",
                            c.canon_uid,
                            a.checkpoint,
                            c.npc.as_deref().unwrap_or("-"),
                            c.text
                        );
                    }
                })
                .await?;
                store.close().await;
                anyhow::Ok(())
            })
        }
        Cmd::Compositor {
            nats,
            postgres,
            metrics_listen,
        } => {
            let transport = transport_config(&cli.config)?;
            let url = postgres.unwrap_or_else(|| transport.postgres.url.clone());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let client = async_nats::connect(&nats)
                    .await
                    .with_context(|| format!("connecting to NATS at {nats}"))?;
                if let Some(addr) = metrics_listen {
                    let handle = nimmer::metrics::handle();
                    let app = axum::Router::new()
                        .route(
                            "/metrics",
                            axum::routing::get(move || async move { handle.render() }),
                        )
                        .route("/healthz", axum::routing::get(|| async { "ok" }));
                    let listener = tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding {addr}"))?;
                    tracing::info!(%addr, "compositor metrics listening");
                    tokio::spawn(async move { axum::serve(listener, app).await });
                }
                tracing::info!(%nats, "compositor started");
                nimmer_compositor::serve(transport, &url, client, shutdown_signal()).await?;
                tracing::info!("compositor stopped");
                anyhow::Ok(())
            })
        }
        Cmd::Classify { classifier, inputs } => {
            let spec = &cfg.tiers.tiers.saturn;
            let dir = ensure_model(&cfg.tiers, &spec.model, Verify::Cached)?;
            let base = cli.config.as_deref();
            let saturn = SaturnHandle::start(spec, &dir, &cfg.classifiers, base)?;
            let out = saturn.classify_blocking(&classifier, inputs.clone())?;
            let rows: Vec<_> = inputs.iter().zip(out).map(|(i, c)| serde_json::json!({ "input": i, "label": c.label, "scores": c.scores, "latency_ms": c.latency_ms })).collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
            Ok(())
        }
    }
}

fn generate(cfg: &Config, a: GenerateArgs) -> Result<()> {
    let (spec, budget) = match a.tier.as_str() {
        "driver" => (&cfg.tiers.tiers.driver, &cfg.budgets.tiers.driver),
        "theia" => (&cfg.tiers.tiers.theia, &cfg.budgets.tiers.theia),
        other => bail!("unknown tier `{other}` (driver, theia)"),
    };
    let model = ensure_llm(&cfg.tiers, &spec.model, Verify::Cached)?;
    let handle = LlmHandle::start(&a.tier, spec, EngineLimits::of(budget), &model)
        .with_context(|| format!("starting the {} tier", a.tier))?;
    let prompt = match (a.raw, a.user) {
        (Some(raw), _) => Prompt::Text(raw),
        (None, Some(user)) => Prompt::Chat(vec![
            Message::new("system", &a.system),
            Message::new("user", &user),
        ]),
        (None, None) => bail!("give --user MESSAGE or --raw PROMPT"),
    };
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
        max_tokens: a.max_tokens,
        stop: a.stop,
        ignore_eos: false,
    };
    let mut blend = nimmer_loras::Blend::default();
    let base = handle.info().model.lora_base();
    for dir in &a.adapter {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let adapter = nimmer_loras::load_peft(dir, &name, &base)?;
        blend.parts.push((std::sync::Arc::new(adapter), 1.0));
    }
    let mut rx = handle.generate(GenerateRequest {
        prompt,
        params,
        lora: (!blend.is_empty()).then(|| std::sync::Arc::new(blend)),
    })?;
    let mut out = std::io::stdout().lock();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token { text, .. } => {
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
            Event::Done(d) => {
                writeln!(out)?;
                eprintln!(
                    "[{} prompt + {} generated tokens, finish {:?}, ttft {:.0} ms, {:.1} tok/s]",
                    d.prompt_tokens,
                    d.completion_tokens,
                    d.finish_reason,
                    d.ttft_ms,
                    d.completion_tokens as f64 / ((d.total_ms - d.ttft_ms).max(1e-3) / 1e3)
                );
                return Ok(());
            }
            Event::Error(e) => bail!("engine: {e}"),
        }
    }
    bail!("the engine stopped before finishing")
}

fn train(cfg: &Config, a: TrainArgs) -> Result<()> {
    use nimmer_tiers::llama::train::{TrainOptions, Trainer, read_examples};
    let modules = a
        .modules
        .iter()
        .map(|m| {
            nimmer_loras::Module::from_peft_name(m.trim()).with_context(|| {
                format!("`{m}` is not a llama projection (q_proj, ..., down_proj)")
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let examples = read_examples(&a.data)?;
    let model_name = &cfg.tiers.tiers.driver.model;
    let model = ensure_llm(&cfg.tiers, model_name, Verify::Cached)?;
    eprintln!(
        "training a rank-{} LoRA on {} ({} examples, {} steps of {})",
        a.rank,
        model_name,
        examples.len(),
        a.steps,
        a.batch
    );
    let mut trainer = Trainer::new(
        &model,
        TrainOptions {
            rank: a.rank,
            alpha: a.alpha,
            modules,
            steps: a.steps,
            batch: a.batch,
            lr: a.lr,
            seed: a.seed,
        },
    )?;
    let bar = indicatif::ProgressBar::new(a.steps as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} steps  {msg}",
        )?
        .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let mut first = None;
    let mut last = 0f32;
    trainer.train(&examples, |r| {
        first.get_or_insert(r.loss);
        last = r.loss;
        bar.set_position(r.step as u64);
        bar.set_message(format!("loss {:.3} ({} reply tokens)", r.loss, r.tokens));
        if !bar.is_hidden() {
            return;
        }
        if r.step % 10 == 0 || r.step == a.steps {
            eprintln!("step {}/{}: loss {:.3}", r.step, a.steps, r.loss);
        }
    })?;
    bar.finish();
    let name = a
        .out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    let adapter = trainer.adapter(&name)?;
    let store = if a.f32 {
        nimmer_loras::StoreAs::F32
    } else {
        nimmer_loras::StoreAs::F16
    };
    nimmer_loras::save_peft_as(&adapter, &trainer.base(), &a.out, store)?;
    eprintln!(
        "wrote {} (loss {:.3} -> {:.3}, {:.0} s)",
        a.out.display(),
        first.unwrap_or(0.0),
        last,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn serve(cfg: Config, opts: nimmer::Options, listen: std::net::SocketAddr) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        tracing::info!(config = %cfg.origin, "loading tiers");
        let dir = opts.config_dir.clone();
        let gw =
            tokio::task::spawn_blocking(move || nimmer::core::Gateway::start(cfg, dir.as_deref()))
                .await??;
        tracing::info!(addr = %listener.local_addr()?, nats = ?opts.nats, "nimmer gateway listening");
        nimmer::run(listener, std::sync::Arc::new(gw), opts, shutdown_signal()).await?;
        tracing::info!("shut down");
        Ok(())
    })
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
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

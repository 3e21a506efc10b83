//! city-bench's command line: the city load, and each workload's own settings.

use clap::Parser;

#[derive(Parser, Clone)]
#[command(about = "City-scale load on the gateway; writes figures into benches/RESULTS.md")]
pub struct Args {
    /// Active zones.
    #[arg(long, default_value_t = 515)]
    pub zones: usize,
    /// Mean arrivals per second, all zones together.
    #[arg(long, default_value_t = 6.0)]
    pub rate: f64,
    /// How long arrivals go on.
    #[arg(long, default_value_t = 60)]
    pub duration_s: u64,
    /// Zones that flood (5% of 515).
    #[arg(long, default_value_t = 26)]
    pub hot_zones: usize,
    /// Share of all arrivals that come from the hot zones.
    #[arg(long, default_value_t = 0.4)]
    pub hot_share: f64,
    /// New tokens per generation request.
    #[arg(long, default_value_t = 24)]
    pub max_tokens: usize,
    /// Requests per overhead measurement (0 skips it).
    #[arg(long, default_value_t = 200)]
    pub overhead_n: usize,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Config directory (default: the embedded config).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Write the figures into this file (between the `city-bench:<label>` markers).
    #[arg(long)]
    pub write: Option<std::path::PathBuf>,
    /// city: write the run's HTML report here (default with `--write`: `reports/city-<label>.html` beside
    /// the results file).
    #[arg(long)]
    pub html: Option<std::path::PathBuf>,
    /// Names the run in the results file (a run replaces the previous one of the same label).
    #[arg(long, default_value = "nominal")]
    pub label: String,
    /// `city`: the zones' mixed load above; `personas`: the NPCs' real prompts in conversations, swept over
    /// `--rates` with the prefix cache off, then on; `burst`: a flood against a quiet line, and weights 1:2,
    /// under the step schedule before issue 13 and the fair one; `events`: the city runs itself (GM shards open
    /// events at `--event-rate`; every piece a process), sampled every `--every-s`.
    #[arg(long, default_value = "city")]
    pub workload: String,
    /// personas: conversations per rate.
    #[arg(long, default_value_t = 24)]
    pub conversations: usize,
    /// personas: player lines per conversation.
    #[arg(long, default_value_t = 4)]
    pub turns: usize,
    /// personas: NPCs the conversations talk to (the first of `benches/data/city/personas.jsonl`).
    #[arg(long, default_value_t = 16)]
    pub npcs: usize,
    /// personas: conversation arrivals per second to sweep.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.2,0.4")]
    pub rates: Vec<f64>,
    /// personas: pause between a reply and the player's next line (ms).
    #[arg(long, default_value_t = 500)]
    pub think_ms: u64,
    /// personas: NPCs speak in their trait-LoRA voices.
    #[arg(long)]
    pub voices: bool,
    /// personas: drive this OpenAI-compatible server (e.g. llama-server) instead of an in-process nimmer.
    #[arg(long)]
    pub target: Option<String>,
    /// personas: only the cached run (skip the run with the prefix cache off).
    #[arg(long)]
    pub cache_only: bool,
    /// events: events opened per second (Poisson), all shards together.
    #[arg(long, default_value_t = 0.5)]
    pub event_rate: f64,
    /// events: seconds between samples.
    #[arg(long, default_value_t = 60)]
    pub every_s: u64,
    /// events: the `nimmer` binary the processes run (default: target/release/nimmer).
    #[arg(long)]
    pub nimmer: Option<std::path::PathBuf>,
    /// burst: dialogs the flooding zone sends at once.
    #[arg(long, default_value_t = 64)]
    pub flood: usize,
    /// burst: rounds (each runs both schedules).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
}

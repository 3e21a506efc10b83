//! `nimmer generate`: one request through a tier's engine, streamed to stdout; `nimmer classify`: Saturn's
//! classifiers over the given inputs, as JSON.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nimmer_config::Config;
use nimmer_tiers::fetch::{Verify, ensure_llm, ensure_model};
use nimmer_tiers::tokenizer::Message;
use nimmer_tiers::{
    EngineLimits, Event, GenerateRequest, LlmHandle, Prompt, SamplingParams, SaturnHandle,
};

#[derive(clap::Args)]
pub struct GenerateArgs {
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

/// The LLM tier named `tier` to run in this process: its spec and budget (an error for a tier whose model
/// lives on an OpenAI-compatible server).
pub fn local_llm<'a>(
    cfg: &'a Config,
    tier: &str,
) -> Result<(
    &'a nimmer_config::LlmTierSpec,
    &'a nimmer_config::TierBudget,
)> {
    let (spec, budget) = match tier {
        "driver" => (&cfg.tiers.tiers.driver, &cfg.budgets.tiers.driver),
        "theia" => (&cfg.tiers.tiers.theia, &cfg.budgets.tiers.theia),
        other => bail!("unknown tier `{other}` (driver, theia)"),
    };
    if spec.via == nimmer_config::Via::OpenAi {
        bail!(
            "tiers.{tier} runs on the OpenAI-compatible server at {} (via = \"openai\"): no model of it \
             runs here; use a configuration whose {tier} tier names a model under [models]",
            spec.url.as_deref().unwrap_or("?")
        );
    }
    Ok((spec, budget))
}

pub fn generate(cfg: &Config, a: GenerateArgs) -> Result<()> {
    let (spec, budget) = local_llm(cfg, &a.tier)?;
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
        ..SamplingParams::default()
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
        deadline: None,
        share: Default::default(),
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
            Event::Expired => bail!("the request expired before it started"),
        }
    }
    bail!("the engine stopped before finishing")
}

/// Classifies `inputs` with `classifier` and prints one JSON row per input.
pub fn classify(
    cfg: &Config,
    config_dir: Option<&Path>,
    classifier: String,
    inputs: Vec<String>,
) -> Result<()> {
    let spec = &cfg.tiers.tiers.saturn;
    let dir = ensure_model(&cfg.tiers, &spec.model, Verify::Cached)?;
    let base = config_dir;
    let saturn = SaturnHandle::start(spec, &dir, &cfg.classifiers, base)?;
    let out = saturn.classify_blocking(&classifier, inputs.clone())?;
    let rows: Vec<_> = inputs.iter().zip(out).map(|(i, c)| serde_json::json!({ "input": i, "label": c.label, "scores": c.scores, "latency_ms": c.latency_ms })).collect();
    println!("{}", serde_json::to_string_pretty(&rows)?);
    Ok(())
}

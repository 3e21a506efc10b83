//! `nimmer loras train`: train a trait-LoRA for the Driver's model from a JSON Lines file of chat examples.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use nimmer_config::Config;
use nimmer_tiers::fetch::{Verify, ensure_llm};

#[derive(Subcommand)]
pub enum LorasCmd {
    /// Train a LoRA for the Driver tier's model with candle's autograd over its dequantized weights and
    /// write it as a PEFT adapter (adapter_config.json + adapter_model.safetensors).
    Train(TrainArgs),
}

#[derive(clap::Args)]
pub struct TrainArgs {
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

pub fn train(cfg: &Config, a: TrainArgs) -> Result<()> {
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
    let model_name = &crate::generate::local_llm(cfg, "driver")?.0.model;
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

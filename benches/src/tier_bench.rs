//! Tier benchmark: prefill tok/s, decode tok/s at several concurrencies, time to first token and inter-token
//! latency percentiles, peak RSS; Saturn embeddings/s. Writes a Markdown table (and the machine and command)
//! into `benches/RESULTS.md` between markers, replacing the previous run of the same tier.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use nimmer_benches::{machine, machine_on, pct, peak_rss_mib, write_block};
use nimmer_config::Config;
use nimmer_tiers::fetch::{Verify, ensure_llm, ensure_model};
use nimmer_tiers::{Event, GenerateRequest, LlmHandle, Prompt, SamplingParams, Schedule, Share};

#[derive(Parser)]
#[command(about = "Benchmark a model tier and record the figures in benches/RESULTS.md")]
struct Args {
    /// driver, theia, saturn, or reference (candle's own quantized_llama on the Driver's file, batch 1)
    #[arg(long, default_value = "driver")]
    tier: String,
    /// Concurrency levels for the decode test.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16,32")]
    concurrency: Vec<usize>,
    /// Rounds over all concurrency levels (interleaved, so machine noise hits every level alike).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Tokens generated per request in the decode test.
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Sampling temperature in the decode test (0 = greedy; the city's dialog samples at 0.7, seeded).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Prompt length for the cold-prefill test.
    #[arg(long, default_value_t = 512)]
    prefill_tokens: usize,
    /// Distinct prompts arriving together in the cold-prefill test (aggregate prompt tok/s per level).
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    prefill_concurrency: Vec<usize>,
    /// Only the cold-prefill test (print it; skip the decode test).
    #[arg(long)]
    prefill_only: bool,
    /// Step schedules to measure in the decode test, interleaved within each round (`fair,fcfs` compares
    /// the weighted fair step planner with first come, first served). Each request runs for its own zone.
    #[arg(long, value_delimiter = ',', default_value = "fair", value_parser = parse_schedule)]
    schedules: Vec<Schedule>,
    /// Config directory (default: the embedded config).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Override the tier's backend (nimmer or candle).
    #[arg(long)]
    backend: Option<String>,
    /// Override the tier's device (cpu, or cuda: needs a `--features cuda` build and a GPU).
    #[arg(long)]
    device: Option<String>,
    /// Write the table into this file (between markers for the tier).
    #[arg(long)]
    write: Option<std::path::PathBuf>,
}

fn parse_schedule(s: &str) -> Result<Schedule, String> {
    match s {
        "fair" => Ok(Schedule::Fair),
        "fcfs" => Ok(Schedule::Fcfs),
        other => Err(format!("unknown schedule `{other}` (fair, fcfs)")),
    }
}

fn schedule_name(s: Schedule) -> &'static str {
    match s {
        Schedule::Fair => "fair",
        Schedule::Fcfs => "fcfs",
    }
}

/// One concurrency level measured in one round.
struct Measured {
    round: usize,
    concurrency: usize,
    schedule: Schedule,
    /// Steady-state aggregate decode tok/s.
    tps: f64,
    ttft: Vec<f64>,
    itl: Vec<f64>,
}

struct Run {
    /// (first token time, per-token times, done time) per request.
    tokens: Vec<Vec<Instant>>,
    start: Instant,
}

fn run_concurrent(h: &LlmHandle, reqs: Vec<GenerateRequest>) -> Result<Run> {
    let start = Instant::now();
    let streams: Vec<_> = reqs
        .into_iter()
        .map(|r| h.generate(r))
        .collect::<Result<_, _>>()?;
    let handles: Vec<_> = streams
        .into_iter()
        .map(|mut rx| {
            std::thread::spawn(move || {
                let mut times = Vec::new();
                while let Some(ev) = rx.blocking_recv() {
                    match ev {
                        Event::Token { .. } => times.push(Instant::now()),
                        Event::Done(_) => break,
                        Event::Error(e) => panic!("{e}"),
                        Event::Expired => panic!("expired without a deadline"),
                    }
                }
                times
            })
        })
        .collect();
    let tokens = handles
        .into_iter()
        .map(|j| j.join().expect("collector"))
        .collect();
    Ok(Run { tokens, start })
}

fn main() -> Result<()> {
    nimmer_benches::init_tracing();
    let args = Args::parse();
    if args.prefill_only && args.write.is_some() {
        anyhow::bail!("--prefill-only prints its figures; drop --write (or --prefill-only)");
    }
    let cfg = match &args.config {
        Some(d) => Config::load(d)?,
        None => Config::embedded(),
    };
    let table = match args.tier.as_str() {
        "driver" | "theia" => bench_llm(&args, &cfg)?,
        "saturn" => bench_saturn(&args, &cfg)?,
        "reference" => bench_reference(&args, &cfg)?,
        other => anyhow::bail!("unknown tier `{other}` (driver, theia, saturn, reference)"),
    };
    if table.is_empty() {
        return Ok(()); // --prefill-only printed its line
    }
    println!("{table}");
    if let Some(path) = &args.write {
        let key = match args.device.as_deref() {
            Some("cuda") => format!("tier-bench:{}-cuda", args.tier),
            _ => format!("tier-bench:{}", args.tier),
        };
        write_block(path, &key, &table)?;
    }
    Ok(())
}

fn bench_llm(args: &Args, cfg: &Config) -> Result<String> {
    let (spec, budget) = if args.tier == "driver" {
        (cfg.tiers.tiers.driver.clone(), &cfg.budgets.tiers.driver)
    } else {
        (cfg.tiers.tiers.theia.clone(), &cfg.budgets.tiers.theia)
    };
    let mut limits = nimmer_tiers::EngineLimits::of(budget);
    // Cold figures: the prefix cache would serve repeated prompts (city-bench measures it).
    limits.prefix_cache_bytes = 0;
    let model = ensure_llm(&cfg.tiers, &spec.model, Verify::Cached)?;
    let mut spec = spec;
    spec.backend = match args.backend.as_deref() {
        None => spec.backend,
        Some("nimmer") => Some(nimmer_config::Backend::Nimmer),
        Some("candle") => Some(nimmer_config::Backend::Candle),
        Some(other) => anyhow::bail!("unknown backend `{other}` (nimmer, candle)"),
    };
    if let Some(d) = &args.device {
        spec.device = nimmer_benches::parse_device(d)?;
    }
    let most = args
        .concurrency
        .iter()
        .chain(&args.prefill_concurrency)
        .copied()
        .max()
        .unwrap_or(1);
    spec.max_batch = spec.max_batch.max(most);
    spec.queue = spec.queue.max(most);
    limits.batch_token_budget = limits.batch_token_budget.max(spec.max_batch);
    limits.resident = limits.resident.max(most);
    limits.step_rows = limits.step_rows.max(most);
    let h = LlmHandle::start(&args.tier, &spec, limits, &model).context("starting the engine")?;
    let mut rows = Vec::new();

    // Cold prefill: `n` distinct prompts arriving together, one new token each. The prefix cache is off for
    // the whole bench (`limits` above), so every prompt token is prefilled.
    let filler =
        "The old lighthouse keeper climbed the spiral stairs every evening to light the lamp. ";
    let mut text = filler.to_string();
    while h.tokenize(&Prompt::Text(text.clone()))?.len() < args.prefill_tokens {
        text.push_str(filler);
    }
    let ids: Vec<u32> = h.tokenize(&Prompt::Text(text))?[..args.prefill_tokens].to_vec();
    let mut prefill: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for round in 0..3 {
        for &n in &args.prefill_concurrency {
            let reqs = (0..n)
                .map(|i| {
                    let mut p = ids.clone();
                    p.rotate_left((round * 131 + i * 17) % ids.len());
                    GenerateRequest {
                        prompt: Prompt::Tokens(p),
                        params: SamplingParams {
                            ignore_eos: true,
                            ..SamplingParams::greedy(1)
                        },
                        lora: None,
                        deadline: None,
                        share: Share::default(),
                    }
                })
                .collect();
            let r = run_concurrent(&h, reqs)?;
            let last = r.tokens.iter().map(|t| t[0]).max().expect("tokens");
            let tps = (n * args.prefill_tokens) as f64 / last.duration_since(r.start).as_secs_f64();
            eprintln!(
                "round {round}: cold prefill of {n} x {}: {tps:.0} tok/s",
                args.prefill_tokens
            );
            prefill.entry(n).or_default().push(tps);
        }
    }
    let prefill_tps = prefill
        .iter_mut()
        .map(|(n, v)| {
            let runs = v
                .iter()
                .map(|t| format!("{t:.0}"))
                .collect::<Vec<_>>()
                .join(", ");
            format!("{n} at a time **{:.0} tok/s** ({runs})", pct(v, 0.5))
        })
        .collect::<Vec<_>>()
        .join(", ");

    // Rounds interleave the concurrency levels so that slow drifts of a shared machine hit all of them alike;
    // the table reports per-level medians and the ratio to batch 1 as the median of per-round ratios.
    if args.prefill_only {
        println!("{} ({}): {prefill_tps}", h.info().kernel, args.tier);
        return Ok(String::new());
    }
    let mut results: Vec<Measured> = Vec::new();
    let runs = (0..args.rounds).flat_map(|r| {
        args.concurrency
            .iter()
            .flat_map(move |&c| args.schedules.iter().map(move |&s| (r, c, s)))
    });
    for (round, c, schedule) in runs {
        // FCFS is the engine before issue 13: no step target either.
        h.set_limits(nimmer_tiers::EngineLimits {
            schedule,
            step_target: match schedule {
                Schedule::Fcfs => None,
                Schedule::Fair => limits.step_target,
            },
            ..h.limits()
        });
        let users = [
            "Tell me about the harbour.",
            "What do the guards say about the thief?",
            "Describe the market at dawn.",
            "Why is the bridge closed?",
        ];
        let reqs = (0..c)
            .map(|i| GenerateRequest {
                prompt: Prompt::Chat(vec![
                    nimmer_tiers::tokenizer::Message::new(
                        "system",
                        "You are a townsperson in a busy port city.",
                    ),
                    nimmer_tiers::tokenizer::Message::new("user", users[i % users.len()]),
                ]),
                params: SamplingParams {
                    ignore_eos: true,
                    temperature: args.temperature,
                    seed: Some(i as u64),
                    ..SamplingParams::greedy(args.gen_tokens)
                },
                lora: None,
                deadline: None,
                share: Share::zone(&format!("zone-{i}"), "street", 1.0, 0),
            })
            .collect();
        let r = run_concurrent(&h, reqs)?;
        // Steady-state decode: from the moment every sequence has its first token (all prefills done) to the
        // moment the first sequence finishes, so every step in the window decodes all `c` sequences.
        let start = r.tokens.iter().map(|t| t[0]).max().expect("tokens");
        let end = r
            .tokens
            .iter()
            .map(|t| *t.last().expect("tokens"))
            .min()
            .expect("tokens");
        let decoded = r
            .tokens
            .iter()
            .flatten()
            .filter(|&&t| t > start && t <= end)
            .count();
        let decode_tps = decoded as f64 / end.duration_since(start).as_secs_f64().max(1e-9);
        let ttft: Vec<f64> = r
            .tokens
            .iter()
            .map(|t| t[0].duration_since(r.start).as_secs_f64() * 1e3)
            .collect();
        let mut itl: Vec<f64> = r
            .tokens
            .iter()
            .flat_map(|t| {
                t.windows(2)
                    .map(|w| w[1].duration_since(w[0]).as_secs_f64() * 1e3)
            })
            .collect();
        eprintln!(
            "round {round}: concurrency {c} ({}): {decode_tps:.0} tok/s, ITL p50 {:.1} ms",
            schedule_name(schedule),
            pct(&mut itl, 0.5)
        );
        results.push(Measured {
            round,
            concurrency: c,
            schedule,
            tps: decode_tps,
            ttft,
            itl,
        });
        std::thread::sleep(Duration::from_millis(200));
    }
    let several = args.schedules.len() > 1;
    for (&schedule, &c) in args
        .schedules
        .iter()
        .flat_map(|s| args.concurrency.iter().map(move |c| (s, c)))
    {
        let batch1: BTreeMap<usize, f64> = results
            .iter()
            .filter(|r| r.concurrency == 1 && r.schedule == schedule)
            .map(|r| (r.round, r.tps))
            .collect();
        let mine: Vec<_> = results
            .iter()
            .filter(|r| r.concurrency == c && r.schedule == schedule)
            .collect();
        let mut tps: Vec<f64> = mine.iter().map(|r| r.tps).collect();
        let mut ratios: Vec<f64> = mine
            .iter()
            .filter_map(|r| batch1.get(&r.round).map(|b| r.tps / b))
            .collect();
        let mut ttft: Vec<f64> = mine.iter().flat_map(|r| r.ttft.clone()).collect();
        let mut itl: Vec<f64> = mine.iter().flat_map(|r| r.itl.clone()).collect();
        let runs = tps
            .iter()
            .map(|t| format!("{t:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        let label = if several {
            format!("{c} ({})", schedule_name(schedule))
        } else {
            c.to_string()
        };
        rows.push(format!(
            "| {label} | {:.0} ({runs}) | {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} |",
            pct(&mut tps, 0.5),
            if ratios.is_empty() {
                "–".to_string()
            } else {
                format!("{:.2}×", pct(&mut ratios, 0.5))
            },
            pct(&mut ttft, 0.5),
            pct(&mut ttft, 0.95),
            pct(&mut ttft, 0.99),
            pct(&mut itl, 0.5),
            pct(&mut itl, 0.95),
            pct(&mut itl, 0.99)
        ));
    }
    // Fair against first come, first served: per concurrency, the median of per-round ratios.
    let mut versus = String::new();
    if args.schedules.contains(&Schedule::Fair) && args.schedules.contains(&Schedule::Fcfs) {
        let mut parts = Vec::new();
        for &c in &args.concurrency {
            let of = |s: Schedule| -> BTreeMap<usize, f64> {
                results
                    .iter()
                    .filter(|r| r.concurrency == c && r.schedule == s)
                    .map(|r| (r.round, r.tps))
                    .collect()
            };
            let (fair, fcfs) = (of(Schedule::Fair), of(Schedule::Fcfs));
            let mut ratios: Vec<f64> = fair
                .iter()
                .filter_map(|(r, f)| fcfs.get(r).map(|b| f / b))
                .collect();
            let each = ratios
                .iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(", ");
            parts.push(format!(
                "{c} zone(s) of one sequence each **{:.2}×** ({each})",
                pct(&mut ratios, 0.5)
            ));
        }
        versus = format!(
            "Decode tok/s of the fair step planner against FCFS, same engine, schedules alternated within each round (median of per-round ratios): {}.\n\n",
            parts.join(", ")
        );
    }
    let info = h.info();
    let mut flags = format!("--tier {}", args.tier);
    if several || args.schedules != [Schedule::Fair] {
        let names: Vec<&str> = args.schedules.iter().map(|&s| schedule_name(s)).collect();
        flags.push_str(&format!(" --schedules {}", names.join(",")));
    }
    if args.concurrency != [1, 4, 8, 16, 32] {
        let levels: Vec<String> = args.concurrency.iter().map(|c| c.to_string()).collect();
        flags.push_str(&format!(" --concurrency {}", levels.join(",")));
    }
    if args.temperature != 0.0 {
        flags.push_str(&format!(" --temperature {}", args.temperature));
    }
    if args.prefill_concurrency != [1, 16] {
        let levels: Vec<String> = args
            .prefill_concurrency
            .iter()
            .map(|c| c.to_string())
            .collect();
        flags.push_str(&format!(" --prefill-concurrency {}", levels.join(",")));
    }
    let machine = machine_on(spec.device);
    let (title, command) = match spec.device {
        nimmer_config::Device::Cuda => (
            " on CUDA",
            format!(
                "scripts/cuda-build.sh && target/cuda/release/tier-bench {flags} --device cuda"
            ),
        ),
        nimmer_config::Device::Cpu => (
            "",
            format!("cargo run --release -p nimmer-benches --bin tier-bench -- {flags}"),
        ),
    };
    let mut table = format!(
        "### {tier} tier{title}\n\nMachine: {machine}, kernel `{}`. Model `{}` ({:?}, {} MiB of weights). Command: `{command}`.\n\nCold prefill of {}-token prompts (aggregate prompt tok/s, median of 3 rounds, prefix cache off): {prefill_tps}. Peak RSS: {:.0} MiB.\n\n{} interleaved rounds. Decode tok/s is the steady-state aggregate (tokens generated between the moment all sequences have their first token and the moment the first one finishes, over that time: every step in it decodes all of them); the median (each round's figure in brackets), the ratio to batch 1 the median of per-round ratios.\n\n| concurrency | decode tok/s (aggregate) | vs batch 1 | TTFT p50 ms | p95 | p99 | ITL p50 ms | p95 | p99 |\n|---|---|---|---|---|---|---|---|---|\n",
        info.kernel,
        spec.model,
        spec.precision,
        info.weight_bytes >> 20,
        args.prefill_tokens,
        peak_rss_mib(),
        args.rounds,
        tier = args.tier,
    );
    for r in &rows {
        table.push_str(r);
        table.push('\n');
    }
    if !versus.is_empty() {
        table.push('\n');
        table.push_str(&versus);
    }
    Ok(table)
}

/// Saturn: embeddings/s and classify latency with N concurrent single-text requests.
fn bench_saturn(args: &Args, cfg: &Config) -> Result<String> {
    let spec = &cfg.tiers.tiers.saturn;
    let dir = ensure_model(&cfg.tiers, &spec.model, Verify::Cached)?;
    let saturn =
        nimmer_tiers::SaturnHandle::start(spec, &dir, &cfg.classifiers, args.config.as_deref())?;
    let lines = [
        "You lied to me and stole my horse!",
        "Fresh fish, two coins a piece.",
        "Please, hide me from the guards.",
        "What a wonderful festival this is!",
    ];
    let mut table = format!(
        "### saturn tier\n\nMachine: {}. Model `{}`, max_batch {}, max_delay {} ms. Command: `cargo run --release -p nimmer-benches --bin tier-bench -- --tier saturn`.\n\n| concurrent requests | classifications/s | latency p50 ms | p95 | p99 |\n|---|---|---|---|---|\n",
        machine(),
        spec.model,
        spec.max_batch,
        spec.max_delay_ms
    );
    for &c in &args.concurrency {
        let per = 64usize.div_ceil(c).max(4);
        let start = Instant::now();
        let threads: Vec<_> = (0..c)
            .map(|i| {
                let s = saturn.clone();
                std::thread::spawn(move || {
                    (0..per)
                        .map(|j| {
                            let t = Instant::now();
                            s.classify_blocking(
                                "ternary-gate",
                                vec![lines[(i + j) % lines.len()].to_string()],
                            )
                            .expect("classify");
                            t.elapsed().as_secs_f64() * 1e3
                        })
                        .collect::<Vec<f64>>()
                })
            })
            .collect();
        let mut lat: Vec<f64> = threads
            .into_iter()
            .flat_map(|t| t.join().expect("client"))
            .collect();
        let rate = lat.len() as f64 / start.elapsed().as_secs_f64();
        table.push_str(&format!(
            "| {c} | {rate:.0} | {:.1} | {:.1} | {:.1} |\n",
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.95),
            pct(&mut lat, 0.99)
        ));
    }
    Ok(table)
}

/// candle's stock `quantized_llama` on the Driver's file: prefill and batch-1 decode, for comparison.
fn bench_reference(args: &Args, cfg: &Config) -> Result<String> {
    use candle_core::quantized::gguf_file::Content;
    use candle_core::{Device, Tensor};
    use candle_transformers::models::quantized_llama::ModelWeights;
    let spec = &cfg.tiers.tiers.driver;
    let path = ensure_model(&cfg.tiers, &spec.model, Verify::Cached)?.join("model.gguf");
    let mut f = std::fs::File::open(&path)?;
    let ct = Content::read(&mut f)?;
    let mut m = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu)?;
    let prompt: Vec<u32> = (0..args.prefill_tokens as u32)
        .map(|i| 200 + (i * 37) % 20000)
        .collect();
    let t = Instant::now();
    let mut logits = m.forward(
        &Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
        0,
    )?;
    let prefill = args.prefill_tokens as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..args.gen_tokens {
        let next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
        logits = m.forward(
            &Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?,
            args.prefill_tokens + i,
        )?;
    }
    let decode = args.gen_tokens as f64 / t.elapsed().as_secs_f64();
    Ok(format!(
        "### reference: candle `quantized_llama` (stock, batch 1)\n\nMachine: {}. Same file as the Driver, same build flags (x86-64-v3). Command: `cargo run --release -p nimmer-benches --bin tier-bench -- --tier reference`.\n\nPrefill ({} tokens): **{prefill:.0} tok/s**; decode at batch 1: **{decode:.0} tok/s** (it keeps one KV cache per model, so it cannot batch sequences).\n\n",
        machine(),
        args.prefill_tokens
    ))
}

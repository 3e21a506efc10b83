//! Trait-LoRA benchmark on the Driver: aggregate decode tok/s at 16 concurrent sequences with 0, 1, 4 and 16
//! distinct adapters (rank 8 and 32), each sequence running one adapter; adapter cold load (PEFT folder →
//! validated, resident) p50 and hot-swap latency (a replaced folder → the new version served). Writes a table
//! into `benches/RESULTS.md`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use nimmer_benches::{pct, write_block};
use nimmer_config::Config;
use nimmer_loras::{Adapter, Blend, LoraPair, Module, Registry, peft::save_peft};
use nimmer_tiers::fetch::{Verify, ensure_llm};
use nimmer_tiers::tokenizer::Message;
use nimmer_tiers::{EngineLimits, Event, GenerateRequest, LlmHandle, Prompt, SamplingParams};

#[derive(Parser)]
#[command(about = "Trait-LoRA throughput and load latency; writes figures into benches/RESULTS.md")]
struct Args {
    /// Concurrent sequences.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Ranks to measure.
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    ranks: Vec<usize>,
    /// Distinct adapter counts to measure (0 = base model).
    #[arg(long, value_delimiter = ',', default_value = "0,1,4,16")]
    distinct: Vec<usize>,
    /// Rounds (interleaved); medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Run the Driver on this device (cpu, or cuda: needs a `--features cuda` build and a GPU).
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long)]
    write: Option<std::path::PathBuf>,
}

/// Projections the benchmark adapters target: PEFT's default for llama (q_proj, v_proj).
const TARGETS: [Module; 2] = [Module::Q, Module::V];

fn random_adapter(base: &nimmer_loras::BaseShape, rank: usize, seed: u32) -> Adapter {
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    let mut rnd = || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.02
    };
    let layers = (0..base.n_layer)
        .map(|_| {
            TARGETS
                .iter()
                .map(|m| {
                    let (i, o) = m.dims(base);
                    Some(LoraPair {
                        a: (0..rank * i).map(|_| rnd()).collect(),
                        b: (0..o * rank).map(|_| rnd()).collect(),
                    })
                })
                .collect()
        })
        .collect();
    Adapter {
        name: format!("bench{seed}"),
        rank,
        alpha: 2.0 * rank as f32,
        scale: 2.0,
        modules: TARGETS.to_vec(),
        layers,
        size_bytes: 0,
        digest: Default::default(),
    }
}

/// Steady-state aggregate decode tok/s of `blends.len()` concurrent sequences.
fn decode(h: &LlmHandle, blends: &[Option<Arc<Blend>>], tokens: usize) -> Result<f64> {
    let users = [
        "Tell me about the harbour.",
        "What do the guards say about the thief?",
        "Describe the market at dawn.",
        "Why is the bridge closed?",
    ];
    let streams: Vec<_> = blends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            h.generate(GenerateRequest {
                prompt: Prompt::Chat(vec![
                    Message::new("system", "You are a townsperson in a busy port city."),
                    Message::new("user", users[i % users.len()]),
                ]),
                params: SamplingParams {
                    ignore_eos: true,
                    ..SamplingParams::greedy(tokens)
                },
                lora: b.clone(),
                deadline: None,
                share: Default::default(),
            })
        })
        .collect::<Result<_, _>>()?;
    let times: Vec<Vec<Instant>> = streams
        .into_iter()
        .map(|mut rx| {
            std::thread::spawn(move || {
                let mut t = Vec::new();
                while let Some(ev) = rx.blocking_recv() {
                    match ev {
                        Event::Token { .. } => t.push(Instant::now()),
                        Event::Done(_) => break,
                        Event::Error(e) => panic!("{e}"),
                        Event::Expired => panic!("expired without a deadline"),
                    }
                }
                t
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|j| j.join().expect("collector"))
        .collect();
    let start = times.iter().map(|t| t[0]).max().expect("tokens");
    let end = times
        .iter()
        .map(|t| *t.last().expect("tokens"))
        .min()
        .expect("tokens");
    let n = times
        .iter()
        .flatten()
        .filter(|&&t| t > start && t <= end)
        .count();
    Ok(n as f64 / end.duration_since(start).as_secs_f64().max(1e-9))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cfg = Config::embedded();
    let mut spec = cfg.tiers.tiers.driver.clone();
    spec.device = nimmer_benches::parse_device(&args.device)?;
    let on_cuda = spec.device == nimmer_config::Device::Cuda;
    let mut limits = EngineLimits::of(&cfg.budgets.tiers.driver);
    limits.batch_token_budget = limits.batch_token_budget.max(args.concurrency);
    let model = ensure_llm(&cfg.tiers, &spec.model, Verify::Cached)?;
    let h = LlmHandle::start("driver", &spec, limits, &model)?;
    let base = h.info().model.lora_base();
    let dir = tempfile::tempdir()?;

    // Throughput: rounds × ranks × distinct counts, interleaved.
    let mut rows: Vec<(usize, usize, Vec<f64>)> = Vec::new();
    for &rank in &args.ranks {
        for &d in &args.distinct {
            rows.push((rank, d, Vec::new()));
        }
    }
    let adapters: Vec<Vec<Arc<Adapter>>> = args
        .ranks
        .iter()
        .map(|&r| {
            (0..args.distinct.iter().copied().max().unwrap_or(0) as u32)
                .map(|i| Arc::new(random_adapter(&base, r, 100 + i)))
                .collect()
        })
        .collect();
    for round in 0..args.rounds {
        for (ri, &rank) in args.ranks.iter().enumerate() {
            for &d in &args.distinct {
                let blends: Vec<Option<Arc<Blend>>> = (0..args.concurrency)
                    .map(|i| {
                        (d > 0).then(|| {
                            Arc::new(Blend {
                                parts: vec![(adapters[ri][i % d].clone(), 1.0)],
                            })
                        })
                    })
                    .collect();
                let tps = decode(&h, &blends, args.gen_tokens)?;
                eprintln!("round {round}: rank {rank}, {d} distinct: {tps:.0} tok/s");
                rows.iter_mut()
                    .find(|r| r.0 == rank && r.1 == d)
                    .expect("row")
                    .2
                    .push(tps);
            }
        }
    }

    // Cold load and hot swap through the registry, from PEFT folders on disk.
    let registry = Registry::new(base, 1 << 30);
    let mut cold = Vec::new();
    let mut swap = Vec::new();
    for i in 0..10u32 {
        let a = random_adapter(&base, 8, 500 + i);
        let p = dir.path().join(format!("a{i}"));
        save_peft(&a, &base, &p)?;
        let t = Instant::now();
        registry.load(&format!("a{i}"), &p)?;
        cold.push(t.elapsed().as_secs_f64() * 1e3);
        // Hot swap: new files in place, rescan, the next lookup returns the new version.
        let b = random_adapter(&base, 8, 900 + i);
        std::thread::sleep(Duration::from_millis(5));
        save_peft(&b, &base, &p)?;
        let t = Instant::now();
        registry.scan(dir.path());
        let got = registry.get(&format!("a{i}"))?.expect("present");
        swap.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            got.layers[0][0].as_ref().map(|p| p.a[0]) == b.layers[0][0].as_ref().map(|p| p.a[0]),
            "the swap served the new version"
        );
        let _ = std::fs::remove_dir_all(&p);
        registry.scan(dir.path());
    }

    let machine = nimmer_benches::machine_on(spec.device);
    let (title, command) = if on_cuda {
        (
            " on CUDA",
            "scripts/cuda-build.sh && target/cuda/release/lora-bench --device cuda",
        )
    } else {
        (
            "",
            "cargo run --release -p nimmer-benches --bin lora-bench -- --write benches/RESULTS.md",
        )
    };
    let mut t = format!(
        "### trait-LoRAs (Driver){title}\n\nMachine: {machine}, kernel `{}`. Command: `{command}`. \
         {} concurrent sequences × {} tokens, each sequence on one adapter (sequence i uses adapter i mod N), adapters on q_proj and v_proj \
         (PEFT's default for llama), steady-state aggregate decode tok/s, median of {} interleaved rounds (each round in brackets).\n\n\
         | rank | distinct adapters | decode tok/s | vs no adapter |\n|---|---|---|---|\n",
        h.info().kernel,
        args.concurrency,
        args.gen_tokens,
        args.rounds
    );
    for &rank in &args.ranks {
        let base_tps = rows.iter().find(|r| r.0 == rank && r.1 == 0).map(|r| {
            let mut v = r.2.clone();
            pct(&mut v, 0.5)
        });
        for r in rows.iter().filter(|r| r.0 == rank) {
            let mut v = r.2.clone();
            let med = pct(&mut v, 0.5);
            t += &format!(
                "| {rank} | {} | {med:.0} ({}) | {} |\n",
                r.1,
                r.2.iter()
                    .map(|x| format!("{x:.0}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                base_tps.map_or("–".into(), |b| format!("{:.2}×", med / b))
            );
        }
    }
    t += &format!(
        "\nAdapter cold load (rank 8, q+v, PEFT folder → validated and resident): p50 {:.1} ms, max {:.1} ms. \
         Hot swap (files replaced → rescan → next lookup serves the new version): p50 {:.1} ms, max {:.1} ms.\n",
        pct(&mut cold.clone(), 0.5),
        pct(&mut cold, 1.0),
        pct(&mut swap.clone(), 0.5),
        pct(&mut swap, 1.0),
    );
    println!("{t}");
    if let Some(path) = &args.write {
        write_block(
            path,
            if on_cuda {
                "lora-bench-cuda"
            } else {
                "lora-bench"
            },
            &t,
        )?;
    }
    Ok(())
}

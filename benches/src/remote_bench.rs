//! Remote-tier benchmark (issue 14). Two experiments on the Driver:
//!
//! - `hop`: what the NATS hop adds. One engine in this process serves both paths: directly (in-process, as
//!   `via = "local"`) and through a tier worker on a real nats-server (`via = "nats"`: worker and client in
//!   this process, every token crossing the server). Sequential requests, interleaved per round; TTFT and
//!   inter-token latency percentiles per path.
//! - `workers`: Driver tok/s with one worker process against two, each `nimmer tier` pinned to its own core
//!   with `taskset`, `--concurrency` streams from an in-process client.
//!
//! Writes its table into `benches/RESULTS.md` with `--write`.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use nimmer_benches::{machine, pct, write_block};
use nimmer_config::Config;
use nimmer_gateway::tier::LlmTier;
use nimmer_gateway::tier::remote::client::{NatsLlm, RemoteShape};
use nimmer_gateway::tier::remote::worker;
use nimmer_tiers::fetch::{Verify, ensure_llm};
use nimmer_tiers::tokenizer::Message;
use nimmer_tiers::{
    EngineLimits, Event, GenerateRequest, LlmHandle, Prompt, SamplingParams, Share,
};

#[derive(Parser)]
#[command(
    about = "Benchmark Driver workers over NATS and record the figures in benches/RESULTS.md"
)]
struct Args {
    /// `hop` (NATS hop latency against in-process) or `workers` (1 against 2 pinned worker processes).
    #[arg(long, default_value = "hop")]
    mode: String,
    /// Rounds (paths or worker counts interleaved within each).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Requests per path per round (`hop`).
    #[arg(long, default_value_t = 20)]
    requests: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    gen_tokens: usize,
    /// Concurrent streams (`workers`).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// The `nimmer` binary the worker processes run (`workers`).
    #[arg(long, default_value = "target/release/nimmer")]
    nimmer: std::path::PathBuf,
    /// Write the table into this file (between markers for the mode).
    #[arg(long)]
    write: Option<std::path::PathBuf>,
}

fn request(i: usize, gen_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: Prompt::Chat(vec![
            Message::new("system", "You are a fisherman in a busy port city."),
            Message::new("user", &format!("What did you catch on day {i}?")),
        ]),
        params: SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(gen_tokens)
        },
        lora: None,
        deadline: None,
        share: Share::zone(&format!("z{i}"), "street", 1.0, 0),
    }
}

/// One request: TTFT and the gaps between tokens, in ms.
async fn timed(llm: &dyn LlmTier, req: GenerateRequest) -> Result<(f64, Vec<f64>, usize)> {
    let t = Instant::now();
    let mut rx = llm.submit(req).await?;
    let (mut first, mut last, mut gaps, mut n) = (None, t, Vec::new(), 0);
    while let Some(e) = rx.recv().await {
        match e {
            Event::Token { .. } => {
                let now = Instant::now();
                if first.is_none() {
                    first = Some(now.duration_since(t).as_secs_f64() * 1e3);
                } else {
                    gaps.push(now.duration_since(last).as_secs_f64() * 1e3);
                }
                last = now;
                n += 1;
            }
            Event::Done(_) => break,
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    Ok((first.unwrap_or(f64::NAN), gaps, n))
}

async fn nats_client(url: &str, gguf: &std::path::Path, cfg: &Config) -> Result<Arc<NatsLlm>> {
    let client = async_nats::connect(url).await?;
    let shape = RemoteShape::new(nimmer_tiers::llama::ModelShape::read(gguf)?);
    let limits = EngineLimits::of(&cfg.budgets.tiers.driver);
    Ok(NatsLlm::connect(client, "driver", Arc::new(shape), limits).await?)
}

async fn until_workers(llm: &NatsLlm, n: usize) -> Result<()> {
    let t = Instant::now();
    while llm.live_workers().len() < n {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(120),
            "workers did not report"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn hop(
    a: &Args,
    cfg: &Config,
    gguf: &std::path::Path,
    local: Arc<dyn LlmTier>,
) -> Result<String> {
    let server = nimmer_services::NatsServer::start();
    let w = worker::Worker {
        tier: "driver".into(),
        name: "w1".into(),
        model: "driver".into(),
        llm: local.clone(),
        loras: None,
    };
    let wc = async_nats::connect(&server.url).await?;
    tokio::spawn(async move { worker::serve(wc, w, std::future::pending()).await });
    let remote = nats_client(&server.url, gguf, cfg).await?;
    until_workers(&remote, 1).await?;
    let paths: [(&str, Arc<dyn LlmTier>); 2] = [("in-process", local), ("NATS worker", remote)];
    let mut ttft = [Vec::new(), Vec::new()];
    let mut itl = [Vec::new(), Vec::new()];
    let mut i = 0;
    // Warm-up (first requests pay for allocations on both paths).
    for (_, llm) in &paths {
        timed(&**llm, request(usize::MAX, 4)).await?;
    }
    for round in 0..a.rounds {
        for (p, (_, llm)) in paths.iter().enumerate() {
            for _ in 0..a.requests {
                i += 1;
                let (t, gaps, _) = timed(&**llm, request(i, a.gen_tokens)).await?;
                ttft[p].push(t);
                itl[p].extend(gaps);
            }
        }
        eprintln!("round {} done", round + 1);
    }
    let mut out = format!(
        "Machine: {}. `remote-bench --mode hop --rounds {} --requests {} --gen-tokens {}`: one Driver engine, \
         reached directly and through a tier worker on a local nats-server (worker and client in one process), \
         sequential requests, paths interleaved per round.\n\n\
         | path | TTFT p50 ms | TTFT p99 ms | inter-token p50 ms | inter-token p99 ms |\n|---|---|---|---|---|\n",
        machine(),
        a.rounds,
        a.requests,
        a.gen_tokens
    );
    let mut row = Vec::new();
    for (p, (name, _)) in paths.iter().enumerate() {
        let v = [
            pct(&mut ttft[p], 0.5),
            pct(&mut ttft[p], 0.99),
            pct(&mut itl[p], 0.5),
            pct(&mut itl[p], 0.99),
        ];
        out.push_str(&format!(
            "| {name} | {:.1} | {:.1} | {:.2} | {:.2} |\n",
            v[0], v[1], v[2], v[3]
        ));
        row.push(v);
    }
    out.push_str(&format!(
        "| **added by the hop** | {:+.1} | {:+.1} | {:+.2} | {:+.2} |\n",
        row[1][0] - row[0][0],
        row[1][1] - row[0][1],
        row[1][2] - row[0][2],
        row[1][3] - row[0][3]
    ));
    Ok(out)
}

/// A `nimmer tier` worker process pinned to `core`; killed on drop.
struct Pinned(Child);

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pinned(nimmer: &std::path::Path, url: &str, name: &str, core: usize) -> Result<Pinned> {
    let log = std::fs::File::create(std::env::temp_dir().join(format!("remote-bench-{name}.log")))?;
    let child = Command::new("taskset")
        .args(["-c", &core.to_string()])
        .arg(nimmer)
        .args(["tier", "--tier", "driver", "--nats", url, "--worker", name])
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("starting {} under taskset", nimmer.display()))?;
    Ok(Pinned(child))
}

async fn workers(a: &Args, cfg: &Config, gguf: &std::path::Path) -> Result<String> {
    let server = nimmer_services::NatsServer::start();
    let client = nats_client(&server.url, gguf, cfg).await?;
    let mut tps: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut i = 0;
    for round in 0..a.rounds {
        for n in [1usize, 2] {
            let procs = (0..n)
                .map(|k| pinned(&a.nimmer, &server.url, &format!("r{round}w{k}"), k))
                .collect::<Result<Vec<_>>>()?;
            until_workers(&client, n).await?;
            // Only this round's workers: the killed ones fall silent within DEAD_AFTER.
            while client.live_workers().len() != n {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            timed(&*client, request(usize::MAX, 4)).await?;
            let t = Instant::now();
            let runs = (0..a.concurrency).map(|_| {
                i += 1;
                let (c, req) = (client.clone(), request(i, a.gen_tokens));
                tokio::spawn(async move { timed(&*c, req).await })
            });
            let mut tokens = 0;
            for r in futures::future::join_all(runs.collect::<Vec<_>>()).await {
                tokens += r??.2;
            }
            let rate = tokens as f64 / t.elapsed().as_secs_f64();
            eprintln!("round {} workers {n}: {rate:.0} tok/s", round + 1);
            tps[n - 1].push(rate);
            drop(procs);
        }
    }
    let med: Vec<f64> = tps.iter().map(|v| pct(&mut v.clone(), 0.5)).collect();
    let all = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Ok(format!(
        "Machine: {}. `remote-bench --mode workers --rounds {} --concurrency {} --gen-tokens {}`: `nimmer tier` \
         Driver workers, each pinned to its own core with `taskset`, on a local nats-server; the client (this \
         process) sends {} streams at once and counts tokens per second from first request to last token.\n\n\
         | Driver workers | tok/s (median) | rounds |\n|---|---|---|\n\
         | 1 (core 0) | {:.0} | {} |\n| 2 (cores 0 and 1) | {:.0} | {} |\n| **ratio** | **{:.2}x** | |\n",
        machine(),
        a.rounds,
        a.concurrency,
        a.gen_tokens,
        a.concurrency,
        med[0],
        all(&tps[0]),
        med[1],
        all(&tps[1]),
        med[1] / med[0]
    ))
}

fn main() -> Result<()> {
    let a = Args::parse();
    let cfg = Config::embedded();
    let gguf = ensure_llm(&cfg.tiers, &cfg.tiers.tiers.driver.model, Verify::Cached)?;
    // The in-process engine (`hop`) starts before the runtime: its start blocks until the model is loaded.
    let local: Option<Arc<dyn LlmTier>> = match a.mode.as_str() {
        "hop" => Some(Arc::new(LlmHandle::start(
            "driver",
            &cfg.tiers.tiers.driver,
            EngineLimits::of(&cfg.budgets.tiers.driver),
            &gguf,
        )?)),
        _ => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let table = rt.block_on(async {
        match (a.mode.as_str(), local) {
            ("hop", Some(local)) => hop(&a, &cfg, &gguf, local).await,
            ("workers", _) => workers(&a, &cfg, &gguf).await,
            (other, _) => anyhow::bail!("unknown mode `{other}` (hop, workers)"),
        }
    })?;
    print!("{table}");
    if let Some(path) = &a.write {
        write_block(path, &format!("remote-{}", a.mode), &table)?;
    }
    Ok(())
}

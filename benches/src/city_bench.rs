//! City scenario: the whole gateway (HTTP on loopback, the three real tiers in process) under a city's load.
//! `--workload personas` runs the city's NPCs with their real prompts instead (`personas.rs`); `--workload
//! events` lets the city run itself through the GM shards (`events.rs`).
//! 515 zones send requests with Poisson arrivals (5% deep/moment, 80% dialog, 15% classify); a set of hot
//! zones sends a configurable share of all traffic (a flood), the rest spread evenly. Reports per-tier tokens/s,
//! slot wait and time to first token percentiles (measured by the client over SSE), rejections, degradations
//! and Jain's fairness index across zones. Then measures the gateway's overhead: latency and requests/s of
//! the same work through HTTP versus calling the tier's handle directly.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use futures::StreamExt;
use nimmer_benches::{machine, next_slot, pct, run_id, write_block};
use nimmer_config::Config;
use nimmer_gateway::{Gateway, Tier};
use nimmer_tiers::tokenizer::Message;
use nimmer_tiers::{Event, GenerateRequest, Prompt, SamplingParams};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

#[path = "city_bench/args.rs"]
mod args;
#[path = "city_bench/burst.rs"]
mod burst;
#[path = "city_bench/events.rs"]
mod events;
#[path = "city_bench/personas.rs"]
mod personas;
#[path = "city_bench/report.rs"]
mod report;

use args::Args;

const SYSTEM: &str = "You are a helpful assistant.";
const CLASSIFY_TEXT: &str = "Thank you, friend, you saved my life!";
const LINES: &[&str] = &[
    "Good morning! Any news from the harbour?",
    "What do you sell here?",
    "Have you seen a girl with a red scarf?",
    "The guards are looking for you. Why?",
    "Tell me about the old lighthouse.",
    "Can you spare some bread?",
    "Where can I find the blacksmith?",
    "Is the bridge to the north district open?",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Dialog,
    Deep,
    Moment,
    Classify,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Dialog => "dialog",
            Kind::Deep => "deep",
            Kind::Moment => "moment",
            Kind::Classify => "classify",
        }
    }
}

/// What the client saw of one request.
#[derive(Debug, Clone)]
struct Outcome {
    zone: usize,
    kind: Kind,
    status: u16,
    tier: String,
    degraded: bool,
    completion_tokens: usize,
    ttft_ms: f64,
    slot_wait_ms: f64,
    /// The engine's own time from queueing to the first token (the response's `timings.ttft_ms`).
    engine_ttft_ms: f64,
    total_ms: f64,
    /// Seconds from the run's start to the request's end.
    end_s: f64,
}

fn body(kind: Kind, zone: &str, i: usize, max_tokens: usize) -> Value {
    let line = LINES[i % LINES.len()];
    match kind {
        Kind::Classify => json!({
            "uid": format!("city{}/d{}/s{}/k{}", run_id(), i % 12, i % 40, next_slot()), "zone": zone, "kind": "classify",
            "classifier": "ternary-gate", "prompt": line,
        }),
        _ => json!({
            "uid": format!("city{}/d{}/s{}/k{}", run_id(), i % 12, i % 40, next_slot()), "zone": zone, "kind": kind.name(),
            "stream": true, "max_tokens": max_tokens,
            "messages": [{ "role": "system", "content": SYSTEM }, { "role": "user", "content": line }],
            "sampling": { "temperature": 0.7, "seed": i, "ignore_eos": true },
        }),
    }
}

/// Sends one request; generation kinds stream (SSE) so the client measures its own time to first token.
async fn send(client: &reqwest::Client, base: &str, zone: usize, kind: Kind, b: Value) -> Outcome {
    let t0 = Instant::now();
    let mut o = Outcome {
        zone,
        kind,
        status: 0,
        tier: String::new(),
        degraded: false,
        completion_tokens: 0,
        ttft_ms: f64::NAN,
        slot_wait_ms: f64::NAN,
        engine_ttft_ms: f64::NAN,
        total_ms: f64::NAN,
        end_s: f64::NAN,
    };
    let resp = match client
        .post(format!("{base}/v1/dialog"))
        .json(&b)
        .send()
        .await
    {
        Ok(r) => r,
        Err(_) => return o,
    };
    o.status = resp.status().as_u16();
    if o.status != 200 {
        return o;
    }
    let done: Value = if kind == Kind::Classify {
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        o.ttft_ms = t0.elapsed().as_secs_f64() * 1e3;
        v
    } else {
        let mut buf = String::new();
        let mut stream = resp.bytes_stream();
        let mut done = Value::Null;
        while let Some(Ok(chunk)) = stream.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            if o.ttft_ms.is_nan() && buf.contains("event: token") {
                o.ttft_ms = t0.elapsed().as_secs_f64() * 1e3;
            }
            if let Some(at) = buf.find("event: done\ndata: ") {
                let rest = &buf[at + "event: done\ndata: ".len()..];
                if let Some(end) = rest.find('\n') {
                    done = serde_json::from_str(&rest[..end]).unwrap_or(Value::Null);
                    break;
                }
            }
        }
        done
    };
    o.total_ms = t0.elapsed().as_secs_f64() * 1e3;
    o.tier = done["tier"].as_str().unwrap_or("?").to_string();
    o.degraded = done["degraded"].as_bool().unwrap_or(false);
    o.completion_tokens = done["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
    o.slot_wait_ms = done["timings"]["slot_wait_ms"].as_f64().unwrap_or(f64::NAN);
    o.engine_ttft_ms = done["timings"]["ttft_ms"].as_f64().unwrap_or(f64::NAN);
    o
}

/// Jain's fairness index of `x`: 1 when all equal, 1/n when one takes everything.
fn jain(x: &[f64]) -> f64 {
    let (s, s2) = x.iter().fold((0.0, 0.0), |(s, s2), v| (s + v, s2 + v * v));
    if s2 == 0.0 {
        1.0
    } else {
        s * s / (x.len() as f64 * s2)
    }
}

fn p3(mut v: Vec<f64>) -> String {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return "– / – / –".into();
    }
    format!(
        "{:.0} / {:.0} / {:.0}",
        pct(&mut v, 0.5),
        pct(&mut v, 0.95),
        pct(&mut v, 0.99)
    )
}

/// The city run: its Markdown and the HTML report of the same run.
async fn city(args: &Args, base: &str) -> Result<(String, String)> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .pool_max_idle_per_host(256)
        .build()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let zone_name = |z: usize| {
        if z < args.hot_zones {
            format!("hot-{z:03}")
        } else {
            format!("zone-{z:03}")
        }
    };
    let start = Instant::now();
    let end = start + Duration::from_secs(args.duration_s);
    let mut next = start;
    let mut tasks = Vec::new();
    let mut offered = vec![0usize; args.zones];
    let mut i = 0;
    while next < end {
        tokio::time::sleep_until(next.into()).await;
        let zone = if rng.random::<f64>() < args.hot_share {
            rng.random_range(0..args.hot_zones)
        } else {
            rng.random_range(args.hot_zones..args.zones)
        };
        let r = rng.random::<f64>();
        let kind = if r < 0.025 {
            Kind::Deep
        } else if r < 0.05 {
            Kind::Moment
        } else if r < 0.85 {
            Kind::Dialog
        } else {
            Kind::Classify
        };
        offered[zone] += 1;
        let b = body(kind, &zone_name(zone), i, args.max_tokens);
        let (client, base) = (client.clone(), base.to_string());
        tasks.push(tokio::spawn(async move {
            let mut o = send(&client, &base, zone, kind, b).await;
            o.end_s = start.elapsed().as_secs_f64();
            o
        }));
        i += 1;
        next += Duration::from_secs_f64(-rng.random::<f64>().max(1e-12).ln() / args.rate);
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await?);
    }
    let wall = start.elapsed().as_secs_f64();

    let mut s = format!(
        "#### {}\n\nMachine: {}. Command: `cargo run --release -p nimmer-benches --bin city-bench -- --label {}{} --rate {} --hot-zones {} --hot-share {} --duration-s {} --overhead-n {} --write benches/RESULTS.md`. \
         {} zones, Poisson arrivals at {} req/s for {} s ({} requests; {} hot zones send {:.0}% of them), 5% deep/moment, 80% dialog, 15% classify, \
         {} new tokens per generation (ignore_eos), {}. Client-side times over HTTP/SSE on loopback; wall {:.1} s.\n\n",
        args.label,
        machine(),
        args.label,
        args.config
            .as_ref()
            .map_or(String::new(), |d| format!(" --config {}", d.display())),
        args.rate,
        args.hot_zones,
        args.hot_share,
        args.duration_s,
        args.overhead_n,
        args.zones,
        args.rate,
        args.duration_s,
        out.len(),
        args.hot_zones,
        args.hot_share * 100.0,
        args.max_tokens,
        if args.config.is_some() {
            "the budgets of that config directory"
        } else {
            "default budgets"
        },
        wall
    );
    s += "| tier | served | tokens/s | TTFT p50 / p95 / p99 ms | slot wait p50 / p95 / p99 ms | total p50 / p99 ms |\n|---|---|---|---|---|---|\n";
    let ok: Vec<&Outcome> = out.iter().filter(|o| o.status == 200).collect();
    for tier in ["driver", "theia", "saturn"] {
        let rows: Vec<&&Outcome> = ok.iter().filter(|o| o.tier == tier).collect();
        let toks: usize = rows.iter().map(|o| o.completion_tokens).sum();
        let mut total: Vec<f64> = rows.iter().map(|o| o.total_ms).collect();
        s += &format!(
            "| {tier} | {} | {:.1} | {} | {} | {:.0} / {:.0} |\n",
            rows.len(),
            toks as f64 / wall,
            p3(rows.iter().map(|o| o.ttft_ms).collect()),
            p3(rows.iter().map(|o| o.slot_wait_ms).collect()),
            pct(&mut total, 0.5),
            pct(&mut total, 0.99),
        );
    }
    let mut rejected: BTreeMap<(Kind, u16), usize> = BTreeMap::new();
    for o in out.iter().filter(|o| o.status != 200) {
        *rejected.entry((o.kind, o.status)).or_default() += 1;
    }
    let degraded = ok.iter().filter(|o| o.degraded).count();
    let deep = ok
        .iter()
        .filter(|o| matches!(o.kind, Kind::Deep | Kind::Moment))
        .count();
    s += &format!(
        "\nRejections: {}. Degraded deep/moment (served by the Driver): {degraded} of {deep}.\n",
        if rejected.is_empty() {
            "none".to_string()
        } else {
            rejected
                .iter()
                .map(|((k, st), n)| format!("{n} {} → {st}", k.name()))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    // Fairness: per zone, the share of its requests served, and its mean time to first token.
    let mut served = vec![0usize; args.zones];
    let mut ttft: Vec<Vec<f64>> = vec![Vec::new(); args.zones];
    for o in &ok {
        served[o.zone] += 1;
        if o.kind != Kind::Classify && o.ttft_ms.is_finite() {
            ttft[o.zone].push(o.ttft_ms);
        }
    }
    let served_share: Vec<f64> = (0..args.zones)
        .filter(|&z| offered[z] > 0)
        .map(|z| served[z] as f64 / offered[z] as f64)
        .collect();
    let mean_ttft: Vec<f64> = ttft
        .iter()
        .filter(|v| !v.is_empty())
        .map(|v| v.iter().sum::<f64>() / v.len() as f64)
        .collect();
    let of_group = |hot: bool, f: fn(&Outcome) -> f64| {
        let v: Vec<f64> = ok
            .iter()
            .filter(|o| (o.zone < args.hot_zones) == hot && o.kind != Kind::Classify)
            .map(|o| f(o))
            .collect();
        p3(v)
    };
    s += &format!(
        "Jain's fairness index across the {} zones that sent requests: {:.3} on served/offered, {:.3} on mean TTFT ({} zones with a generation). \
         TTFT p50 / p95 / p99 ms: hot zones {}, other zones {}; slot wait p50 / p95 / p99 ms: hot zones {}, other zones {}; \
         the engine's own TTFT (queued to first token) p50 / p95 / p99 ms: hot zones {}, other zones {}.\n",
        served_share.len(),
        jain(&served_share),
        jain(&mean_ttft),
        mean_ttft.len(),
        of_group(true, |o| o.ttft_ms),
        of_group(false, |o| o.ttft_ms),
        of_group(true, |o| o.slot_wait_ms),
        of_group(false, |o| o.slot_wait_ms),
        of_group(true, |o| o.engine_ttft_ms),
        of_group(false, |o| o.engine_ttft_ms),
    );
    // The Driver alone (dialog): the tier a flood of dialogs contends for, without Theia's longer prefill.
    let driver = |hot: bool| {
        p3(ok
            .iter()
            .filter(|o| (o.zone < args.hot_zones) == hot && o.tier == "driver")
            .filter(|o| o.kind != Kind::Classify)
            .map(|o| o.ttft_ms)
            .collect())
    };
    s += &format!(
        "On the Driver alone, TTFT p50 / p95 / p99 ms: hot zones {}, other zones {}.\n",
        driver(true),
        driver(false)
    );
    let points: Vec<report::Point> = out
        .iter()
        .map(|o| report::Point {
            zone: o.zone,
            hot: o.zone < args.hot_zones,
            tier: o.tier.clone(),
            status: o.status,
            end_s: o.end_s,
            ttft_ms: o.ttft_ms,
            total_ms: o.total_ms,
            completion_tokens: o.completion_tokens,
        })
        .collect();
    let page = report::html(
        &format!("city-bench: {}", args.label),
        &s,
        &points,
        wall,
        args.zones,
    );
    Ok((s, page))
}

/// Latency of the same work through HTTP and through the tier's handle directly; then requests/s of each
/// at 16 concurrent callers.
async fn overhead(args: &Args, base: &str, gw: &Arc<Gateway>) -> Result<String> {
    let client = reqwest::Client::new();
    let n = args.overhead_n;
    let mut s = String::from(
        "\nGateway overhead (sequential requests; the HTTP path includes JSON, routing, slots and budgets):\n\n\
         | work | path | p50 ms | p99 ms | requests/s at 16 concurrent |\n|---|---|---|---|---|\n",
    );
    // Saturn: one classification.
    let direct = |gw: Arc<Gateway>| async move {
        let t = Instant::now();
        gw.tiers()
            .saturn
            .classify("ternary-gate", vec![CLASSIFY_TEXT.to_string()])
            .await
            .map(|_| t.elapsed().as_secs_f64() * 1e3)
    };
    let http = |client: reqwest::Client, base: String| async move {
        let t = Instant::now();
        let r = client
            .post(format!("{base}/v1/dialog"))
            .json(&json!({ "uid": format!("o{}/d/s/k{}", run_id(), next_slot()), "zone": "overhead", "kind": "classify", "classifier": "ternary-gate", "prompt": CLASSIFY_TEXT }))
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "status {}", r.status());
        r.bytes().await?;
        Ok::<_, anyhow::Error>(t.elapsed().as_secs_f64() * 1e3)
    };
    let mut d = Vec::new();
    let mut h = Vec::new();
    for _ in 0..n {
        d.push(direct(gw.clone()).await?);
        h.push(http(client.clone(), base.to_string()).await?);
    }
    let rps = |f: Arc<
        dyn Fn() -> futures::future::BoxFuture<'static, Result<f64>> + Send + Sync,
    >| async move {
        let t = Instant::now();
        let per = n.max(16) / 16;
        let mut js = Vec::new();
        for _ in 0..16 {
            let f = f.clone();
            js.push(tokio::spawn(async move {
                for _ in 0..per {
                    f().await?;
                }
                Ok::<_, anyhow::Error>(())
            }));
        }
        for j in js {
            j.await??;
        }
        Ok::<_, anyhow::Error>((per * 16) as f64 / t.elapsed().as_secs_f64())
    };
    let g = gw.clone();
    let d_rps = rps(Arc::new(move || {
        let g = g.clone();
        Box::pin(async move { Ok(direct(g).await?) })
    }))
    .await?;
    let (c, b) = (client.clone(), base.to_string());
    let h_rps = rps(Arc::new(move || Box::pin(http(c.clone(), b.clone())))).await?;
    s += &format!(
        "| classify (saturn) | direct | {:.2} | {:.2} | {:.0} |\n| classify (saturn) | HTTP | {:.2} | {:.2} | {:.0} |\n",
        pct(&mut d, 0.5),
        pct(&mut d, 0.99),
        d_rps,
        pct(&mut h, 0.5),
        pct(&mut h, 0.99),
        h_rps
    );
    // Driver: a one-token generation.
    let driver = gw.tiers().llm(Tier::Driver).context("driver")?.clone();
    let messages = vec![
        Message::new("system", SYSTEM),
        Message::new("user", "Hello!"),
    ];
    let mut d = Vec::new();
    let mut h = Vec::new();
    for _ in 0..n.min(100) {
        let t = Instant::now();
        let mut rx = driver
            .submit(GenerateRequest {
                prompt: Prompt::Chat(messages.clone()),
                params: SamplingParams::greedy(1),
                lora: None,
                deadline: None,
                share: Default::default(),
            })
            .await?;
        while let Some(ev) = rx.recv().await {
            if matches!(ev, Event::Done(_) | Event::Error(_) | Event::Expired) {
                break;
            }
        }
        d.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let r = client
            .post(format!("{base}/v1/dialog"))
            .json(&json!({ "uid": format!("o{}/d/s/k{}", run_id(), next_slot()), "zone": "overhead", "kind": "dialog", "max_tokens": 1,
                "messages": [{ "role": "system", "content": SYSTEM }, { "role": "user", "content": "Hello!" }],
                "sampling": { "temperature": 0.0 } }))
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "status {}", r.status());
        r.bytes().await?;
        h.push(t.elapsed().as_secs_f64() * 1e3);
    }
    s += &format!(
        "| 1-token dialog (driver) | direct | {:.2} | {:.2} | – |\n| 1-token dialog (driver) | HTTP | {:.2} | {:.2} | – |\n",
        pct(&mut d, 0.5),
        pct(&mut d, 0.99),
        pct(&mut h, 0.5),
        pct(&mut h, 0.99),
    );
    Ok(s)
}

fn main() -> Result<()> {
    nimmer_benches::init_tracing();
    let args = Args::parse();
    if args.workload == "personas" {
        return personas::main(&args);
    }
    if args.workload == "events" {
        return events::main(&args);
    }
    if args.workload == "burst" {
        return burst::main(&args);
    }
    anyhow::ensure!(
        args.workload == "city",
        "unknown --workload `{}` (city, personas, burst, events)",
        args.workload
    );
    anyhow::ensure!(
        args.hot_zones < args.zones,
        "--hot-zones must be below --zones"
    );
    let cfg = match &args.config {
        Some(d) => Config::load(d)?,
        None => Config::embedded(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (gw, base, stop_tx, server) = serve(cfg).await?;
        let (mut text, page) = city(&args, &base).await?;
        // The HTML report: `--html`, else beside the results file (`reports/city-<label>.html`).
        let html = args.html.clone().or_else(|| {
            args.write.as_ref().map(|w| {
                w.with_file_name("reports")
                    .join(format!("city-{}.html", args.label))
            })
        });
        if let Some(h) = &html {
            if let Some(dir) = h.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(h, &page).with_context(|| format!("writing {}", h.display()))?;
            eprintln!("report: {}", h.display());
            if args.html.is_none() {
                text += &format!(
                    "\nPlots of this run (latency CDFs per tier, tokens/s over time, each zone's share, rejections): [reports/city-{0}.html](reports/city-{0}.html).\n",
                    args.label
                );
            }
        }
        if args.overhead_n > 0 {
            text += &overhead(&args, &base, &gw).await?;
        }
        println!("{text}");
        if let Some(path) = &args.write {
            write_block(path, &format!("city-bench:{}", args.label), &text)?;
        }
        let _ = stop_tx.send(());
        server.await??;
        Ok(())
    })
}

/// A gateway with the three real tiers in process, serving HTTP on a loopback port: the gateway, its base
/// URL, the sender that stops it and the serving task.
pub(crate) async fn serve(
    cfg: Config,
) -> Result<(
    Arc<Gateway>,
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), nimmer_gateway::GatewayError>>,
)> {
    let gw = Arc::new(tokio::task::spawn_blocking(move || Gateway::start(cfg, None)).await??);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(nimmer_gateway::run(
        listener,
        gw.clone(),
        nimmer_gateway::Options::default(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    Ok((gw, base, stop_tx, server))
}

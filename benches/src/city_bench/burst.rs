//! The burst workload (`city-bench --workload burst`): the two experiments of issue 13, run against the
//! in-process gateway under each step schedule in turn (a budgets reload between them, rounds interleaved).
//! 1. **Flood and a quiet line**: one zone sends `--flood` dialogs of 48 tokens at once; one second later a
//!    quiet zone sends one 16-token line. Reported: the quiet line's TTFT and total time, and its total as a
//!    share of the flood's drain time.
//! 2. **Weights**: a weight-1 zone (`street`) and a weight-2 zone (`plaza-`) each send 24 dialogs of 48
//!    tokens at once. Reported: the tokens each received until the first request ended (both zones
//!    backlogged all along), and their ratio.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use nimmer_benches::{machine, pct};
use nimmer_config::Config;
use serde_json::{Value, json};

use super::Args;

/// The schedules compared: the engine before issue 13 (slots = rows = 32, first come first served, no step
/// target) and the shipped default (128 slots of which 32 kept for zones under their share, 128 resident,
/// 32 rows a step held to a 30 ms target, fair).
const BEFORE: &[(&str, &str)] = &[
    (
        "slots = 128\nreserved_slots = 32",
        "slots = 32\nreserved_slots = 0",
    ),
    ("resident = 128", "resident = 32"),
    ("step_target_ms = 30", "step_target_ms = 0"),
    ("schedule = \"fair\"", "schedule = \"fcfs\""),
];

/// One round of one schedule.
struct Round {
    quiet_ttft: f64,
    quiet_total: f64,
    drain: f64,
    street: usize,
    plaza: usize,
}

/// Token arrival times of one streamed request, and when it ended.
struct Stream {
    tokens: Vec<Instant>,
    end: Instant,
}

async fn stream(client: &reqwest::Client, base: &str, body: Value) -> Result<Stream> {
    let resp = client
        .post(format!("{base}/v1/dialog"))
        .json(&body)
        .send()
        .await?;
    anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
    let mut s = resp.bytes_stream();
    let (mut buf, mut tokens) = (String::new(), Vec::new());
    while let Some(chunk) = s.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(nl) = buf.find('\n') {
            if buf[..nl].trim_end() == "event: token" {
                tokens.push(Instant::now());
            }
            buf.drain(..=nl);
        }
    }
    Ok(Stream {
        tokens,
        end: Instant::now(),
    })
}

fn line(zone: &str, i: usize, max_tokens: usize) -> Value {
    json!({
        "uid": format!("burst{}/d0/s{}/k{}", nimmer_benches::run_id(), i % 40, nimmer_benches::next_slot()), "zone": zone, "kind": "dialog", "stream": true,
        "max_tokens": max_tokens,
        "messages": [{ "role": "system", "content": super::SYSTEM },
                     { "role": "user", "content": super::LINES[i % super::LINES.len()] }],
        "sampling": { "temperature": 0.7, "seed": i, "ignore_eos": true },
    })
}

async fn many(client: &reqwest::Client, base: &str, bodies: Vec<Value>) -> Result<Vec<Stream>> {
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|b| {
            let (c, base) = (client.clone(), base.to_string());
            tokio::spawn(async move { stream(&c, &base, b).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

/// Experiment 1: (quiet TTFT ms, quiet total ms, flood drain ms).
async fn flood_and_quiet(
    client: &reqwest::Client,
    base: &str,
    flood: usize,
    round: usize,
) -> Result<(f64, f64, f64)> {
    let zone = format!("flood-{round}");
    let t0 = Instant::now();
    let bodies = (0..flood).map(|i| line(&zone, i, 48)).collect();
    let flood = {
        let (c, b) = (client.clone(), base.to_string());
        tokio::spawn(async move { many(&c, &b, bodies).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let q0 = Instant::now();
    let quiet = stream(client, base, line(&format!("quiet-{round}"), 99, 16)).await?;
    let flood = flood.await??;
    let drain = flood.iter().map(|s| s.end).max().context("flood")?;
    let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1e3;
    Ok((
        ms(q0, *quiet.tokens.first().context("quiet tokens")?),
        ms(q0, quiet.end),
        ms(t0, drain),
    ))
}

/// Experiment 2: tokens (street, plaza) received while both zones had every request running or waiting.
async fn weights(client: &reqwest::Client, base: &str, round: usize) -> Result<(usize, usize)> {
    let bodies = |zone: String| (0..24).map(move |i| line(&zone, i, 48)).collect::<Vec<_>>();
    let (street, plaza) = (format!("street-{round}"), format!("plaza-{round}"));
    let (a, b) = tokio::join!(
        many(client, base, bodies(street)),
        many(client, base, bodies(plaza))
    );
    let (a, b) = (a?, b?);
    // Both zones have every request in flight until the first request ends (after that a zone's share can
    // be limited by what it has left, within a zone requests run in arrival order): count up to there.
    let until = a.iter().chain(&b).map(|s| s.end).min().context("streams")?;
    let count = |v: &[Stream]| {
        v.iter()
            .flat_map(|s| &s.tokens)
            .filter(|&&t| t <= until)
            .count()
    };
    Ok((count(&a), count(&b)))
}

pub fn main(args: &Args) -> Result<()> {
    let cfg = match &args.config {
        Some(d) => Config::load(d)?,
        None => Config::embedded(),
    };
    let after = cfg.sources.budgets.clone();
    let mut before = after.clone();
    for (from, to) in BEFORE {
        anyhow::ensure!(before.contains(from), "budgets.toml has no `{from}`");
        before = before.replacen(from, to, 1);
    }
    let flood = args.flood;
    let rounds = args.rounds;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let text = rt.block_on(async move {
        let (gw, base, stop_tx, server) = super::serve(cfg).await?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .pool_max_idle_per_host(256)
            .build()?;
        let mut runs: [Vec<Round>; 2] = [Vec::new(), Vec::new()];
        for round in 0..rounds {
            for (k, budgets) in [&before, &after].into_iter().enumerate() {
                gw.apply_budgets(budgets).context("applying the schedule's budgets")?;
                let tag = round * 2 + k;
                let (ttft, total, drain) = flood_and_quiet(&client, &base, flood, tag).await?;
                let (street, plaza) = weights(&client, &base, tag).await?;
                eprintln!(
                    "round {round} {}: quiet TTFT {ttft:.0} ms, total {total:.0} ms = {:.2} of the flood's {drain:.0} ms; street {street} vs plaza {plaza} tokens",
                    ["before", "after"][k],
                    total / drain
                );
                runs[k].push(Round {
                    quiet_ttft: ttft,
                    quiet_total: total,
                    drain,
                    street,
                    plaza,
                });
            }
        }
        let _ = stop_tx.send(());
        server.await??;
        let mut text = format!(
            "#### {}\n\nMachine: {}. Command: `cargo run --release -p nimmer-benches --bin city-bench -- --workload burst --flood {flood} --rounds {rounds} --label {} --write benches/RESULTS.md`. \
             Default budgets (after: 128 Driver slots with 32 reserved for zones under their share, 128 resident, 32 rows a step held to a 30 ms target, `schedule = \"fair\"`) against the engine before issue 13 (before: 32 slots = 32 resident, none reserved, no step target, `schedule = \"fcfs\"`), applied by a budgets reload, alternated in each of {rounds} rounds. \
             Flood: one zone sends {flood} dialogs of 48 tokens at once, one second later a quiet zone one line of 16 tokens. Weights: a `street` zone (weight 1) and a `plaza-` zone (weight 2) send 24 dialogs of 48 tokens each at once; tokens each received until the first of the 48 requests ended (both zones fully backlogged). Medians, each round's figure in brackets.\n\n\
             | schedule | quiet TTFT ms | quiet line total ms | share of the flood's drain | flood drain ms | street : plaza tokens | plaza / street |\n|---|---|---|---|---|---|---|\n",
            args.label,
            machine(),
            args.label
        );
        for (k, name) in ["before (fcfs, 32 slots)", "after (fair, 128 slots)"].iter().enumerate() {
            let r = &runs[k];
            let col = |f: &dyn Fn(&Round) -> f64, digits: usize| {
                let mut v: Vec<f64> = r.iter().map(f).collect();
                let each = v.iter().map(|x| format!("{x:.digits$}")).collect::<Vec<_>>().join(", ");
                format!("{:.digits$} ({each})", pct(&mut v, 0.5))
            };
            text += &format!(
                "| {name} | {} | {} | {} | {} | {} | {} |\n",
                col(&|x| x.quiet_ttft, 0),
                col(&|x| x.quiet_total, 0),
                col(&|x| x.quiet_total / x.drain, 2),
                col(&|x| x.drain, 0),
                r.iter()
                    .map(|x| format!("{}:{}", x.street, x.plaza))
                    .collect::<Vec<_>>()
                    .join(", "),
                col(&|x| x.plaza as f64 / x.street.max(1) as f64, 2),
            );
        }
        Ok::<_, anyhow::Error>(text)
    })?;
    println!("{text}");
    if let Some(path) = &args.write {
        nimmer_benches::write_block(path, &format!("city-bench:{}", args.label), &text)?;
    }
    Ok(())
}

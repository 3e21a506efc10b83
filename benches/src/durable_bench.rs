//! `durable-bench`: what "durable before answered" adds to a dialog's answer. The gateway's results publisher
//! (`nimmer_gateway::results`, the code `nimmer serve` runs) is driven by concurrent senders, each waiting as a
//! dialog does until its result is durable: acknowledged by JetStream on one nats-server and on a 3-node
//! cluster (3 replicas), and, with the server down, fsync'd to the spool. Before this change an answer waited
//! for nothing (the result was only queued in memory), so these waits are the added latency. Also the claim a
//! dialog makes across gateways before it runs (`nimmer_gateway::shared_answers`: one KV create), the other
//! wait a gateway on NATS adds to every dialog.

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use nimmer_benches::{machine, pct, write_block};
use nimmer_gateway::results::{self, Durable, PublisherConfig, Spool};
use nimmer_services::{NatsCluster, NatsServer};
use nimmer_wire::{DialogResponse, DialogResult, Kind, Uid};

#[derive(Parser)]
#[command(
    about = "Latency a dialog's answer waits for its result to be durable (JetStream ack or spool fsync)"
)]
struct Args {
    /// Results sent per run.
    #[arg(long, default_value_t = 2000)]
    sends: usize,
    /// Concurrent senders (dialogs finishing at once), one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    concurrency: Vec<usize>,
    /// Append the table to this file (benches/RESULTS.md).
    #[arg(long)]
    write: Option<std::path::PathBuf>,
}

fn result(run: &str, i: usize) -> DialogResult {
    DialogResult {
        result_id: format!("{run}-{i}"),
        uid: Uid {
            gm_event: "ev1".into(),
            district: format!("d{}", i % 8),
            scene: format!("sc{}", i % 64),
            slot: format!("s{i}"),
        },
        zone: "z1".into(),
        kind: Kind::Dialog,
        npc: None,
        participants: vec!["p1".into(), "p2".into()],
        faction: None,
        finished_at_ms: 1,
        response: serde_json::from_value::<DialogResponse>(serde_json::json!({
            "text": "Arr, the ferry leaves every hour on the bell, matey.", "tier": "driver",
        }))
        .expect("a response"),
    }
}

/// `sends` results from `concurrency` senders: per-send latency percentiles (ms), results/s and how each
/// became durable.
async fn run(
    client: async_nats::Client,
    replicas: usize,
    wait: Duration,
    sends: usize,
    concurrency: usize,
    name: &str,
) -> Result<(f64, f64, f64, Durable)> {
    let dir = tempfile::tempdir()?;
    let cfg = PublisherConfig {
        stream: "RESULTS".into(),
        replicas,
        durable_wait: wait,
    };
    let (sink, task) = results::start(client, cfg, Some(Spool::open(dir.path())?));
    let t = Instant::now();
    let per = sends / concurrency;
    let senders: Vec<_> = (0..concurrency)
        .map(|c| {
            let (sink, name) = (sink.clone(), name.to_string());
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per);
                let mut via = Durable::Memory;
                for k in 0..per {
                    let r = result(&name, c * per + k);
                    let t = Instant::now();
                    via = sink.send(&r).await.expect("publisher running");
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
                (lat, via)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut via = Durable::Memory;
    for s in senders {
        let (l, v) = s.await?;
        lat.extend(l);
        via = v;
    }
    let secs = t.elapsed().as_secs_f64();
    drop(sink);
    task.abort();
    Ok((
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        (per * concurrency) as f64 / secs,
        via,
    ))
}

/// `claims` shared-answer claims (KV creates, each then answered) from `concurrency` claimers: latency
/// percentiles (ms) of the claim, which a dialog waits for before it runs, and claims/s.
async fn claims(
    client: async_nats::Client,
    replicas: usize,
    claims: usize,
    concurrency: usize,
    name: &str,
) -> Result<(f64, f64, f64)> {
    use nimmer_gateway::shared_answers::{Shared, SharedAnswers};
    let shared = SharedAnswers::start(client, Duration::from_secs(600), replicas);
    while !shared.ready() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answer: DialogResponse = serde_json::from_value(serde_json::json!({
        "text": "Arr, the ferry leaves every hour on the bell, matey.", "tier": "driver",
    }))?;
    let t = Instant::now();
    let per = claims / concurrency;
    let tasks: Vec<_> = (0..concurrency)
        .map(|c| {
            let (shared, answer, name) = (shared.clone(), answer.clone(), name.to_string());
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per);
                for k in 0..per {
                    let t = Instant::now();
                    let Shared::Owner(lease) =
                        shared.claim(&format!("{name}-{}", c * per + k)).await
                    else {
                        panic!("a fresh key is this claimer's");
                    };
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                    lease.finish(&answer);
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await?);
    }
    let rate = (per * concurrency) as f64 / t.elapsed().as_secs_f64();
    Ok((pct(&mut lat, 0.5), pct(&mut lat, 0.99), rate))
}

fn row(what: &str, c: usize, (p50, p99, rate, via): (f64, f64, f64, Durable)) -> String {
    format!("| {what} | {c} | {via:?} | {p50:.2} | {p99:.2} | {rate:.0} |\n")
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut table = format!(
        "Machine: {}. nimmer's results publisher against nats-server (file store) on loopback; {} results per \
         run. Command: `cargo run --release -p nimmer-benches --bin durable-bench -- --write benches/RESULTS.md`.\n\n\
         | durable by | senders | became | answer waits p50 (ms) | p99 (ms) | results/s |\n|---|---|---|---|---|---|\n",
        machine(),
        args.sends
    );
    let wait = Duration::from_millis(500);
    let mut claim_rows = String::new();
    let claim_row = |what: &str, c: usize, (p50, p99, rate): (f64, f64, f64)| {
        format!("| {what} | {c} | {p50:.2} | {p99:.2} | {rate:.0} |\n")
    };
    {
        let nats = NatsServer::start();
        let client = async_nats::connect(&nats.url).await?;
        for &c in &args.concurrency {
            let r = run(client.clone(), 1, wait, args.sends, c, &format!("one-{c}")).await?;
            table += &row("JetStream ack, one server", c, r);
            let r = claims(client.clone(), 1, args.sends, c, &format!("one-{c}")).await?;
            claim_rows += &claim_row("one server", c, r);
        }
    }
    {
        let cluster = NatsCluster::start();
        let client = async_nats::connect(nimmer_wire::nats_urls(&cluster.urls())).await?;
        for &c in &args.concurrency {
            let r = claims(client.clone(), 3, args.sends, c, &format!("cluster-{c}")).await?;
            claim_rows += &claim_row("3-node cluster (R3)", c, r);
            let r = run(
                client.clone(),
                3,
                wait,
                args.sends,
                c,
                &format!("cluster-{c}"),
            )
            .await?;
            table += &row("JetStream ack, 3-node cluster (R3)", c, r);
        }
    }
    {
        // The server down: each send waits `spool_wait` for an ack that never comes, then for the fsync; once
        // the backlog is non-empty later results go to the spool at once.
        let mut nats = NatsServer::start();
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(nats.url.as_str())
            .await?;
        nats.kill();
        let spool_wait = Duration::from_millis(50);
        for &c in &args.concurrency {
            let r = run(
                client.clone(),
                1,
                spool_wait,
                args.sends,
                c,
                &format!("down-{c}"),
            )
            .await?;
            table += &row("spool fsync, server down (first waits 50 ms)", c, r);
        }
    }
    table += "\nBefore: an answer waited for nothing (the result was only queued in the gateway's memory).\n";
    table += &format!(
        "\nThe claim across gateways (`shared_answers`: a KV create on `NIMMER_ANSWERS`, memory storage) that a \
         dialog on a gateway with NATS waits for before it runs; its answer is put in the background.\n\n\
         | NATS | claimers | claim p50 (ms) | p99 (ms) | claims/s |\n|---|---|---|---|---|\n{claim_rows}"
    );
    println!("{table}");
    if let Some(path) = &args.write {
        write_block(path, "durable-bench", &table)?;
    }
    Ok(())
}

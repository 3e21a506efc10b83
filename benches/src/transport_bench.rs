//! Canon transport benchmark against a real PostgreSQL and nats-server (started here, on loopback, in temp
//! directories): end-to-end canon rows/s (results published to `RESULTS` → compositors → PostgreSQL → relay →
//! `CANON`), result → player SQLite latency at a steady 1k rows/s, a player's replay rate over 100k missed
//! rows, and nats-server memory, file handles and disk for 1,000 durable player consumers. Writes a table into
//! `benches/RESULTS.md`. With `--cluster`: the end-to-end throughput on one nats-server (every stream one
//! replica) against a 3-node JetStream cluster on loopback (every stream three replicas).

use std::time::{Duration, Instant};

use anyhow::Result;
use async_nats::jetstream::{self, consumer};
use clap::Parser;
use nimmer_benches::{machine, pct, write_block};
use nimmer_compositor::{Canon, PlayerStore, follow};
use nimmer_config::TransportFile;
use nimmer_services::{NatsCluster, NatsServer, PgOptions, Postgres};

#[derive(Parser)]
#[command(
    about = "Canon transport throughput, latency, replay and consumer cost; writes benches/RESULTS.md"
)]
struct Args {
    /// Results for the throughput run.
    #[arg(long, default_value_t = 20_000)]
    rows: usize,
    /// Compositor processes (tasks) in the throughput run.
    #[arg(long, default_value_t = 2)]
    compositors: usize,
    /// Seconds of the 1k rows/s latency run.
    #[arg(long, default_value_t = 10)]
    latency_s: u64,
    /// Missed rows a player replays.
    #[arg(long, default_value_t = 100_000)]
    replay: usize,
    /// Durable player consumers created.
    #[arg(long, default_value_t = 1000)]
    consumers: usize,
    /// Measure only the end-to-end throughput, on one server and on a 3-node cluster (3 replicas).
    #[arg(long)]
    cluster: bool,
    /// Measure only end-to-end throughput and latency (written as the `transport-bench-durable` block,
    /// labelled `--label`).
    #[arg(long)]
    durable_pg: bool,
    /// PostgreSQL without fsync and synchronous_commit (how figures before session 11 were taken); by default
    /// every mode runs it with durable commits, as in production.
    #[arg(long)]
    pg_fsync_off: bool,
    /// A label for the run (e.g. the commit), printed in the durable block.
    #[arg(long, default_value = "")]
    label: String,
    #[arg(long)]
    write: Option<std::path::PathBuf>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn result(i: usize, participants: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "result_id": format!("r{i}"),
        "uid": { "gm_event": "ev1", "district": format!("d{}", i % 8), "scene": format!("sc{}", i % 64), "slot": format!("s{i}") },
        "zone": "z1", "kind": "dialog", "npc": { "id": "npc1" },
        "participants": participants, "faction": "f1",
        "finished_at_ms": now_ms() + i as u64,
        "response": { "text": "Arr, the ferry leaves every hour on the bell, matey.", "tier": "driver", "adapters": [] },
    }))
    .unwrap()
}

async fn publish_results(js: &jetstream::Context, from: usize, to: usize, participants: &[&str]) {
    let mut acks = Vec::with_capacity(to - from);
    for i in from..to {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("r{i}").as_str());
        let subject = format!("nimmerverse.results.ev1.d{}.sc{}", i % 8, i % 64);
        acks.push(
            js.publish_with_headers(subject, h, result(i, participants).into())
                .await
                .unwrap(),
        );
        if acks.len() >= 1000 {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }
    for a in acks {
        a.await.unwrap();
    }
}

async fn messages(js: &jetstream::Context, name: &str) -> u64 {
    match js.get_stream(name).await {
        Ok(mut s) => s.info().await.map_or(0, |i| i.state.messages),
        Err(_) => 0,
    }
}

fn proc_stat(pid: u32) -> (f64, usize) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss, fds)
}

fn dir_mib(p: &std::path::Path) -> f64 {
    fn walk(p: &std::path::Path) -> u64 {
        std::fs::read_dir(p).map_or(0, |d| {
            d.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
    }
    walk(p) as f64 / (1 << 20) as f64
}

struct Compositors {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn start_compositors(n: usize, t: &TransportFile, pg: &str, nats: &str) -> Compositors {
    let (stop, rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for _ in 0..n {
        let client = async_nats::connect(nimmer_wire::nats_urls(nats))
            .await
            .unwrap();
        let (t, url, mut rx) = (t.clone(), pg.to_string(), rx.clone());
        tasks.push(tokio::spawn(async move {
            nimmer_compositor::serve(t, &url, client, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
            .unwrap();
        }));
    }
    Compositors { stop, tasks }
}

impl Compositors {
    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Publishes `args.rows` results at once and waits until `CANON` holds them all: canon rows/s and seconds.
/// The streams are created first (compositors racing to create them on a cluster would time out).
async fn throughput(args: &Args, t: &TransportFile, pg: &str, nats: &str) -> (f64, f64) {
    let client = async_nats::connect(nimmer_wire::nats_urls(nats))
        .await
        .unwrap();
    let js = jetstream::new(client);
    nimmer_compositor::streams::ensure(&js, t).await.unwrap();
    let comps = start_compositors(args.compositors, t, pg, nats).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    publish_results(&js, 0, args.rows, &["p1", "p2"]).await;
    let published = started.elapsed();
    while messages(&js, "CANON").await < args.rows as u64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed().as_secs_f64();
    let rate = args.rows as f64 / took;
    println!(
        "throughput: {} rows in {took:.2} s = {rate:.0} rows/s (publishing took {:.2} s)",
        args.rows,
        published.as_secs_f64()
    );
    comps.stop().await;
    (rate, took)
}

/// `--cluster`: the throughput on one server (1 replica) and on a 3-node cluster (3 replicas).
async fn cluster(args: &Args) -> Result<()> {
    let mut out = format!(
        "Machine: {}. PostgreSQL 15 ({}, loopback), nats-server {} (JetStream, file store), every process \
         on the same cores. Command: `cargo run --release -p nimmer-benches --bin transport-bench -- --cluster \
         --write benches/RESULTS.md`.\n\n| NATS | end to end, {} results published at once, {} compositors |\n|---|---|\n",
        machine(),
        pg_mode(args),
        nats_version(),
        args.rows,
        args.compositors
    );
    let mut t = TransportFile::embedded();
    t.relay.poll_ms = 50;
    t.results.batch = 256;
    let mut rates = Vec::new();
    for (label, replicas) in [
        ("one server, 1 replica", 1),
        ("3-node cluster, 3 replicas", 3),
    ] {
        let pg = Postgres::start_with(PgOptions {
            durable: !args.pg_fsync_off,
        });
        t.replicas = nimmer_config::ReplicasSpec::all(replicas);
        let (rate, took) = if replicas == 1 {
            let nats = NatsServer::start();
            throughput(args, &t, &pg.url, &nats.url).await
        } else {
            let nats = NatsCluster::start();
            throughput(args, &t, &pg.url, &nats.urls()).await
        };
        rates.push(rate);
        out += &format!("| {label} | {rate:.0} canon rows/s ({took:.1} s) |\n");
    }
    out += &format!(
        "\nThe cluster keeps {:.0}% of the single server's rate.\n",
        100.0 * rates[1] / rates[0]
    );
    println!("{out}");
    if let Some(path) = &args.write {
        write_block(path, "transport-bench-cluster", &out)?;
    }
    Ok(())
}

fn pg_mode(args: &Args) -> &'static str {
    if args.pg_fsync_off {
        "fsync off"
    } else {
        "fsync and synchronous_commit on"
    }
}

fn nats_version() -> String {
    std::process::Command::new(std::env::var("NATS_SERVER").unwrap_or("nats-server".into()))
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .trim_start_matches("nats-server: ")
                .to_string()
        })
        .unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    // The compositors run in this process: their warnings (a failed relay batch, a redelivery) show here.
    nimmer_benches::init_tracing();
    let args = Args::parse();
    if args.cluster {
        return cluster(&args).await;
    }
    let pg = Postgres::start_with(PgOptions {
        durable: !args.pg_fsync_off,
    });
    let nats = NatsServer::start();
    let client = async_nats::connect(&nats.url).await?;
    let js = jetstream::new(client.clone());
    let mut t = TransportFile::embedded();
    t.relay.poll_ms = 50;
    t.results.batch = 256;
    let mut out = format!(
        "Machine: {}. PostgreSQL 15 ({}, loopback), nats-server {} (JetStream, file store). \
         Command: `cargo run --release -p nimmer-benches --bin transport-bench -- {}--write benches/RESULTS.md`.{}\n\n",
        machine(),
        pg_mode(&args),
        nats_version(),
        if args.durable_pg { "--durable-pg " } else { "" },
        if args.label.is_empty() {
            String::new()
        } else {
            format!(" Run: {}.", args.label)
        },
    );
    out += "| measure | figure |\n|---|---|\n";

    // 1. Throughput: a backlog of results drained by the compositors; canon rows/s until CANON holds all.
    let (rate, took) = throughput(&args, &t, &pg.url, &nats.url).await;
    out += &format!(
        "| end to end, {} results (2 participants + faction: 4 outbox rows each) published at once, {} compositors | {rate:.0} canon rows/s ({took:.1} s until `CANON` held all) |\n",
        args.rows, args.compositors
    );
    let comps = start_compositors(args.compositors, &t, &pg.url, &nats.url).await;

    // 2. Latency at 1k rows/s: result published → row committed in the player's SQLite.
    let dir = tempfile::tempdir()?;
    let store = PlayerStore::open(&dir.path().join("lat.sqlite")).await?;
    let sent: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>> =
        Default::default();
    let mut lat = Vec::new();
    let n_lat = (args.latency_s * 1000) as usize;
    let base = args.rows;
    let (stop_follow, rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let mut done_tx = Some(done_tx);
    let publisher = {
        let (js, sent) = (js.clone(), sent.clone());
        tokio::spawn(async move {
            let tick = Duration::from_millis(1);
            let t0 = Instant::now();
            for k in 0..n_lat {
                let due = t0 + tick * k as u32;
                tokio::time::sleep_until(due.into()).await;
                let i = base + k;
                sent.lock().unwrap().insert(format!("r{i}"), Instant::now());
                let mut h = async_nats::HeaderMap::new();
                h.insert("Nats-Msg-Id", format!("r{i}").as_str());
                let subject = format!("nimmerverse.results.ev1.d{}.sc{}", i % 8, i % 64);
                let ack = js
                    .publish_with_headers(subject, h, result(i, &["lat"]).into())
                    .await
                    .unwrap();
                tokio::spawn(async move { ack.await.unwrap() });
            }
        })
    };
    let stopper = tokio::spawn(async move {
        let _ = done_rx.await;
        let _ = stop_follow.send(());
    });
    follow(
        &js,
        &t,
        "lat",
        &store,
        async {
            let _ = rx.await;
        },
        |a| {
            let now = Instant::now();
            let sent = sent.lock().unwrap();
            for c in &a.new {
                if let Some(s) = sent.get(&c.result_id) {
                    lat.push((now - *s).as_secs_f64() * 1e3);
                }
            }
            if lat.len() >= n_lat
                && let Some(tx) = done_tx.take()
            {
                let _ = tx.send(());
            }
        },
    )
    .await?;
    publisher.await?;
    stopper.await?;
    store.close().await;
    let (p50, p99, max) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99), pct(&mut lat, 1.0));
    println!("latency at 1k rows/s: p50 {p50:.1} ms p99 {p99:.1} ms max {max:.1} ms");
    out += &format!(
        "| result published → committed in the player's SQLite, 1,000 rows/s for {} s | p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms |\n",
        args.latency_s
    );
    comps.stop().await;
    if args.durable_pg {
        println!("{out}");
        if let Some(path) = &args.write {
            let name = if args.label.is_empty() {
                "transport-bench-durable".to_string()
            } else {
                format!("transport-bench-durable-{}", args.label)
            };
            write_block(path, &name, &out)?;
        }
        return Ok(());
    }

    // 3. Replay: a player offline while `replay` rows accumulated on its feed.
    let feed = t.player_subject("offline");
    let row = serde_json::to_vec(&Canon {
        canon_uid: String::new(),
        result_id: String::new(),
        gm_event: "ev1".into(),
        district: "d1".into(),
        scene: "sc1".into(),
        slot: "s1".into(),
        seq: 0,
        zone: "z1".into(),
        kind: "dialog".into(),
        tier: "driver".into(),
        npc: Some("npc1".into()),
        text: "Arr, the ferry leaves every hour on the bell, matey.".into(),
        participants: vec!["offline".into()],
        faction: None,
        adapters: vec![],
        finished_at_ms: now_ms() as i64,
    })?;
    let mut acks = Vec::new();
    for i in 0..args.replay {
        let mut v: serde_json::Value = serde_json::from_slice(&row)?;
        v["canon_uid"] = format!("ev1/d1/sc1/{i}").into();
        v["result_id"] = format!("x{i}").into();
        v["seq"] = (i as i64 + 1).into();
        acks.push(
            js.publish(feed.clone(), serde_json::to_vec(&v)?.into())
                .await?,
        );
        if acks.len() >= 2000 {
            for a in acks.drain(..) {
                a.await?;
            }
        }
    }
    for a in acks {
        a.await?;
    }
    // Raw JetStream replay (ordered consumer, nothing applied).
    let s = js.get_stream(&t.players.stream).await?;
    let c = s
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: feed.clone(),
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut msgs = c.messages().await?;
    let mut n = 0;
    use futures::StreamExt;
    while n < args.replay {
        msgs.next().await.unwrap()?;
        n += 1;
    }
    let raw = args.replay as f64 / started.elapsed().as_secs_f64();
    drop(msgs);
    // The player client: replay + apply into SQLite with checkpoints.
    let store = PlayerStore::open(&dir.path().join("offline.sqlite")).await?;
    let started = Instant::now();
    let (stop_follow, rx) = tokio::sync::oneshot::channel::<()>();
    let mut stop_follow = Some(stop_follow);
    let mut applied = 0usize;
    let total = args.replay;
    follow(
        &js,
        &t,
        "offline",
        &store,
        async {
            let _ = rx.await;
        },
        |a| {
            applied += a.new.len();
            if applied >= total
                && let Some(s) = stop_follow.take()
            {
                let _ = s.send(());
            }
        },
    )
    .await?;
    let replay = started.elapsed().as_secs_f64();
    let db_mib = dir_mib(dir.path());
    store.close().await;
    println!(
        "replay {} rows: {:.0} rows/s applied ({replay:.2} s), raw {raw:.0} msg/s",
        args.replay,
        args.replay as f64 / replay
    );
    out += &format!(
        "| player replay of {} missed rows (ordered consumer from the checkpoint → SQLite, batches of ≤ 512 per transaction) | {:.0} rows/s ({replay:.1} s); raw JetStream replay of the same feed {raw:.0} msg/s; SQLite files {db_mib:.0} MiB |\n",
        args.replay,
        args.replay as f64 / replay
    );

    // 4. Durable consumers: one per player on PLAYERS, filtered to the player's subject.
    let pid = nats.pid().expect("nats-server runs");
    let (rss0, fds0) = proc_stat(pid);
    let disk0 = dir_mib(nats.store_path());
    let stream = js.get_stream(&t.players.stream).await?;
    let started = Instant::now();
    for i in 0..args.consumers {
        let name = format!("player-{i}");
        stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name),
                filter_subject: t.player_subject(&format!("p{i}")),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("creating durable consumer {i}: {e}"))?;
    }
    let created = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss1, fds1) = proc_stat(pid);
    let disk1 = dir_mib(nats.store_path());
    println!(
        "{} durable consumers: created in {created:.1} s; nats-server RSS {rss0:.0} -> {rss1:.0} MiB, fds {fds0} -> {fds1}, store {disk0:.1} -> {disk1:.1} MiB",
        args.consumers
    );
    out += &format!(
        "| {} durable player consumers on `PLAYERS` (one per player, filtered) | created in {created:.1} s; nats-server RSS {rss0:.0} → {rss1:.0} MiB ({:.1} KiB each), open files {fds0} → {fds1}, store {disk0:.1} → {disk1:.1} MiB |\n",
        args.consumers,
        (rss1 - rss0) * 1024.0 / args.consumers as f64
    );
    println!("{out}");
    if let Some(path) = &args.write {
        write_block(path, "transport-bench", &out)?;
    }
    Ok(())
}

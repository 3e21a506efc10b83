//! `--workload events`: the city runs itself. Every piece is a process: nats-server, PostgreSQL, a gateway
//! (`nimmer serve --nats`, the three real tiers), a compositor and two GM processes serving every shard of
//! gm.toml (the repository's `config/`: its event templates and shard map). Events open over the zones at a
//! Poisson rate through the shards (`nimmer_gm::city::drive`); every `--every-s` the bench samples what the
//! design cares about (tokens/s per tier, slot latency, event duration, open directors, canon lag, and the
//! sizes that pruning keeps flat: the active register, the outbox, the streams, each process's RSS) and
//! writes the series as a table.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nimmer_benches::{machine, write_block};
use nimmer_gm::city::{self, CityPlan, Opens, prom};

use super::Args;

/// A child process with its log file; killed when dropped.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn start(name: &'static str, nimmer: &Path, args: &[&str], logs: &Path) -> Result<Self> {
        let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
        let child = Command::new(nimmer)
            .args(args)
            .env("NIMMER_CONFIG", repo().join("config"))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", nimmer.display()))?;
        Ok(Self { name, child })
    }

    /// Resident set size (MiB).
    fn rss_mib(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
            .map_or(f64::NAN, |kb| kb / 1024.0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

async fn get(http: &reqwest::Client, url: &str) -> String {
    match http.get(url).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// What one look at the processes' metrics gives (kept to difference the next look against).
struct Scrape {
    at: Instant,
    gateway: String,
    gm: Vec<String>,
}

fn tokens(text: &str, tier: &str) -> f64 {
    prom::sum(
        text,
        "nimmer_tokens_total",
        &[&format!("tier=\"{tier}\""), "kind=\"completion\""],
    )
}

fn slot_buckets(gm: &[String]) -> Vec<(f64, f64)> {
    let mut all: Vec<(f64, f64)> = Vec::new();
    for text in gm {
        for (le, c) in prom::buckets(text, "nimmer_gm_slot_seconds", &[]) {
            match all.iter_mut().find(|x| x.0 == le) {
                Some(x) => x.1 += c,
                None => all.push((le, c)),
            }
        }
    }
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    all
}

/// `p50 / p95`, in seconds (or, `ms`, in milliseconds).
fn s2(v: (f64, f64), ms: bool) -> String {
    let f = |x: f64| match (x.is_finite(), ms) {
        (false, _) => "–".to_string(),
        (true, false) => format!("{x:.1}"),
        (true, true) => format!("{:.0}", x * 1e3),
    };
    format!("{} / {}", f(v.0), f(v.1))
}

pub fn main(args: &Args) -> Result<()> {
    let nimmer = args
        .nimmer
        .clone()
        .unwrap_or_else(|| repo().join("target/release/nimmer"));
    if !nimmer.is_file() {
        bail!(
            "{} not found: build it (`cargo build --release -p nimmer`) or pass --nimmer",
            nimmer.display()
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(args, &nimmer))
}

async fn run(args: &Args, nimmer: &Path) -> Result<()> {
    let nats = nimmer_services::NatsServer::start();
    let pg = nimmer_services::Postgres::start();
    let tmp = tempfile::tempdir()?;
    let logs = tmp.path();
    let ports = nimmer_services::free_ports(3);
    let base = format!("http://127.0.0.1:{}", ports[0]);
    let templates = {
        let config = nimmer_config::Config::load(&repo().join("config"))?;
        Arc::new(nimmer_gm::Templates {
            catalog: nimmer_config::EventCatalog::load(&repo().join("config/events"), &config)?,
            map: nimmer_config::GmFile::load(&repo().join("config"))?,
        })
    };
    let shards: Vec<String> = templates
        .map
        .shard_names()
        .iter()
        .flat_map(|s| ["--shard".to_string(), s.to_string()])
        .collect();
    let spool = logs.join("spool");
    let listen = format!("127.0.0.1:{}", ports[0]);
    let mut procs = vec![
        Proc::start(
            "gateway",
            nimmer,
            &[
                "serve",
                "--nats",
                &nats.url,
                "--listen",
                &listen,
                "--spool",
                spool.to_str().unwrap_or("spool"),
            ],
            logs,
        )?,
        Proc::start(
            "compositor",
            nimmer,
            &["compositor", "--nats", &nats.url, "--postgres", &pg.url],
            logs,
        )?,
    ];
    let mut gm_urls = Vec::new();
    for (i, name) in [(1, "gm-1"), (2, "gm-2")] {
        let listen = format!("127.0.0.1:{}", ports[i]);
        let mut a: Vec<&str> = vec![
            "gm",
            "--nats",
            &nats.url,
            "--postgres",
            &pg.url,
            "--name",
            name,
        ];
        a.extend(shards.iter().map(String::as_str));
        a.extend(["--metrics-listen", &listen]);
        procs.push(Proc::start(name, nimmer, &a, logs)?);
        gm_urls.push(format!("http://{listen}/metrics"));
    }
    let http = reqwest::Client::new();
    let t0 = Instant::now();
    while !http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if t0.elapsed() > Duration::from_secs(600) {
            bail!(
                "the gateway was not ready within 10 minutes; logs in {}",
                logs.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let client = async_nats::connect(&nats.url).await?;
    let js = async_nats::jetstream::new(client.clone());
    let pool = sqlx::PgPool::connect(&pg.url).await?;
    let plan = CityPlan {
        zones: args.zones,
        rate: args.event_rate,
        duration: Duration::from_secs(args.duration_s),
        seed: args.seed,
    };
    let opens = Arc::new(Opens::default());
    eprintln!(
        "city: {} events/s over {} zones for {} s",
        plan.rate, plan.zones, args.duration_s
    );
    let driver = tokio::spawn(city::drive(
        client.clone(),
        templates.clone(),
        plan,
        opens.clone(),
    ));
    let every = Duration::from_secs(args.every_s.max(1));
    let scrape = |http: reqwest::Client| {
        let (base, gm_urls) = (base.clone(), gm_urls.clone());
        async move {
            let gateway = get(&http, &format!("{base}/metrics")).await;
            let mut gm = Vec::new();
            for u in &gm_urls {
                gm.push(get(&http, u).await);
            }
            Scrape {
                at: Instant::now(),
                gateway,
                gm,
            }
        }
    };
    let mut last = scrape(http.clone()).await;
    let mut rows = String::new();
    let start = Instant::now();
    let mut drained = false;
    while !drained {
        tokio::time::sleep(every).await;
        let now = scrape(http.clone()).await;
        let dt = now.at.duration_since(last.at).as_secs_f64();
        let s = city::sample(&pool, &js, &["RESULTS", "CANON", "PLAYERS"], every).await?;
        let mib = |name: &str| {
            s.stream_bytes
                .get(name)
                .map_or(0.0, |b| *b as f64 / 1048576.0)
        };
        let slot_now = slot_buckets(&now.gm);
        let slot_before = slot_buckets(&last.gm);
        let slot = (
            prom::quantile(&slot_now, &slot_before, 0.5),
            prom::quantile(&slot_now, &slot_before, 0.95),
        );
        let tps = |tier: &str| (tokens(&now.gateway, tier) - tokens(&last.gateway, tier)) / dt;
        let rss: Vec<String> = procs
            .iter()
            .map(|p| format!("{:.0}", p.rss_mib()))
            .collect();
        let row = format!(
            "| {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} / {:.0} | {} | {} | {:.1} / {:.1} / {:.1} | {} |\n",
            start.elapsed().as_secs_f64() / 60.0,
            opens.opened.load(std::sync::atomic::Ordering::Relaxed),
            opens.failed.load(std::sync::atomic::Ordering::Relaxed),
            s.open_events,
            s.completed_events,
            s.canon_rows,
            s2(s.event_s, false),
            s2(slot, false),
            s2(s.canon_lag_s, true),
            tps("driver"),
            tps("theia"),
            s.scene_rows,
            s.outbox_rows,
            mib("RESULTS"),
            mib("CANON"),
            mib("PLAYERS"),
            rss.join(" / "),
        );
        eprint!("{row}");
        rows += &row;
        last = now;
        drained = driver.is_finished() && s.open_events == 0;
        if driver.is_finished() && start.elapsed() > Duration::from_secs(args.duration_s + 600) {
            eprintln!("events still open 10 minutes after the last opened");
            break;
        }
    }
    let names: Vec<&str> = procs.iter().map(|p| p.name).collect();
    let text = format!(
        "Machine: {}. Command: `cargo build --release -p nimmer && cargo run --release -p nimmer-benches --bin \
         city-bench -- --workload events --event-rate {} --duration-s {} --every-s {} --zones {} --label {} \
         --write benches/RESULTS.md`. Every process separate: nats-server, PostgreSQL, {}; the repository's \
         `config/` (templates in `config/events/`, shards in `gm.toml`; both GM processes serve every shard). A \
         row per sample: events opened (refused), open events (director rows), completed, canon rows; p50 / p95 of event \
         duration, of one slot's gateway request (`nimmer_gm_slot_seconds`: its histogram's bucket bounds), of canon lag (dialog finished → \
         canon row), each over the sample's interval; Driver / Theia completion tokens/s; the active register's \
         scene rows; outbox rows waiting for the relay; stream sizes; RSS per process.\n\n\
         | min | opened | refused | open | completed | canon rows | event s p50 / p95 | slot s p50 / p95 | canon lag ms p50 / p95 | \
         driver / theia tok/s | scenes | outbox | RESULTS / CANON / PLAYERS MiB | RSS MiB ({}) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n{rows}\n",
        machine(),
        args.event_rate,
        args.duration_s,
        args.every_s,
        args.zones,
        args.label,
        names.join(", "),
        names.join(" / "),
    );
    println!("{text}");
    if let Some(path) = &args.write {
        write_block(path, &format!("city-bench:{}", args.label), &text)?;
    }
    drop(procs);
    Ok(())
}

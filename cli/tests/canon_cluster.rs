//! Canon on a 3-node JetStream cluster, every piece a real process: three nats-servers (`[replicas]` 3 for
//! every stream), PostgreSQL, a gateway serving the Driver, two compositors and a player client, each a
//! `nimmer` child process with its own log. While dialogs are being answered, the node leading `RESULTS` is
//! SIGKILLed, then (after it is back) the node leading `CANON`. Every answered dialog with a participant must
//! end as exactly one canon row, one `CANON` message, one `PLAYERS` message and one row in the player's SQLite.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use nimmer_services::{NatsCluster, Postgres};

const SYSTEM: &str = "You are a fisherman in a busy port city.";
const DIALOGS: usize = 160;
/// Dialogs start at this pace (the kills and elections take seconds: the flow must outlast them).
const EVERY: Duration = Duration::from_millis(150);

/// A `nimmer` child process with its own log file, SIGKILLed on drop.
struct Proc(Child);

impl Proc {
    fn start(args: &[&str], log: &Path, config: &Path) -> Self {
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_nimmer"))
            .args(args)
            .env("NIMMER_CONFIG", config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("starting nimmer");
        Self(child)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The config directory: the embedded files, transport.toml with 3 replicas everywhere, quick redelivery.
fn config(dir: &Path, pg: &str) -> PathBuf {
    let config = dir.join("config");
    std::fs::create_dir(&config).unwrap();
    let src = nimmer_config::Sources::embedded();
    let transport = nimmer_config::DEFAULT_TRANSPORT_TOML
        .replace("ack_wait_s = 30", "ack_wait_s = 3")
        .replace("poll_ms = 500", "poll_ms = 100")
        .replace(
            "url = \"postgres://nimmer@127.0.0.1:5432/nimmer\"",
            &format!("url = \"{pg}\""),
        );
    let mut replicas = String::new();
    for key in [
        "results",
        "canon",
        "players",
        "factions",
        "feeds",
        "dead_letter",
    ] {
        replicas.push_str(&format!("{key} = 3\n"));
    }
    let transport = transport.replace(
        "[replicas]\nresults = 1\ncanon = 1\nplayers = 1\nfactions = 1\nfeeds = 1\ndead_letter = 1\n",
        &format!("[replicas]\n{replicas}"),
    );
    assert!(transport.contains("canon = 3") && transport.contains("ack_wait_s = 3"));
    nimmer_config::TransportFile::parse("transport.toml", &transport).unwrap();
    for (name, text) in [
        ("tiers.toml", src.tiers.as_str()),
        ("budgets.toml", src.budgets.as_str()),
        ("classifiers.toml", src.classifiers.as_str()),
        ("transport.toml", transport.as_str()),
    ] {
        std::fs::write(config.join(name), text).unwrap();
    }
    config
}

fn body(i: usize) -> serde_json::Value {
    serde_json::json!({
        "uid": format!("ev1/docks/quay/s{i}"),
        "npc": { "id": "brannoch" }, "participants": ["p1"], "faction": "dockers",
        "messages": [{ "role": "system", "content": SYSTEM }, { "role": "user", "content": format!("What did you catch on day {i}?") }],
        "max_tokens": 4,
    })
}

/// Asks the gateway (NATS front) for dialog `i`; true when it was answered with a line.
async fn ask(client: &async_nats::Client, i: usize) -> bool {
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        client.request(
            "nimmerverse.gateway.dialog.docks-1",
            body(i).to_string().into(),
        ),
    )
    .await;
    match r {
        Ok(Ok(m)) => serde_json::from_slice::<serde_json::Value>(&m.payload)
            .is_ok_and(|v| v.get("text").is_some()),
        _ => false,
    }
}

async fn stream_info(js: &jetstream::Context, name: &str) -> Option<jetstream::stream::Info> {
    let mut s = js.get_stream(name).await.ok()?;
    s.info().await.ok().cloned()
}

async fn messages(js: &jetstream::Context, name: &str) -> u64 {
    stream_info(js, name).await.map_or(0, |i| i.state.messages)
}

/// The server leading `name`'s RAFT group (`n0`..`n2`), once one is elected.
async fn leader(js: &jetstream::Context, name: &str) -> String {
    for _ in 0..300 {
        if let Some(l) = stream_info(js, name)
            .await
            .and_then(|i| i.cluster)
            .and_then(|c| c.leader)
        {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name} has no leader");
}

async fn canon_rows(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM canon")
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

async fn player_rows(db: &Path) -> u64 {
    match nimmer_compositor::PlayerStore::open(db).await {
        Ok(s) => {
            let n = s.count().await.unwrap_or(0);
            s.close().await;
            n
        }
        Err(_) => 0,
    }
}

/// Waits until at least `n` dialogs were answered.
async fn answered_at_least(answered: &AtomicUsize, n: usize) {
    let t = Instant::now();
    while answered.load(Ordering::SeqCst) < n {
        assert!(t.elapsed() < Duration::from_secs(300), "dialogs stalled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn killing_the_leaders_of_results_and_canon_mid_flight_loses_and_duplicates_nothing() {
    let mut cluster = NatsCluster::start();
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &pg.url);
    let urls = cluster.urls();
    let log = |f: &str| dir.path().join(f);
    let start = |args: &[&str], f: &str| Proc::start(args, &log(f), &config);
    let _c1 = start(&["compositor", "--nats", &urls], "compositor1.log");
    let _c2 = start(&["compositor", "--nats", &urls], "compositor2.log");
    let db = log("p1.sqlite");
    let _player = start(
        &[
            "player",
            "--id",
            "p1",
            "--db",
            db.to_str().unwrap(),
            "--nats",
            &urls,
        ],
        "player.log",
    );
    let _gateway = start(
        &[
            "serve",
            "--nats",
            &urls,
            "--listen",
            "127.0.0.1:0",
            "--spool",
            log("spool").to_str().unwrap(),
        ],
        "gateway.log",
    );
    let logs = || {
        [
            "gateway.log",
            "compositor1.log",
            "compositor2.log",
            "player.log",
        ]
        .map(|f| {
            let text = std::fs::read_to_string(log(f)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            format!(
                "--- {f}\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .join("\n")
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = async_nats::connect(nimmer_wire::nats_urls(&urls))
            .await
            .unwrap();
        let js = jetstream::new(client.clone());
        // Ready: the gateway answers dialog 0 on its NATS front (the Driver loaded, RESULTS created).
        let t = Instant::now();
        while !ask(&client, 0).await {
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "not ready:\n{}",
                logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for s in ["RESULTS", "CANON", "PLAYERS"] {
            let t = Instant::now();
            loop {
                if let Some(i) = stream_info(&js, s).await {
                    assert_eq!(i.config.num_replicas, 3, "{s}");
                    break;
                }
                assert!(t.elapsed() < Duration::from_secs(60), "{s}:\n{}", logs());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // The canon path is warm (the compositors made their streams and consumer, a relay leads): dialog 0
        // is a canon row. (On a fresh cluster this can take tens of seconds; dialogs sent meanwhile would
        // all be answered before the faults below.)
        let pool = sqlx::PgPool::connect(&pg.url).await.unwrap();
        let t = Instant::now();
        while canon_rows(&pool).await < 1 {
            assert!(t.elapsed() < Duration::from_secs(180), "no canon row:\n{}", logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Dialogs 1..DIALOGS at a steady pace, while the leaders die.
        let answered = Arc::new(AtomicUsize::new(1));
        let sender = {
            let (client, answered) = (client.clone(), answered.clone());
            tokio::spawn(async move {
                let mut running = Vec::new();
                for i in 1..DIALOGS {
                    let (client, answered) = (client.clone(), answered.clone());
                    running.push(tokio::spawn(async move {
                        // The gateway answers every dialog (a fault in the canon path is never the
                        // caller's): retry only what the gateway itself could not answer.
                        for _ in 0..5 {
                            if ask(&client, i).await {
                                answered.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                        }
                        panic!("dialog {i} was never answered");
                    }));
                    tokio::time::sleep(EVERY).await;
                }
                for r in running {
                    r.await.unwrap();
                }
            })
        };
        for (stream, at) in [("RESULTS", DIALOGS / 8), ("CANON", DIALOGS / 2)] {
            answered_at_least(&answered, at).await;
            if stream == "CANON" {
                // The relay is publishing: canon rows are being written and sent to CANON.
                let t = Instant::now();
                while canon_rows(&pool).await < 5 {
                    assert!(t.elapsed() < Duration::from_secs(120), "no canon rows:\n{}", logs());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            let node = leader(&js, stream).await;
            let (done, rows) = (answered.load(Ordering::SeqCst), canon_rows(&pool).await);
            cluster.node_mut(&node).kill();
            eprintln!(
                "SIGKILLed {node}, leader of {stream}, after {done} of {DIALOGS} dialogs answered, {rows} canon rows"
            );
            assert!(
                done < DIALOGS,
                "the kill of {stream}'s leader came after the work\n{}",
                logs()
            );
            // Once the stream has a new leader, the node comes back on its store (the next kill keeps a
            // quorum).
            // Polled with short requests: a request to a stream without a leader goes unanswered.
            let mut quick = js.clone();
            quick.set_timeout(Duration::from_millis(250));
            let t = Instant::now();
            while leader(&quick, stream).await == node {
                assert!(t.elapsed() < Duration::from_secs(60), "{stream} elected no new leader");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            eprintln!("{stream}: a new leader answered {:?} after the kill", t.elapsed());
            cluster.node_mut(&node).start_again();
            cluster.wait_meta_leader();
        }
        tokio::time::timeout(Duration::from_secs(600), sender)
            .await
            .expect("dialogs finished")
            .unwrap();
        let n = answered.load(Ordering::SeqCst);
        assert_eq!(n, DIALOGS);
        let t = Instant::now();
        loop {
            let (rows, canon, players, sqlite) = (
                canon_rows(&pool).await,
                messages(&js, "CANON").await,
                messages(&js, "PLAYERS").await,
                player_rows(&db).await,
            );
            if rows == n as i64 && canon == n as u64 && players == n as u64 && sqlite == n as u64
            {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "{n} answered: {rows} canon rows, {canon} CANON, {players} PLAYERS, {sqlite} in SQLite\n{}",
                logs()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Nothing arrives twice later (a redelivery or a republish after the dedup window closed).
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(canon_rows(&pool).await, n as i64);
        assert_eq!(messages(&js, "CANON").await, n as u64);
        assert_eq!(messages(&js, "PLAYERS").await, n as u64);
        assert_eq!(player_rows(&db).await, n as u64);
        assert_eq!(messages(&js, "RESULTS").await, 0, "every result consumed");
        pool.close().await;
        eprintln!("{}", logs());
    });
}

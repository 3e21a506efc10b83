//! The canon path under real faults, every piece a process: nats-server, PostgreSQL (durable commits: fsync
//! and synchronous_commit on) and two `nimmer compositor` processes, fed results on JetStream `RESULTS`
//! (what gateways publish), with a 2 s duplicate window on the canon streams. While results are in flight:
//! (1) a compositor is SIGKILLed mid-batch; (2) PostgreSQL and its backends are SIGKILLed while the relay
//! publishes, and restarted 3 s later (whoever leads the relay next must not republish what JetStream
//! already holds; the window no longer would catch it); (3) PostgreSQL is SIGSTOPped for 3 s (the relay
//! gives up leadership after 1 s). After each, every result is exactly one canon row, one
//! `CANON` message and one `PLAYERS` message, and each scene's `CANON` messages carry sequence numbers
//! 1, 2, 3, ... in order.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use nimmer_services::{NatsServer, PgOptions, Postgres};
use support::{Proc, until};

const SCENES: usize = 8;

fn config(dir: &Path, pg: &str) -> PathBuf {
    let src = nimmer_config::Sources::embedded();
    let config = support::config(dir, "config", &src.tiers, &src.budgets);
    let mut t = support::edit(
        nimmer_config::DEFAULT_TRANSPORT_TOML,
        "url = \"postgres://nimmer@127.0.0.1:5432/nimmer\"",
        &format!("url = \"{pg}\""),
    );
    for (from, to) in [
        ("ack_wait_s = 30", "ack_wait_s = 2"),
        ("poll_ms = 500", "poll_ms = 100"),
        ("db_timeout_ms = 5000", "db_timeout_ms = 1000"),
        // CANON's and PLAYERS' duplicate windows (in that order in the file).
        ("duplicate_window_s = 900", "duplicate_window_s = 2"),
        ("duplicate_window_s = 900", "duplicate_window_s = 2"),
    ] {
        t = support::edit(&t, from, to);
    }
    std::fs::write(config.join("transport.toml"), t).unwrap();
    config
}

fn result(i: usize) -> Vec<u8> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    serde_json::to_vec(&serde_json::json!({
        "result_id": format!("r{i}"),
        "uid": { "gm_event": "ev1", "district": "docks", "scene": format!("sc{}", i % SCENES), "slot": format!("s{i}") },
        "zone": "docks-1", "kind": "dialog", "npc": { "id": "brannoch" },
        "participants": ["p1"], "finished_at_ms": now,
        "response": { "text": format!("line {i}"), "tier": "driver" },
    }))
    .unwrap()
}

/// Publishes results `from..to` as a gateway does (Nats-Msg-Id = result id), all acked.
async fn publish(js: &jetstream::Context, from: usize, to: usize) {
    let mut acks = Vec::new();
    for i in from..to {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("r{i}").as_str());
        let subject = format!("nimmerverse.results.ev1.docks.sc{}", i % SCENES);
        acks.push(
            js.publish_with_headers(subject, h, result(i).into())
                .await
                .unwrap(),
        );
    }
    for a in acks {
        a.await.unwrap();
    }
}

/// Publishes results `from..from + n` in the background; returns the moment the relay is seen publishing
/// (`CANON` grows), so that a fault injected now falls between the relay's publish and its delete.
async fn feed_while_relaying(
    js: &jetstream::Context,
    from: usize,
    n: usize,
) -> tokio::task::JoinHandle<()> {
    let before = messages(js, "CANON").await;
    let feeding = tokio::spawn({
        let js = js.clone();
        async move { publish(&js, from, from + n).await }
    });
    let t = Instant::now();
    while messages(js, "CANON").await <= before {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the relay never published"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    feeding
}

async fn messages(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map_or(0, |i| i.state.messages),
        Err(_) => 0,
    }
}

/// Results published and not yet acked by a compositor, and redeliveries so far.
async fn in_flight(js: &jetstream::Context) -> (u64, u64) {
    let Ok(s) = js.get_stream("RESULTS").await else {
        return (0, 0);
    };
    match s
        .get_consumer::<jetstream::consumer::pull::Config>("compositors")
        .await
    {
        Ok(mut c) => match c.info().await {
            Ok(i) => (
                i.num_pending + i.num_ack_pending as u64,
                i.delivered
                    .consumer_sequence
                    .saturating_sub(i.delivered.stream_sequence),
            ),
            Err(_) => (0, 0),
        },
        Err(_) => (0, 0),
    }
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap_or(-1)
}

/// Every one of `n` results is exactly one canon row, CANON message and PLAYERS message; each scene's
/// CANON messages are its sequence numbers in order, with no gap.
async fn exactly_once(js: &jetstream::Context, pg: &str, n: usize, logs: &dyn Fn() -> String) {
    let t = Instant::now();
    loop {
        // A fresh pool: the server may have restarted.
        let rows = match sqlx::PgPool::connect(pg).await {
            Ok(pool) => {
                let r = (
                    count(&pool, "SELECT count(*) FROM canon").await,
                    count(&pool, "SELECT count(DISTINCT result_id) FROM canon").await,
                    count(&pool, "SELECT count(*) FROM outbox").await,
                );
                pool.close().await;
                r
            }
            Err(_) => (-1, -1, -1),
        };
        let (canon, players) = (messages(js, "CANON").await, messages(js, "PLAYERS").await);
        if rows == (n as i64, n as i64, 0) && canon == n as u64 && players == n as u64 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{n} results: (canon rows, distinct, outbox) {rows:?}, CANON {canon}, PLAYERS {players}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for sc in 0..SCENES {
        let subject = format!("nimmerverse.events.ev1.district.docks.scene.sc{sc}");
        let c = js
            .get_stream("CANON")
            .await
            .unwrap()
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: subject,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut msgs = c.messages().await.unwrap();
        let want = (n / SCENES) as i64 + i64::from(sc < n % SCENES);
        let mut seqs = Vec::new();
        while (seqs.len() as i64) < want {
            let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
                .await
                .expect("CANON messages")
                .unwrap()
                .unwrap();
            let c: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            seqs.push(c["seq"].as_i64().unwrap());
        }
        let order: Vec<i64> = (1..=want).collect();
        assert_eq!(
            seqs, order,
            "scene sc{sc}: canon in sequence order, no gaps"
        );
    }
}

#[test]
fn compositor_and_postgres_faults_mid_stream_lose_and_duplicate_nothing() {
    let nats = NatsServer::start();
    let mut pg = Postgres::start_with(PgOptions { durable: true });
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &pg.url);
    let log = |name: &str| dir.path().join(name);
    let compositor = |name: &str| {
        Proc::start(
            &["compositor", "--nats", &nats.url],
            &config,
            log(&format!("{name}.log")),
        )
    };
    let mut c1 = compositor("c1");
    let _c2 = compositor("c2");
    let logs = || {
        ["c1.log", "c1-again.log", "c2.log"]
            .map(|f| {
                let text = std::fs::read_to_string(log(f)).unwrap_or_default();
                let tail: Vec<&str> = text
                    .lines()
                    .filter(|l| l.contains("relay"))
                    .rev()
                    .take(12)
                    .collect();
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
        let client = async_nats::connect(nats.url.as_str()).await.unwrap();
        let js = jetstream::new(client);
        until(
            Duration::from_secs(60),
            "the compositors never made their consumer",
            || async {
                match js.get_stream("RESULTS").await {
                    Ok(s) => s.consumer_info("compositors").await.is_ok(),
                    Err(_) => false,
                }
            },
        )
        .await;
        let batch = 600;

        // (1) A compositor SIGKILLed while results are in flight.
        publish(&js, 0, batch).await;
        let (pending, _) = in_flight(&js).await;
        c1.kill();
        eprintln!("compositor c1 SIGKILLed with {pending} results in flight");
        assert!(pending > 0, "the kill came after the work\n{}", logs());
        let _c1 = compositor("c1-again");
        exactly_once(&js, &pg.url, batch, &logs).await;

        // (2) PostgreSQL (and its backends) SIGKILLed while the relay publishes (so the rows it published
        // are not deleted), restarted on its data after longer than the canon duplicate window: the relay
        // that leads next finds the rows JetStream already holds and does not store them again. The window
        // between a round's publish and its delete is milliseconds wide: a kill may miss it (five in a row
        // did once in CI), so up to ten kills try for it.
        let mut sent = batch;
        let mut hit = false;
        for attempt in 0..10 {
            let feeding = feed_while_relaying(&js, sent, batch).await;
            sent += batch;
            let (pending, _) = in_flight(&js).await;
            pg.kill();
            eprintln!("PostgreSQL SIGKILLed with {pending} results in flight");
            feeding.await.unwrap();
            tokio::time::sleep(Duration::from_secs(3)).await;
            pg.start_again();
            exactly_once(&js, &pg.url, sent, &logs).await;
            hit = ["c1-again.log", "c2.log"].iter().any(|f| {
                std::fs::read_to_string(log(f))
                    .unwrap_or_default()
                    .contains("already held were deleted, not published again")
            });
            eprintln!("kill {attempt}: the relay found rows already stored: {hit}");
            if hit {
                break;
            }
        }
        assert!(
            hit,
            "no kill came between the relay's publish and its delete\n{}",
            logs()
        );
        let (_, redelivered) = in_flight(&js).await;
        assert!(
            redelivered > 0,
            "no result was redelivered: the faults hit nothing"
        );

        // (3) PostgreSQL stalled (SIGSTOP) for 3 s while the relay publishes: compositors and relay wait or
        // time out and resume; still exactly once, in order.
        let feeding = feed_while_relaying(&js, sent, batch).await;
        sent += batch;
        pg.pause();
        tokio::time::sleep(Duration::from_secs(3)).await;
        pg.resume();
        feeding.await.unwrap();
        exactly_once(&js, &pg.url, sent, &logs).await;
    });
}

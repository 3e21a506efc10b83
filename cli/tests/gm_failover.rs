//! GM shards under SIGKILL, every piece a process: nats-server, PostgreSQL, a gateway (`nimmer serve --nats`,
//! the real Driver), a compositor, and two `nimmer gm --shard market` processes. Events (a drill of calls in
//! order, from the config directory's own `events/`) are opened
//! over HTTP (`POST /v1/events`) while only the first GM process runs, so it holds them all; once their first
//! lines are canon it is SIGKILLed. The second takes them over within seconds (its lease TTL is 1.5 s) and
//! completes them from the register: every event completes, every slot is exactly one canon row, and nothing
//! is left in the register or running.

mod support;

use std::path::Path;
use std::time::Duration;

use nimmer_services::{NatsServer, Postgres};
use support::{Proc, metric, post_json, until};

/// Events opened at once.
const EVENTS: usize = 6;
/// Calls (scenes of one slot each, in order) of the drill.
const CALLS: usize = 5;

/// A studio's own event (a file in the config's `events/`): a watchman's calls in order, ungated, so that the
/// model's wording cannot decide how many canon rows an event has (the shipped quarrel's overseer gate may
/// refuse every attempt at a line, leaving an event without canon).
fn drill() -> String {
    let mut t = String::from(
        r#"description = "A night watchman's rounds: his calls, in order."
district = "market"
theme = "drill"
tier = "everyday"
values = ["player"]
"#,
    );
    for i in 1..=CALLS {
        let (after, prompt) = if i == 1 {
            (
                String::new(),
                "Call out the first hour of the night to {player}.".to_string(),
            )
        } else {
            (
                format!("after = [\"c{}\"]", i - 1),
                format!(
                    r#"You called: \"{{slot.call{}}}\" The bell rang again. Call out the next hour to {{player}}."#,
                    i - 1
                ),
            )
        };
        t += &format!(
            r#"
[[scene]]
id = "c{i}"
{after}

[[scene.slot]]
id = "call{i}"
kind = "dialog"
npc = "watchman-ivo"
system = "You are Ivo, a night watchman in a port city. Answer in one short sentence."
prompt = "{prompt}"
participants = ["{{player}}"]
max_tokens = 40
"#
        );
    }
    t
}

fn config(dir: &Path, pg: &str) -> std::path::PathBuf {
    let src = nimmer_config::Sources::embedded();
    let adapters = Path::new(env!("CARGO_MANIFEST_DIR")).join("../loras/adapters");
    let budgets = support::edit(
        &src.budgets,
        "dir = \"../loras/adapters\"",
        &format!("dir = \"{}\"", adapters.display()),
    );
    let config = support::config(dir, "config", &src.tiers, &budgets);
    let transport = support::edit(
        nimmer_config::DEFAULT_TRANSPORT_TOML,
        "url = \"postgres://nimmer@127.0.0.1:5432/nimmer\"",
        &format!("url = \"{pg}\""),
    );
    std::fs::write(config.join("transport.toml"), transport).unwrap();
    let mut gm = nimmer_config::DEFAULT_GM_TOML.to_string();
    for (from, to) in [
        ("ttl_ms = 3000", "ttl_ms = 1500"),
        ("renew_ms = 1000", "renew_ms = 500"),
        ("takeover_ms = 500", "takeover_ms = 200"),
    ] {
        gm = support::edit(&gm, from, to);
    }
    std::fs::write(config.join("gm.toml"), gm).unwrap();
    std::fs::create_dir(config.join("events")).unwrap();
    std::fs::write(config.join("events/watch-drill.toml"), drill()).unwrap();
    config
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap_or(-1)
}

#[test]
fn a_gm_process_sigkilled_mid_event_is_taken_over_and_its_events_complete_once() {
    let nats = NatsServer::start();
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &pg.url);
    let ports = nimmer_services::free_ports(3);
    let url = format!("http://127.0.0.1:{}", ports[0]);
    let metrics_b = format!("http://127.0.0.1:{}", ports[2]);
    let spool = dir.path().join("spool");
    let compositor = Proc::start(
        &["compositor", "--nats", &nats.url],
        &config,
        dir.path().join("compositor.log"),
    );
    let gateway = Proc::start(
        &[
            "serve",
            "--nats",
            &nats.url,
            "--listen",
            &format!("127.0.0.1:{}", ports[0]),
            "--spool",
            spool.to_str().unwrap(),
        ],
        &config,
        dir.path().join("gateway.log"),
    );
    let gm = |name: &str, port: u16| {
        Proc::start(
            &[
                "gm",
                "--shard",
                "market",
                "--name",
                name,
                "--nats",
                &nats.url,
                "--metrics-listen",
                &format!("127.0.0.1:{port}"),
            ],
            &config,
            dir.path().join(format!("{name}.log")),
        )
    };
    let mut a = gm("gm-a", ports[1]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let pool = sqlx::PgPool::connect(&pg.url).await.unwrap();
        until(Duration::from_secs(300), "the gateway never became ready", || async {
            http.get(format!("{url}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        // Opened through the gateway while only gm-a serves the shard (503 until it subscribes).
        let mut events = Vec::new();
        for i in 0..EVENTS {
            let body = serde_json::json!({
                "template": "watch-drill", "gm_event": format!("ev-fail{i}"),
                "zone": format!("market-{i}"), "values": { "player": format!("p{i}") },
            });
            let started = std::time::Instant::now();
            let answer = loop {
                let answer = post_json(&http, &url, "/v1/events", &body).await;
                if answer.0 != 503 {
                    break answer;
                }
                assert!(started.elapsed() < Duration::from_secs(60), "gm-a never took an event:\n{}", a.log());
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            assert_eq!(answer.0, 201, "{}\n{}", answer.1, a.log());
            assert_eq!(answer.1["shard"], "market");
            events.push(format!("ev-fail{i}"));
        }
        let started = std::time::Instant::now();
        while count(&pool, "SELECT count(*) FROM canon WHERE gm_event LIKE 'ev-fail%'").await == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "no line of the events became canon\n-- gm-a:\n{}\n-- gateway:\n{}\n-- compositor:\n{}",
                a.log(),
                gateway.log(),
                compositor.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let b = gm("gm-b", ports[2]);
        until(Duration::from_secs(60), "gm-b never served its metrics", || async {
            http.get(format!("{metrics_b}/healthz"))
                .send()
                .await
                .is_ok()
        })
        .await;
        // The fault hits work in flight: gm-a holds open events, some with lines already accepted.
        let held = count(&pool, "SELECT count(*) FROM directors WHERE owner = 'gm-a/market'").await;
        assert!(held > 0, "gm-a holds no open event when killed");
        let midway = count(
            &pool,
            "SELECT count(*) FROM directors WHERE owner = 'gm-a/market' AND progress->'lines' <> '{}'",
        )
        .await;
        a.kill();
        eprintln!("gm-a SIGKILLed holding {held} open events ({midway} with accepted lines)");

        until(Duration::from_secs(600), "the events never completed", || async {
            count(
                &pool,
                "SELECT count(*) FROM events WHERE gm_event LIKE 'ev-fail%' AND status = 'completed'",
            )
            .await
                == EVENTS as i64
        })
        .await;
        assert!(
            metric(&http, &metrics_b, "nimmer_gm_takeovers_total{shard=\"market\"}").await
                >= held as f64,
            "gm-b took over every event gm-a held:\n{}",
            b.log()
        );
        assert_eq!(count(&pool, "SELECT count(*) FROM directors").await, 0);
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT gm_event, slot, count(*) FROM canon WHERE gm_event LIKE 'ev-fail%'
             GROUP BY gm_event, slot ORDER BY gm_event, slot",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert!(rows.iter().all(|r| r.2 == 1), "a slot with two canon rows: {rows:?}");
        for e in &events {
            let slots: Vec<&str> = rows.iter().filter(|r| &r.0 == e).map(|r| r.1.as_str()).collect();
            let want: Vec<String> = (1..=CALLS).map(|i| format!("call{i}")).collect();
            assert_eq!(slots, want, "{e}: every call is one canon row");
        }
        assert!(
            metric(&http, &metrics_b, "nimmer_gm_directors{shard=\"market\"}").await == 0.0,
            "a director is left behind"
        );
        drop((gateway, compositor));
    });
}

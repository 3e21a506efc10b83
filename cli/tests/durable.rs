//! Durable before answered, with real processes: a gateway (`nimmer serve`, the Driver) answers dialogs while
//! nats-server is down (their results are fsync'd in its spool), is SIGKILLed, and after nats-server and the
//! gateway are started again, every answered dialog is exactly one canon row (a compositor process writes
//! them to PostgreSQL). Then the same dialog sent twice at once, and again after, is one canon row with one
//! text for every caller.

mod support;

use std::path::Path;
use std::time::Duration;

use nimmer_services::{NatsServer, Postgres};
use support::{Proc, post_json, until};

const SYSTEM: &str = "You are a fisherman in a busy port city.";
/// Dialogs answered while nats-server is down.
const N: usize = 5;

fn body(slot: &str) -> serde_json::Value {
    serde_json::json!({
        "uid": format!("ev1/docks/quay/{slot}"), "zone": "docks-1", "kind": "dialog",
        "npc": { "id": "brannoch" }, "participants": ["p1"],
        "messages": [{ "role": "system", "content": SYSTEM }, { "role": "user", "content": format!("What did you catch ({slot})?") }],
        "max_tokens": 4,
    })
}

fn transport(config: &Path, pg: &str) {
    let text = support::edit(
        nimmer_config::DEFAULT_TRANSPORT_TOML,
        "url = \"postgres://nimmer@127.0.0.1:5432/nimmer\"",
        &format!("url = \"{pg}\""),
    );
    let text = support::edit(&text, "durable_wait_ms = 500", "durable_wait_ms = 300");
    std::fs::write(config.join("transport.toml"), text).unwrap();
}

async fn canon_rows(pool: &sqlx::PgPool, slot: Option<&str>) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM canon WHERE $1::text IS NULL OR slot = $1")
        .bind(slot)
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

#[test]
fn dialogs_answered_while_nats_is_down_reach_canon_after_the_gateway_is_sigkilled() {
    let mut nats = NatsServer::start();
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let src = nimmer_config::Sources::embedded();
    let config = support::config(dir.path(), "config", &src.tiers, &src.budgets);
    transport(&config, &pg.url);
    let port = nimmer_services::free_ports(1)[0];
    let url = format!("http://127.0.0.1:{port}");
    let spool = dir.path().join("spool");
    let nats_url = nats.url.clone();
    let gateway_args = [
        "serve",
        "--nats",
        &nats_url,
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--spool",
        spool.to_str().unwrap(),
    ];
    let _compositor = Proc::start(
        &["compositor", "--nats", &nats_url],
        &config,
        dir.path().join("compositor.log"),
    );
    let mut gateway = Proc::start(&gateway_args, &config, dir.path().join("gateway1.log"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let pool = sqlx::PgPool::connect(&pg.url).await.unwrap();
        // Ready: the gateway answers, and its answer is a canon row (the canon path is warm).
        until(
            Duration::from_secs(300),
            "the gateway never answered",
            || async {
                http.post(format!("{url}/v1/dialog"))
                    .json(&body("s0"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            },
        )
        .await;
        until(Duration::from_secs(120), "no canon row for s0", || async {
            canon_rows(&pool, None).await == 1
        })
        .await;

        nats.kill();
        let answers = futures::future::join_all((1..=N).map(|i| {
            let (http, url) = (http.clone(), url.clone());
            async move { post_json(&http, &url, "/v1/dialog", &body(&format!("s{i}"))).await }
        }))
        .await;
        for (status, v) in &answers {
            assert_eq!(*status, 200, "{v}");
            assert!(v["text"].is_string(), "{v}");
        }
        // The fault hits work in flight: the answered results are in the spool, nowhere else.
        let spooled = std::fs::metadata(spool.join("results.spool")).map_or(0, |m| m.len());
        assert!(spooled > 0, "nothing was spooled:\n{}", gateway.log());
        gateway.kill();
        eprintln!("gateway SIGKILLed with {N} answered dialogs spooled ({spooled} bytes)");

        nats.start_again();
        let gateway = Proc::start(&gateway_args, &config, dir.path().join("gateway2.log"));
        until(
            Duration::from_secs(300),
            "the spooled dialogs never became canon rows",
            || async { canon_rows(&pool, None).await > N as i64 },
        )
        .await;
        assert!(
            gateway
                .log()
                .contains("publishing the results the spool kept"),
            "{}",
            gateway.log()
        );

        // The same dialog twice at once, then once more: one generation's text for all, one canon row.
        let twice = body("twice");
        let (a, b) = tokio::join!(
            post_json(&http, &url, "/v1/dialog", &twice),
            post_json(&http, &url, "/v1/dialog", &twice)
        );
        let c = post_json(&http, &url, "/v1/dialog", &twice).await;
        for (status, v) in [&a, &b, &c] {
            assert_eq!(*status, 200, "{v}");
        }
        assert_eq!(a.1["text"], b.1["text"]);
        assert_eq!(a.1["text"], c.1["text"]);
        until(
            Duration::from_secs(60),
            "no canon row for `twice`",
            || async { canon_rows(&pool, Some("twice")).await >= 1 },
        )
        .await;
        // Exact counts once everything the gateway published is composed (RESULTS drained).
        let client = async_nats::connect(nats_url.as_str()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        until(Duration::from_secs(60), "RESULTS never drained", || async {
            match js.get_stream("RESULTS").await {
                Ok(mut s) => s.info().await.is_ok_and(|i| i.state.messages == 0),
                Err(_) => false,
            }
        })
        .await;
        assert_eq!(canon_rows(&pool, Some("twice")).await, 1);
        assert_eq!(canon_rows(&pool, None).await, 2 + N as i64);
        let spooled = std::fs::metadata(spool.join("results.spool")).map_or(0, |m| m.len());
        assert_eq!(spooled, 0, "the spool is emptied once JetStream has it all");
    });
}

//! The many-hosts topology as child processes: a 3-node NATS cluster, two Driver workers, a Theia and a
//! Saturn worker (`nimmer tier`) and two gateways (`nimmer serve --nats` with the cluster's URLs), each with
//! its own log, sharing one configuration (the Driver's step runs 4 rows, so a small flood contends).
//! PostgreSQL and two compositors (`nimmer compositor`) take the results, every stream on 3 replicas. Dialogs,
//! deep dialogs and classifications run through both gateways (each dialog with participants one canon row);
//! then:
//! - (d) a zone that spent its token burst through gateway A is refused (429) by gateway B;
//! - (c) a zone flooding the workers through A does not hold back a quiet zone entering through B: the
//!   quiet zone's answer comes back while the flood has streamed less than a quarter of its tokens (the
//!   step planner gives a new zone a row within 2 steps: measured 19-31 of 1,024 on a 2-core machine; with
//!   `schedule = "fcfs"` the same run measured 860);
//! - (a) the worker serving a stream through A is SIGKILLed mid-stream: the stream completes on the other
//!   worker with the text of an uninterrupted greedy run (through B); with the last worker killed, both
//!   gateways answer 503 at once.
//!
//! Killing the JetStream leaders of the canon path, with a player, is `canon_cluster.rs`.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use nimmer_gateway::tier::remote::{LoadMsg, load_subject};
use serde_json::{Value, json};
use support::{Proc, Sse, busy_worker, config, edit, post_json};

const SYSTEM: &str = "You are a fisherman in a busy port city.";

fn chat(zone: &str, user: &str, max_tokens: usize, stream: bool) -> Value {
    json!({
        "model": "driver",
        "messages": [{ "role": "system", "content": SYSTEM }, { "role": "user", "content": user }],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "ignore_eos": true,
        "user": zone,
    })
}

async fn post(http: &reqwest::Client, url: &str, body: &Value) -> reqwest::Response {
    http.post(format!("{url}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The text of a whole (not streamed) chat completion.
async fn text(r: reqwest::Response) -> String {
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn two_gateways_share_two_workers_budgets_and_fairness_and_survive_a_worker_sigkill() {
    let cluster = nimmer_services::NatsCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let src = nimmer_config::Sources::embedded();
    let mut tiers = src.tiers.clone();
    for t in ["driver", "theia", "saturn"] {
        let h = format!("[tiers.{t}]\n");
        tiers = edit(&tiers, &h, &format!("{h}via = \"nats\"\n"));
    }
    // Two workers on a small machine: one kernel thread each.
    let tiers = edit(&tiers, "threads = 0", "threads = 1");
    let budgets = edit(&src.budgets, "step_rows = 32", "step_rows = 4");
    let budgets = edit(
        &budgets,
        "[routing]",
        "[classes.metered]\nweight = 1.0\nprefixes = [\"metered-\"]\n\
         [classes.metered.driver]\ntokens_per_s = 1\nburst_tokens = 64\n\n[routing]",
    );
    let cfg = config(dir.path(), "config", &tiers, &budgets);
    // Canon: PostgreSQL and every stream at 3 replicas.
    let pg = nimmer_services::Postgres::start();
    let mut transport = edit(
        nimmer_config::DEFAULT_TRANSPORT_TOML,
        "url = \"postgres://nimmer@127.0.0.1:5432/nimmer\"",
        &format!("url = \"{}\"", pg.url),
    );
    for key in [
        "results",
        "canon",
        "players",
        "factions",
        "feeds",
        "dead_letter",
    ] {
        transport = edit(
            &transport,
            &format!("\n{key} = 1\n"),
            &format!("\n{key} = 3\n"),
        );
    }
    nimmer_config::TransportFile::parse("transport.toml", &transport).unwrap();
    std::fs::write(cfg.join("transport.toml"), &transport).unwrap();
    let urls = cluster.urls();
    let nats = urls.as_str();
    let worker = |tier: &str, w: &str| {
        let args = ["tier", "--tier", tier, "--nats", nats, "--worker", w];
        let log = dir.path().join(format!("{w}.log"));
        (w.to_string(), Proc::start(&args, &cfg, log))
    };
    let mut workers: Vec<(String, Proc)> = vec![worker("driver", "w1"), worker("driver", "w2")];
    let _others = [
        worker("theia", "t1"),
        worker("saturn", "s1"),
        (
            "c1".to_string(),
            Proc::start(
                &["compositor", "--nats", nats],
                &cfg,
                dir.path().join("c1.log"),
            ),
        ),
        (
            "c2".to_string(),
            Proc::start(
                &["compositor", "--nats", nats],
                &cfg,
                dir.path().join("c2.log"),
            ),
        ),
    ];
    let ports = nimmer_services::free_ports(2);
    let gateway_urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let gateways: Vec<Proc> = ports
        .iter()
        .zip(["a", "b"])
        .map(|(p, name)| {
            let listen = format!("127.0.0.1:{p}");
            let spool = dir.path().join(format!("spool-{name}"));
            let spool = spool.to_str().unwrap();
            let args = [
                "serve", "--nats", nats, "--listen", &listen, "--spool", spool,
            ];
            Proc::start(&args, &cfg, dir.path().join(format!("gateway-{name}.log")))
        })
        .collect();
    let (a, b) = (gateway_urls[0].as_str(), gateway_urls[1].as_str());
    let logs =
        |procs: &[(String, Proc)]| -> Vec<String> { procs.iter().map(|(_, p)| p.log()).collect() };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = async_nats::connect(nimmer_wire::nats_urls(nats)).await.unwrap();
        let mut loads = client.subscribe(load_subject("driver")).await.unwrap();
        // Ready: both workers report their load, both gateways answer a dialog (probing, not sleeping).
        let t = Instant::now();
        let mut seen = HashSet::new();
        while seen.len() < 2 {
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "workers not ready: {:?}",
                logs(&workers)
            );
            if let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(1), loads.next()).await {
                let l: LoadMsg = serde_json::from_slice(&m.payload).unwrap();
                seen.insert(l.worker);
            }
        }
        let http = reqwest::Client::new();
        // Both gateways see every tier up (Theia and Saturn through their workers).
        for url in [a, b] {
            let t = Instant::now();
            loop {
                let r = http.get(format!("{url}/readyz")).send().await;
                if r.is_ok_and(|r| r.status() == 200) {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(300),
                    "gateway {url} not ready: {:?}",
                    logs(&workers)
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        for (i, url) in [a, b].into_iter().enumerate() {
            let hello = text(post(&http, url, &chat("docks-1", "Hello.", 2, false)).await).await;
            assert!(!hello.is_empty());
            let (_, deep) = post_json(&http, url, "/v1/dialog", &json!({
                    "uid": format!("ev1/docks/quay/deep{i}"),
                    "zone": "docks-1",
                    "kind": "deep",
                    "npc": { "id": "brannoch" }, "participants": ["p1"], "faction": "dockers",
                    "messages": [{ "role": "system", "content": SYSTEM }, { "role": "user", "content": "Any news?" }],
                    "max_tokens": 4,
                })).await;
            assert_eq!(deep["tier"], "theia", "{deep}");
            assert_eq!(deep["degraded"], false, "{deep}");
            let (_, line) = post_json(&http, url, "/v1/dialog", &json!({
                    "uid": format!("ev1/docks/quay/line{i}"),
                    "zone": "docks-1",
                    "kind": "dialog",
                    "npc": { "id": "brannoch" }, "participants": ["p1"], "faction": "dockers",
                    "messages": [{ "role": "system", "content": SYSTEM }, { "role": "user", "content": "And the weather?" }],
                    "max_tokens": 4,
                })).await;
            assert_eq!(line["tier"], "driver", "{line}");
            let (_, class) = post_json(&http, url, "/v1/classify", &json!({ "classifier": "ternary-gate", "inputs": ["A storm is coming."] })).await;
            assert!(class.to_string().contains("label"), "{class}");
        }
        // The four dialogs with participants, two through each gateway: exactly four canon rows.
        let pool = sqlx::PgPool::connect(&pg.url).await.unwrap();
        let rows = || {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM canon")
                    .fetch_one(&pool)
                    .await
                    .unwrap_or(0)
            }
        };
        support::until(Duration::from_secs(120), "four canon rows", || {
            let n = rows();
            async move { n.await >= 4 }
        })
        .await;
        assert_eq!(rows().await, 4);

        // (d) A zone's token budget holds across both gateways.
        let metered = chat("metered-1", "What did you catch today?", 24, false);
        let mut refused = false;
        for _ in 0..10 {
            let r = post(&http, a, &metered).await;
            if r.status() == 429 {
                refused = true;
                break;
            }
            assert_eq!(r.status(), 200);
        }
        assert!(refused, "gateway A never refused the metered zone");
        // A's charges reach B asynchronously (a few ms): wait for B's bucket to show the debt, then B refuses.
        let level = |url: String| {
            let http = http.clone();
            async move {
                let v: Value = http
                    .get(format!("{url}/v1/zones"))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                v["zones"]["metered-1"]["tokens"]["driver"].as_f64()
            }
        };
        assert!(level(a.to_string()).await.is_some_and(|l| l <= 0.0));
        support::until(Duration::from_secs(10), "A's charges reached B", || {
            let l = level(b.to_string());
            async move { l.await.is_some_and(|l| l <= 0.0) }
        })
        .await;
        let r = post(&http, b, &metered).await;
        assert_eq!(
            r.status(),
            429,
            "B applies A's charges: {}",
            r.text().await.unwrap()
        );
        assert!(r.headers().contains_key("retry-after"));
        let other = chat("docks-1", "What did you catch today?", 4, false);
        assert_eq!(
            post(&http, b, &other).await.status(),
            200,
            "another zone is served"
        );

        // (c) A flood through A, a quiet zone through B.
        let flood_tokens = Arc::new(AtomicUsize::new(0));
        let (n, each) = (16, 64);
        let flood: Vec<_> = (0..n)
            .map(|i| {
                let (http, url, count) = (http.clone(), a.to_string(), flood_tokens.clone());
                let body = chat(
                    "flood-1",
                    &format!("Tell me story number {i} about the sea."),
                    each,
                    true,
                );
                tokio::spawn(async move {
                    let r = post(&http, &url, &body).await;
                    assert_eq!(r.status(), 200);
                    // Every token is one chunk with a `content` delta (an empty one while text is held back).
                    let mut sse = Sse::of(r);
                    while let Some(d) = sse.next().await {
                        if d == "[DONE]" {
                            break;
                        }
                        let v: Value = serde_json::from_str(&d).unwrap();
                        let delta = &v["choices"][0]["delta"];
                        if delta.get("content").is_some() && delta.get("role").is_none() {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        // The flood is streaming from every sequence before the quiet zone asks.
        while flood_tokens.load(Ordering::Relaxed) < 2 * n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before = flood_tokens.load(Ordering::Relaxed);
        let quiet = text(post(&http, b, &chat("quiet-1", "Good morning!", 1, false)).await).await;
        let during = flood_tokens.load(Ordering::Relaxed) - before;
        assert!(!quiet.is_empty());
        eprintln!(
            "the quiet zone was answered while the flood streamed {during} of its {} tokens",
            n * each
        );
        assert!(
            during < n * each / 4,
            "the flood streamed {during} of its {} tokens while the quiet zone waited for one",
            n * each
        );
        for f in flood {
            f.await.unwrap();
        }
        assert_eq!(
            flood_tokens.load(Ordering::Relaxed),
            n * each,
            "the flood finished"
        );

        // (a) SIGKILL the worker serving a stream through A: it completes on the other, text unchanged.
        let user = "Tell me a long story about the sea.";
        let want = text(post(&http, b, &chat("docks-1", user, 96, false)).await).await;
        let mut sse = Sse::of(post(&http, a, &chat("docks-1", user, 96, true)).await);
        let mut got = String::new();
        let mut pieces = 0;
        while pieces < 8 {
            got.push_str(&sse.content().await.expect("streaming"));
            pieces += 1;
        }
        // Reports from before this stream (the flood's) may still wait in the subscription.
        while let Some(Some(_)) = loads.next().now_or_never() {}
        let first = busy_worker(&mut loads, &[]).await;
        let at = workers.iter().position(|(w, _)| *w == first).unwrap();
        workers[at].1.kill();
        let mut after = 0;
        while let Some(t) = sse.content().await {
            got.push_str(&t);
            after += 1;
        }
        assert!(after > 0, "the kill hit the stream in flight");
        assert_eq!(
            got, want,
            "greedy text across the migration vs uninterrupted"
        );

        // The last worker killed: both gateways answer 503 at once, no hang.
        let last = workers.iter_mut().find(|(w, _)| *w != first).unwrap();
        last.1.kill();
        for (url, g) in [a, b].into_iter().zip(&gateways) {
            let started = Instant::now();
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                post(&http, url, &chat("docks-1", "Hello?", 4, false)),
            )
            .await;
            let Ok(r) = r else {
                panic!("{url}: a hang past {:?}:\n{}", started.elapsed(), g.log())
            };
            assert_eq!(r.status(), 503, "{url}: {}", r.text().await.unwrap());
        }
    });
}

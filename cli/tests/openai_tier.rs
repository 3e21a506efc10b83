//! A tier on an OpenAI-compatible server (`via = "openai"`), against a real one: gateway A serves Theia
//! through gateway B's OpenAI endpoint (another `nimmer serve` process, its Driver allowed one slot and one
//! waiting request), both child processes with their own logs. Through A: a stream arrives token by token
//! with B's text and usage; B's queue full is a 429; a request B holds past A's deadline is a 504 (and leaves
//! B's queue); a client that drops its stream cancels the sequence on B; B killed with SIGKILL turns A's
//! Theia down, deep dialogs degrade to A's own Driver and Theia requests get a 503.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Proc, Sse, config, edit, metric, post_json, until};

const SYSTEM: &str = "You are a fisherman in a busy port city.";

/// A `nimmer serve` process on `port` with that configuration.
struct Gateway {
    proc: Proc,
    url: String,
}

impl Gateway {
    fn start(dir: &std::path::Path, name: &str, tiers: &str, budgets: &str, port: u16) -> Self {
        let cfg = config(dir, &format!("{name}-config"), tiers, budgets);
        let listen = format!("127.0.0.1:{port}");
        Self {
            proc: Proc::start(
                &["serve", "--listen", &listen],
                &cfg,
                dir.join(format!("{name}.log")),
            ),
            url: format!("http://{listen}"),
        }
    }

    fn log(&self) -> String {
        self.proc.log()
    }

    fn kill(&mut self) {
        self.proc.kill()
    }
}

fn chat(model: &str, user: &str, max_tokens: usize, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{ "role": "system", "content": SYSTEM }, { "role": "user", "content": user }],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "ignore_eos": max_tokens > 64,
        "user": "docks-1",
    })
}

#[test]
fn a_tier_on_an_openai_server_streams_cancels_refuses_expires_and_degrades_when_it_dies() {
    let dir = tempfile::tempdir().unwrap();
    let ports = nimmer_services::free_ports(2);
    let src = nimmer_config::Sources::embedded();
    // B: the server. Its Driver takes one sequence at a time and one waiting; long sequences allowed.
    let budgets_b = edit(
        &src.budgets,
        "slots = 128\nreserved_slots = 32\nqueue = 256",
        "slots = 1\nreserved_slots = 0\nqueue = 1",
    );
    let budgets_b = edit(&budgets_b, "max_new_tokens = 512", "max_new_tokens = 1900");
    // A: Theia is B's Driver, counted with the same tokenizer; A's Theia budget allows the long ones too.
    let tiers_a = edit(
        &src.tiers,
        "[tiers.theia]\nmodel = \"smollm2-135m-instruct-q4_1\"\n",
        &format!(
            "[tiers.theia]\nmodel = \"driver\"\nvia = \"openai\"\nurl = \"http://127.0.0.1:{}/v1\"\n\
             tokenizer = \"smollm2-135m-instruct-q4_1\"\n",
            ports[1]
        ),
    );
    let budgets_a = src
        .budgets
        .replace("max_new_tokens = 512", "max_new_tokens = 1900");
    let mut a = Gateway::start(dir.path(), "a", &tiers_a, &budgets_a, ports[0]);
    let mut b = Gateway::start(dir.path(), "b", &src.tiers, &budgets_b, ports[1]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        // A is ready when its Theia probe reaches B (and its own tiers are up).
        let t = Instant::now();
        loop {
            let r = http.get(format!("{}/readyz", a.url)).send().await;
            if r.is_ok_and(|r| r.status() == 200) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "not ready:\nA: {}\nB: {}",
                a.log(),
                b.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // Streaming: token by token through A, B's greedy text and B's usage.
        let user = "What did you catch today?";
        let (_, direct) = post_json(&http, &b.url, "/v1/chat/completions", &chat("driver", user, 24, false)).await;
        let want = direct["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        let r = http
            .post(format!("{}/v1/chat/completions", a.url))
            .json(&chat("theia", user, 24, true))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let mut sse = Sse::of(r);
        let (mut text, mut chunks, mut usage) = (String::new(), 0, Value::Null);
        while let Some(d) = sse.next().await {
            if d == "[DONE]" {
                break;
            }
            let v: Value = serde_json::from_str(&d).unwrap();
            if let Some(t) = v["choices"][0]["delta"]["content"].as_str()
                && !t.is_empty()
            {
                text.push_str(t);
                chunks += 1;
            }
            if !v["usage"].is_null() {
                usage = v["usage"].clone();
            }
        }
        assert_eq!(text, want, "A's Theia is B's Driver");
        assert!(chunks > 1, "streamed in pieces: {chunks}");
        for k in ["prompt_tokens", "completion_tokens"] {
            assert_eq!(usage[k], direct["usage"][k], "B's usage, as B counted it: {k}");
        }

        // Hold B's one slot with a long stream through A.
        let long = |n: usize| chat("theia", "Tell me a long story about the sea.", n, true);
        let r = http
            .post(format!("{}/v1/chat/completions", a.url))
            .json(&long(1800))
            .send()
            .await
            .unwrap();
        let mut held = Sse::of(r);
        assert!(held.content().await.is_some());
        let driver = "nimmer_slots_in_use{tier=\"driver\"}";
        let waiting = "nimmer_queue_depth{tier=\"driver\"}";
        assert_eq!(metric(&http, &b.url, driver).await, 1.0);

        // A second waits in B's queue; a third finds it full: 429 through A.
        let queued = tokio::spawn({
            let (http, url) = (http.clone(), a.url.clone());
            let body = long(8);
            async move {
                http.post(format!("{url}/v1/chat/completions"))
                    .json(&body)
                    .send()
                    .await
            }
        });
        until(Duration::from_secs(10), "a request waiting in B", || {
            let (http, url) = (http.clone(), b.url.clone());
            async move { metric(&http, &url, waiting).await == 1.0 }
        })
        .await;
        let r = http
            .post(format!("{}/v1/chat/completions", a.url))
            .json(&long(8))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 429, "{}", r.text().await.unwrap());
        // The waiting one's caller goes away: it leaves B's queue.
        queued.abort();
        until(Duration::from_secs(10), "the abandoned request left B's queue", || {
            let (http, url) = (http.clone(), b.url.clone());
            async move { metric(&http, &url, waiting).await == 0.0 }
        })
        .await;

        // A deep dialog with a deadline B cannot meet: 504 from A, and it leaves B's queue.
        let r = http
            .post(format!("{}/v1/dialog", a.url))
            .json(&json!({
                "uid": "ev1/docks/quay/s1",
                "zone": "docks-2",
                "kind": "deep",
                "messages": [{ "role": "system", "content": SYSTEM }, { "role": "user", "content": "Any news?" }],
                "max_tokens": 8,
                "deadline_ms": 1500,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 504, "{}", r.text().await.unwrap());
        until(Duration::from_secs(10), "the expired request left B's queue", || {
            let (http, url) = (http.clone(), b.url.clone());
            async move { metric(&http, &url, waiting).await == 0.0 }
        })
        .await;

        // The long stream is still running on B; its client goes away: B stops it (it never finishes).
        assert!(held.content().await.is_some(), "still streaming");
        let completed = "nimmer_tokens_total{tier=\"driver\",class=\"street\",kind=\"completion\"}";
        let finished_before = metric(&http, &b.url, completed).await;
        drop(held);
        until(Duration::from_secs(10), "B freed the dropped stream's slot", || {
            let (http, url) = (http.clone(), b.url.clone());
            async move { metric(&http, &url, driver).await == 0.0 }
        })
        .await;
        assert_eq!(
            metric(&http, &b.url, completed).await,
            finished_before,
            "the dropped stream was cancelled, not run to its end"
        );

        // B dies: A's Theia goes down, deep dialogs degrade to A's Driver, Theia requests get a 503.
        b.kill();
        until(Duration::from_secs(10), "A noticed B is gone", || {
            let (http, url) = (http.clone(), a.url.clone());
            async move {
                let v: Value = http
                    .get(format!("{url}/readyz"))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                v["tiers"]["theia"]["status"] == "down"
            }
        })
        .await;
        let (_, v) = post_json(&http, &a.url, "/v1/dialog", &json!({
                "uid": "ev1/docks/quay/s2",
                "zone": "docks-2",
                "kind": "deep",
                "messages": [{ "role": "system", "content": SYSTEM }, { "role": "user", "content": "Any news?" }],
                "max_tokens": 8,
            })).await;
        assert_eq!(v["tier"], "driver", "{v}");
        assert_eq!(v["degraded"], true, "{v}");
        let r = http
            .post(format!("{}/v1/chat/completions", a.url))
            .json(&chat("theia", user, 8, false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "{}", r.text().await.unwrap());
    });
    a.kill();
}

//! Operating the gateway with the real models: budgets hot-reloaded from a watched directory under load (and
//! an invalid edit rejected), zone classes, token-rate limits, idle-zone pruning, bearer tokens, Prometheus
//! metrics and `GET /v1/config`.

use std::time::Duration;

use nimmer_e2e::http::{client, eventually, get, get_text, post};
use serde_json::{Value, json};

/// Each dialog its own slot: a repeated UID is a repeat of one line (it gets the first answer).
static NEXT_SLOT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

const SYSTEM: &str = "You are a helpful assistant.";

fn dialog(zone: &str, max_tokens: usize) -> Value {
    json!({
        "uid": format!("ev1/market/stall/s{}", NEXT_SLOT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)), "zone": zone, "kind": "dialog", "max_tokens": max_tokens,
        "messages": [{ "role": "system", "content": SYSTEM }, { "role": "user", "content": "Say hello to a traveller." }],
        "sampling": { "temperature": 0.7, "seed": 3, "ignore_eos": true },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_edited_under_load_apply_without_failing_a_request_and_invalid_edits_are_rejected()
{
    let (dir, config) = nimmer_e2e::config_dir();
    let src = nimmer_config::Sources::embedded();
    let base = nimmer_e2e::start_gateway_with(
        config,
        nimmer_gateway::Options {
            config_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        },
    );
    assert_eq!(get(&base, "/v1/config").await["version"], 1);

    // Load: 3 clients, each sending requests back to back until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for c in 0..3 {
        let (base, stop) = (base.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (s, v) = post(&base, "/v1/dialog", &dialog(&format!("load-{c}"), 16)).await;
                statuses.push((s, v));
            }
            statuses
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A valid edit: fewer slots and a lower max_new_tokens, written the way editors do (temp file + rename).
    let edited = src
        .budgets
        .replacen("slots = 128\nreserved_slots = 32", "slots = 2", 1)
        .replacen("max_new_tokens = 512", "max_new_tokens = 20", 1);
    let tmp = dir.path().join(".budgets.toml.swp");
    std::fs::write(&tmp, &edited).unwrap();
    std::fs::rename(&tmp, dir.path().join("budgets.toml")).unwrap();
    assert!(
        eventually(10, || async {
            get(&base, "/v1/config").await["version"] == 2
        })
        .await,
        "the edit was applied"
    );
    let cfg = get(&base, "/v1/config").await;
    assert_eq!(cfg["budgets"]["tiers"]["driver"]["slots"], 2);
    assert!(
        cfg["origin"]
            .as_str()
            .unwrap()
            .contains(&dir.path().display().to_string())
    );
    // The new budget applies to new requests.
    let (s, v) = post(&base, "/v1/dialog", &dialog("alley", 24)).await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["field"], "max_tokens");
    assert!(v["error"].as_str().unwrap().contains("20"), "{v}");

    // An invalid edit: rejected, logged, counted; the version and the values in effect stay.
    std::fs::write(
        dir.path().join("budgets.toml"),
        edited.replacen("slots = 2", "slots = 0", 1),
    )
    .unwrap();
    assert!(
        eventually(10, || async {
            get_text(&base, "/metrics")
                .await
                .contains("nimmer_config_reloads_total{result=\"rejected\"} 1")
        })
        .await,
        "the invalid edit was seen and rejected"
    );
    let cfg = get(&base, "/v1/config").await;
    assert_eq!(cfg["version"], 2);
    assert_eq!(cfg["budgets"]["tiers"]["driver"]["slots"], 2);
    // A broken TOML file too.
    std::fs::write(dir.path().join("budgets.toml"), "[tiers.driver\nslots = ").unwrap();
    assert!(
        eventually(10, || async {
            get_text(&base, "/metrics")
                .await
                .contains("nimmer_config_reloads_total{result=\"rejected\"} 2")
        })
        .await
    );
    assert_eq!(get(&base, "/v1/config").await["version"], 2);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut served = 0;
    for t in load {
        for (s, v) in t.await.unwrap() {
            assert_eq!(s, 200, "a request under load failed: {v}");
            served += 1;
        }
    }
    assert!(served >= 3, "the load ran ({served} requests)");
    // Still serving after all that.
    let (s, v) = post(&base, "/v1/dialog", &dialog("alley", 8)).await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_classes_token_rates_pruning_and_metrics() {
    let config = nimmer_e2e::config_with_budgets(
        |t| t.to_string(),
        |b| {
            b.replacen("idle_ttl_s = 300", "idle_ttl_s = 1", 1)
                .replacen(
                    "[classes.landmark.theia]",
                    "[classes.plaza.driver]\ntokens_per_s = 1.0\nburst_tokens = 20.0\n\n[classes.landmark.theia]",
                    1,
                )
        },
    );
    let base = nimmer_e2e::start_gateway(config);

    // PUT activates a zone and pins its class; unknown classes and bad ids are refused.
    let put = |zone: &str, body: Value| {
        let url = format!("{base}/v1/zones/{zone}");
        async move {
            let r = client().put(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (s, v) = put("gate-1", json!({ "class": "landmark" })).await;
    assert_eq!((s, &v["class"]), (200, &json!("landmark")), "{v}");
    let (s, v) = put("gate-2", json!({ "class": "castle" })).await;
    assert_eq!((s, &v["field"]), (422, &json!("class")), "{v}");
    let (s, v) = put("gate.3", json!({})).await;
    assert_eq!((s, &v["field"]), (422, &json!("zone")), "{v}");
    let zones = get(&base, "/v1/zones").await;
    assert_eq!(zones["zones"]["gate-1"]["class"], "landmark");
    assert_eq!(zones["zones"]["gate-1"]["weight"], 4.0);

    // A plaza zone has 20 tokens of burst at 1 token/s: the first request spends more, the next gets 429.
    let (s, v) = post(&base, "/v1/dialog", &dialog("plaza-9", 16)).await;
    assert_eq!(s, 200, "{v}");
    let r = client()
        .post(format!("{base}/v1/dialog"))
        .json(&dialog("plaza-9", 16))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["kind"], "over_rate", "{v}");
    // Other zones are not limited by it.
    let (s, v) = post(&base, "/v1/dialog", &dialog("alley-2", 8)).await;
    assert_eq!(s, 200, "{v}");
    let zones = get(&base, "/v1/zones").await;
    assert_eq!(zones["zones"]["plaza-9"]["class"], "plaza");
    assert!(
        zones["zones"]["plaza-9"]["tokens"]["driver"]
            .as_f64()
            .unwrap()
            < 0.0
    );
    // The engine's books: the zone's tokens against its fair share of the steps that ran them.
    let share = &zones["zones"]["alley-2"]["engine_share"]["driver"];
    assert!(share["tokens_served"].as_u64().unwrap() >= 8, "{share}");
    assert!(share["share_ratio"].as_f64().unwrap() > 0.0, "{share}");

    // Metrics.
    let m = get_text(&base, "/metrics").await;
    for needle in [
        "nimmer_requests_total{tier=\"driver\",class=\"street\",outcome=\"admitted\"}",
        "nimmer_requests_total{tier=\"driver\",class=\"plaza\",outcome=\"token_rate\"} 1",
        "nimmer_ttft_seconds_bucket{tier=\"driver\",class=\"street\"",
        "nimmer_slot_wait_seconds_bucket",
        "nimmer_tokens_total{tier=\"driver\",class=\"street\",kind=\"completion\"}",
        "nimmer_slots_capacity{tier=\"driver\"}",
        "nimmer_queue_depth{tier=\"driver\"}",
        "nimmer_batch_size_bucket{tier=\"driver\"",
        "nimmer_zone_tokens_served_total{tier=\"driver\",class=\"street\"}",
        "nimmer_zone_tokens_owed_total{tier=\"driver\",class=\"plaza\"}",
        "nimmer_config_version",
    ] {
        assert!(m.contains(needle), "metrics lack {needle}:\n{m}");
    }

    // Idle zones are pruned after the TTL (1 s here).
    assert!(
        eventually(20, || async {
            get(&base, "/v1/zones").await["zones"]
                .as_object()
                .unwrap()
                .is_empty()
        })
        .await,
        "idle zones were pruned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_guard_npc_and_ops_routes_separately() {
    let base = nimmer_e2e::start_gateway_with(
        nimmer_e2e::config(),
        nimmer_gateway::Options {
            auth: nimmer_gateway::Auth {
                npc: vec!["npc-secret".into()],
                ops: vec!["ops-secret".into()],
            },
            ..Default::default()
        },
    );
    let send = |path: &str, token: Option<&str>| {
        let mut r = if path == "/v1/dialog" {
            client()
                .post(format!("{base}{path}"))
                .json(&dialog("alley", 4))
        } else {
            client().get(format!("{base}{path}"))
        };
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(send("/v1/dialog", None).await, 401);
    assert_eq!(send("/v1/dialog", Some("wrong")).await, 401);
    assert_eq!(send("/v1/dialog", Some("ops-secret")).await, 401);
    assert_eq!(send("/v1/dialog", Some("npc-secret")).await, 200);
    assert_eq!(send("/v1/config", Some("npc-secret")).await, 401);
    assert_eq!(send("/v1/config", Some("ops-secret")).await, 200);
    assert_eq!(send("/metrics", None).await, 401);
    assert_eq!(send("/healthz", None).await, 200);
    assert_eq!(send("/readyz", None).await, 200);
}

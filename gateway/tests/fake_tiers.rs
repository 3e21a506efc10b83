//! The gateway's behaviour on scripted fake tiers, through `http::app()` and `oneshot` (no model, no socket):
//! saturation (429 + Retry-After), deadlines (504 before any tier work), degradation, client cancellation, a
//! budgets reload under load, fairness between zones, and a dead tier (503, `/readyz` 503).

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::*;
use http_body_util::BodyExt;
use nimmer_config::{Config, Sources};
use nimmer_gateway::Gateway;
use nimmer_gateway::tier::fake::Fakes;
use serde_json::json;
use tower::ServiceExt;

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after_and_the_others_finish() {
    let fakes = Fakes::new(3, Duration::ZERO);
    let (gw, app) = gateway(&one_driver_slot(1), &fakes);
    fakes.driver.hold();
    let running = spawn_send(&app, dialog("a", "dialog", "x"));
    until("the first request runs", || {
        fakes.driver.running.load(Ordering::SeqCst) == 1
    })
    .await;
    let waiting = spawn_send(&app, dialog("a", "dialog", "x"));
    until("the second request waits", || queued(&gw, "a") == 1).await;
    let (status, headers, body) = send(&app, "/v1/dialog", &dialog("b", "dialog", "x")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["kind"], "over_budget");
    assert_eq!(headers[header::RETRY_AFTER], "1");
    fakes.driver.release();
    for t in [running, waiting] {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["text"], "w0 w1 w2 ");
    }
    assert_eq!(fakes.driver.submitted(), 2);
}

#[tokio::test]
async fn a_deadline_that_passes_in_the_queue_is_504_and_never_reaches_the_tier() {
    let fakes = Fakes::new(3, Duration::ZERO);
    let (_gw, app) = gateway(&one_driver_slot(8), &fakes);
    fakes.driver.hold();
    let running = spawn_send(&app, dialog("a", "dialog", "x"));
    until("the first request runs", || {
        fakes.driver.running.load(Ordering::SeqCst) == 1
    })
    .await;
    let mut late = dialog("b", "dialog", "x");
    late["deadline_ms"] = json!(50);
    let (status, _, body) = send(&app, "/v1/dialog", &late).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["kind"], "deadline");
    assert_eq!(
        fakes.driver.submitted(),
        1,
        "the late request never reached the tier"
    );
    fakes.driver.release();
    assert_eq!(running.await.unwrap().0, StatusCode::OK);
}

#[tokio::test]
async fn deep_work_degrades_to_the_driver_when_theia_is_saturated_or_down() {
    let fakes = Fakes::new(2, Duration::ZERO);
    let text = budgets(&[("[tiers.theia]\nslots = 16", "[tiers.theia]\nslots = 1")]);
    let (_gw, app) = gateway(&text, &fakes);
    fakes.theia.hold();
    let on_theia = spawn_send(&app, dialog("a", "deep", "x"));
    until("theia's slot is taken", || {
        fakes.theia.running.load(Ordering::SeqCst) == 1
    })
    .await;
    let (status, _, body) = send(&app, "/v1/dialog", &dialog("b", "deep", "x")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["tier"], "driver");
    assert_eq!(body["degraded"], true);
    assert_eq!(body["degraded_reason"], "theia saturated: served by driver");
    fakes.theia.release();
    let (status, body) = on_theia.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["tier"], "theia");
    assert_eq!(body["degraded"], false);

    fakes.theia.kill();
    let (status, _, body) = send(&app, "/v1/dialog", &dialog("b", "moment", "x")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["degraded_reason"], "theia is down: served by driver");
    assert_eq!(fakes.driver.submitted(), 2);
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_cancels_its_generation_and_frees_its_slot() {
    let fakes = Fakes::new(1000, Duration::from_millis(5));
    let (gw, app) = gateway(&one_driver_slot(8), &fakes);
    let mut body = dialog("a", "dialog", "x");
    body["stream"] = json!(true);
    body["max_tokens"] = json!(500);
    let req = Request::post("/v1/dialog")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut stream = resp.into_body();
    let first = stream.frame().await.expect("a first event").unwrap();
    let first = String::from_utf8_lossy(first.data_ref().expect("data")).to_string();
    assert!(first.contains("event: token"), "{first}");
    drop(stream);
    until("the tier saw the cancellation", || {
        fakes.driver.cancelled.load(Ordering::SeqCst) == 1
    })
    .await;
    until("the slot is free", || {
        gw.zones()
            .get("a")
            .is_none_or(|z| z.slots_in_use.values().all(|&n| n == 0))
    })
    .await;
    // The freed slot serves the next request at once.
    let mut next = dialog("b", "dialog", "x");
    next["max_tokens"] = json!(2);
    let (status, _, _) = send(&app, "/v1/dialog", &next).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_budgets_reload_under_load_admits_waiters_and_keeps_running_requests() {
    let fakes = Fakes::new(2, Duration::ZERO);
    let (gw, app) = gateway(&one_driver_slot(8), &fakes);
    fakes.driver.hold();
    let first = spawn_send(&app, dialog("a", "dialog", "x"));
    until("the first request runs", || {
        fakes.driver.running.load(Ordering::SeqCst) == 1
    })
    .await;
    let second = spawn_send(&app, dialog("b", "dialog", "x"));
    until("the second request waits", || queued(&gw, "b") == 1).await;

    // An invalid edit changes nothing.
    assert!(gw.apply_budgets("[tiers.driver]\nslots = -1").is_err());
    assert_eq!(gw.live().version, 1);
    assert_eq!(queued(&gw, "b"), 1);

    let version = gw
        .apply_budgets(&budgets(&[(
            "[tiers.driver]\nslots = 128\nreserved_slots = 32\nqueue = 256",
            "[tiers.driver]\nslots = 2\nqueue = 8",
        )]))
        .expect("valid edit");
    assert_eq!(version, 2);
    until("the waiter got the new slot", || {
        fakes.driver.running.load(Ordering::SeqCst) == 2
    })
    .await;
    let (_, config) = get(&app, "/v1/config").await;
    assert_eq!(config["version"], 2);
    assert_eq!(config["budgets"]["tiers"]["driver"]["slots"], 2);
    fakes.driver.release();
    for t in [first, second] {
        assert_eq!(t.await.unwrap().0, StatusCode::OK);
    }
}

#[tokio::test]
async fn a_quiet_zone_is_served_before_a_flooding_zone_drains() {
    let fakes = Fakes::new(1, Duration::ZERO);
    let text = budgets(&[(
        "[tiers.driver]\nslots = 128\nreserved_slots = 32\nqueue = 256",
        "[tiers.driver]\nslots = 2\nqueue = 64",
    )]);
    let (gw, app) = gateway(&text, &fakes);
    fakes.driver.hold();
    // Zone a's prompts are one token, zone b's three: the tier's log tells them apart.
    let mut tasks: Vec<_> = (0..8)
        .map(|_| spawn_send(&app, dialog("flood", "dialog", "x")))
        .collect();
    until("the flood fills the slots and queues", || {
        fakes.driver.running.load(Ordering::SeqCst) == 2 && queued(&gw, "flood") == 6
    })
    .await;
    tasks.push(spawn_send(&app, dialog("quiet", "dialog", "y y y")));
    until("the quiet zone waits", || queued(&gw, "quiet") == 1).await;
    fakes.driver.release();
    for t in tasks {
        assert_eq!(t.await.unwrap().0, StatusCode::OK);
    }
    let order = fakes.driver.prompts.lock().unwrap().clone();
    let quiet = order.iter().position(|&n| n == 3).expect("quiet ran");
    assert_eq!(order.len(), 9);
    assert!(
        quiet <= 3,
        "the quiet zone ran {quiet}th of 9 (a FIFO queue would run it last): {order:?}"
    );
}

#[tokio::test]
async fn a_dead_tier_answers_503_and_readyz_names_it() {
    let fakes = Fakes::new(2, Duration::ZERO);
    let (_gw, app) = gateway(&Sources::embedded().budgets, &fakes);
    let (status, ready) = get(&app, "/readyz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ready["tiers"]["driver"]["status"], "ready");

    fakes.driver.kill();
    let (status, _, body) = send(&app, "/v1/dialog", &dialog("a", "dialog", "x")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["kind"], "unavailable");
    assert_eq!(fakes.driver.submitted(), 0);
    let (status, ready) = get(&app, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready["ready"], false);
    assert_eq!(ready["error"], "tiers down: driver");
    assert_eq!(ready["tiers"]["driver"]["status"], "down");
    assert_eq!(ready["tiers"]["theia"]["status"], "ready");
}

#[tokio::test]
async fn a_tier_that_dies_mid_generation_answers_503_not_a_hang() {
    let fakes = Fakes::new(1000, Duration::from_millis(2));
    let (_gw, app) = gateway(&one_driver_slot(8), &fakes);
    let mut body = dialog("a", "dialog", "x");
    body["max_tokens"] = json!(500);
    let t = spawn_send(&app, body);
    until("it runs", || {
        fakes.driver.running.load(Ordering::SeqCst) == 1
    })
    .await;
    fakes.driver.kill();
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), t)
        .await
        .expect("no hang")
        .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}

#[tokio::test]
async fn a_zones_npcs_are_pinned_in_their_voice_while_it_is_active_and_released_when_it_idles_out()
{
    let fakes = Fakes::new(4, Duration::ZERO);
    let (gw, app) = gateway(&budgets(&[("idle_ttl_s = 300", "idle_ttl_s = 1")]), &fakes);
    // A `sailor` adapter shaped for the fake tier's base.
    let dir = tempfile::tempdir().unwrap();
    let base = nimmer_gateway::tier::LlmTier::lora_base(&*gw.tiers().driver);
    let (r, kvd) = (2, base.n_kv_head * base.head_dim);
    let sailor = nimmer_loras::Adapter {
        name: "sailor".into(),
        rank: r,
        alpha: 2.0,
        scale: 1.0,
        modules: vec![nimmer_loras::Module::V],
        layers: vec![vec![Some(nimmer_loras::LoraPair {
            a: vec![0.1; r * base.dim],
            b: vec![0.1; kvd * r],
        })]],
        size_bytes: 0,
        digest: Default::default(),
    };
    nimmer_loras::save_peft(&sailor, &base, dir.path()).unwrap();
    gw.loras().load("sailor", dir.path()).unwrap();
    let npcs = json!({ "npcs": [
        { "id": "marta", "persona": "You are Marta, the harbour-master." },
        { "id": "old-tom", "persona": "You are Tom, a retired sailor.", "traits": { "sailor": 0.8 } },
    ]});
    let (status, body) = put(&app, "/v1/zones/docks", &npcs).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["npcs_pinned"], json!(["marta", "old-tom"]));
    let pins = |f: &Fakes| f.driver.pins.lock().unwrap().clone();
    let held = pins(&fakes);
    assert_eq!(held.len(), 2);
    assert_eq!(
        held.values().map(|(_, voiced)| *voiced).collect::<Vec<_>>(),
        [false, true],
        "old-tom is pinned in his sailor voice"
    );
    let (_, zones) = get(&app, "/v1/zones").await;
    assert_eq!(
        zones["zones"]["docks"]["npcs_pinned"],
        json!(["marta", "old-tom"])
    );

    // A PUT states who is present: marta left, so only old-tom stays pinned (under a new pin).
    let only_tom =
        json!({ "npcs": [{ "id": "old-tom", "persona": "You are Tom, a retired sailor." }] });
    assert_eq!(
        put(&app, "/v1/zones/docks", &only_tom).await.0,
        StatusCode::OK
    );
    assert_eq!(pins(&fakes).len(), 1);

    // Bad input changes nothing: not the pins, not the class.
    for bad in [
        json!({ "class": "landmark", "npcs": [{ "id": "a b", "persona": "x" }] }),
        json!({ "npcs": [{ "id": "x", "persona": " " }] }),
        json!({ "npcs": [{ "id": "x", "persona": "p" }, { "id": "x", "persona": "q" }] }),
        json!({ "npcs": [{ "id": "x", "persona": "p", "traits": { "nosuchtrait": 1.0 } }] }),
        json!({ "npcs": [{ "id": "x" }] }),
    ] {
        let (status, body) = put(&app, "/v1/zones/docks", &bad).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad} -> {body}");
        assert!(
            body["field"].as_str().unwrap_or("").starts_with("npcs"),
            "{body}"
        );
        assert_eq!(pins(&fakes).len(), 1, "{bad} changed the pins");
        let (_, zones) = get(&app, "/v1/zones").await;
        assert_eq!(
            zones["zones"]["docks"]["class"], "street",
            "{bad} changed the class"
        );
    }
    let (status, body) = put(
        &app,
        "/v1/zones/docks",
        &json!({ "class": "nosuch", "npcs": [] }),
    )
    .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("class"))
    );
    assert_eq!(pins(&fakes).len(), 1, "an unknown class released the pins");

    // The zone idles out: its NPCs are released.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(gw.prune_zones(), 1);
    assert!(pins(&fakes).is_empty());
    let (_, zones) = get(&app, "/v1/zones").await;
    assert!(zones["zones"].get("docks").is_none(), "{zones}");
}

#[tokio::test]
async fn slots_admit_into_the_engine_beyond_its_rows_and_each_request_carries_its_zone_s_share() {
    let fakes = Fakes::new(2, Duration::ZERO);
    // Default budgets: 128 Driver slots (four times the engine's 32 rows a step), the last 32 of them kept
    // for zones under their share.
    let (gw, app) = gateway(&Sources::embedded().budgets, &fakes);
    fakes.driver.hold();
    let mut tasks: Vec<_> = (0..100)
        .map(|_| spawn_send(&app, dialog("flood", "dialog", "x")))
        .collect();
    until("the flood fills all but the reserved slots", || {
        fakes.driver.running.load(Ordering::SeqCst) == 96 && queued(&gw, "flood") == 4
    })
    .await;
    let mut quiet = dialog("plaza-1", "dialog", "y y y");
    quiet["priority"] = json!(3);
    tasks.push(spawn_send(&app, quiet));
    until("the quiet request reaches the engine at once", || {
        fakes.driver.running.load(Ordering::SeqCst) == 97
    })
    .await;
    assert_eq!(queued(&gw, "flood"), 4, "the flood still waits");
    let share = fakes.driver.shares.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        (&*share.zone, &*share.class, share.weight, share.priority),
        ("plaza-1", "plaza", 2.0, 3),
        "the engine's step planner gets the zone, its class weight and the priority"
    );
    fakes.driver.release();
    for t in tasks {
        assert_eq!(t.await.unwrap().0, StatusCode::OK);
    }
    let (_, zones) = get(&app, "/v1/zones").await;
    let served = &zones["zones"]["plaza-1"]["engine_share"]["driver"];
    assert_eq!(
        served["tokens_served"], 5,
        "3 prompt + 2 generated: {served}"
    );
    assert!(served["share_ratio"].is_number(), "{served}");
}

#[test]
fn a_tier_on_nats_workers_without_a_nats_server_is_a_start_error_naming_the_setting() {
    let mut sources = Sources::embedded();
    sources.tiers =
        sources
            .tiers
            .replacen("[tiers.driver]\n", "[tiers.driver]\nvia = \"nats\"\n", 1);
    let config = Config::parse(sources, "test").expect("valid tiers.toml");
    let err = match Gateway::start_with(config, None, None) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("started without a NATS server"),
    };
    assert!(
        err.contains("tiers.driver.via") && err.contains("--nats"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_s_token_budget_holds_across_gateways_sharing_nats() {
    let server = nimmer_services::NatsServer::start();
    let text = budgets(&[(
        "tokens_per_s = 0\nburst_tokens = 8192",
        "tokens_per_s = 1\nburst_tokens = 8",
    )]);
    let (fa, fb) = (Fakes::new(3, Duration::ZERO), Fakes::new(3, Duration::ZERO));
    let (gw_a, app_a) = gateway(&text, &fa);
    let (gw_b, app_b) = gateway(&text, &fb);
    for gw in [&gw_a, &gw_b] {
        let client = async_nats::connect(&server.url).await.unwrap();
        nimmer_gateway::budget_sync::start(client, gw.clone(), std::future::pending())
            .await
            .unwrap();
    }
    // docks-1 spends more than its burst (6 prompt + 3 generated tokens > 8) through gateway A...
    let body = dialog("docks-1", "dialog", "one two three four five six");
    let (status, _, v) = send(&app_a, "/v1/dialog", &body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    // ...so gateway B, which never served it, refuses its next request once A's charge arrived (at most
    // one request could pass before it did).
    let mut passed = 0;
    let (status, headers) = loop {
        // (each its own line: a repeat of one UID would get B's first answer)
        let body = dialog("docks-1", "dialog", "one two three four five six");
        let (status, headers, v) = send(&app_b, "/v1/dialog", &body).await;
        if status != StatusCode::OK {
            break (status, headers);
        }
        passed += 1;
        assert!(passed <= 1, "gateway B kept serving the zone: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(headers.contains_key(header::RETRY_AFTER));
    assert_eq!(fb.driver.submitted(), passed);
    // Another zone is untouched on both gateways.
    let (status, _, _) = send(&app_b, "/v1/dialog", &dialog("market-2", "dialog", "hello")).await;
    assert_eq!(status, StatusCode::OK);
}

//! Slots, queues, degradation and fairness with small configurations (Driver 2 slots, Theia 1). Each test runs
//! its own gateway so no other test shares the slots.

use std::time::Duration;

use nimmer_e2e::http::{client, hold_stream};
use serde_json::{Value, json};

/// Each dialog its own slot: a repeated UID is a repeat of one line (it gets the first answer).
static NEXT_SLOT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

fn small(driver_queue: usize) -> String {
    let cfg = nimmer_e2e::config_with_budgets(
        |t| t.to_string(),
        |b| {
            b.replacen("slots = 128\nreserved_slots = 32", "slots = 2", 1)
                .replacen("slots = 16", "slots = 1", 1)
                .replacen("queue = 256", &format!("queue = {driver_queue}"), 1)
                .replace("max_new_tokens = 512", "max_new_tokens = 2000")
        },
    );
    nimmer_e2e::start_gateway(cfg)
}

/// A request that generates exactly `max_tokens` tokens (`ignore_eos`), so slot holders never finish early.
fn body(zone: &str, kind: &str, stream: bool, max_tokens: usize) -> Value {
    json!({ "uid": format!("e/d/s/k{}", NEXT_SLOT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)), "zone": zone, "kind": kind, "stream": stream, "max_tokens": max_tokens,
            "messages": [{ "role": "system", "content": "You are a helpful assistant." }, { "role": "user", "content": "Count from one to five hundred." }],
            "sampling": { "temperature": 0.7, "seed": 1, "ignore_eos": true } })
}

/// Starts a long streamed request; returns its open stream (holding the slot) once the first bytes arrived.
async fn hold(base: &str, zone: &str, kind: &str) -> Box<dyn std::any::Any + Send> {
    hold_stream(base, &body(zone, kind, true, 2000)).await
}

#[tokio::test]
async fn deep_work_degrades_to_the_driver_and_a_full_queue_answers_429() {
    let base = small(1);
    let theia = hold(&base, "market", "deep").await;
    let r: Value = client()
        .post(format!("{base}/v1/dialog"))
        .json(&body("market", "deep", false, 4))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["tier"], "driver", "{r}");
    assert_eq!(r["degraded"], true);
    assert!(r["degraded_reason"].as_str().unwrap().contains("theia"));
    let d1 = hold(&base, "market", "dialog").await;
    let d2 = hold(&base, "market", "dialog").await;
    // One request may wait (queue = 1): it waits; the next is refused with 429 + Retry-After.
    let waiting = tokio::spawn({
        let base = base.clone();
        async move {
            client()
                .post(format!("{base}/v1/dialog"))
                .json(&body("alley", "dialog", false, 4))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    for _ in 0..100 {
        let z: Value = client()
            .get(format!("{base}/v1/zones"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if z["zones"]["alley"]["queued"]["driver"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = client()
        .post(format!("{base}/v1/dialog"))
        .json(&body("square", "dialog", false, 4))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(r.json::<Value>().await.unwrap()["kind"], "over_budget");
    drop((theia, d1, d2));
    assert_eq!(
        waiting.await.unwrap(),
        200,
        "the queued request ran once slots were freed"
    );
}

#[tokio::test]
async fn a_queued_request_past_its_deadline_gets_504() {
    let base = small(8);
    let _d1 = hold(&base, "market", "dialog").await;
    let _d2 = hold(&base, "market", "dialog").await;
    let mut b = body("alley", "dialog", false, 4);
    b["deadline_ms"] = json!(300);
    let r = client()
        .post(format!("{base}/v1/dialog"))
        .json(&b)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 504);
    assert_eq!(r.json::<Value>().await.unwrap()["kind"], "deadline");
}

/// A zone floods the Driver (2 slots) with 12 long requests; a quiet zone then sends one short one. Once the
/// quiet request is seen at the gateway, it may wait only for the lines already running (at most 2 flood lines
/// finish before it), never for the flood's queue to drain. An ordering check, not a timing one: the count
/// starts when the gateway shows the quiet zone, so a slow arrival cannot fail it.
#[tokio::test]
async fn a_flooding_zone_does_not_starve_a_quiet_one() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let base = small(64);
    let flood_done = std::sync::Arc::new(AtomicUsize::new(0));
    let zones = |base: String| async move {
        client()
            .get(format!("{base}/v1/zones"))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let mut flood = Vec::new();
    for _ in 0..12 {
        let (base, done) = (base.clone(), flood_done.clone());
        flood.push(tokio::spawn(async move {
            let r = client()
                .post(format!("{base}/v1/dialog"))
                .json(&body("flood", "dialog", false, 48))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
            done.fetch_add(1, Ordering::SeqCst);
        }));
    }
    for _ in 0..500 {
        let z = zones(base.clone()).await;
        if z["zones"]["flood"]["queued"]["driver"]
            .as_u64()
            .unwrap_or(0)
            >= 9
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let quiet = tokio::spawn({
        let (base, done) = (base.clone(), flood_done.clone());
        async move {
            let r = client()
                .post(format!("{base}/v1/dialog"))
                .json(&body("quiet", "dialog", false, 8))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
            done.load(Ordering::SeqCst)
        }
    });
    // The moment the gateway holds the quiet request (queued or in a slot), and how far the flood was then.
    let (seen_at, flood_queued) = loop {
        let done = flood_done.load(Ordering::SeqCst);
        let z = zones(base.clone()).await;
        let q = &z["zones"]["quiet"];
        let held = q["queued"]["driver"].as_u64().unwrap_or(0)
            + q["slots_in_use"]["driver"].as_u64().unwrap_or(0);
        if held > 0 || quiet.is_finished() {
            break (
                done,
                z["zones"]["flood"]["queued"]["driver"]
                    .as_u64()
                    .unwrap_or(0),
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let done_when_quiet_finished = quiet.await.unwrap();
    for f in flood {
        f.await.unwrap();
    }
    assert!(
        flood_queued >= 3,
        "the quiet request arrived too late to test anything (flood lines still queued: {flood_queued})"
    );
    let overtook = done_when_quiet_finished - seen_at;
    assert!(
        overtook <= 2,
        "{overtook} flood lines finished between the quiet request's arrival and its answer \
         (at most the 2 already running may; {flood_queued} flood lines were queued when it arrived)"
    );
}

#[tokio::test]
async fn with_degradation_off_deep_work_waits_for_theia() {
    let cfg = nimmer_e2e::config_with_budgets(
        |t| t.to_string(),
        |b| {
            b.replacen("slots = 16", "slots = 1", 1)
                .replacen("degrade = true", "degrade = false", 1)
                .replace("max_new_tokens = 512", "max_new_tokens = 2000")
        },
    );
    let base = nimmer_e2e::start_gateway(cfg);
    let theia = hold(&base, "market", "deep").await;
    // Theia's one slot is held: the moment waits for it instead of running on the Driver, until its deadline.
    let mut late = body("market", "moment", false, 4);
    late["deadline_ms"] = json!(300);
    let r = client()
        .post(format!("{base}/v1/dialog"))
        .json(&late)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 504);
    drop(theia);
    let r: Value = client()
        .post(format!("{base}/v1/dialog"))
        .json(&body("market", "moment", false, 4))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["tier"], "theia", "{r}");
    assert_eq!(r["degraded"], false);
}

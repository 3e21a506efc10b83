//! Slots and degradation with a small configuration: Driver 2 slots, Theia 1. Its own test binary (and
//! gateway) so no other test shares the slots.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

#[tokio::test]
async fn deep_work_degrades_to_the_driver_and_a_saturated_tier_answers_429() {
    let text = nimmer_config::DEFAULT_TIERS_TOML
        .replacen("max_batch = 32", "max_batch = 2", 1)
        .replacen("max_batch = 4", "max_batch = 1", 1);
    let cfg = nimmer_config::Config::from_strs(
        "tiers.toml",
        &text,
        "classifiers.toml",
        nimmer_config::DEFAULT_CLASSIFIERS_TOML,
        "test".into(),
    )
    .unwrap();
    let base = nimmer_e2e::start_gateway(cfg);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let body = |kind: &str, stream: bool, max_tokens: usize| {
        json!({ "uid": "e/d/s/k", "zone": "market", "kind": kind, "stream": stream, "max_tokens": max_tokens,
                "messages": [{ "role": "system", "content": "You are a helpful assistant." }, { "role": "user", "content": "Count from one to five hundred." }],
                "sampling": { "temperature": 0.7, "seed": 1 } })
    };
    let hold = |kind: &'static str| {
        let c = client.clone();
        let url = format!("{base}/v1/dialog");
        let b = body(kind, true, 2000);
        async move {
            let r = c.post(url).json(&b).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 200);
            let mut s = r.bytes_stream();
            s.next().await.unwrap().unwrap();
            s
        }
    };
    // Theia's one slot is busy: a deep request runs on the driver, marked degraded.
    let theia = hold("deep").await;
    let r: Value = client
        .post(format!("{base}/v1/dialog"))
        .json(&body("deep", false, 4))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["tier"], "driver", "{r}");
    assert_eq!(r["degraded"], true);
    assert!(r["degraded_reason"].as_str().unwrap().contains("theia"));
    // Both driver slots busy: dialog gets 429 with Retry-After.
    let d1 = hold("dialog").await;
    let d2 = hold("dialog").await;
    let r = client
        .post(format!("{base}/v1/dialog"))
        .json(&body("dialog", false, 4))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["kind"], "over_budget");
    // Freed slots serve again.
    drop((theia, d1, d2));
    for _ in 0..100 {
        let r = client
            .post(format!("{base}/v1/dialog"))
            .json(&body("dialog", false, 4))
            .send()
            .await
            .unwrap();
        if r.status().as_u16() == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("slots were not freed");
}

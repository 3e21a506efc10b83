//! The NATS front against a real nats-server (>= 2.10) the test starts: request/reply on
//! `nimmerverse.gateway.<kind>.<zone>` (queue group), errors as JSON replies, and every finished dialog
//! (NATS or HTTP) in the JetStream stream `RESULTS` on `nimmerverse.results.<gm_event>.<district>.<scene>`,
//! also when the broker was down while it finished.

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use serde_json::{Value, json};

const SYSTEM: &str = "You are a helpful assistant.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_nats_and_results_in_jetstream() {
    let server = nimmer_e2e::NatsServer::start();
    let base = nimmer_e2e::start_gateway_with(
        nimmer_e2e::config(),
        nimmer_gateway::Options {
            nats: Some(server.url.clone()),
            ..Default::default()
        },
    );
    let client = async_nats::connect(&server.url).await.unwrap();
    // The gateway subscribes after loading its models; wait for its queue subscription.
    let body = json!({
        "uid": "ev9/docks/quay/s1",
        "messages": [{ "role": "system", "content": SYSTEM }, { "role": "user", "content": "What is the capital of France?" }],
        "max_tokens": 16, "participants": ["p7"], "faction": "guild",
    });
    let mut reply = None;
    for _ in 0..100 {
        match tokio::time::timeout(
            Duration::from_secs(60),
            client.request(
                "nimmerverse.gateway.dialog.docks-2",
                body.to_string().into(),
            ),
        )
        .await
        {
            Ok(Ok(m)) => {
                reply = Some(m);
                break;
            }
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => panic!("request failed: {other:?}"),
        }
    }
    let reply: Value =
        serde_json::from_slice(&reply.expect("the gateway answered").payload).unwrap();
    assert!(reply["text"].as_str().unwrap().contains("Paris"), "{reply}");
    assert_eq!(reply["tier"], "driver");
    assert_eq!(reply["slot"]["zone"], "docks-2");

    // A draft (a director's line before its gate) is answered but never reaches RESULTS.
    let draft = client
        .request(
            "nimmerverse.gateway.dialog.docks-2",
            json!({
                "uid": "ev9/docks/quay/s0",
                "messages": [{ "role": "system", "content": SYSTEM }, { "role": "user", "content": "Hello!" }],
                "max_tokens": 4, "draft": true,
            })
            .to_string()
            .into(),
        )
        .await
        .unwrap();
    let draft: Value = serde_json::from_slice(&draft.payload).unwrap();
    assert!(draft["text"].is_string(), "{draft}");

    // Classification over NATS.
    let m = client
        .request(
            "nimmerverse.gateway.classify.docks-2",
            json!({ "uid": "ev9/docks/quay/s2", "classifier": "ternary-gate", "prompt": "Thank you, friend, you saved my life!" })
                .to_string()
                .into(),
        )
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(v["tier"], "saturn", "{v}");
    assert_eq!(v["classification"]["label"], "+1", "{v}");

    // Bad requests get an error reply naming the field, and the gateway keeps serving.
    for (subject, body, field, status) in [
        (
            "nimmerverse.gateway.dialog.docks-2",
            json!({ "uid": "ev9/do*cks/quay/s1", "prompt": "hi" }),
            "uid.district",
            422,
        ),
        (
            "nimmerverse.gateway.dialog.docks-2",
            json!({ "uid": "a/b/c/d", "zone": "elsewhere", "prompt": "hi" }),
            "zone",
            422,
        ),
        (
            "nimmerverse.gateway.gossip.docks-2",
            json!({ "uid": "a/b/c/d", "prompt": "hi" }),
            "kind",
            422,
        ),
        (
            "nimmerverse.gateway.dialog.docks-2",
            json!({ "uid": "a/b/c/d", "prompt": "hi", "stream": true }),
            "stream",
            422,
        ),
    ] {
        let m = client
            .request(subject, body.to_string().into())
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["status"], status, "{subject} {body}: {v}");
        assert_eq!(v["field"], field, "{subject} {body}: {v}");
    }
    let m = client
        .request("nimmerverse.gateway.dialog.docks-2", "{not json".into())
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(v["status"], 400, "{v}");

    // The twin of `PUT /v1/zones/{id}`: the NPCs present are pinned in the Driver's prefix cache.
    let m = client
        .request(
            "nimmerverse.gateway.zones.docks-2",
            json!({ "class": "plaza", "npcs": [{ "id": "marta", "persona": "You are Marta, the harbour-master of Lowgate. You keep the harbour logbook and you distrust strangers. Answer in one sentence." }] })
                .to_string()
                .into(),
        )
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(v["npcs_pinned"], json!(["marta"]), "{v}");
    assert_eq!(v["class"], "plaza", "{v}");
    let mut pinned = false;
    for _ in 0..600 {
        let zones: Value = reqwest::get(format!("{base}/v1/zones"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            zones["zones"]["docks-2"]["npcs_pinned"],
            json!(["marta"]),
            "{zones}"
        );
        if zones["prefix_cache"]["driver"]["pinned_blocks"]
            .as_u64()
            .unwrap()
            > 0
        {
            pinned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(pinned, "the persona was never pinned");
    let m = client
        .request(
            "nimmerverse.gateway.zones.docks-2",
            json!({ "npcs": [{ "id": "x" }] }).to_string().into(),
        )
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(
        (v["status"].as_u64(), v["field"].as_str()),
        (Some(422), Some("npcs[0]")),
        "{v}"
    );

    // An HTTP dialog is published too.
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/dialog"))
        .json(&json!({
            "uid": "ev9/docks/quay/s3", "zone": "docks-2", "kind": "dialog", "max_tokens": 8,
            "messages": [{ "role": "system", "content": SYSTEM }, { "role": "user", "content": "Hello!" }],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // Three results (two dialogs, one classification) in RESULTS, on the scene's subject.
    let js = jetstream::new(client);
    let mut stream = js.get_stream("RESULTS").await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(
        info.config.retention,
        jetstream::stream::RetentionPolicy::WorkQueue
    );
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("test-compositor".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut msgs = consumer.messages().await.unwrap();
    while got.len() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(30), msgs.next())
            .await
            .expect("a result within 30 s")
            .unwrap()
            .unwrap();
        assert_eq!(m.subject.as_str(), "nimmerverse.results.ev9.docks.quay");
        let id = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.to_string())
            .expect("Nats-Msg-Id");
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["result_id"], id.as_str());
        m.ack().await.unwrap();
        got.push(v);
    }
    let slots: Vec<&str> = got
        .iter()
        .map(|v| v["uid"]["slot"].as_str().unwrap())
        .collect();
    assert!(
        slots.contains(&"s1") && slots.contains(&"s2") && slots.contains(&"s3"),
        "the draft s0 (asked between s1 and s2) was not published: {slots:?}"
    );
    let s1 = got.iter().find(|v| v["uid"]["slot"] == "s1").unwrap();
    assert_eq!(s1["participants"], json!(["p7"]));
    assert_eq!(s1["faction"], "guild");
    assert_eq!(s1["response"]["text"], reply["text"]);
}

/// The results publisher across a broker outage: dialogs finished while nats-server is down (SIGKILL) are
/// published once it is back (same port and store), each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_finished_while_the_broker_is_down_are_published_once_it_is_back() {
    let mut server = nimmer_e2e::NatsServer::start();
    let base = nimmer_e2e::start_gateway_with(
        nimmer_e2e::config(),
        nimmer_gateway::Options {
            nats: Some(server.url.clone()),
            ..Default::default()
        },
    );
    // The gateway creates RESULTS once connected.
    let client = async_nats::connect(&server.url).await.unwrap();
    let js = jetstream::new(client);
    let mut ready = false;
    for _ in 0..300 {
        if js.get_stream("RESULTS").await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "the gateway created RESULTS");

    server.kill();
    let http = reqwest::Client::new();
    let slots = ["s1", "s2", "s3", "s4"];
    for slot in slots {
        let r = http
            .post(format!("{base}/v1/dialog"))
            .json(&json!({
                "uid": format!("ev3/docks/quay/{slot}"), "zone": "docks-2", "kind": "dialog", "max_tokens": 4,
                "messages": [{ "role": "system", "content": SYSTEM }, { "role": "user", "content": "Hello!" }],
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            200,
            "dialogs run while the broker is down"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.start_again();

    let client = async_nats::connect(&server.url).await.unwrap();
    let js = jetstream::new(client);
    let mut stream = js.get_stream("RESULTS").await.unwrap();
    let mut held = 0;
    for _ in 0..600 {
        held = stream.info().await.unwrap().state.messages;
        if held >= slots.len() as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(held, slots.len() as u64, "every result reached RESULTS");
    // Retries carry the same Nats-Msg-Id: nothing arrives twice, even after the publisher settles.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        slots.len() as u64
    );
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("test-outage".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut msgs = consumer.messages().await.unwrap();
    let mut got = Vec::new();
    while got.len() < slots.len() {
        let m = tokio::time::timeout(Duration::from_secs(30), msgs.next())
            .await
            .expect("a result within 30 s")
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        got.push(v["uid"]["slot"].as_str().unwrap().to_string());
        m.ack().await.unwrap();
    }
    got.sort();
    assert_eq!(got, slots);
}

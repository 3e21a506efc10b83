//! The whole path with the real Driver, nats-server and PostgreSQL: dialogs served over HTTP → `RESULTS` →
//! a compositor (canon + outbox in PostgreSQL) → the relay → `CANON` and the player's feed → the player's
//! SQLite file, holding exactly the texts the gateway answered.

use std::time::Duration;

use async_nats::jetstream;
use nimmer_compositor::{PlayerStore, follow};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialogs_reach_the_players_sqlite_as_canon() {
    let nats = nimmer_e2e::NatsServer::start();
    let pg = nimmer_services::Postgres::start();
    let base = nimmer_e2e::start_gateway_with(
        nimmer_e2e::config(),
        nimmer_gateway::Options {
            nats: Some(nats.url.clone()),
            ..Default::default()
        },
    );
    let client = async_nats::connect(&nats.url).await.unwrap();
    let mut t = nimmer_config::TransportFile::embedded();
    t.relay.poll_ms = 100;
    let (stop_compositor, rx) = tokio::sync::oneshot::channel::<()>();
    let compositor = tokio::spawn({
        let (t, url, client) = (t.clone(), pg.url.clone(), client.clone());
        async move {
            nimmer_compositor::serve(t, &url, client, async {
                let _ = rx.await;
            })
            .await
        }
    });

    let http = reqwest::Client::new();
    let mut texts = Vec::new();
    for (i, q) in [
        "Where is the harbour?",
        "Is the ferry running?",
        "Who runs the market?",
    ]
    .iter()
    .enumerate()
    {
        let body = json!({
            "uid": format!("ev9/docks/quay/s{i}"), "zone": "docks-2", "kind": "dialog", "max_tokens": 24,
            "npc": { "id": "brannoch" }, "participants": ["p7"], "faction": "guild",
            "messages": [{ "role": "system", "content": "You are a helpful assistant." }, { "role": "user", "content": q }],
        });
        let r = http
            .post(format!("{base}/v1/dialog"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "{v}");
        texts.push(v["text"].as_str().unwrap().to_string());
    }

    let dir = tempfile::tempdir().unwrap();
    let store = PlayerStore::open(&dir.path().join("p7.sqlite"))
        .await
        .unwrap();
    let js = jetstream::new(client.clone());
    let mut got = Vec::new();
    let (stop_player, prx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let stopper = tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(60), done_rx.recv()).await;
        let _ = stop_player.send(());
    });
    follow(
        &js,
        &t,
        "p7",
        &store,
        async {
            let _ = prx.await;
        },
        |a| {
            got.extend(a.new.iter().cloned());
            if got.len() >= 3 {
                let _ = done_tx.send(());
            }
        },
    )
    .await
    .unwrap();
    stopper.await.unwrap();
    assert_eq!(got.len(), 3, "{got:?}");
    let mut by_slot: Vec<_> = got
        .iter()
        .map(|c| (c.slot.clone(), c.text.clone()))
        .collect();
    by_slot.sort();
    let expected: Vec<_> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("s{i}"), t.clone()))
        .collect();
    assert_eq!(by_slot, expected);
    assert!(got.iter().all(|c| c.npc.as_deref() == Some("brannoch")
        && c.faction.as_deref() == Some("guild")
        && c.tier == "driver"
        && c.canon_uid.starts_with("ev9/docks/quay/")));
    assert_eq!(store.count().await.unwrap(), 3);
    store.close().await;
    let _ = stop_compositor.send(());
    compositor.await.unwrap().unwrap();
}

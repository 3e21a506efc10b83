//! `POST /v1/events` on fake tiers with a real nats-server: the shard map routes each event to its shard's
//! subject, the shard's answer or refusal comes back as the caller's status, and a shard nobody serves is a
//! 503 that says what to start.

mod common;

use common::{gateway, send};
use futures::StreamExt;
use nimmer_config::{Config, EventCatalog, GmFile, Sources};
use nimmer_gateway::events::EventsFront;
use nimmer_gateway::tier::fake::Fakes;
use serde_json::{Value, json};

/// Answers open requests on `shard`'s subject with `answer(request)`.
async fn fake_shard(client: &async_nats::Client, shard: &str, answer: fn(Value) -> Value) {
    let mut sub = client
        .subscribe(nimmer_wire::subjects::gm_open(shard))
        .await
        .unwrap();
    let replies = client.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let req: Value = serde_json::from_slice(&m.payload).unwrap();
            let body = answer(req).to_string();
            replies
                .publish(m.reply.unwrap(), body.into())
                .await
                .unwrap();
        }
    });
    client.flush().await.unwrap();
}

#[tokio::test]
async fn events_go_to_the_shard_the_map_names_and_its_answer_comes_back() {
    let server = nimmer_services::NatsServer::start();
    let client = async_nats::connect(&server.url).await.unwrap();
    let fakes = Fakes::new(1, std::time::Duration::ZERO);
    let (gw, app) = gateway(&Sources::embedded().budgets, &fakes);

    // Without NATS the gateway cannot hand events on.
    let quarrel = json!({ "template": "market-quarrel", "values": { "player": "p1" } });
    let (status, _, body) = send(&app, "/v1/events", &quarrel).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("--nats"), "{body}");

    let config = Config::embedded();
    gw.set_events(EventsFront::new(
        client.clone(),
        EventCatalog::embedded(&config).unwrap(),
        GmFile::embedded(),
    ));
    fake_shard(&client, "market", |r| {
        json!({ "gm_event": r["gm_event"].as_str().unwrap_or("ev-new"), "shard": "market", "opened": true })
    })
    .await;
    fake_shard(&client, "docks", |_| {
        json!({ "error": "`market-quarrel` needs it", "status": 422, "field": "values.player" })
    })
    .await;

    let (status, _, body) = send(&app, "/v1/events", &quarrel).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["shard"], "market");
    // The same template in the docks goes to the docks shard (geography first), whose refusal comes back.
    let docks = json!({ "template": "market-quarrel", "district": "docks", "values": {} });
    let (status, _, body) = send(&app, "/v1/events", &docks).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["field"], "values.player");
    // The guild's shard has no process.
    let guild = json!({ "template": "guild-inquiry", "values": { "player": "p", "rumour": "r" } });
    let (status, _, body) = send(&app, "/v1/events", &guild).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("nimmer gm --shard guild"),
        "{body}"
    );
    for (bad, want, what) in [
        (json!({ "template": "nope" }), 404, "event template `nope`"),
        (json!({ "values": {} }), 422, "template"),
        (
            json!({ "template": "market-quarrel", "district": "a b" }),
            422,
            "district",
        ),
        (
            json!({ "template": "market-quarrel", "colour": 1 }),
            422,
            "colour",
        ),
    ] {
        let (status, _, body) = send(&app, "/v1/events", &bad).await;
        assert_eq!(status, want, "{bad} -> {body}");
        assert!(
            body["error"].as_str().unwrap().contains(what),
            "{bad} -> {body}"
        );
    }
}

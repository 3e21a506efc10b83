//! Fan-out by configuration against a real nats-server: the default feeds (a district and a faction) hold exactly
//! their canon rows, and a district feed added to the config while a compositor, a player and a feed consumer
//! run starts with the district's whole history and disturbs none of them.

mod common;

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use common::{Stack, eventually, read_all, result};
use futures::StreamExt;
use nimmer_config::FeedSpec;

fn in_district(id: &str, district: &str, faction: Option<&str>, i: u32) -> serde_json::Value {
    let mut v = result(id, "sc0", i, &["p1"]);
    v["uid"]["district"] = district.into();
    v["faction"] = faction.into();
    v
}

async fn messages(js: &jetstream::Context, name: &str) -> u64 {
    match js.get_stream(name).await {
        Ok(mut s) => s.info().await.map_or(0, |i| i.state.messages),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feeds_come_from_config_and_can_be_added_while_running() {
    let stack = Stack::start();
    let js = jetstream::new(stack.client().await);
    let compositor = stack.compositor().await;
    let mut n = 0u32;
    let mut send = async |district: &str, faction: Option<&str>| {
        let v = in_district(&format!("r{n}"), district, faction, n);
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("r{n}").as_str());
        js.publish_with_headers(
            format!("nimmerverse.results.ev1.{district}.sc0"),
            h,
            serde_json::to_vec(&v).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        n += 1;
    };
    for _ in 0..12 {
        send("docks", Some("dockers")).await;
    }
    for _ in 0..8 {
        send("market", None).await;
    }
    for _ in 0..5 {
        send("market", Some("dockers")).await;
    }
    assert!(
        eventually(30, || async {
            messages(&js, "CANON").await == 25
                && messages(&js, "DISTRICT_DOCKS").await == 12
                && messages(&js, "FACTION_DOCKERS").await == 17
        })
        .await,
        "CANON {} DISTRICT_DOCKS {} FACTION_DOCKERS {}",
        messages(&js, "CANON").await,
        messages(&js, "DISTRICT_DOCKS").await,
        messages(&js, "FACTION_DOCKERS").await
    );
    let docks = read_all(&js, "DISTRICT_DOCKS", "", 12, Duration::from_secs(5)).await;
    assert!(
        docks
            .iter()
            .all(|m| m.subject.as_str() == "nimmerverse.district.docks.canon.ev1.sc0"),
        "{:?}",
        docks
            .iter()
            .map(|m| m.subject.to_string())
            .collect::<Vec<_>>()
    );

    // A durable consumer on the docks feed is running when the new feed is added.
    let docks_stream = js.get_stream("DISTRICT_DOCKS").await.unwrap();
    let durable = docks_stream
        .get_or_create_consumer(
            "docks-board",
            consumer::pull::Config {
                durable_name: Some("docks-board".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut board = durable.messages().await.unwrap();
    for _ in 0..12 {
        let m = tokio::time::timeout(Duration::from_secs(5), board.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        m.ack().await.unwrap();
    }

    // Ops add a market feed to transport.toml and apply it (`nimmer feeds apply`).
    let mut t2 = stack.t.clone();
    t2.feeds.push(FeedSpec {
        name: "DISTRICT_MARKET".into(),
        district: Some("market".into()),
        faction: None,
    });
    let applied = nimmer_compositor::streams::ensure_feeds(&js, &t2)
        .await
        .unwrap();
    assert!(applied.contains(&"DISTRICT_MARKET".to_string()));
    for _ in 0..3 {
        send("market", None).await;
    }
    send("docks", None).await;
    assert!(
        eventually(30, || async {
            messages(&js, "DISTRICT_MARKET").await == 16
                && messages(&js, "DISTRICT_DOCKS").await == 13
        })
        .await,
        "DISTRICT_MARKET {} DISTRICT_DOCKS {}",
        messages(&js, "DISTRICT_MARKET").await,
        messages(&js, "DISTRICT_DOCKS").await
    );
    // The running durable consumer gets just the new docks row.
    let m = tokio::time::timeout(Duration::from_secs(5), board.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let c: nimmer_compositor::Canon = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(
        (c.district.as_str(), c.result_id.as_str()),
        ("docks", "r28")
    );
    compositor.stop().await;
}

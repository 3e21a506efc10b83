//! Compositors against a real PostgreSQL and a real nats-server (both started here): results → canon rows +
//! outbox in one transaction → relay → JetStream `CANON`, each row exactly once; duplicates and redeliveries are
//! no-ops; malformed results are dead-lettered with their reason without blocking the others; a rolled-back
//! outbox insert publishes nothing.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream;
use common::{Stack, publish, read_all, result};
use nimmer_compositor::Canon;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_become_canon_exactly_once() {
    let stack = Stack::start();
    let js = jetstream::new(stack.client().await);
    let compositor = stack.compositor().await;
    // 60 results over 3 scenes, one published twice under another message id (a gateway retry after its
    // dedup window), and two malformed ones.
    for i in 0..60u32 {
        let scene = format!("sc{}", i % 3);
        publish(
            &js,
            &scene,
            &result(&format!("r{i}"), &scene, i, &["p1", "p2"]),
            &format!("r{i}"),
        )
        .await;
    }
    publish(
        &js,
        "sc0",
        &result("r0", "sc0", 0, &["p1", "p2"]),
        "r0-again",
    )
    .await;
    publish(&js, "sc1", &json!({ "result_id": "bad1" }), "bad1").await;
    let mut bad_scene = result("bad2", "sc1", 99, &["p1"]);
    bad_scene["uid"]["scene"] = json!("a.b");
    publish(&js, "sc1", &bad_scene, "bad2").await;
    // Valid JSON the schema rejects (PostgreSQL text cannot hold NUL): dead-lettered, the batch still lands.
    let mut nul = result("bad3", "sc2", 98, &["p1"]);
    nul["response"]["text"] = json!("bad\u{0}text");
    publish(&js, "sc2", &nul, "bad3").await;

    let canon = read_all(&js, "CANON", "", 60, Duration::from_secs(30)).await;
    assert_eq!(canon.len(), 60, "each result exactly once");
    let rows: Vec<Canon> = canon
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    let uids: BTreeSet<_> = rows.iter().map(|c| c.canon_uid.clone()).collect();
    let results: BTreeSet<_> = rows.iter().map(|c| c.result_id.clone()).collect();
    assert_eq!((uids.len(), results.len()), (60, 60));
    for m in &canon {
        let c: Canon = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(
            m.subject.as_str(),
            format!("nimmerverse.events.ev1.district.docks.scene.{}", c.scene)
        );
        assert_eq!(
            m.headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str()),
            Some(c.result_id.as_str())
        );
        assert_eq!(c.participants, ["p1", "p2"]);
        assert_eq!(c.adapters, ["sailor@v1"]);
    }
    // Within a scene, sequence numbers are 1..=20 in publish order.
    for sc in ["sc0", "sc1", "sc2"] {
        let seqs: Vec<i64> = rows
            .iter()
            .filter(|c| c.scene == sc)
            .map(|c| c.seq)
            .collect();
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>(), "{sc}");
    }

    let dead = read_all(&js, "DEADLETTER", "", 3, Duration::from_secs(10)).await;
    assert_eq!(dead.len(), 3);
    let reasons: Vec<String> = dead
        .iter()
        .map(|m| {
            m.headers
                .as_ref()
                .unwrap()
                .get("Nimmer-Reason")
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(reasons[0].contains("not a dialog result"), "{reasons:?}");
    assert!(reasons[1].contains("uid.scene"), "{reasons:?}");
    assert!(
        reasons[2].contains("rejected by the canon schema"),
        "{reasons:?}"
    );

    let pool = sqlx::PgPool::connect(&stack.pg.url).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM canon")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 60);
    let mut outbox = -1i64;
    for _ in 0..50 {
        outbox = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&pool)
            .await
            .unwrap();
        if outbox == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(outbox, 0, "acked outbox rows are deleted");

    // A rolled-back outbox insert publishes nothing.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO outbox (msg_id, subject, payload) VALUES ('x/y/z/1', 'nimmerverse.events.x.district.y.scene.z', '\\x7b7d')")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let info = js
        .get_stream("CANON")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(info, 60);

    // Each participant got each row once on its own subject.
    let p1 = read_all(
        &js,
        "PLAYERS",
        "nimmerverse.player.p1.canon",
        60,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(p1.len(), 60);

    // Completing the event prunes its register entries; a late result for it is dead-lettered.
    let scenes: i64 = sqlx::query_scalar("SELECT count(*) FROM scenes WHERE gm_event = 'ev1'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(scenes, 3);
    let (known, pruned) = nimmer_compositor::complete_event(&pool, "ev1")
        .await
        .unwrap();
    assert_eq!((known, pruned), (true, 3));
    publish(&js, "sc0", &result("late", "sc0", 77, &["p1"]), "late").await;
    let dead = read_all(&js, "DEADLETTER", "", 4, Duration::from_secs(10)).await;
    assert_eq!(dead.len(), 4);
    let reason = dead[3]
        .headers
        .as_ref()
        .unwrap()
        .get("Nimmer-Reason")
        .unwrap()
        .to_string();
    assert!(reason.contains("event ev1 is completed"), "{reason}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM canon")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 60);
    compositor.stop().await;
}

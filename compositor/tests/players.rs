//! Player clients against a real PostgreSQL and nats-server: a player applies its feed into its SQLite file
//! exactly once, an offline player replays exactly what it missed from its checkpoint, a late joiner catches up
//! from the start of its feed, and a corrupt store file is reported naming the file.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream;
use common::{Delivery, Follower, Stack, count, eventually, publish, read_all, result};
use nimmer_compositor::PlayerStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_player_replays_what_it_missed_and_late_joiner_catches_up() {
    let stack = Stack::start();
    let js = jetstream::new(stack.client().await);
    let compositor = stack.compositor().await;
    let dir = tempfile::tempdir().unwrap();
    let (p1_db, p2_db) = (dir.path().join("p1.sqlite"), dir.path().join("p2.sqlite"));

    let p1 = Follower::start(&stack, "p1", &p1_db, Delivery::Feed).await;
    for i in 0..20u32 {
        publish(
            &js,
            "sc0",
            &result(&format!("r{i}"), "sc0", i, &["p1", "p2"]),
            &format!("r{i}"),
        )
        .await;
    }
    let js2 = js.clone();
    assert!(
        eventually(20, || {
            let js = js2.clone();
            async move {
                read_all(
                    &js,
                    "PLAYERS",
                    "nimmerverse.player.p1.canon",
                    20,
                    Duration::from_millis(200),
                )
                .await
                .len()
                    == 20
            }
        })
        .await
    );
    // p1's follower applies them, then goes offline.
    assert!(eventually(20, || async { count(&p1_db).await == 20 }).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let live = p1.stop().await;
    assert_eq!(live, 20);
    assert_eq!(count(&p1_db).await, 20);

    // While p1 is offline: 20 more with p1, 5 without.
    for i in 20..40u32 {
        publish(
            &js,
            "sc1",
            &result(&format!("r{i}"), "sc1", i, &["p2", "p1"]),
            &format!("r{i}"),
        )
        .await;
    }
    for i in 40..45u32 {
        publish(
            &js,
            "sc1",
            &result(&format!("r{i}"), "sc1", i, &["p2"]),
            &format!("r{i}"),
        )
        .await;
    }
    let all_p2 = read_all(
        &js,
        "PLAYERS",
        "nimmerverse.player.p2.canon",
        45,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(all_p2.len(), 45);

    // p1 reconnects: exactly the 20 it missed.
    let p1 = Follower::start(&stack, "p1", &p1_db, Delivery::Feed).await;
    assert!(eventually(20, || async { count(&p1_db).await == 40 }).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        p1.stop().await,
        20,
        "only the missed rows are applied again"
    );
    assert_eq!(count(&p1_db).await, 40);

    // p2 joins late: its whole feed.
    let p2 = Follower::start(&stack, "p2", &p2_db, Delivery::Feed).await;
    assert!(eventually(20, || async { count(&p2_db).await == 45 }).await);
    assert_eq!(p2.stop().await, 45);

    // The stores hold exactly the canon UIDs of their rows, and the checkpoint is the feed's last sequence.
    let s = PlayerStore::open(&p2_db).await.unwrap();
    let uids: BTreeSet<String> = s.canon_uids().await.unwrap().into_iter().collect();
    let expected: BTreeSet<String> = all_p2
        .iter()
        .map(|m| {
            serde_json::from_slice::<nimmer_compositor::Canon>(&m.payload)
                .unwrap()
                .canon_uid
        })
        .collect();
    assert_eq!(uids, expected);
    let last = all_p2.last().unwrap().info().unwrap().stream_sequence;
    assert_eq!(
        s.checkpoint("nimmerverse.player.p2.canon").await.unwrap(),
        last
    );
    s.close().await;
    compositor.stop().await;
}

#[tokio::test]
async fn corrupt_player_store_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p9.sqlite");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let err = match PlayerStore::open(&path).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a corrupt file opened"),
    };
    assert!(err.contains("p9.sqlite"), "{err}");
    assert!(err.contains("not a usable player store"), "{err}");
}

#[tokio::test]
async fn player_store_prunes_by_kind_and_age() {
    let dir = tempfile::tempdir().unwrap();
    let store = PlayerStore::open(&dir.path().join("p.sqlite"))
        .await
        .unwrap();
    let hour = 3_600_000i64;
    let now = 1_800_000_000_000i64;
    let row = |i: i64, kind: &str, age_h: i64| nimmer_compositor::Canon {
        canon_uid: format!("e/d/s/{i}"),
        result_id: format!("r{i}"),
        gm_event: "e".into(),
        district: "d".into(),
        scene: "s".into(),
        slot: "s1".into(),
        seq: i,
        zone: "z".into(),
        kind: kind.into(),
        tier: "driver".into(),
        npc: None,
        text: "hi".into(),
        participants: vec!["p".into()],
        faction: None,
        adapters: vec![],
        finished_at_ms: now - age_h * hour,
    };
    let rows = vec![
        (1, row(1, "classify", 2)),
        (2, row(2, "classify", 30)),
        (3, row(3, "dialog", 30)),
        (4, row(4, "dialog", 3000)),
        (5, row(5, "moment", 3000)),
    ];
    store.apply("feed", &rows).await.unwrap();
    let rules = nimmer_config::TransportFile::embedded().players.prune;
    // classify: 24 h; everything else: 2160 h.
    assert_eq!(store.prune(&rules, now).await.unwrap(), 3);
    assert_eq!(store.canon_uids().await.unwrap(), ["e/d/s/1", "e/d/s/3"]);
    assert_eq!(store.checkpoint("feed").await.unwrap(), 5);
}

/// A store written before rows were keyed by result id (version 0: keyed by canon UID) is rebuilt at open,
/// keeping its rows and checkpoint; after that, a row reusing a canon UID for another result (a PostgreSQL
/// failover that lost commits hands scene sequences out again) is kept, not dropped as a repeat.
#[tokio::test]
async fn an_old_store_is_rebuilt_keyed_by_result_id_and_a_reused_canon_uid_is_not_dropped() {
    use sqlx::sqlite::SqliteConnectOptions;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.sqlite");
    {
        let opts = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
        for stmt in [
            "CREATE TABLE canon (canon_uid TEXT PRIMARY KEY, gm_event TEXT NOT NULL, district TEXT NOT NULL,
                scene TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, npc TEXT, text TEXT NOT NULL,
                faction TEXT, finished_at_ms INTEGER NOT NULL, applied_at_ms INTEGER NOT NULL, row TEXT NOT NULL)",
            "CREATE INDEX canon_scene ON canon (gm_event, district, scene, seq)",
            "CREATE TABLE checkpoint (feed TEXT PRIMARY KEY, stream_seq INTEGER NOT NULL)",
            "INSERT INTO checkpoint VALUES ('feed', 7)",
            r#"INSERT INTO canon VALUES ('e/d/s/1', 'e', 'd', 's', 1, 'dialog', NULL, 'old line', NULL, 1, 1,
                '{"canon_uid":"e/d/s/1","result_id":"r-old"}')"#,
        ] {
            sqlx::query(stmt).execute(&pool).await.unwrap();
        }
        pool.close().await;
    }
    let store = PlayerStore::open(&path).await.unwrap();
    assert_eq!(store.count().await.unwrap(), 1);
    assert_eq!(store.checkpoint("feed").await.unwrap(), 7);
    assert_eq!(store.newest().await.unwrap().as_deref(), Some("r-old"));
    let row = |result_id: &str, text: &str| nimmer_compositor::Canon {
        canon_uid: "e/d/s/1".into(),
        result_id: result_id.into(),
        gm_event: "e".into(),
        district: "d".into(),
        scene: "s".into(),
        slot: "s1".into(),
        seq: 1,
        zone: "z".into(),
        kind: "dialog".into(),
        tier: "driver".into(),
        npc: None,
        text: text.into(),
        participants: vec!["p".into()],
        faction: None,
        adapters: vec![],
        finished_at_ms: 2,
    };
    let new = store
        .apply(
            "feed",
            &[(8, row("r-old", "old line")), (9, row("r-new", "new line"))],
        )
        .await
        .unwrap();
    assert_eq!(
        new,
        [false, true],
        "the repeat is a no-op, the other result is kept"
    );
    assert_eq!(store.count().await.unwrap(), 2);
    store.close().await;
}

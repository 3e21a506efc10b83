//! The district-distribution fallback (`[delivery] mode = "district"`) against real PostgreSQL and nats-server:
//! an online player gets its rows pushed, an offline one gets them when it comes online, each applied once into
//! the same SQLite store, and the rows are the canon rows the JetStream path publishes on `CANON`.

mod common;

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use common::{Delivery, Follower, Stack, eventually, publish, read_all, result};
use nimmer_compositor::{Canon, PlayerStore};
use nimmer_config::DeliveryMode;

async fn rows(db: &Path) -> Vec<(String, String)> {
    // Opening the store first also creates it when the player never ran.
    PlayerStore::open(db).await.unwrap().close().await;
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let mut out: Vec<(String, String)> = sqlx::query_as("SELECT canon_uid, text FROM canon")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn district_fallback_delivers_the_same_rows() {
    let mut stack = Stack::start();
    stack.t.delivery.mode = DeliveryMode::District;
    stack.t.delivery.sweep_s = 1;
    let js = jetstream::new(stack.client().await);
    let compositor = stack.compositor().await;
    let dir = tempfile::tempdir().unwrap();
    let (p1_db, p2_db) = (dir.path().join("p1.sqlite"), dir.path().join("p2.sqlite"));

    let p1 = Follower::start(&stack, "p1", &p1_db, Delivery::District).await;
    for i in 0..30u32 {
        let scene = format!("sc{}", i % 2);
        publish(
            &js,
            &scene,
            &result(&format!("r{i}"), &scene, i, &["p1", "p2"]),
            &format!("r{i}"),
        )
        .await;
    }
    assert!(eventually(30, || async { rows(&p1_db).await.len() == 30 }).await);

    // p2 was offline: its rows wait in PostgreSQL until it comes online.
    let pool = sqlx::PgPool::connect(&stack.pg.url).await.unwrap();
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE player = 'p2'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(queued, 30);
    let p2 = Follower::start(&stack, "p2", &p2_db, Delivery::District).await;
    assert!(eventually(30, || async { rows(&p2_db).await.len() == 30 }).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(p1.stop().await, 30, "each row applied once");
    assert_eq!(p2.stop().await, 30);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM deliveries")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "acknowledged deliveries are deleted");

    // The same rows as the canon the JetStream path carries.
    let canon = read_all(&js, "CANON", "", 30, Duration::from_secs(10)).await;
    let mut expected: Vec<(String, String)> = canon
        .iter()
        .map(|m| {
            let c: Canon = serde_json::from_slice(&m.payload).unwrap();
            (c.canon_uid, c.text)
        })
        .collect();
    expected.sort();
    assert_eq!(rows(&p1_db).await, expected);
    assert_eq!(rows(&p2_db).await, expected);
    // No per-player JetStream copies in this mode.
    let players = js
        .get_stream("PLAYERS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(players, 0);
    compositor.stop().await;
}

//! Gaps in a player's feed, against a real PostgreSQL and nats-server: a player whose checkpoint fell behind
//! what `PLAYERS` still holds (a purge) or whose stream was recreated reports the gap once, gets exactly the
//! rows it missed from PostgreSQL canon through the compositors, and then follows its feed as before.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::{Delivery, Follower, Stack, count, eventually, publish, read_all, result};

/// Publishes results `from..to` in `scene` with `participants`.
async fn results(js: &jetstream::Context, scene: &str, from: u32, to: u32, participants: &[&str]) {
    for i in from..to {
        let id = format!("r{i}");
        publish(js, scene, &result(&id, scene, i, participants), &id).await;
    }
}

/// Waits until p1's subject on `PLAYERS` holds `n` messages.
async fn players_hold(js: &jetstream::Context, n: usize) {
    let js2 = js.clone();
    assert!(
        eventually(30, || {
            let js = js2.clone();
            async move {
                read_all(
                    &js,
                    "PLAYERS",
                    "nimmerverse.player.p1.canon",
                    n,
                    Duration::from_millis(200),
                )
                .await
                .len()
                    == n
            }
        })
        .await,
        "PLAYERS never held {n} rows for p1"
    );
}

/// A stack with a compositor where p1 followed 10 rows and went offline; then 15 more rows with p1 and 3
/// without were published, and `PLAYERS` holds p1's 25. Returns the stack, p1's store and what keeps them.
async fn offline_with_15_missed() -> (
    Stack,
    jetstream::Context,
    common::Running,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    let stack = Stack::start();
    let js = jetstream::new(stack.client().await);
    let compositor = stack.compositor().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("p1.sqlite");
    let p1 = Follower::start(&stack, "p1", &db, Delivery::Feed).await;
    results(&js, "sc0", 0, 10, &["p1", "p2"]).await;
    assert!(eventually(20, || async { count(&db).await == 10 }).await);
    assert!(p1.gaps().is_empty());
    assert_eq!(p1.stop().await, 10);
    results(&js, "sc1", 10, 25, &["p2", "p1"]).await;
    results(&js, "sc1", 25, 28, &["p2"]).await;
    players_hold(&js, 25).await;
    (stack, js, compositor, dir, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_player_behind_a_purged_feed_reports_the_gap_and_gets_what_it_missed_from_canon() {
    let (stack, js, _compositor, _dir, db) = offline_with_15_missed().await;
    // Everything the stream held is purged: p1's checkpoint is now behind its first sequence.
    let mut players = js.get_stream("PLAYERS").await.unwrap();
    players.purge().await.unwrap();
    let first = players.info().await.unwrap().state.first_sequence;

    let p1 = Follower::start(&stack, "p1", &db, Delivery::Feed).await;
    assert!(eventually(20, || async { count(&db).await == 25 }).await);
    // Live rows after the resync still arrive through the feed.
    results(&js, "sc2", 28, 33, &["p1"]).await;
    assert!(eventually(20, || async { count(&db).await == 30 }).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let gaps = p1.gaps();
    assert_eq!(
        p1.stop().await,
        20,
        "the 15 missed rows from canon, the 5 live ones from the feed"
    );
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!(gaps[0].first_available, first);
    assert!(!gaps[0].recreated);
    assert_eq!(count(&db).await, 30);

    // Back again with nothing missed: no gap, nothing applied twice.
    let p1 = Follower::start(&stack, "p1", &db, Delivery::Feed).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(p1.gaps().is_empty());
    assert_eq!(p1.stop().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_player_whose_stream_was_recreated_reports_the_gap_and_gets_what_it_missed_from_canon() {
    let (stack, js, _compositor, _dir, db) = offline_with_15_missed().await;
    // The stream is deleted and made again: it counts from 1, below p1's checkpoint.
    js.delete_stream("PLAYERS").await.unwrap();
    nimmer_compositor::streams::ensure(&js, &stack.t)
        .await
        .unwrap();
    results(&js, "sc2", 28, 30, &["p1"]).await;
    players_hold(&js, 2).await;

    let p1 = Follower::start(&stack, "p1", &db, Delivery::Feed).await;
    assert!(eventually(20, || async { count(&db).await == 27 }).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let gaps = p1.gaps();
    assert_eq!(
        p1.stop().await,
        17,
        "the 15 lost with the old stream and the 2 in the new one"
    );
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert!(gaps[0].recreated);
    assert_eq!(count(&db).await, 27);
}

//! Failures against the real services: nats-server killed (SIGKILL) and restarted mid-stream, and a compositor
//! killed mid-batch. In both, every result becomes exactly one canon row, one `CANON` message and one row in
//! the player's SQLite file.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::{Stack, eventually, result};
use nimmer_compositor::{PlayerStore, follow};

/// Publishes a result, retrying until JetStream acknowledges it (the server may be restarting).
async fn publish_acked(js: &jetstream::Context, i: u32, participants: &[&str]) {
    let v = serde_json::to_vec(&result(&format!("r{i}"), "sc0", i, participants)).unwrap();
    for _ in 0..200 {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("r{i}").as_str());
        if let Ok(ack) = js
            .publish_with_headers("nimmerverse.results.ev1.docks.sc0", h, v.clone().into())
            .await
            && ack.await.is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("result r{i} was never acknowledged");
}

async fn canon_rows(url: &str) -> i64 {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let n = sqlx::query_scalar("SELECT count(*) FROM canon")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    n
}

async fn stream_messages(js: &jetstream::Context, name: &str) -> u64 {
    match js.get_stream(name).await {
        Ok(mut s) => s.info().await.map_or(0, |i| i.state.messages),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_mid_stream_loses_and_duplicates_nothing() {
    let mut stack = Stack::start();
    let js = jetstream::new(stack.client().await);
    let compositor = stack.compositor().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("p1.sqlite");
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let follower = {
        let (js, t, db) = (js.clone(), stack.t.clone(), db.clone());
        tokio::spawn(async move {
            let store = PlayerStore::open(&db).await.unwrap();
            let mut applied = 0;
            follow(
                &js,
                &t,
                "p1",
                &store,
                async {
                    let _ = rx.await;
                },
                |a| applied += a.new.len(),
            )
            .await
            .unwrap();
            store.close().await;
            applied
        })
    };
    for i in 0..100 {
        publish_acked(&js, i, &["p1"]).await;
    }
    // Kill the broker while compositors and the relay are working through those, then bring it back.
    stack.nats.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.nats.start_again();
    for i in 100..200 {
        publish_acked(&js, i, &["p1"]).await;
    }
    let url = stack.pg.url.clone();
    assert!(
        eventually(60, || {
            let (js, url) = (js.clone(), url.clone());
            async move {
                canon_rows(&url).await == 200 && stream_messages(&js, "CANON").await == 200
            }
        })
        .await,
        "canon rows {} / CANON messages {}",
        canon_rows(&url).await,
        stream_messages(&js, "CANON").await
    );
    assert!(
        eventually(30, || async {
            let s = PlayerStore::open(&db).await.unwrap();
            let n = s.count().await.unwrap();
            s.close().await;
            n == 200
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stream_messages(&js, "CANON").await, 200, "no duplicates");
    assert_eq!(stream_messages(&js, "PLAYERS").await, 200, "no duplicates");
    let _ = stop.send(());
    assert_eq!(follower.await.unwrap(), 200, "each row applied once");
    compositor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_compositor_results_are_redelivered_and_applied_once() {
    let mut stack = Stack::start();
    stack.t.results.batch = 40;
    let js = jetstream::new(stack.client().await);
    let a = stack.compositor().await;
    for i in 0..400 {
        publish_acked(&js, i, &["p1"]).await;
    }
    // Kill compositor A while it works through the backlog (some batches committed, one in flight).
    let url = stack.pg.url.clone();
    assert!(eventually(30, || async { canon_rows(&url).await > 0 }).await);
    a.kill();
    let done_by_a = canon_rows(&url).await;
    let b = stack.compositor().await;
    assert!(
        eventually(60, || {
            let (js, url) = (js.clone(), url.clone());
            async move {
                canon_rows(&url).await == 400 && stream_messages(&js, "CANON").await == 400
            }
        })
        .await,
        "canon rows {} / CANON messages {}",
        canon_rows(&url).await,
        stream_messages(&js, "CANON").await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stream_messages(&js, "CANON").await, 400);
    assert_eq!(stream_messages(&js, "PLAYERS").await, 400);
    eprintln!("compositor A composed {done_by_a} of 400 before it was killed");
    b.stop().await;
}

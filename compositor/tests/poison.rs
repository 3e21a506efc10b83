//! A poison result (one PostgreSQL cannot store for a reason of its own: a result id too large for the
//! unique index) among 100 good ones: the 100 become canon at their first delivery (only the poison is ever
//! redelivered), and the poison goes to the dead-letter stream with its reason after `max_attempts`.

mod common;

use async_nats::jetstream;
use common::{Stack, eventually, publish, result};

async fn count(url: &str, sql: &str) -> i64 {
    let Ok(pool) = sqlx::PgPool::connect(url).await else {
        return -1;
    };
    let n = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap_or(-1);
    pool.close().await;
    n
}

async fn messages(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map_or(0, |i| i.state.messages),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_result_is_dead_lettered_without_holding_its_batch_mates() {
    let mut stack = Stack::start();
    stack.t.results.max_attempts = 2;
    let js = jetstream::new(stack.client().await);
    let c = stack.compositor().await;
    // Random hex does not compress: far over btree's 2704-byte limit (SQLSTATE 54000, not 22/23).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let huge: String = (0..6000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            format!("{:x}", x % 16)
        })
        .collect();
    for i in 0..101u32 {
        let (id, v) = if i == 50 {
            (huge.clone(), result(&huge, "sc0", i, &["p1"]))
        } else {
            let id = format!("good-{i}");
            (id.clone(), result(&id, "sc0", i, &["p1"]))
        };
        publish(&js, "sc0", &v, &id[..id.len().min(64)]).await;
    }
    let url = stack.pg.url.clone();
    assert!(
        eventually(60, || async {
            count(&url, "SELECT count(*) FROM canon").await == 100
                && messages(&js, "DEADLETTER").await == 1
        })
        .await,
        "canon rows {}, dead letters {}",
        count(&url, "SELECT count(*) FROM canon").await,
        messages(&js, "DEADLETTER").await
    );
    // Its batch-mates were not redelivered with it: the only redeliveries are the poison's.
    let info = js
        .get_stream("RESULTS")
        .await
        .unwrap()
        .consumer_info("compositors")
        .await
        .unwrap()
        .clone();
    let redeliveries = info.delivered.consumer_sequence - info.delivered.stream_sequence;
    assert_eq!(redeliveries, 1, "{info:?}");
    assert_eq!(info.num_pending + info.num_ack_pending as u64, 0);
    // The dead letter says why.
    let dl = js
        .get_stream("DEADLETTER")
        .await
        .unwrap()
        .get_raw_message(1)
        .await
        .unwrap();
    let reason = dl
        .headers
        .get("Nimmer-Reason")
        .map(|v| v.as_str().to_string())
        .unwrap_or_default();
    assert!(reason.contains("after 2 attempts"), "{reason}");
    assert!(reason.contains("index row"), "{reason}");
    assert_eq!(
        count(&url, "SELECT count(DISTINCT seq) FROM canon").await,
        100
    );
    c.stop().await;
}

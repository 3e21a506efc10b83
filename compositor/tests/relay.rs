//! The relay never stores an outbox row twice, however long after its first publish the republish comes:
//! rows an earlier leader published without deleting them (it died, or PostgreSQL was away) are checked
//! against what JetStream holds, not against the duplicate window. And a subject's rows are stored in
//! outbox order: after a row that was not stored, JetStream refuses the rest of the round.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::{Stack, read_all};
use nimmer_compositor::Relay;
use nimmer_compositor::relay::{LeaderState, Round};
use sqlx::Connection;

const SCENE_A: &str = "nimmerverse.events.ev1.district.docks.scene.a";
const SCENE_B: &str = "nimmerverse.events.ev1.district.docks.scene.b";

async fn outbox(pool: &sqlx::PgPool, rows: &[(&str, &str)]) {
    for (msg_id, subject) in rows {
        sqlx::query("INSERT INTO outbox (msg_id, subject, payload) VALUES ($1, $2, $3)")
            .bind(msg_id)
            .bind(subject)
            .bind(format!("{{\"row\": \"{msg_id}\"}}").into_bytes())
            .execute(pool)
            .await
            .unwrap();
    }
}

/// Publishes as an earlier leader did before it died.
async fn publish(js: &jetstream::Context, rows: &[(&str, &str)]) {
    for (msg_id, subject) in rows {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", *msg_id);
        js.publish_with_headers(
            subject.to_string(),
            h,
            format!("{{\"row\": \"{msg_id}\"}}").into_bytes().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
}

async fn canon_messages(js: &jetstream::Context) -> u64 {
    js.get_stream("CANON")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

/// The streams, and a relay on `stack` with its pool, JetStream context and own connection.
async fn relay_on(stack: &Stack) -> (sqlx::PgPool, jetstream::Context, Relay, sqlx::PgConnection) {
    let pool = nimmer_compositor::connect(&stack.pg.url, 4).await.unwrap();
    let js = jetstream::new(stack.client().await);
    nimmer_compositor::streams::ensure(&js, &stack.t)
        .await
        .unwrap();
    let relay = Relay {
        pool: pool.clone(),
        url: stack.pg.url.clone(),
        js: js.clone(),
        transport: stack.t.clone(),
    };
    let conn = sqlx::PgConnection::connect(&stack.pg.url).await.unwrap();
    (pool, js, relay, conn)
}

async fn max_id(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar::<_, Option<i64>>("SELECT max(id) FROM outbox")
        .fetch_one(pool)
        .await
        .unwrap()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_republish_after_the_duplicate_window_stores_nothing_twice() {
    let mut stack = Stack::start();
    stack.t.canon.duplicate_window_s = 2;
    let (pool, js, relay, mut conn) = relay_on(&stack).await;

    let rows = [
        ("a1", SCENE_A),
        ("b1", SCENE_B),
        ("a2", SCENE_A),
        ("a3", SCENE_A),
        ("b2", SCENE_B),
    ];
    outbox(&pool, &rows).await;
    // The earlier leader stored a1, a2, b1 and b2, then died before deleting them.
    publish(&js, &[rows[0], rows[1], rows[2], rows[4]]).await;
    // Longer than JetStream's duplicate window: a republish would be stored again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut suspects = LeaderState {
        up_to: max_id(&pool).await,
        ..Default::default()
    };
    let round = relay.drain_once(&mut conn, &mut suspects).await.unwrap();
    assert_eq!(
        round,
        Round {
            published: 1,
            skipped: 4,
            failed: false
        }
    );
    assert_eq!(canon_messages(&js).await, 5, "a3 once, nothing twice");
    let outbox_left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(outbox_left, 0);
    // The scene's lines are stored in order.
    let a: Vec<String> = read_all(&js, "CANON", SCENE_A, 3, Duration::from_secs(5))
        .await
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(
        a,
        ["a1", "a2", "a3"].map(|r| format!("{{\"row\": \"{r}\"}}"))
    );

    // The check is what prevents the duplicate: a relay that does not suspect the row (as before)
    // stores it a second time once the window has passed.
    outbox(&pool, &[("c1", SCENE_B)]).await;
    publish(&js, &[("c1", SCENE_B)]).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let round = relay
        .drain_once(&mut conn, &mut LeaderState::default())
        .await
        .unwrap();
    assert_eq!(round.published, 1);
    assert_eq!(
        canon_messages(&js).await,
        7,
        "unchecked, c1 is stored twice"
    );
}

/// The chain: when a row of a round is not stored (lost on the way, refused), JetStream refuses every row
/// after it, so nothing is stored out of order. Here the relay's idea of `CANON`'s last sequence is ahead of
/// the stream, as after a lost row: the whole round is refused, and the next round asks JetStream where the
/// stream stands and stores every row once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_sequence_chain_refuses_the_rest_of_the_round() {
    let stack = Stack::start();
    let (pool, js, relay, mut conn) = relay_on(&stack).await;
    outbox(&pool, &[("a1", SCENE_A), ("b1", SCENE_B)]).await;
    let mut state = LeaderState::default();
    let round = relay.drain_once(&mut conn, &mut state).await.unwrap();
    assert_eq!((round.published, round.failed), (2, false));
    assert_eq!(state.last_seq.get("CANON"), Some(&2));

    // As if a row the relay sent after seq 2 never reached the stream.
    state.last_seq.insert("CANON".into(), 3);
    outbox(&pool, &[("a2", SCENE_A), ("b2", SCENE_B), ("a3", SCENE_A)]).await;
    let round = relay.drain_once(&mut conn, &mut state).await.unwrap();
    assert_eq!((round.published, round.failed), (0, true), "{round:?}");
    assert_eq!(
        canon_messages(&js).await,
        2,
        "nothing of the refused round was stored"
    );
    assert!(
        !state.last_seq.contains_key("CANON"),
        "the stale sequence is forgotten"
    );

    let round = relay.drain_once(&mut conn, &mut state).await.unwrap();
    assert_eq!(
        (round.published, round.skipped, round.failed),
        (3, 0, false),
        "{round:?}"
    );
    assert_eq!(canon_messages(&js).await, 5);
    let a: Vec<String> = read_all(&js, "CANON", SCENE_A, 3, Duration::from_secs(5))
        .await
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(
        a,
        ["a1", "a2", "a3"].map(|r| format!("{{\"row\": \"{r}\"}}"))
    );
}

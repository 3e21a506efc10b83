//! The directors' register against a real PostgreSQL: leases, takeover with a new epoch, fencing, completion.

use std::collections::BTreeMap;
use std::time::Duration;

use nimmer_config::{Config, EventCatalog};
use nimmer_gm::{Outcome, Progress, Register};
use nimmer_services::Postgres;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_not_renewed_is_taken_over_and_the_old_owner_can_no_longer_write() {
    let pg = Postgres::start();
    let pool = nimmer_compositor::connect(&pg.url, 4).await.unwrap();
    let c = Config::embedded();
    let t = EventCatalog::embedded(&c).unwrap().events["market-quarrel"].clone();
    let values: BTreeMap<String, String> = [("player".to_string(), "p1".to_string())].into();
    let ttl = Duration::from_secs(2);
    let a = Register::new(pool.clone(), "market", "gm-a", ttl);
    let b = Register::new(pool.clone(), "market", "gm-b", ttl);
    let other_shard = Register::new(pool.clone(), "docks", "gm-c", ttl);

    let mut lease = a
        .open("ev-q1", &t.name, "market", &values, &Progress::open(&t))
        .await
        .unwrap()
        .expect("a new event opens");
    assert!(
        a.open("ev-q1", &t.name, "market", &values, &Progress::open(&t))
            .await
            .unwrap()
            .is_none(),
        "an event opens once"
    );
    lease
        .progress
        .apply(
            &t,
            Outcome::Line {
                scene: "quarrel".into(),
                text: "You thief!".into(),
            },
        )
        .unwrap();
    assert!(a.record(&lease).await.unwrap());

    // While A renews, nobody takes the event.
    for _ in 0..3 {
        assert_eq!(a.renew().await.unwrap(), 1);
        assert!(b.take_expired(10).await.unwrap().is_empty());
        tokio::time::sleep(ttl / 3).await;
    }
    // A stops renewing (its process died): B of the same shard takes it with its progress; another shard never.
    let mut taken = Vec::new();
    for _ in 0..100 {
        assert!(other_shard.take_expired(10).await.unwrap().is_empty());
        taken = b.take_expired(10).await.unwrap();
        if !taken.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(taken.len(), 1, "B took the expired lease");
    let mut moved = taken.remove(0);
    assert_eq!(moved.epoch, 2);
    assert_eq!(
        moved.progress, lease.progress,
        "the recorded progress moves with the event"
    );
    assert_eq!(moved.values, values);
    assert_eq!(moved.template, "market-quarrel");

    // A, back from a stall, can neither record nor complete: it lost the event.
    assert!(!a.record(&lease).await.unwrap());
    assert!(!a.complete(&lease).await.unwrap());
    assert_eq!(a.renew().await.unwrap(), 0);

    moved
        .progress
        .apply(
            &t,
            Outcome::Label {
                scene: "quarrel".into(),
                label: "ok".into(),
            },
        )
        .unwrap();
    assert!(b.record(&moved).await.unwrap());
    assert_eq!(b.open_events().await.unwrap(), 1);
    assert!(b.complete(&moved).await.unwrap());
    assert_eq!(b.open_events().await.unwrap(), 0);
    let status: String = sqlx::query_scalar("SELECT status FROM events WHERE gm_event = 'ev-q1'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(status, "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_let_go_by_its_holder_is_taken_at_once_and_only_at_its_epoch() {
    let pg = Postgres::start();
    let pool = nimmer_compositor::connect(&pg.url, 4).await.unwrap();
    let c = Config::embedded();
    let t = EventCatalog::embedded(&c).unwrap().events["market-quarrel"].clone();
    let values: BTreeMap<String, String> = [("player".to_string(), "p1".to_string())].into();
    let ttl = Duration::from_secs(600);
    let a = Register::new(pool.clone(), "market", "gm-a", ttl);
    let b = Register::new(pool.clone(), "market", "gm-b", ttl);
    let lease = a
        .open("ev-r1", &t.name, "market", &values, &Progress::open(&t))
        .await
        .unwrap()
        .unwrap();
    assert!(
        b.take_expired(10).await.unwrap().is_empty(),
        "a held lease is not taken"
    );
    assert!(
        !b.release_event("ev-r1", lease.epoch).await.unwrap(),
        "only its holder lets it go"
    );
    assert!(
        !a.release_event("ev-r1", lease.epoch + 1).await.unwrap(),
        "only at its epoch"
    );
    assert!(a.release_event("ev-r1", lease.epoch).await.unwrap());
    let taken = b.take_expired(10).await.unwrap();
    assert_eq!(taken.len(), 1, "taken without waiting for the TTL");
    assert_eq!(taken[0].epoch, lease.epoch + 1);
}

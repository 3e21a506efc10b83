//! GM shard loops against a real nats-server and PostgreSQL, with a compositor, and the gateway faked on its
//! NATS subjects (every line "answer to <key>", every gate "ok", every branch "0"). Events opened on
//! `nimmerverse.gm.<shard>.open` run on the shard the map names; a rumour completing in the docks shard opens
//! its inquiry in the guild shard (the cross-shard message); completed events leave no register rows, no
//! directors and no consumers behind; a director whose gateway refuses for a while resumes once it answers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use nimmer_config::{Config, EventCatalog, GmFile};
use nimmer_gm::{NatsServices, Register, Shard, Templates};
use nimmer_services::{NatsServer, Postgres};
use nimmer_wire::gm::{OpenEvent, Opened, raised_event_id};
use serde_json::{Value, json};

/// The gateway, faked on `nimmerverse.gateway.>`: requests of events in `held` wait until it is cleared.
#[derive(Clone, Default)]
struct FakeGateway {
    held: Arc<Mutex<Vec<String>>>,
    asked: Arc<Mutex<Vec<String>>>,
    /// While set, every request is refused with a 503 (a gateway whose tiers are down); counts refusals.
    down: Arc<std::sync::atomic::AtomicBool>,
    refused: Arc<std::sync::atomic::AtomicUsize>,
}

impl FakeGateway {
    async fn serve(self, client: async_nats::Client) {
        let mut sub = client
            .queue_subscribe("nimmerverse.gateway.>", "nimmer-gateway".into())
            .await
            .unwrap();
        while let Some(msg) = sub.next().await {
            let (me, client) = (self.clone(), client.clone());
            tokio::spawn(async move {
                let req: Value = serde_json::from_slice(&msg.payload).unwrap();
                let uid = req["uid"].as_str().unwrap().to_string();
                while me.held.lock().unwrap().iter().any(|h| uid.starts_with(h)) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if me.down.load(std::sync::atomic::Ordering::SeqCst) {
                    me.refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let refusal =
                        json!({ "error": "the driver tier is not available", "status": 503 });
                    let _ = client
                        .publish(msg.reply.unwrap(), refusal.to_string().into())
                        .await;
                    return;
                }
                me.asked.lock().unwrap().push(uid);
                let key = req["idempotency_key"].as_str().unwrap();
                let answer = match req["classifier"].as_str() {
                    Some(c) => {
                        let label = match c {
                            "ternary-gate" => "0",
                            "trait-salience" => "sailor",
                            _ => "ok",
                        };
                        json!({ "text": "", "tier": "saturn", "classification": {
                            "label": label, "scores": {}, "latency_ms": 1.0 } })
                    }
                    None => json!({ "text": format!("answer to {key}"), "tier": "driver" }),
                };
                client
                    .publish(msg.reply.unwrap(), answer.to_string().into())
                    .await
                    .unwrap();
            });
        }
    }
}

/// A compositor in this process: the sender that stops it, and its task.
fn compositor(
    pg: &str,
    client: &async_nats::Client,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<nimmer_compositor::Result<()>>,
) {
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let (url, client) = (pg.to_string(), client.clone());
    let task = tokio::spawn(async move {
        nimmer_compositor::serve(
            nimmer_config::TransportFile::embedded(),
            &url,
            client,
            async {
                let _ = rx.await;
            },
        )
        .await
    });
    (stop, task)
}

fn templates() -> Arc<Templates> {
    let mut map = GmFile::embedded();
    map.lease.ttl_ms = 1000;
    map.lease.renew_ms = 300;
    map.lease.takeover_ms = 100;
    Arc::new(Templates {
        catalog: EventCatalog::embedded(&Config::embedded()).unwrap(),
        map,
    })
}

/// One shard loop as its own "process" (its own NATS connection and owner name); stops when `stop` drops.
async fn shard(
    nats: &str,
    pool: &sqlx::PgPool,
    tm: &Arc<Templates>,
    name: &str,
    owner: &str,
) -> tokio::sync::oneshot::Sender<()> {
    let client = async_nats::connect(nats).await.unwrap();
    let svc = Arc::new(NatsServices::new(client.clone(), Duration::from_secs(30)));
    let reg = Register::new(pool.clone(), name, owner, tm.map.ttl());
    let loop_ = Shard {
        name: name.into(),
        reg,
        svc,
        templates: tm.clone(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        loop_
            .serve(client, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap()
    });
    stop
}

async fn open(client: &async_nats::Client, tm: &Templates, req: &OpenEvent) -> Opened {
    let shard = tm.route(req).unwrap();
    let subject = nimmer_wire::subjects::gm_open(&shard);
    for _ in 0..100 {
        // The shard loops subscribe as they start: no responders until then.
        if let Ok(reply) = client
            .request(subject.clone(), serde_json::to_vec(req).unwrap().into())
            .await
        {
            let v: Value = serde_json::from_slice(&reply.payload).unwrap();
            return serde_json::from_value(v.clone()).unwrap_or_else(|_| panic!("{v}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nobody serves {subject}")
}

fn req(template: &str, values: &[(&str, &str)]) -> OpenEvent {
    OpenEvent {
        template: template.into(),
        gm_event: None,
        district: None,
        zone: None,
        values: values
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

async fn completed(pool: &sqlx::PgPool, gm_event: &str) {
    for _ in 0..600 {
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM events WHERE gm_event = $1")
                .bind(gm_event)
                .fetch_optional(pool)
                .await
                .unwrap();
        if status.as_deref() == Some("completed") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{gm_event} did not complete within 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_run_on_their_shards_and_a_rumour_opens_its_inquiry_on_the_guild_shard() {
    let nats = NatsServer::start();
    let pg = Postgres::start();
    let pool = nimmer_compositor::connect(&pg.url, 8).await.unwrap();
    let client = async_nats::connect(&nats.url).await.unwrap();
    let (stop_compositor, compositor) = compositor(&pg.url, &client);
    let gateway = FakeGateway::default();
    tokio::spawn(gateway.clone().serve(client.clone()));
    let tm = templates();
    let _shards = [
        shard(&nats.url, &pool, &tm, "docks", "docks-a").await,
        shard(&nats.url, &pool, &tm, "market", "market-a").await,
        shard(&nats.url, &pool, &tm, "guild", "guild-a").await,
    ];

    let quarrel = open(&client, &tm, &req("market-quarrel", &[("player", "p1")])).await;
    assert_eq!((quarrel.shard.as_str(), quarrel.opened), ("market", true));
    // The rumour's inquiry is held at the fake gateway, so its register row can be seen while it runs.
    let mut rumour = req(
        "faction-rumour",
        &[("player", "p2"), ("rumour", "short weights")],
    );
    rumour.gm_event = Some("ev-rumour1".into());
    rumour.zone = Some("docks-tavern".into());
    let inquiry = raised_event_id("ev-rumour1", "inquiry");
    gateway.held.lock().unwrap().push(format!("{inquiry}/"));
    let r = open(&client, &tm, &rumour).await;
    assert_eq!(
        (r.gm_event.as_str(), r.shard.as_str(), r.opened),
        ("ev-rumour1", "docks", true)
    );
    // Opening the same id again opens nothing.
    let again = open(&client, &tm, &rumour).await;
    assert!(!again.opened, "{again:?}");
    completed(&pool, "ev-rumour1").await;
    let row: (String, String) = loop {
        if let Some(row) = sqlx::query_as("SELECT shard, owner FROM directors WHERE gm_event = $1")
            .bind(&inquiry)
            .fetch_optional(&pool)
            .await
            .unwrap()
        {
            break row;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        row,
        ("guild".into(), "guild-a".into()),
        "the inquiry runs on the guild shard"
    );
    gateway.held.lock().unwrap().clear();
    completed(&pool, &inquiry).await;
    completed(&pool, &quarrel.gm_event).await;

    // Each slot one canon row; the inquiry quotes the rumour's line; the rumour's lines are in its zone.
    let canon: Vec<(String, String, String, String)> =
        sqlx::query_as("SELECT gm_event, slot, text, zone FROM canon ORDER BY gm_event, slot")
            .fetch_all(&pool)
            .await
            .unwrap();
    let mut per_slot = BTreeMap::new();
    for (e, slot, text, zone) in &canon {
        assert!(
            per_slot
                .insert((e.clone(), slot.clone()), text.clone())
                .is_none(),
            "{e}/{slot} twice"
        );
        if e == "ev-rumour1" {
            assert_eq!(zone, "docks-tavern");
        }
    }
    assert_eq!(
        per_slot[&("ev-rumour1".to_string(), "telling".to_string())],
        "answer to ev-rumour1/docks/whisper/telling#1"
    );
    assert!(
        per_slot.contains_key(&(inquiry.clone(), "question".to_string())),
        "{per_slot:?}"
    );
    let asked = gateway.asked.lock().unwrap().clone();
    assert!(
        asked
            .iter()
            .any(|u| u.starts_with(&format!("{inquiry}/guildhall/questioning/"))),
        "{asked:?}"
    );

    // Nothing is left behind: no register rows, no director tasks, no consumers but the compositors'.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM directors")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    let js = async_nats::jetstream::new(client.clone());
    let mut names = js.get_stream("RESULTS").await.unwrap().consumer_names();
    let mut consumers = Vec::new();
    while let Some(n) = names.next().await {
        consumers.push(n.unwrap());
    }
    assert_eq!(consumers, ["compositors"]);
    let _ = stop_compositor.send(());
    compositor.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_holds_a_thousand_open_events_and_completes_them_all() {
    const N: usize = 1000;
    let nats = NatsServer::start();
    let pg = Postgres::start();
    let pool = nimmer_compositor::connect(&pg.url, 8).await.unwrap();
    let client = async_nats::connect(&nats.url).await.unwrap();
    let (stop_compositor, compositor) = compositor(&pg.url, &client);
    let gateway = FakeGateway::default();
    gateway.held.lock().unwrap().push("ev-k".into());
    tokio::spawn(gateway.clone().serve(client.clone()));
    let tm = templates();
    let _market = shard(&nats.url, &pool, &tm, "market", "market-a").await;
    // All open at once, every director waiting on its first line at the (held) gateway.
    let opens = futures::future::join_all((0..N).map(|i| {
        let (client, tm) = (client.clone(), tm.clone());
        async move {
            let mut r = req("market-quarrel", &[("player", "p1")]);
            r.gm_event = Some(format!("ev-k{i}"));
            open(&client, &tm, &r).await
        }
    }))
    .await;
    assert!(opens.iter().all(|o| o.opened), "every open was taken");
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM directors WHERE owner = 'market-a'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(held, N as i64, "one process holds them all");
    gateway.held.lock().unwrap().clear();
    for _ in 0..1200 {
        let open: i64 = sqlx::query_scalar("SELECT count(*) FROM directors")
            .fetch_one(&pool)
            .await
            .unwrap();
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let completed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE status = 'completed'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(completed, N as i64);
    // Every quarrel: the accusation, the retort (the fake branch label "0" ends it there).
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM canon")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 2 * N as i64);
    let _ = stop_compositor.send(());
    compositor.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_director_whose_gateway_is_down_retries_and_completes_once_it_is_back() {
    use std::sync::atomic::Ordering;
    let nats = NatsServer::start();
    let pg = Postgres::start();
    let pool = nimmer_compositor::connect(&pg.url, 4).await.unwrap();
    let client = async_nats::connect(&nats.url).await.unwrap();
    let (stop_compositor, compositor) = compositor(&pg.url, &client);
    let gateway = FakeGateway::default();
    gateway.down.store(true, Ordering::SeqCst);
    tokio::spawn(gateway.clone().serve(client.clone()));
    let tm = templates();
    let _market = shard(&nats.url, &pool, &tm, "market", "market-a").await;
    let mut r = req("market-quarrel", &[("player", "p1")]);
    r.gm_event = Some("ev-down1".into());
    assert!(open(&client, &tm, &r).await.opened);
    // The director is refused, waits, resumes from the register and is refused again.
    while gateway.refused.load(Ordering::SeqCst) < 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let open_events: i64 = sqlx::query_scalar("SELECT count(*) FROM directors")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        open_events, 1,
        "the event stays open while its gateway is down"
    );
    gateway.down.store(false, Ordering::SeqCst);
    completed(&pool, "ev-down1").await;
    let rows: Vec<String> =
        sqlx::query_scalar("SELECT slot FROM canon WHERE gm_event = 'ev-down1' ORDER BY slot")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows, ["accusation", "retort"]);
    let _ = stop_compositor.send(());
    compositor.await.unwrap().unwrap();
}

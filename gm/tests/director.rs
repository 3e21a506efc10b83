//! Directors against a real PostgreSQL register, with the gateway and RESULTS faked: gates, branches, and a
//! director that dies mid-event taken over by another process of its shard, every slot published once; an
//! event raised on another shard as its event completes, under the same id whoever raises it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nimmer_config::{Config, EventCatalog, GmFile};
use nimmer_gm::director::{self, Ask, Finished, Services, slot_result_id};
use nimmer_gm::{GmError, Progress, Register, Templates};
use nimmer_services::Postgres;
use nimmer_wire::dialog::{DialogResponse, DialogResult, Uid};
use nimmer_wire::gm::{OpenEvent, Opened};

/// Answers by key (the same key always gets the same answer, as the gateway's idempotency does), labels by
/// rule, records what is published and makes it canon the way a compositor would (one row per result id);
/// fails every ask after `fail_after` asks (a director that dies).
struct Fake {
    pool: sqlx::PgPool,
    asks: AtomicUsize,
    fail_after: usize,
    reject: BTreeSet<String>,
    branch: String,
    /// Every gate classification fails (a director that dies between asking a line and gating it).
    gates_fail: bool,
    published: Mutex<Vec<DialogResult>>,
    /// Open requests sent to other shards, with the shard.
    raised: Mutex<Vec<(String, OpenEvent)>>,
}

impl Fake {
    fn new(pool: &sqlx::PgPool, fail_after: usize, reject: &[&str], branch: &str) -> Self {
        Self {
            pool: pool.clone(),
            asks: AtomicUsize::new(0),
            fail_after,
            reject: reject.iter().map(|s| s.to_string()).collect(),
            branch: branch.into(),
            gates_fail: false,
            published: Mutex::new(Vec::new()),
            raised: Mutex::new(Vec::new()),
        }
    }
}

impl Services for Fake {
    async fn ask(&self, ask: &Ask<'_>) -> nimmer_gm::Result<DialogResponse> {
        if self.asks.fetch_add(1, Ordering::SeqCst) >= self.fail_after {
            return Err(GmError::Service("the director died".into()));
        }
        Ok(serde_json::from_value(serde_json::json!({
            "text": format!("answer to {}", ask.key), "tier": "driver",
        }))
        .unwrap())
    }
    async fn classify(
        &self,
        uid: &Uid,
        _zone: &str,
        key: &str,
        classifier: &str,
        input: &str,
    ) -> nimmer_gm::Result<String> {
        if uid.slot.ends_with("-branch") {
            return Ok(self.branch.clone());
        }
        if self.gates_fail {
            return Err(GmError::Service("the director died".into()));
        }
        assert_eq!(classifier, "audit-overseer");
        assert!(input.starts_with("answer to "), "{input}");
        let attempt = key.rsplit('#').next().unwrap();
        let slot = uid.slot.trim_end_matches("-gate");
        Ok(if self.reject.contains(&format!("{slot}#{attempt}")) {
            "meta".into()
        } else {
            "ok".into()
        })
    }
    async fn open(&self, shard: &str, req: &OpenEvent) -> nimmer_gm::Result<Opened> {
        self.raised
            .lock()
            .unwrap()
            .push((shard.to_string(), req.clone()));
        Ok(Opened {
            gm_event: req.gm_event.clone().unwrap(),
            shard: shard.into(),
            opened: true,
        })
    }
    async fn publish(&self, result: &DialogResult) -> nimmer_gm::Result<()> {
        self.published.lock().unwrap().push(result.clone());
        let u = &result.uid;
        sqlx::query(
            "INSERT INTO canon (canon_uid, result_id, gm_event, district, scene, slot, seq, zone, kind, tier,
                                text, participants, adapters, finished_at)
             SELECT $1 || '/' || $2, $2, $3, $4, $5, $6,
                    (SELECT coalesce(max(seq), 0) + 1 FROM canon WHERE gm_event = $3 AND district = $4
                                                                 AND scene = $5),
                    $7, 'dialog', 'driver', $8, '{}', '{}', now()
             ON CONFLICT (result_id) DO NOTHING",
        )
        .bind(u.to_string())
        .bind(&result.result_id)
        .bind(&u.gm_event)
        .bind(&u.district)
        .bind(&u.scene)
        .bind(&u.slot)
        .bind(&result.zone)
        .bind(&result.response.text)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

fn templates() -> Templates {
    Templates {
        catalog: EventCatalog::embedded(&Config::embedded()).unwrap(),
        map: GmFile::embedded(),
    }
}

fn values(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Published slot -> text (one entry per result id).
fn canon(f: &Fake) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for r in f.published.lock().unwrap().iter() {
        assert_eq!(r.result_id, slot_result_id(&r.uid));
        if let Some(prev) = out.insert(r.uid.slot.clone(), r.response.text.clone()) {
            assert_eq!(prev, r.response.text, "a repeat publishes the same line");
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_director_walks_gates_and_a_branch_and_publishes_only_accepted_lines() {
    let pg = Postgres::start();
    let pool = nimmer_compositor::connect(&pg.url, 4).await.unwrap();
    let tm = templates();
    let t = tm.template("market-quarrel").unwrap().clone();
    let v = values(&[("player", "p1")]);
    let reg = Register::new(pool.clone(), "market", "gm-a", Duration::from_secs(30));
    let lease = reg
        .open("ev-m1", &t.name, "market", &v, &Progress::open(&t))
        .await
        .unwrap()
        .unwrap();
    // The accusation's first line is rejected by the overseer; the retort reads as hostile: a brawl.
    let fake = Fake::new(&pool, usize::MAX, &["accusation#1"], "-1");
    let end = director::run(&fake, &reg, &tm, lease).await.unwrap();
    let Finished::Completed(progress) = end else {
        panic!("{end:?}")
    };
    assert_eq!(progress.scenes.len(), 2, "the quarrel and the brawl ran");
    let lines = canon(&fake);
    assert_eq!(
        lines.keys().collect::<Vec<_>>(),
        ["accusation", "guard", "retort"]
    );
    assert_eq!(
        lines["accusation"],
        "answer to ev-m1/market/quarrel/accusation#2"
    );
    let r = fake.published.lock().unwrap()[0].clone();
    assert_eq!(r.participants, ["p1"]);
    assert_eq!(r.npc.as_ref().unwrap().id, "fishmonger-greta");
    assert_eq!(r.zone, "market");
    assert_eq!(
        reg.open_events().await.unwrap(),
        0,
        "completion prunes the register"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_director_that_dies_mid_event_is_taken_over_and_every_slot_is_published_once() {
    let pg = Postgres::start();
    let pool = nimmer_compositor::connect(&pg.url, 4).await.unwrap();
    let tm = templates();
    let t = tm.template("harbour-arrival").unwrap().clone();
    let v = values(&[("ship", "Gull"), ("player", "p7")]);
    let ttl = Duration::from_secs(1);
    let a = Register::new(pool.clone(), "docks", "gm-a", ttl);
    let b = Register::new(pool.clone(), "docks", "gm-b", ttl);
    let lease = a
        .open("ev-h1", &t.name, "docks", &v, &Progress::open(&t))
        .await
        .unwrap()
        .unwrap();
    // A asks three lines (hail, gossip, then reply), then dies on its fourth ask.
    let fa = Fake::new(&pool, 3, &[], "0");
    let err = director::run(&fa, &a, &tm, lease).await.unwrap_err();
    assert!(err.to_string().contains("died"), "{err}");
    let before = canon(&fa);
    assert!(!before.is_empty(), "A published some slots before it died");
    // A no longer renews; B takes the event over with A's recorded progress and finishes it.
    let mut taken = Vec::new();
    for _ in 0..100 {
        taken = b.take_expired(10).await.unwrap();
        if !taken.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lease = taken.pop().expect("B took the event");
    assert!(
        !lease.progress.lines.is_empty(),
        "B resumes from A's progress"
    );
    let fb = Fake::new(&pool, usize::MAX, &[], "0");
    let end = director::run(&fb, &b, &tm, lease).await.unwrap();
    assert!(matches!(end, Finished::Completed(_)), "{end:?}");
    // Every slot exactly once across both directors (by result id), each with its first attempt's answer.
    let mut all = canon(&fa);
    for (slot, text) in canon(&fb) {
        assert!(
            !all.contains_key(&slot),
            "{slot} published by both directors"
        );
        all.insert(slot, text);
    }
    assert_eq!(
        all.keys().collect::<Vec<_>>(),
        ["gossip", "hail", "inspection", "reply"]
    );
    for (slot, text) in &all {
        assert!(text.ends_with(&format!("/{slot}#1")), "{slot}: {text}");
    }
    assert_eq!(b.open_events().await.unwrap(), 0);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM canon WHERE gm_event = 'ev-h1'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 4, "one canon row per slot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_asked_by_a_dead_director_and_accepted_by_its_successor_is_published() {
    let pg = Postgres::start();
    let pool = nimmer_compositor::connect(&pg.url, 4).await.unwrap();
    let tm = templates();
    let t = tm.template("harbour-arrival").unwrap().clone();
    let v = values(&[("ship", "Gull"), ("player", "p7")]);
    let ttl = Duration::from_secs(1);
    let a = Register::new(pool.clone(), "docks", "gm-a", ttl);
    let b = Register::new(pool.clone(), "docks", "gm-b", ttl);
    let lease = a
        .open("ev-h2", &t.name, "docks", &v, &Progress::open(&t))
        .await
        .unwrap()
        .unwrap();
    // A asks the hail (gated) and the gossip, records the hail as waiting for its gate, and dies gating it.
    let mut fa = Fake::new(&pool, usize::MAX, &[], "0");
    fa.gates_fail = true;
    assert!(director::run(&fa, &a, &tm, lease).await.is_err());
    assert_eq!(canon(&fa).keys().collect::<Vec<_>>(), ["gossip"]);
    let mut taken = Vec::new();
    for _ in 0..100 {
        taken = b.take_expired(10).await.unwrap();
        if !taken.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lease = taken.pop().expect("B took the event");
    let fb = Fake::new(&pool, usize::MAX, &[], "0");
    let end = director::run(&fb, &b, &tm, lease).await.unwrap();
    assert!(matches!(end, Finished::Completed(_)), "{end:?}");
    // B's gate accepted A's hail: B publishes it (asked again under A's key), with A's text.
    let hail = canon(&fb)["hail"].clone();
    assert_eq!(hail, "answer to ev-h2/docks/berth/hail#1");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM canon WHERE gm_event = 'ev-h2'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 4, "one canon row per slot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_rumour_raises_an_inquiry_on_the_guild_shard_under_one_id() {
    let pg = Postgres::start();
    let pool = nimmer_compositor::connect(&pg.url, 4).await.unwrap();
    let tm = templates();
    let t = tm.template("faction-rumour").unwrap().clone();
    let v = values(&[
        ("player", "p3"),
        ("rumour", "the guild sells short weights"),
    ]);
    let reg = Register::new(pool.clone(), "docks", "gm-a", Duration::from_secs(30));
    let mut raised = Vec::new();
    for id in ["ev-r1", "ev-r2"] {
        let lease = reg
            .open(id, &t.name, "docks", &v, &Progress::open(&t))
            .await
            .unwrap()
            .unwrap();
        let fake = Fake::new(&pool, usize::MAX, &[], "0");
        let end = director::run(&fake, &reg, &tm, lease.clone())
            .await
            .unwrap();
        assert!(matches!(end, Finished::Completed(_)), "{end:?}");
        let r = fake.raised.lock().unwrap().clone();
        assert_eq!(r.len(), 1, "{r:?}");
        let (shard, req) = &r[0];
        assert_eq!(
            shard, "guild",
            "the map routes the inquiry to the guild's shard"
        );
        assert_eq!(req.template, "guild-inquiry");
        assert_eq!(req.values["player"], "p3");
        assert_eq!(
            req.values["rumour"],
            canon(&fake)["telling"],
            "it carries the line told"
        );
        raised.push(req.gm_event.clone().unwrap());
    }
    assert_ne!(raised[0], raised[1], "each rumour raises its own inquiry");
    assert_eq!(
        raised[0],
        nimmer_wire::gm::raised_event_id("ev-r1", "inquiry"),
        "the id derives from the raising event: a respawned director raises the same one"
    );
}

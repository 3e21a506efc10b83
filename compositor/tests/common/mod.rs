//! Shared by the compositor tests: a PostgreSQL + nats-server pair, compositor processes as tasks, result
//! builders, stream readers.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use nimmer_config::TransportFile;
use nimmer_services::{NatsServer, Postgres};
use serde_json::json;

pub fn transport() -> TransportFile {
    let mut t = TransportFile::embedded();
    t.results.ack_wait_s = 2;
    t.relay.poll_ms = 100;
    t
}

pub struct Stack {
    pub pg: Postgres,
    pub nats: NatsServer,
    pub t: TransportFile,
}

/// A running compositor process (as a task); `stop` ends it gracefully, `kill` aborts it mid-work.
pub struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<nimmer_compositor::Result<()>>,
}

impl Running {
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
    pub fn kill(self) {
        self.task.abort();
    }
}

impl Stack {
    pub fn start() -> Self {
        Self {
            pg: Postgres::start(),
            nats: NatsServer::start(),
            t: transport(),
        }
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(&self.nats.url)
            .await
            .unwrap()
    }

    /// Starts a compositor and waits until the shared consumer exists.
    pub async fn compositor(&self) -> Running {
        let client = self.client().await;
        let js = jetstream::new(client.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (t, url) = (self.t.clone(), self.pg.url.clone());
        let task = tokio::spawn(async move {
            nimmer_compositor::serve(t, &url, client, async {
                let _ = rx.await;
            })
            .await
        });
        for _ in 0..200 {
            if let Ok(s) = js.get_stream("RESULTS").await
                && s.consumer_info("compositors").await.is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Running {
            stop: Some(tx),
            task,
        }
    }
}

pub fn result(id: &str, scene: &str, slot: u32, participants: &[&str]) -> serde_json::Value {
    json!({
        "result_id": id,
        "uid": { "gm_event": "ev1", "district": "docks", "scene": scene, "slot": format!("s{slot}") },
        "zone": "docks-3", "kind": "dialog",
        "npc": { "id": "brannoch", "traits": {} },
        "participants": participants, "faction": "dockers",
        "finished_at_ms": now_ms() + slot as u64,
        "response": { "text": format!("line {slot}"), "tier": "driver", "adapters": ["sailor@v1"], "extra": 1 },
    })
}

/// Now, in Unix milliseconds (results must be recent: player stores prune old rows).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

pub async fn publish(js: &jetstream::Context, scene: &str, v: &serde_json::Value, msg_id: &str) {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", msg_id);
    js.publish_with_headers(
        format!("nimmerverse.results.ev1.docks.{scene}"),
        h,
        serde_json::to_vec(v).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// Messages on `stream` (optionally filtered) from its start, until `n` arrived or `wait` passed.
pub async fn read_all(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    n: usize,
    wait: Duration,
) -> Vec<jetstream::Message> {
    let s = js.get_stream(stream).await.unwrap();
    let c = s
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::All,
            filter_subject: filter.to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut msgs = c.messages().await.unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, msgs.next()).await {
            Ok(Some(Ok(m))) => out.push(m),
            Ok(Some(Err(e))) => panic!("{e}"),
            _ => break,
        }
    }
    out
}

/// Polls `f` every 50 ms until it holds or `secs` pass.
pub async fn eventually<F: std::future::Future<Output = bool>>(
    secs: u64,
    mut f: impl FnMut() -> F,
) -> bool {
    for _ in 0..secs * 20 {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// How a [`Follower`] gets its rows: its JetStream feed, or pushed by its district's distributor.
#[derive(Clone, Copy)]
pub enum Delivery {
    Feed,
    District,
}

/// A player client following its rows in a task; [`Follower::stop`] ends it and returns how many new rows
/// it applied.
pub struct Follower {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<usize>,
    gaps: std::sync::Arc<std::sync::Mutex<Vec<nimmer_compositor::Gap>>>,
}

impl Follower {
    pub async fn start(stack: &Stack, player: &'static str, db: &Path, delivery: Delivery) -> Self {
        let client = stack.client().await;
        let t = stack.t.clone();
        let db = db.to_path_buf();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let gaps = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = gaps.clone();
        let task = tokio::spawn(async move {
            let store = nimmer_compositor::PlayerStore::open(&db).await.unwrap();
            let mut applied = 0;
            let stopped = async {
                let _ = rx.await;
            };
            let count = |a: &nimmer_compositor::player::Applied| {
                applied += a.new.len();
                seen.lock().unwrap().extend(a.gap.clone());
            };
            match delivery {
                Delivery::Feed => {
                    let js = jetstream::new(client);
                    nimmer_compositor::follow(&js, &t, player, &store, stopped, count).await
                }
                Delivery::District => {
                    nimmer_compositor::follow_district(&client, &t, player, &store, stopped, count)
                        .await
                }
            }
            .unwrap();
            store.close().await;
            applied
        });
        Self { stop, task, gaps }
    }

    /// The gaps reported so far.
    pub fn gaps(&self) -> Vec<nimmer_compositor::Gap> {
        self.gaps.lock().unwrap().clone()
    }

    pub async fn stop(self) -> usize {
        assert!(self.stop.send(()).is_ok(), "the follower already ended");
        self.task.await.unwrap()
    }
}

/// Canon rows in the player store at `db`.
pub async fn count(db: &Path) -> u64 {
    let s = nimmer_compositor::PlayerStore::open(db).await.unwrap();
    let n = s.count().await.unwrap();
    s.close().await;
    n
}

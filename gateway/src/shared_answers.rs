//! Answers shared across gateways: a dialog's first answer kept in a JetStream KV bucket under its result id,
//! so a repeat sent to another gateway gets it too, waiting while the first still runs there. The gateway that
//! creates the key owns the dialog and keeps its claim alive with a heartbeat; a repeat elsewhere watches the
//! key until the answer is put (it answers with it), the key is deleted (the first failed: it claims the key
//! and runs), or no heartbeat comes within [`LEASE`] (the owner died: it takes the key over by revision and
//! runs). Without NATS (disconnected, or no answer within 500 ms), or before the bucket exists, each gateway
//! answers repeats from its own store alone (`idempotency.rs`, whose tickets hold these leases); canon keeps
//! one row either way (the result id is the same).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;

use crate::api::DialogResponse;

/// The bucket (stream `KV_NIMMER_ANSWERS`).
pub const BUCKET: &str = "NIMMER_ANSWERS";
/// A running dialog's value: an answer is JSON, so never this.
const RUNNING: &[u8] = b"running";
/// An owner refreshes its claim this often...
const BEAT: Duration = Duration::from_secs(1);
/// ...and a claim not refreshed for this long is taken over (its gateway is gone).
pub const LEASE: Duration = Duration::from_secs(5);
/// Longest a claim waits for the bucket to answer: past it (NATS slow or away) the gateway answers alone.
const CLAIM_TIMEOUT: Duration = Duration::from_millis(500);

/// The bucket, once it exists.
#[derive(Clone)]
pub struct SharedAnswers {
    store: Arc<OnceLock<Arc<kv::Store>>>,
    client: async_nats::Client,
}

/// What a shared claim found.
pub enum Shared {
    /// This gateway runs the dialog; the lease puts its answer (or frees the key when dropped unanswered).
    Owner(Lease),
    /// Another gateway answered it.
    Answer(Arc<DialogResponse>),
    /// The bucket cannot be used now: answer from this gateway alone.
    Unavailable(String),
}

/// The right to answer a result id across gateways, kept alive by a heartbeat until finished or dropped.
pub struct Lease {
    store: Arc<kv::Store>,
    key: String,
    beat: tokio::task::JoinHandle<()>,
    finished: bool,
}

impl SharedAnswers {
    /// Creates (or opens) the bucket in the background, retrying until JetStream answers; answers older than
    /// `window` expire, and it keeps `replicas` copies.
    pub fn start(client: async_nats::Client, window: Duration, replicas: usize) -> Self {
        let shared = Self {
            store: Default::default(),
            client: client.clone(),
        };
        let store = shared.store.clone();
        tokio::spawn(async move {
            let js = jetstream::new(client);
            let config = kv::Config {
                bucket: BUCKET.into(),
                history: 1,
                max_age: window,
                storage: jetstream::stream::StorageType::Memory,
                num_replicas: replicas,
                ..Default::default()
            };
            let mut backoff = Duration::from_millis(200);
            loop {
                match js.create_key_value(config.clone()).await {
                    Ok(s) => {
                        let _ = store.set(Arc::new(s));
                        return;
                    }
                    Err(e) => match js.get_key_value(BUCKET).await {
                        Ok(s) => {
                            let _ = store.set(Arc::new(s));
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(error = %e, retry_in = ?backoff, "shared answers: bucket not ready");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    },
                }
            }
        });
        shared
    }

    /// Whether the bucket exists (until then repeats are answered per gateway).
    pub fn ready(&self) -> bool {
        self.store.get().is_some()
    }

    /// Claims `key` (a result id) across gateways: this gateway runs it, or another's answer.
    pub async fn claim(&self, key: &str) -> Shared {
        let Some(store) = self.store.get() else {
            return Shared::Unavailable("the answers bucket is not ready".into());
        };
        loop {
            if self.client.connection_state() != async_nats::connection::State::Connected {
                return Shared::Unavailable("not connected to NATS".into());
            }
            match tokio::time::timeout(CLAIM_TIMEOUT, store.create(key, RUNNING.into())).await {
                Ok(Ok(rev)) => return Shared::Owner(Lease::start(store.clone(), key, rev)),
                Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Ok(Err(e)) => return Shared::Unavailable(e.to_string()),
                Err(_) => {
                    return Shared::Unavailable("the answers bucket did not answer in time".into());
                }
            }
            match wait(store, key).await {
                Ok(Waited::Answer(a)) => return Shared::Answer(a),
                Ok(Waited::Freed) => continue,
                Ok(Waited::Stale(rev)) => {
                    if let Ok(rev) = store.update(key, RUNNING.into(), rev).await {
                        tracing::warn!(
                            key,
                            "shared answers: the gateway running this dialog stopped answering; running it here"
                        );
                        return Shared::Owner(Lease::start(store.clone(), key, rev));
                    }
                }
                Err(e) => return Shared::Unavailable(e),
            }
        }
    }
}

enum Waited {
    Answer(Arc<DialogResponse>),
    /// The key was deleted (the first failed): claim it again.
    Freed,
    /// No heartbeat within the lease, at this revision.
    Stale(u64),
}

/// Watches `key` (currently claimed) until it is answered, freed or goes stale.
async fn wait(store: &kv::Store, key: &str) -> Result<Waited, String> {
    let mut watch = store
        .watch_with_history(key)
        .await
        .map_err(|e| e.to_string())?;
    let mut last = None;
    loop {
        let entry = match tokio::time::timeout(LEASE, watch.next()).await {
            Err(_) => return Ok(last.map_or(Waited::Freed, Waited::Stale)),
            Ok(None) => return Err("the answers watch ended".into()),
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(Some(Ok(e))) => e,
        };
        match entry.operation {
            kv::Operation::Delete | kv::Operation::Purge => return Ok(Waited::Freed),
            kv::Operation::Put if &entry.value[..] == RUNNING => last = Some(entry.revision),
            kv::Operation::Put => {
                return match serde_json::from_slice::<DialogResponse>(&entry.value) {
                    Ok(a) => Ok(Waited::Answer(Arc::new(a))),
                    Err(e) => Err(format!("a stored answer is not one: {e}")),
                };
            }
        }
    }
}

impl Lease {
    fn start(store: Arc<kv::Store>, key: &str, rev: u64) -> Self {
        let (s, k) = (store.clone(), key.to_string());
        let beat = tokio::spawn(async move {
            let mut rev = rev;
            loop {
                tokio::time::sleep(BEAT).await;
                match s.update(&k, RUNNING.into(), rev).await {
                    Ok(r) => rev = r,
                    Err(e) => {
                        tracing::warn!(key = k, error = %e, "shared answers: the claim could not be renewed");
                        return;
                    }
                }
            }
        });
        Self {
            store,
            key: key.to_string(),
            beat,
            finished: false,
        }
    }

    /// Puts the answer for every gateway (in the background: the caller has it already).
    pub fn finish(mut self, answer: &DialogResponse) {
        self.finished = true;
        self.beat.abort();
        let (store, key) = (self.store.clone(), self.key.clone());
        let value = serde_json::to_vec(answer).expect("an answer serializes");
        background(async move {
            if let Err(e) = store.put(&key, value.into()).await {
                tracing::warn!(key, error = %e, "shared answers: storing the answer failed");
            }
        });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.beat.abort();
        if !self.finished {
            // Unanswered (refused, failed): free the key so a repeat anywhere runs afresh.
            let (store, key) = (self.store.clone(), self.key.clone());
            background(async move {
                let _ = store.delete(&key).await;
            });
        }
    }
}

/// Runs `work` on the current runtime, if there still is one (a lease dropped while the runtime shuts down
/// leaves its key to expire: repeats elsewhere take it over after [`LEASE`]).
fn background(work: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(work);
    }
}

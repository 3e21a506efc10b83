//! One shard of a GM process: the loop that owns its events. It answers open requests on
//! `nimmerverse.gm.<shard>.open` (a queue group: one process of the shard opens each event), renews every
//! lease it holds with one statement per period, takes the events whose lease expired (their process died)
//! and runs one director task per held event, resuming a director from the register when a round fails (a
//! gateway or the database away) and forgetting it when it completes or its lease moves on. On shutdown it
//! stops its directors and lets its leases expire at once, so the shard's other processes take its events
//! without waiting for the TTL.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use nimmer_wire::gm::{OpenEvent, Opened};
use serde_json::json;
use tokio::task::JoinSet;

use crate::director::{self, Finished, Services};
use crate::error::Result;
use crate::open::Templates;
use crate::register::{Lease, Register};
use crate::walk::Progress;

/// How a director task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Completed,
    Lost,
}

/// What one shard loop runs with.
pub struct Shard<S> {
    pub name: String,
    pub reg: Register,
    pub svc: Arc<S>,
    pub templates: Arc<Templates>,
}

/// The events this loop directs, by id: the epoch it holds each at, and its task.
type Running = HashMap<String, (i64, tokio::task::AbortHandle)>;

impl<S: Services + Send + Sync + 'static> Shard<S> {
    /// Runs the shard until `shutdown` resolves (or NATS closes the subscription for good).
    pub async fn serve(
        self,
        client: async_nats::Client,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let name = self.name.clone();
        let map = &self.templates.map;
        let mut sub = client
            .queue_subscribe(
                nimmer_wire::subjects::gm_open(&name),
                nimmer_wire::subjects::gm_queue_group(&name),
            )
            .await
            .map_err(|e| crate::GmError::Service(format!("subscribing for shard {name}: {e}")))?;
        let mut renew = tokio::time::interval(Duration::from_millis(map.lease.renew_ms));
        let mut take = tokio::time::interval(Duration::from_millis(map.lease.takeover_ms));
        let max = map.directors.max_per_process;
        let mut tasks: JoinSet<(String, i64, Ended)> = JoinSet::new();
        let mut running: Running = HashMap::new();
        let gauge = metrics::gauge!("nimmer_gm_directors", "shard" => name.clone());
        tracing::info!(shard = %name, "GM shard serving");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = renew.tick() => {
                    if let Err(e) = self.reg.renew().await {
                        tracing::warn!(shard = %name, error = %e, "renewing leases failed (retried next period)");
                    }
                }
                _ = take.tick(), if running.len() < max => {
                    let room = (max - running.len()).min(map.lease.takeover_batch as usize) as i64;
                    match self.reg.take_expired(room).await {
                        Ok(leases) => for lease in leases {
                            tracing::info!(shard = %name, gm_event = %lease.gm_event, epoch = lease.epoch, "took over an event whose lease expired");
                            metrics::counter!("nimmer_gm_takeovers_total", "shard" => name.clone()).increment(1);
                            self.spawn(&mut tasks, &mut running, lease);
                        },
                        Err(e) => tracing::warn!(shard = %name, error = %e, "looking for expired leases failed"),
                    }
                }
                msg = sub.next() => {
                    let Some(msg) = msg else {
                        tracing::error!(shard = %name, "the open subscription closed");
                        break;
                    };
                    let answer = self.open(&msg.payload, &mut tasks, &mut running, max).await;
                    if let Some(reply) = msg.reply
                        && let Err(e) = client.publish(reply, answer.to_string().into()).await {
                        tracing::warn!(shard = %name, error = %e, "answering an open request failed");
                    }
                }
                Some(done) = tasks.join_next_with_id() => match done {
                    Ok((_, (gm_event, epoch, ended))) => {
                        if running.get(&gm_event).is_some_and(|r| r.0 == epoch) {
                            running.remove(&gm_event);
                        }
                        let what = if ended == Ended::Completed { "completed" } else { "lost" };
                        metrics::counter!("nimmer_gm_events_ended_total", "shard" => name.clone(), "how" => what).increment(1);
                    }
                    // A director that panicked (a replaced one was aborted: its entry names the new task).
                    Err(e) => {
                        let gone = running.iter().find(|(_, r)| r.1.id() == e.id()).map(|(k, r)| (k.clone(), r.0));
                        if let Some((gm_event, epoch)) = gone {
                            running.remove(&gm_event);
                            tracing::error!(shard = %name, %gm_event, error = %e, "a director failed; its lease is let go so the shard retries the event");
                            metrics::counter!("nimmer_gm_events_ended_total", "shard" => name.clone(), "how" => "failed").increment(1);
                            if let Err(e) = self.reg.release_event(&gm_event, epoch).await {
                                tracing::warn!(shard = %name, %gm_event, error = %e, "letting the lease go failed: it is taken after the TTL");
                            }
                        }
                    }
                },
            }
            gauge.set(running.len() as f64);
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        gauge.set(0.0);
        match self.reg.release().await {
            Ok(n) => {
                tracing::info!(shard = %name, events = n, "GM shard stopped; its events are free for the shard's other processes")
            }
            Err(e) => {
                tracing::warn!(shard = %name, error = %e, "releasing leases at shutdown failed: other processes take them after the TTL")
            }
        }
        Ok(())
    }

    /// Handles one open request; the answer is [`Opened`] or `{"error", "status"}`.
    async fn open(
        &self,
        payload: &[u8],
        tasks: &mut JoinSet<(String, i64, Ended)>,
        running: &mut Running,
        max: usize,
    ) -> serde_json::Value {
        let error = |status: u16, e: String| json!({ "error": e, "status": status });
        let req: OpenEvent = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => return error(400, format!("not an open request: {e}")),
        };
        if running.len() >= max {
            return error(
                503,
                format!("this process directs {max} events already (directors.max_per_process)"),
            );
        }
        let plan = match self.templates.plan(req) {
            Ok(p) => p,
            Err(crate::OpenError::Invalid { field, why }) => {
                let mut v = error(422, why);
                v["field"] = field.into();
                return v;
            }
            Err(e) => return error(e.status(), e.to_string()),
        };
        let t = &self.templates.catalog.events[&plan.template];
        let opened = self
            .reg
            .open(
                &plan.gm_event,
                &plan.template,
                &plan.district,
                &plan.values,
                &Progress::open(t),
            )
            .await;
        let opened = match opened {
            Ok(Some(lease)) => {
                metrics::counter!("nimmer_gm_events_opened_total", "shard" => self.name.clone())
                    .increment(1);
                tracing::debug!(shard = %self.name, gm_event = %lease.gm_event, template = %lease.template, "opened");
                self.spawn(tasks, running, lease);
                true
            }
            Ok(None) => false,
            Err(e) => return error(503, format!("the register is unavailable: {e}")),
        };
        serde_json::to_value(Opened {
            gm_event: plan.gm_event,
            shard: self.name.clone(),
            opened,
        })
        .unwrap_or_default()
    }

    /// Starts the director of `lease` (replacing one this loop ran under an older epoch).
    fn spawn(
        &self,
        tasks: &mut JoinSet<(String, i64, Ended)>,
        running: &mut Running,
        lease: Lease,
    ) {
        let (gm_event, epoch) = (lease.gm_event.clone(), lease.epoch);
        let (svc, reg, templates) = (self.svc.clone(), self.reg.clone(), self.templates.clone());
        let id = gm_event.clone();
        let handle = tasks.spawn(async move {
            let ended = direct(&*svc, &reg, &templates, lease).await;
            (id, epoch, ended)
        });
        if let Some((_, old)) = running.insert(gm_event, (epoch, handle)) {
            old.abort();
        }
    }
}

/// Runs one director to its end, resuming it from the register after a failed round (doubling the wait up
/// to `retry_max_ms`).
async fn direct<S: Services>(
    svc: &S,
    reg: &Register,
    templates: &Templates,
    mut lease: Lease,
) -> Ended {
    let d = &templates.map.directors;
    let (first, most) = (
        Duration::from_millis(d.retry_ms),
        Duration::from_millis(d.retry_max_ms),
    );
    let mut wait = first;
    loop {
        match director::run(svc, reg, templates, lease.clone()).await {
            Ok(Finished::Completed(_)) => {
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                metrics::histogram!("nimmer_gm_event_seconds", "template" => lease.template.clone())
                    .record((now_ms - lease.opened_ms).max(0) as f64 / 1000.0);
                return Ended::Completed;
            }
            Ok(Finished::Lost) => {
                tracing::info!(gm_event = %lease.gm_event, "another process holds the event now");
                return Ended::Lost;
            }
            Err(e) => {
                metrics::counter!("nimmer_gm_director_errors_total").increment(1);
                tracing::warn!(gm_event = %lease.gm_event, error = %e, retry_in = ?wait, "a director's round failed; resuming from the register");
            }
        }
        loop {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(most);
            match reg.reload(&lease).await {
                Ok(Some(l)) => {
                    lease = l;
                    break;
                }
                Ok(None) => return Ended::Lost,
                Err(e) => {
                    tracing::warn!(gm_event = %lease.gm_event, error = %e, "reading the register failed; retrying")
                }
            }
        }
    }
}

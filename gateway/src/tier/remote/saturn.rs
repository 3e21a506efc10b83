//! Saturn across hosts: a worker serves a [`ClassifierTier`] as the NATS service `nimmer-saturn` (two
//! request/reply endpoints, `nimmer.tier.saturn.classify` and `.embed`, in the service's queue group: any
//! worker answers),
//! publishing its load like the LLM workers; [`NatsSaturn`] is the gateway's [`ClassifierTier`] over such
//! workers. Classification is one short forward pass, so there is no stream and no migration: a request that
//! finds no worker, or whose worker dies before answering, is a clear "down" (503) the caller may retry.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::service::ServiceExt;
use futures::StreamExt;
use futures::future::BoxFuture;
use nimmer_tiers::{Classification, Embedding, TierError};
use serde::{Deserialize, Serialize};

use super::client::Workers;
use super::{DEAD_AFTER, LOAD_EVERY, LoadMsg, RemoteError, load_subject, service_name};
use crate::error::GatewayError;
use crate::tier::{ClassifierTier, Health};

const TIER: &str = "saturn";

/// Where classification requests go.
pub fn classify_subject() -> String {
    format!("nimmer.tier.{TIER}.classify")
}

/// Where embedding requests go.
pub fn embed_subject() -> String {
    format!("nimmer.tier.{TIER}.embed")
}

/// A classification request on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassifyMsg {
    pub classifier: String,
    pub inputs: Vec<String>,
}

/// An embedding request on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbedMsg {
    pub inputs: Vec<String>,
}

/// A request a worker answers.
enum Ask {
    Classify(async_nats::service::Request),
    Embed(async_nats::service::Request),
}

/// How long the gateway waits for a worker's answer (a batch of classifications takes milliseconds; a
/// worker that takes this long is gone or drowning).
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// Serves `saturn` as worker `worker` until `shutdown` resolves.
pub async fn serve(
    client: async_nats::Client,
    worker: &str,
    model: &str,
    saturn: Arc<dyn ClassifierTier>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), GatewayError> {
    let nats_err = |what: &str, e: &dyn std::fmt::Display| GatewayError::Subscribe {
        subject: what.to_string(),
        message: e.to_string(),
    };
    let service = client
        .service_builder()
        .description(format!("nimmer {TIER} tier worker {worker}"))
        .start(service_name(TIER), env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| nats_err(&service_name(TIER), &e))?;
    let classify = service
        .endpoint_builder()
        .name("classify")
        .add(classify_subject())
        .await
        .map_err(|e| nats_err(&classify_subject(), &e))?;
    let embed = service
        .endpoint_builder()
        .name("embed")
        .add(embed_subject())
        .await
        .map_err(|e| nats_err(&embed_subject(), &e))?;
    let mut requests = futures::stream::select(classify.map(Ask::Classify), embed.map(Ask::Embed));
    tracing::info!(worker, subject = %classify_subject(), "Saturn worker serving");
    let in_flight = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn(publish_load(
        client.clone(),
        LoadMsg {
            worker: worker.to_string(),
            tier: TIER.into(),
            in_flight: 0,
            version: env!("CARGO_PKG_VERSION").into(),
            model: model.to_string(),
            engine: None,
            adapters: Vec::new(),
            views: None,
        },
        in_flight.clone(),
    ));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            r = requests.next() => {
                let Some(req) = r else { break };
                let (saturn, in_flight) = (saturn.clone(), in_flight.clone());
                in_flight.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    answer(&*saturn, req).await;
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                });
            }
            _ = &mut shutdown => break,
        }
    }
    load.abort();
    // Unsubscribe and make sure the server has it before returning: a request sent after this worker
    // stopped then finds no responder (a clear "down" at once), not a subscription nobody reads.
    drop(requests);
    let _ = service.stop().await;
    super::barrier(&client).await;
    Ok(())
}

async fn answer(saturn: &dyn ClassifierTier, ask: Ask) {
    fn parsed<M: serde::de::DeserializeOwned>(
        req: &async_nats::service::Request,
        what: &str,
    ) -> Result<M, RemoteError> {
        serde_json::from_slice(&req.message.payload).map_err(|e| RemoteError::Invalid {
            field: "request".into(),
            message: format!("not {what} message: {e}"),
        })
    }
    let tier_err = |e: TierError| RemoteError::from_tier(TIER, &e);
    let (req, result) = match ask {
        Ask::Classify(req) => {
            let r = match parsed::<ClassifyMsg>(&req, "a classify") {
                Ok(m) => saturn
                    .classify(&m.classifier, m.inputs)
                    .await
                    .map_err(tier_err),
                Err(e) => Err(e),
            };
            (req, r.map(|c| serde_json::to_vec(&c).unwrap_or_default()))
        }
        Ask::Embed(req) => {
            let r = match parsed::<EmbedMsg>(&req, "an embed") {
                Ok(m) => saturn.embed(m.inputs).await.map_err(tier_err),
                Err(e) => Err(e),
            };
            (req, r.map(|c| serde_json::to_vec(&c).unwrap_or_default()))
        }
    };
    let reply = result.map(Into::into).map_err(|e| e.to_service());
    if let Err(e) = req.respond(reply).await {
        tracing::warn!(error = %e, "answering a Saturn request failed");
    }
}

async fn publish_load(client: async_nats::Client, mut msg: LoadMsg, in_flight: Arc<AtomicUsize>) {
    let mut every = tokio::time::interval(LOAD_EVERY);
    loop {
        every.tick().await;
        msg.in_flight = in_flight.load(Ordering::Relaxed);
        let body = serde_json::to_vec(&msg).unwrap_or_default();
        if let Err(e) = client.publish(load_subject(TIER), body.into()).await {
            tracing::debug!(error = %e, "publishing load failed");
        }
    }
}

/// Saturn served by NATS workers.
pub struct NatsSaturn {
    client: async_nats::Client,
    workers: Arc<Workers>,
    load_task: tokio::task::JoinHandle<()>,
}

impl Drop for NatsSaturn {
    fn drop(&mut self) {
        self.load_task.abort();
    }
}

impl NatsSaturn {
    pub async fn connect(client: async_nats::Client) -> Result<Arc<Self>, GatewayError> {
        let (workers, _arrivals, load_task) = Workers::follow(&client, TIER).await?;
        Ok(Arc::new(Self {
            client,
            workers,
            load_task,
        }))
    }

    /// Workers heard from within [`DEAD_AFTER`].
    pub fn live_workers(&self) -> Vec<String> {
        self.workers.live()
    }
}

impl ClassifierTier for NatsSaturn {
    fn classify(
        &self,
        classifier: &str,
        inputs: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<Classification>, TierError>> {
        let msg = ClassifyMsg {
            classifier: classifier.to_string(),
            inputs,
        };
        Box::pin(ask(self.client.clone(), classify_subject(), msg))
    }

    fn embed(&self, inputs: Vec<String>) -> BoxFuture<'static, Result<Vec<Embedding>, TierError>> {
        Box::pin(ask(
            self.client.clone(),
            embed_subject(),
            EmbedMsg { inputs },
        ))
    }

    fn workers(&self) -> Vec<String> {
        self.live_workers()
    }

    fn health(&self) -> Health {
        if self.workers.live().is_empty() {
            Health::Down {
                reason: format!(
                    "no {TIER} worker reported within {} s",
                    DEAD_AFTER.as_secs()
                ),
            }
        } else {
            Health::Ready
        }
    }
}

/// One request to any worker on `subject`, its answer parsed; a worker's refusal keeps its status, anything
/// else is "down".
async fn ask<A: Serialize, R: serde::de::DeserializeOwned>(
    client: async_nats::Client,
    subject: String,
    msg: A,
) -> Result<R, TierError> {
    let down = |e: &dyn std::fmt::Display| {
        tracing::warn!(tier = TIER, error = %e, "remote Saturn request failed");
        TierError::EngineDown { tier: TIER.into() }
    };
    let body = serde_json::to_vec(&msg).map_err(|e| down(&e))?;
    let reply = tokio::time::timeout(ANSWER_WITHIN, client.request(subject, body.into()))
        .await
        .map_err(|e| down(&e))?
        .map_err(|e| down(&e))?;
    if let Some(refused) = RemoteError::of_reply(&reply) {
        return Err(refused.unwrap_or_else(|status| down(&status)));
    }
    serde_json::from_slice(&reply.payload).map_err(|e| down(&e))
}

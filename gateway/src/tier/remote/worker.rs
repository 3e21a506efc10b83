//! The worker side: serves one [`LlmTier`] over NATS as the service `nimmer-<tier>` (endpoints `generate`
//! on the tier's shared subject and on the worker's own), streams each sequence to its caller's inbox with
//! heartbeats, drops a sequence on a cancel message, and publishes its load. `nimmer tier` runs it over an
//! in-process engine.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::service::ServiceExt;
use futures::StreamExt;
use nimmer_tiers::{Event, GenerateRequest, Prompt, Share};
use tokio::sync::oneshot;

use super::{
    Accepted, GenerateMsg, HEARTBEAT, LOAD_EVERY, LoadMsg, RemoteError, StreamEvent, StreamMsg,
    generate_subject, load_subject, service_name, worker_subject,
};
use crate::error::GatewayError;
use crate::tier::LlmTier;

/// Sequences being streamed, by request id: dropping the sender cancels the sequence.
type Streams = Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>;

/// Serves `llm` as worker `worker` of `tier` until `shutdown` resolves (then stops taking requests; the
/// sequences in flight are dropped with the process).
pub async fn serve(
    client: async_nats::Client,
    tier: &str,
    worker: &str,
    llm: Arc<dyn LlmTier>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), GatewayError> {
    let nats_err = |what: &str, e: &dyn std::fmt::Display| GatewayError::Subscribe {
        subject: what.to_string(),
        message: e.to_string(),
    };
    let service = client
        .service_builder()
        .description(format!("nimmer {tier} tier worker {worker}"))
        .start(service_name(tier), env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| nats_err(&service_name(tier), &e))?;
    let any = service
        .endpoint_builder()
        .name("generate")
        .add(generate_subject(tier))
        .await
        .map_err(|e| nats_err(&generate_subject(tier), &e))?;
    let mine_subject = worker_subject(tier, worker, "generate");
    let mine = service
        .endpoint_builder()
        .name("generate-direct")
        .add(mine_subject.clone())
        .await
        .map_err(|e| nats_err(&mine_subject, &e))?;
    let cancel_subject = worker_subject(tier, worker, "cancel");
    let mut cancels = client
        .subscribe(cancel_subject.clone())
        .await
        .map_err(|e| nats_err(&cancel_subject, &e))?;
    tracing::info!(tier, worker, subject = %generate_subject(tier), "tier worker serving");
    let streams: Streams = Default::default();
    let load = tokio::spawn(publish_load(
        client.clone(),
        tier.to_string(),
        worker.to_string(),
        streams.clone(),
    ));
    let mut requests = futures::stream::select(any, mine);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            r = requests.next() => {
                let Some(req) = r else { break };
                let ctx = (client.clone(), tier.to_string(), worker.to_string(), llm.clone(), streams.clone());
                tokio::spawn(async move { take(ctx, req).await });
            }
            c = cancels.next() => {
                if let Some(m) = c {
                    let id = String::from_utf8_lossy(&m.payload).to_string();
                    if streams.lock().expect("streams lock").remove(&id).is_some() {
                        tracing::debug!(id, "sequence cancelled by its caller");
                    }
                }
            }
            _ = &mut shutdown => break,
        }
    }
    load.abort();
    let _ = service.stop().await;
    Ok(())
}

type Ctx = (
    async_nats::Client,
    String,
    String,
    Arc<dyn LlmTier>,
    Streams,
);

/// Answers one generate request and, when the tier took it, streams its events.
async fn take((client, tier, worker, llm, streams): Ctx, req: async_nats::service::Request) {
    let msg: GenerateMsg = match serde_json::from_slice(&req.message.payload) {
        Ok(m) => m,
        Err(e) => {
            let err = RemoteError::Invalid {
                field: "request".into(),
                message: format!("not a generate message: {e}"),
            };
            respond_err(&req, &err).await;
            return;
        }
    };
    let deadline = msg
        .deadline_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let request = GenerateRequest {
        prompt: Prompt::Tokens(msg.prompt),
        params: msg.params,
        lora: None,
        deadline,
        share: Share::zone(&msg.zone, &msg.class, msg.weight, msg.priority),
    };
    let events = match llm.submit(request).await {
        Ok(ev) => ev,
        Err(e) => {
            respond_err(&req, &RemoteError::from_tier(&tier, &e)).await;
            return;
        }
    };
    let (cancel_tx, cancel_rx) = oneshot::channel();
    streams
        .lock()
        .expect("streams lock")
        .insert(msg.id.clone(), cancel_tx);
    let accepted = serde_json::to_vec(&Accepted {
        worker: worker.clone(),
    })
    .unwrap_or_default();
    if let Err(e) = req.respond(Ok(accepted.into())).await {
        tracing::warn!(error = %e, "answering a generate request failed; dropping the sequence");
        streams.lock().expect("streams lock").remove(&msg.id);
        return;
    }
    forward(&client, &msg.stream_to, events, cancel_rx).await;
    streams.lock().expect("streams lock").remove(&msg.id);
}

async fn respond_err(req: &async_nats::service::Request, err: &RemoteError) {
    let e = async_nats::service::error::Error {
        status: serde_json::to_string(err).unwrap_or_default(),
        code: err.code(),
    };
    if let Err(e) = req.respond(Err(e)).await {
        tracing::warn!(error = %e, "answering a generate request failed");
    }
}

/// Publishes the sequence's events to `to`, with heartbeats, until it ends or is cancelled (dropping
/// `events` cancels it on the engine).
async fn forward(
    client: &async_nats::Client,
    to: &str,
    mut events: crate::tier::Events,
    mut cancel: oneshot::Receiver<()>,
) {
    let mut seq = 0u64;
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.tick().await;
    loop {
        let event = tokio::select! {
            e = events.recv() => match e {
                Some(Event::Token { id, text }) => StreamEvent::Token { id, text },
                Some(Event::Done(completion)) => StreamEvent::Done { completion },
                Some(Event::Expired) => StreamEvent::Expired,
                Some(Event::Error(message)) => StreamEvent::Error { message },
                None => StreamEvent::Error { message: "the engine dropped the sequence".into() },
            },
            _ = beat.tick() => StreamEvent::Heartbeat,
            _ = &mut cancel => return,
        };
        let last = !matches!(event, StreamEvent::Token { .. } | StreamEvent::Heartbeat);
        let body = serde_json::to_vec(&StreamMsg { seq, event }).unwrap_or_default();
        seq += 1;
        if let Err(e) = client.publish(to.to_string(), body.into()).await {
            tracing::warn!(error = %e, "streaming to the caller failed; dropping the sequence");
            return;
        }
        if last {
            return;
        }
    }
}

async fn publish_load(client: async_nats::Client, tier: String, worker: String, streams: Streams) {
    let mut every = tokio::time::interval(LOAD_EVERY);
    loop {
        every.tick().await;
        let msg = LoadMsg {
            worker: worker.clone(),
            tier: tier.clone(),
            in_flight: streams.lock().expect("streams lock").len(),
            version: env!("CARGO_PKG_VERSION").into(),
        };
        let body = serde_json::to_vec(&msg).unwrap_or_default();
        if let Err(e) = client.publish(load_subject(&tier), body.into()).await {
            tracing::debug!(error = %e, "publishing load failed");
        }
    }
}

//! The worker side: serves one [`LlmTier`] over NATS as the service `nimmer-<tier>` (endpoints `generate`
//! on the tier's shared subject and on the worker's own), streams each sequence to its caller's inbox with
//! heartbeats, drops a sequence on a cancel message, runs trait-LoRA blends with the adapters of its own
//! registry (when their content matches the caller's), pins prompts in its prefix cache when a gateway asks
//! every worker to, and publishes its load. `nimmer tier` runs it over an in-process engine.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::service::ServiceExt;
use futures::StreamExt;
use nimmer_loras::{Blend, Registry};
use nimmer_tiers::{Event, GenerateRequest, Prompt, Share};
use tokio::sync::oneshot;

use super::{
    Accepted, EngineViews, GenerateMsg, HEARTBEAT, LOAD_EVERY, LoadMsg, LoraRef, PinMsg,
    RemoteError, StreamEvent, StreamMsg, VIEWS_EVERY, generate_subject, hex, load_subject,
    pin_subject, service_name, worker_subject,
};
use crate::error::GatewayError;
use crate::tier::LlmTier;

/// Sequences being streamed, by request id: dropping the sender cancels the sequence.
type Streams = Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>;

/// One worker: what it serves and under which names.
#[derive(Clone)]
pub struct Worker {
    pub tier: String,
    /// Unique among the tier's workers (a NATS subject token).
    pub name: String,
    /// The model it runs, as its load messages report it.
    pub model: String,
    pub llm: Arc<dyn LlmTier>,
    /// Its trait-LoRA adapters (none: requests with traits are refused).
    pub loras: Option<Arc<Registry>>,
}

/// Serves `w` until `shutdown` resolves (then stops taking requests; the sequences in flight are dropped
/// with the process).
pub async fn serve(
    client: async_nats::Client,
    w: Worker,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), GatewayError> {
    let (tier, worker) = (w.tier.as_str(), w.name.as_str());
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
    let mut pins = futures::stream::select(
        client
            .subscribe(pin_subject(tier, "pin"))
            .await
            .map_err(|e| nats_err(&pin_subject(tier, "pin"), &e))?,
        client
            .subscribe(pin_subject(tier, "unpin"))
            .await
            .map_err(|e| nats_err(&pin_subject(tier, "unpin"), &e))?,
    );
    // Pins by (gateway, its pin id) -> this engine's pin id.
    // Pins by (gateway, id): the local pin id and what it holds (a gateway replays its pins to a new
    // worker by broadcast; a worker that holds one already skips it).
    let mut pinned: HashMap<(String, u64), Held> = HashMap::new();
    let mut next_pin = 0u64;
    tracing::info!(tier, worker, subject = %generate_subject(tier), "tier worker serving");
    let streams: Streams = Default::default();
    let load = tokio::spawn(publish_load(client.clone(), w.clone(), streams.clone()));
    let mut requests = futures::stream::select(any, mine);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            r = requests.next() => {
                let Some(req) = r else { break };
                let (client, w, streams) = (client.clone(), w.clone(), streams.clone());
                tokio::spawn(async move { take(client, w, streams, req).await });
            }
            c = cancels.next() => {
                if let Some(m) = c {
                    let id = String::from_utf8_lossy(&m.payload).to_string();
                    if streams.lock().expect("streams lock").remove(&id).is_some() {
                        tracing::debug!(id, "sequence cancelled by its caller");
                    }
                }
            }
            p = pins.next() => {
                let Some(m) = p else { continue };
                let Ok(p) = serde_json::from_slice::<PinMsg>(&m.payload) else { continue };
                let key = (p.owner.clone(), p.id);
                if p.prompt.is_empty() {
                    if let Some((local, ..)) = pinned.remove(&key) {
                        w.llm.unpin(local);
                    }
                    continue;
                }
                if pinned
                    .get(&key)
                    .is_some_and(|(_, prompt, lora)| *prompt == p.prompt && *lora == p.lora)
                {
                    continue;
                }
                next_pin += 1;
                let blend = match resolve(&w, &p.lora).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(owner = %p.owner, id = p.id, error = ?e, "pin refused");
                        continue;
                    }
                };
                match w.llm.pin(next_pin, Prompt::Tokens(p.prompt.clone()), blend) {
                    Ok(()) => {
                        if let Some((old, ..)) = pinned.insert(key, (next_pin, p.prompt, p.lora)) {
                            w.llm.unpin(old);
                        }
                    }
                    Err(e) => tracing::warn!(owner = %p.owner, id = p.id, error = %e, "pin failed"),
                }
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

/// A pin this worker holds: its local pin id, the prompt and the adapters.
type Held = (u64, Vec<u32>, Vec<LoraRef>);

/// The blend `refs` name, from this worker's registry: refused (400 naming `traits`) when an adapter is
/// unknown here or its content differs from the caller's.
async fn resolve(w: &Worker, refs: &[LoraRef]) -> Result<Option<Arc<Blend>>, RemoteError> {
    if refs.is_empty() {
        return Ok(None);
    }
    let refused = |message: String| RemoteError::Invalid {
        field: "traits".into(),
        message,
    };
    let Some(reg) = w.loras.clone() else {
        return Err(refused(format!(
            "{} worker {} has no trait-LoRA adapters",
            w.tier, w.name
        )));
    };
    let (refs, name) = (refs.to_vec(), w.name.clone());
    // A cold adapter is read from disk: off the runtime.
    tokio::task::spawn_blocking(move || {
        let mut parts = Vec::with_capacity(refs.len());
        for r in &refs {
            let adapter = reg
                .get(&r.name)
                .map_err(|e| refused(format!("worker {name} could not load adapter `{}`: {e}", r.name)))?
                .ok_or_else(|| refused(format!("worker {name} has no adapter `{}`", r.name)))?;
            let digest = hex(&adapter.content_hash());
            if digest != r.digest {
                return Err(refused(format!(
                    "worker {name}'s adapter `{}` differs from the gateway's (content {digest}, asked for {})",
                    r.name, r.digest
                )));
            }
            parts.push((adapter, r.weight));
        }
        Ok(Some(Arc::new(Blend { parts })))
    })
    .await
    .map_err(|e| refused(format!("adapter task: {e}")))?
}

/// Answers one generate request and, when the tier took it, streams its events.
async fn take(
    client: async_nats::Client,
    w: Worker,
    streams: Streams,
    req: async_nats::service::Request,
) {
    let (tier, worker, llm) = (&w.tier, &w.name, &w.llm);
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
    let lora = match resolve(&w, &msg.lora).await {
        Ok(b) => b,
        Err(e) => {
            respond_err(&req, &e).await;
            return;
        }
    };
    let request = GenerateRequest {
        prompt: Prompt::Tokens(msg.prompt),
        params: msg.params,
        lora,
        deadline,
        share: Share::zone(&msg.zone, &msg.class, msg.weight, msg.priority),
    };
    let events = match llm.submit(request).await {
        Ok(ev) => ev,
        Err(e) => {
            respond_err(&req, &RemoteError::from_tier(tier, &e)).await;
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
    if let Err(e) = req.respond(Err(err.to_service())).await {
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
                Some(Event::Token { id, text, logprobs }) => StreamEvent::Token { id, text, logprobs },
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

async fn publish_load(client: async_nats::Client, w: Worker, streams: Streams) {
    let mut every = tokio::time::interval(LOAD_EVERY);
    for n in 0u64.. {
        every.tick().await;
        let adapters = match &w.loras {
            Some(reg) => {
                let reg = reg.clone();
                // Digests are computed once per adapter version (ms): off the runtime.
                tokio::task::spawn_blocking(move || reg.resident_digests())
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(n, d)| (n, hex(&d)))
                    .collect()
            }
            None => Vec::new(),
        };
        let msg = LoadMsg {
            worker: w.name.clone(),
            tier: w.tier.clone(),
            in_flight: streams.lock().expect("streams lock").len(),
            version: env!("CARGO_PKG_VERSION").into(),
            model: w.model.clone(),
            engine: w.llm.load(),
            adapters,
            views: (n % VIEWS_EVERY == 0).then(|| EngineViews {
                zones: w.llm.zone_service(),
                prefix: w.llm.prefix_cache(),
            }),
        };
        let body = serde_json::to_vec(&msg).unwrap_or_default();
        if let Err(e) = client.publish(load_subject(&w.tier), body.into()).await {
            tracing::debug!(error = %e, "publishing load failed");
        }
    }
}

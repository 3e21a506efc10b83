//! A director's [`Services`] over NATS: drafts and classifications as requests on the gateways' subjects
//! (`nimmerverse.gateway.<kind>.<zone>`, any gateway of the queue group answers), raised events as requests
//! to their shard (`nimmerverse.gm.<shard>.open`), accepted slots published to
//! JetStream `RESULTS` on the slot's results subject with its result id as `Nats-Msg-Id` (a repeat within the
//! stream's duplicate window is dropped; the compositors' unique result id covers the rest).

use std::time::Duration;

use async_nats::jetstream;
use nimmer_wire::dialog::{DialogResponse, DialogResult, Kind, Uid};
use nimmer_wire::gm::{OpenEvent, Opened};
use serde_json::{Value, json};

use crate::director::{Ask, Services};
use crate::error::{GmError, Result};
use crate::walk::RenderedWork;

/// The gateways and RESULTS, reached through one NATS connection.
#[derive(Clone)]
pub struct NatsServices {
    client: async_nats::Client,
    js: jetstream::Context,
    /// How long one request may take (a line waits for a slot and its generation).
    timeout: Duration,
}

impl NatsServices {
    pub fn new(client: async_nats::Client, timeout: Duration) -> Self {
        let js = jetstream::new(client.clone());
        Self {
            client,
            js,
            timeout,
        }
    }

    /// One request; an error reply (`{"error", "status", …}`) becomes an error naming both and the subject.
    async fn call(&self, subject: String, payload: Vec<u8>) -> Result<Value> {
        let reply = tokio::time::timeout(
            self.timeout,
            self.client.request(subject.clone(), payload.into()),
        )
        .await
        .map_err(|_| GmError::Service(format!("{subject}: no answer within {:?}", self.timeout)))?
        .map_err(|e| GmError::Service(format!("{subject}: {e}")))?;
        let v: Value = serde_json::from_slice(&reply.payload)?;
        if let Some(e) = v.get("error") {
            return Err(GmError::Service(format!(
                "{subject}: {} {e}",
                v.get("status").unwrap_or(&Value::Null)
            )));
        }
        Ok(v)
    }

    /// One request to the gateways.
    async fn request(&self, kind: Kind, zone: &str, body: Value) -> Result<DialogResponse> {
        let subject = nimmer_wire::subjects::request(kind, zone);
        Ok(serde_json::from_value(
            self.call(subject, body.to_string().into_bytes()).await?,
        )?)
    }
}

impl Services for NatsServices {
    async fn ask(&self, ask: &Ask<'_>) -> Result<DialogResponse> {
        let r = ask.request;
        let mut body = json!({
            "uid": ask.uid.to_string(),
            "idempotency_key": ask.key,
            "draft": true,
            "participants": r.participants,
            "faction": r.faction,
        });
        match &r.work {
            RenderedWork::Line {
                system,
                prompt,
                max_tokens,
            } => {
                let mut messages = Vec::new();
                if let Some(s) = system {
                    messages.push(json!({ "role": "system", "content": s }));
                }
                messages.push(json!({ "role": "user", "content": prompt }));
                body["messages"] = json!(messages);
                body["max_tokens"] = json!(max_tokens);
                if let Some(npc) = &r.npc {
                    body["npc"] = json!({ "id": npc, "traits": r.traits });
                }
            }
            RenderedWork::Classify { classifier, input } => {
                body["classifier"] = json!(classifier);
                body["prompt"] = json!(input);
            }
        }
        self.request(r.kind, ask.zone, body).await
    }

    async fn classify(
        &self,
        uid: &Uid,
        zone: &str,
        key: &str,
        classifier: &str,
        input: &str,
    ) -> Result<String> {
        let body = json!({
            "uid": uid.to_string(), "idempotency_key": key, "draft": true,
            "classifier": classifier, "prompt": input,
        });
        let resp = self.request(Kind::Classify, zone, body).await?;
        resp.classification
            .map(|c| c.label)
            .ok_or_else(|| GmError::Service(format!("{uid}: a classification without a label")))
    }

    async fn open(&self, shard: &str, req: &OpenEvent) -> Result<Opened> {
        let subject = nimmer_wire::subjects::gm_open(shard);
        Ok(serde_json::from_value(
            self.call(subject, serde_json::to_vec(req)?).await?,
        )?)
    }

    async fn publish(&self, result: &DialogResult) -> Result<()> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", result.result_id.as_str());
        let ack = self
            .js
            .publish_with_headers(
                result.uid.results_subject(),
                headers,
                serde_json::to_vec(result)?.into(),
            )
            .await
            .map_err(|e| GmError::Service(format!("publishing {}: {e}", result.uid)))?;
        ack.await
            .map_err(|e| GmError::Service(format!("publishing {}: {e}", result.uid)))?;
        Ok(())
    }
}

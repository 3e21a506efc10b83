//! Per-zone token budgets across gateways. Every gateway charges each finished generation's tokens to the
//! zone's token bucket (`zones.rs`) and, when it has NATS, also publishes the charge on
//! [`SUBJECT`]; every gateway applies the charges of the others to its own buckets. So a zone's
//! `tokens_per_s` holds whichever gateways its requests enter, with no shared state to lose: a lost charge
//! message only lets a zone spend a little more, and a gateway cut off from NATS falls back to its own
//! accounting. (The buckets are in debt form, charged after the work, so a charge arriving milliseconds
//! late changes nothing a single gateway would not already allow.) Why not consistent hashing of zones
//! onto gateways: HTTP clients reach any gateway; why not JetStream KV counters: a compare-and-set per
//! generation on the hot path, for a policy that tolerates being approximate.

use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::mpsc;

use crate::error::GatewayError;
use crate::state::Gateway;

/// Where gateways publish the tokens each zone spent.
pub const SUBJECT: &str = "nimmer.budget.charges";

pub use crate::zones::Charge;

/// Publishes this gateway's charges and applies the others' until `stop` resolves.
pub async fn start(
    client: async_nats::Client,
    gw: Arc<Gateway>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, GatewayError> {
    let me = client.new_inbox().replace("_INBOX.", "");
    let mut others = client
        .subscribe(SUBJECT)
        .await
        .map_err(|e| GatewayError::Subscribe {
            subject: SUBJECT.into(),
            message: e.to_string(),
        })?;
    let (tx, mut mine) = mpsc::unbounded_channel::<Charge>();
    gw.set_charge_sink(Some(tx));
    tracing::info!(
        subject = SUBJECT,
        "zone token budgets shared with other gateways"
    );
    Ok(tokio::spawn(async move {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                c = mine.recv() => {
                    let Some(mut c) = c else { break };
                    c.from = me.clone();
                    let body = serde_json::to_vec(&c).unwrap_or_default();
                    if let Err(e) = client.publish(SUBJECT, body.into()).await {
                        tracing::debug!(error = %e, "publishing a zone charge failed");
                    }
                }
                m = others.next() => {
                    let Some(m) = m else { break };
                    match serde_json::from_slice::<Charge>(&m.payload) {
                        Ok(c) if c.from != me => gw.apply_charge(&c.zone, c.tier, c.tokens),
                        Ok(_) => {}
                        Err(e) => tracing::debug!(error = %e, "unreadable zone charge"),
                    }
                }
                _ = &mut stop => break,
            }
        }
        gw.set_charge_sink(None);
    }))
}

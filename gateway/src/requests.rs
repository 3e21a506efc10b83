//! Requests in flight that a caller may stop: `DELETE /v1/requests/{id}` cancels one by its id (a dialog's
//! idempotency key, by default its UID; an OpenAI response's `id`), and a dialog with `supersede: true`
//! cancels the line still running for the same NPC in the same zone (a player interrupted; the NPC says
//! something new). A cancelled request frees its slot and its engine sequence at once, publishes nothing,
//! and answers 409 (or ends its stream with a `cancelled` event). The registry holds one entry per running
//! request, removed when its [`Handle`] drops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Why a request was stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancel {
    /// `DELETE /v1/requests/{id}`.
    Deleted,
    /// A newer line for the same NPC, with `supersede: true`.
    Superseded { by: String },
}

impl std::fmt::Display for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Deleted => write!(f, "cancelled by DELETE /v1/requests"),
            Self::Superseded { by } => write!(f, "superseded by `{by}`"),
        }
    }
}

struct Entry {
    serial: u64,
    stop: watch::Sender<Option<Cancel>>,
    npc: Option<(String, String)>,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, Entry>,
    /// (zone, npc) → the id of its running line.
    by_npc: HashMap<(String, String), String>,
    serial: u64,
}

/// The gateway's requests in flight, by id and by NPC.
#[derive(Default)]
pub struct Requests(Mutex<Inner>);

/// One registered request: resolves [`Handle::cancelled`] when stopped; unregisters when dropped.
pub struct Handle {
    id: String,
    serial: u64,
    rx: watch::Receiver<Option<Cancel>>,
    owner: Arc<Requests>,
}

impl Requests {
    /// Registers `id` (for `npc` = (zone, npc id), if it speaks for one). With `supersede`, the line running
    /// for that NPC is cancelled first. An id already running is replaced (the older one can no longer be
    /// reached by DELETE; it still runs to its end).
    pub fn register(
        self: &Arc<Self>,
        id: &str,
        npc: Option<(&str, &str)>,
        supersede: bool,
    ) -> Handle {
        let mut g = self.0.lock().expect("requests lock");
        let npc = npc.map(|(z, n)| (z.to_string(), n.to_string()));
        if supersede
            && let Some(key) = &npc
            && let Some(old) = g.by_npc.get(key).cloned()
            && let Some(e) = g.by_id.get(&old)
        {
            tracing::info!(id = %old, by = id, "line superseded");
            let _ = e.stop.send(Some(Cancel::Superseded { by: id.to_string() }));
        }
        g.serial += 1;
        let serial = g.serial;
        let (stop, rx) = watch::channel(None);
        if let Some(key) = &npc {
            g.by_npc.insert(key.clone(), id.to_string());
        }
        g.by_id.insert(id.to_string(), Entry { serial, stop, npc });
        Handle {
            id: id.to_string(),
            serial,
            rx,
            owner: self.clone(),
        }
    }

    /// Cancels the running request `id`; `false` if none runs under it.
    pub fn cancel(&self, id: &str) -> bool {
        let g = self.0.lock().expect("requests lock");
        match g.by_id.get(id) {
            Some(e) => {
                let _ = e.stop.send(Some(Cancel::Deleted));
                true
            }
            None => false,
        }
    }

    /// Requests registered now.
    pub fn len(&self) -> usize {
        self.0.lock().expect("requests lock").by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Handle {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Resolves when the request is stopped (never, if it is not).
    pub async fn cancelled(&mut self) -> Cancel {
        loop {
            if let Some(c) = self.rx.borrow_and_update().clone() {
                return c;
            }
            if self.rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let mut g = self.owner.0.lock().unwrap_or_else(|e| e.into_inner());
        if g.by_id
            .get(&self.id)
            .is_some_and(|e| e.serial == self.serial)
            && let Some(e) = g.by_id.remove(&self.id)
            && let Some(key) = e.npc
            && g.by_npc.get(&key) == Some(&self.id)
        {
            g.by_npc.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delete_and_supersede_stop_the_right_request_and_handles_unregister() {
        let r = Arc::new(Requests::default());
        let mut a = r.register("a", Some(("docks", "mira")), false);
        let mut b = r.register("b", Some(("docks", "tom")), false);
        assert!(r.cancel("b"));
        assert_eq!(b.cancelled().await, Cancel::Deleted);
        assert!(!r.cancel("nope"));
        // A new line for mira with supersede stops `a`; without supersede nothing is stopped.
        let _c = r.register("c", Some(("docks", "mira")), true);
        assert_eq!(a.cancelled().await, Cancel::Superseded { by: "c".into() });
        drop((a, b));
        assert_eq!(r.len(), 1);
        let d = r.register("d", Some(("market", "mira")), true);
        assert_eq!(r.len(), 2, "another zone's mira is another NPC");
        drop(d);
        drop(_c);
        assert!(r.is_empty());
    }
}

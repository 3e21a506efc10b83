//! The player client: follows a player's subject on `PLAYERS` from the checkpoint stored in the player's SQLite
//! file and applies canon there idempotently (the result id is the key), storing the new checkpoint (the last
//! applied stream sequence) in the same SQLite transaction. A crash between apply and checkpoint cannot happen;
//! a redelivery is ignored by the key. A late joiner starts from sequence 1 and catches up on its whole feed.
//! Each time the feed (re)starts, the client checks that the stream still holds everything after its
//! checkpoint: a checkpoint behind the stream's first message (retention, a purge) or a recreated stream is a
//! gap, reported and filled from PostgreSQL canon through the compositors ([`crate::resync`]).

use std::time::Duration;

use crate::canon::Canon;
use crate::error::{CompositorError, Result};
pub use crate::player_store::PlayerStore;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use nimmer_config::{TransportFile, valid_token};

/// A player id must be one subject token.
fn check_player(player: &str) -> Result<()> {
    if valid_token(player) {
        Ok(())
    } else {
        Err(CompositorError::Config(format!(
            "player id {player:?} cannot be a subject token"
        )))
    }
}

/// The rows [`PlayerStore::apply`] found new.
fn only_new(rows: impl IntoIterator<Item = Canon>, new: Vec<bool>) -> Vec<Canon> {
    rows.into_iter()
        .zip(new)
        .filter_map(|(c, n)| n.then_some(c))
        .collect()
}

/// What [`follow`] reports after each applied batch.
#[derive(Debug, Clone)]
pub struct Applied {
    pub new: Vec<Canon>,
    pub checkpoint: u64,
    /// Set when this batch filled a gap from canon (the rows the feed no longer held).
    pub gap: Option<Gap>,
}

/// A gap in a player's feed: the stream no longer holds everything after the player's checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// The player's checkpoint when the gap was found.
    pub checkpoint: u64,
    /// The stream's first sequence then (the feed resumes there).
    pub first_available: u64,
    /// The stream was recreated since the checkpoint (it counts from the start again).
    pub recreated: bool,
}

/// Follows `player`'s feed from its checkpoint, applying batches into `store`, until `stop` resolves.
/// `on_batch` sees each batch's new rows.
pub async fn follow(
    js: &jetstream::Context,
    t: &TransportFile,
    player: &str,
    store: &PlayerStore,
    stop: impl std::future::Future<Output = ()>,
    mut on_batch: impl FnMut(&Applied),
) -> Result<()> {
    check_player(player)?;
    tokio::pin!(stop);
    let feed = t.player_subject(player);
    prune_now(store, &t.players.prune).await;
    let mut last_prune = std::time::Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        if last_prune.elapsed() > Duration::from_secs(600) {
            prune_now(store, &t.players.prune).await;
            last_prune = std::time::Instant::now();
        }
        let from = match resume_point(js, t, player, &feed, store, &mut on_batch).await {
            Ok(from) => from,
            Err(e) => {
                tracing::warn!(error = %e, player, "checking the player feed for gaps failed; retrying");
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let run = follow_from(js, t, &feed, from, store, &mut on_batch);
        tokio::select! {
            _ = &mut stop => return Ok(()),
            r = run => {
                // The stream ended or failed (e.g. the server went away): resume from the checkpoint.
                if let Err(e) = r {
                    tracing::warn!(error = %e, player, "player feed interrupted; resuming from the checkpoint");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Where `feed` resumes: after the checkpoint, unless the stream no longer holds everything after it; then
/// the gap is reported, the player's rows are read back from canon (from just before the newest one it
/// holds) and applied, and the feed resumes at the stream's first message (what it still holds is applied
/// again as no-ops).
async fn resume_point(
    js: &jetstream::Context,
    t: &TransportFile,
    player: &str,
    feed: &str,
    store: &PlayerStore,
    on_batch: &mut impl FnMut(&Applied),
) -> Result<u64> {
    let checkpoint = store.checkpoint(feed).await?;
    let stream = js
        .get_stream(&t.players.stream)
        .await
        .map_err(CompositorError::nats)?;
    let info = stream.cached_info();
    let created = info.created.unix_timestamp_nanos().to_string();
    let first = info.state.first_sequence.max(1);
    let known = store.stream_created(feed).await?;
    let recreated =
        known.as_ref().is_some_and(|k| *k != created) || checkpoint > info.state.last_sequence;
    if !recreated && checkpoint + 1 >= first {
        if known.is_none() {
            store.set_stream_created(feed, &created).await?;
        }
        return Ok(checkpoint + 1);
    }
    let gap = Gap {
        checkpoint,
        first_available: first,
        recreated,
    };
    tracing::warn!(
        player,
        ?gap,
        "player feed gap: the stream no longer holds everything after the checkpoint; resyncing from canon"
    );
    metrics::counter!("nimmer_player_gaps_total").increment(1);
    let rows = crate::resync::fetch(&js.client(), t, player, store.newest().await?).await?;
    let resume = first - 1;
    let new = store.resync(feed, &rows, resume, &created).await?;
    let new = only_new(rows, new);
    tracing::info!(
        player,
        rows = new.len(),
        resume_at = first,
        "player feed gap filled from canon"
    );
    on_batch(&Applied {
        new,
        checkpoint: resume,
        gap: Some(gap),
    });
    Ok(first)
}

async fn follow_from(
    js: &jetstream::Context,
    t: &TransportFile,
    feed: &str,
    from: u64,
    store: &PlayerStore,
    on_batch: &mut impl FnMut(&Applied),
) -> Result<()> {
    let stream = js
        .get_stream(&t.players.stream)
        .await
        .map_err(CompositorError::nats)?;
    let c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: feed.to_string(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            ..Default::default()
        })
        .await
        .map_err(CompositorError::nats)?;
    let mut msgs = c.messages().await.map_err(CompositorError::nats)?;
    loop {
        // A batch: the first message (waiting), then whatever else is already here.
        let Some(first) = msgs.next().await else {
            return Err(CompositorError::Nats("the feed ended".into()));
        };
        let mut batch = vec![first.map_err(CompositorError::nats)?];
        while batch.len() < 512 {
            match tokio::time::timeout(Duration::from_millis(2), msgs.next()).await {
                Ok(Some(m)) => batch.push(m.map_err(CompositorError::nats)?),
                _ => break,
            }
        }
        let mut rows = Vec::with_capacity(batch.len());
        for m in &batch {
            let seq = m.info().map_err(CompositorError::nats)?.stream_sequence;
            match serde_json::from_slice::<Canon>(&m.payload) {
                Ok(c) => rows.push((seq, c)),
                Err(e) => tracing::error!(seq, error = %e, "skipping a malformed canon message"),
            }
        }
        let checkpoint = batch
            .last()
            .and_then(|m| m.info().ok())
            .map_or(0, |i| i.stream_sequence);
        let new = store.apply(feed, &rows).await?;
        on_batch(&Applied {
            new: only_new(rows.into_iter().map(|(_, c)| c), new),
            checkpoint,
            gap: None,
        });
    }
}

async fn prune_now(store: &PlayerStore, rules: &[nimmer_config::PruneRule]) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    match store.prune(rules, now).await {
        Ok(n) if n > 0 => tracing::info!(deleted = n, "player store pruned"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "pruning the player store failed"),
    }
}

/// The checkpoint name of district pushes in the player store.
pub const DISTRICT_FEED: &str = "district";

/// The player client in district-fallback mode: subscribes to the player's push subject, announces itself on
/// its presence subject (so distributors push what was queued while it was offline), and applies each push
/// into `store` before acknowledging it, until `stop` resolves.
pub async fn follow_district(
    client: &async_nats::Client,
    t: &TransportFile,
    player: &str,
    store: &PlayerStore,
    stop: impl std::future::Future<Output = ()>,
    mut on_batch: impl FnMut(&Applied),
) -> Result<()> {
    check_player(player)?;
    tokio::pin!(stop);
    let mut pushes = client
        .subscribe(t.push_subject(player))
        .await
        .map_err(CompositorError::nats)?;
    client.flush().await.map_err(CompositorError::nats)?;
    client
        .publish(t.presence_subject(player), player.to_string().into())
        .await
        .map_err(CompositorError::nats)?;
    loop {
        let m = tokio::select! {
            _ = &mut stop => return Ok(()),
            m = pushes.next() => match m {
                Some(m) => m,
                None => return Err(CompositorError::Nats("push subscription ended".into())),
            },
        };
        let Some(reply) = m.reply.clone() else {
            continue;
        };
        let answer = match serde_json::from_slice::<crate::district::Push>(&m.payload) {
            Ok(push) => {
                let new = store.apply(DISTRICT_FEED, &push.rows).await?;
                let checkpoint = push.rows.last().map_or(0, |(s, _)| *s);
                on_batch(&Applied {
                    new: only_new(push.rows.into_iter().map(|(_, c)| c), new),
                    checkpoint,
                    gap: None,
                });
                "ok".to_string()
            }
            Err(e) => format!("malformed push: {e}"),
        };
        client
            .publish(reply, answer.into())
            .await
            .map_err(CompositorError::nats)?;
    }
}

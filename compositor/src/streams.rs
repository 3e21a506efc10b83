//! The JetStream objects the compositors use, created or brought up to date at start: the `RESULTS` stream
//! (the gateway creates it too, with the same settings) and its shared durable pull consumer, the `CANON` and
//! `PLAYERS` and `FACTIONS` streams (settings from `transport.toml`), the derived feeds, and the stream that
//! keeps dead letters.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use nimmer_config::{FeedSpec, TransportFile};

use crate::error::{CompositorError, Result};

pub use nimmer_wire::RESULTS_SUBJECTS;
/// The stream that stores dead letters.
pub const DEAD_LETTER_STREAM: &str = "DEADLETTER";

/// Creates (or updates) the streams and returns the compositors' shared consumer.
pub async fn ensure(
    js: &jetstream::Context,
    t: &TransportFile,
) -> Result<consumer::Consumer<consumer::pull::Config>> {
    let results_err = |e: &dyn std::fmt::Display| {
        CompositorError::Nats(format!("stream {}: {e}", t.results.stream))
    };
    nimmer_wire::subjects::ensure_stream(js, results_stream(&t.results.stream, t.replicas.results))
        .await
        .map_err(|e| results_err(&e))?;
    let results = js
        .get_stream(&t.results.stream)
        .await
        .map_err(|e| results_err(&e))?;
    nimmer_wire::subjects::ensure_stream(js, canon_stream(t))
        .await
        .map_err(|e| CompositorError::Nats(format!("stream {}: {e}", t.canon.stream)))?;
    for cfg in [players_stream(t), factions_stream(t)] {
        let name = cfg.name.clone();
        nimmer_wire::subjects::ensure_stream(js, cfg)
            .await
            .map_err(|e| CompositorError::Nats(format!("stream {name}: {e}")))?;
    }
    ensure_feeds(js, t).await?;
    nimmer_wire::subjects::ensure_stream(
        js,
        stream::Config {
            name: DEAD_LETTER_STREAM.into(),
            subjects: vec![t.results.dead_letter.clone()],
            max_age: Duration::from_secs(30 * 24 * 3600),
            num_replicas: t.replicas.dead_letter,
            ..Default::default()
        },
    )
    .await
    .map_err(|e| CompositorError::Nats(format!("stream {DEAD_LETTER_STREAM}: {e}")))?;
    // A replicated consumer answers once its RAFT group elected a leader: created with a patient context,
    // then used through the caller's. (Two compositors creating it at once may see no answer on a cluster:
    // the caller retries `ensure`, and finds it.)
    let mut patient = js.clone();
    patient.set_timeout(Duration::from_secs(10));
    let consumer_err = |e: &dyn std::fmt::Display| {
        CompositorError::Nats(format!("consumer {}: {e}", t.results.consumer))
    };
    patient
        .get_stream(&t.results.stream)
        .await
        .map_err(|e| results_err(&e))?
        .get_or_create_consumer(
            &t.results.consumer,
            consumer::pull::Config {
                durable_name: Some(t.results.consumer.clone()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(t.results.ack_wait_s),
                // Never dropped by the server: a result is acked after commit, or dead-lettered by us.
                max_deliver: -1,
                max_ack_pending: 10_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| consumer_err(&e))?;
    results
        .get_consumer(&t.results.consumer)
        .await
        .map_err(|e| consumer_err(&e))
}

pub use nimmer_wire::subjects::results_stream;

/// `CANON`'s settings from `transport.toml`.
pub fn canon_stream(t: &TransportFile) -> stream::Config {
    stream::Config {
        name: t.canon.stream.clone(),
        subjects: vec![t.canon_filter()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(t.canon.duplicate_window_s),
        max_age: Duration::from_secs(t.canon.max_age_h * 3600),
        max_messages_per_subject: if t.canon.max_msgs_per_subject > 0 {
            t.canon.max_msgs_per_subject
        } else {
            -1
        },
        num_replicas: t.replicas.canon,
        ..Default::default()
    }
}

/// `PLAYERS`' settings from `transport.toml`.
pub fn players_stream(t: &TransportFile) -> stream::Config {
    stream::Config {
        name: t.players.stream.clone(),
        subjects: vec![t.players_filter()],
        retention: stream::RetentionPolicy::Limits,
        // nats-server 2.15 caps a stream at 1,000 consumers unless it sets its own limit (and reads -1 as
        // "the default"): one durable consumer per player needs an explicit one.
        max_consumers: t.players.max_consumers,
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(t.players.duplicate_window_s),
        max_age: Duration::from_secs(t.players.max_age_h * 3600),
        num_replicas: t.replicas.players,
        ..Default::default()
    }
}

/// `FACTIONS`' settings from `transport.toml`.
pub fn factions_stream(t: &TransportFile) -> stream::Config {
    stream::Config {
        name: t.factions.stream.clone(),
        subjects: vec![t.factions_filter()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(t.canon.duplicate_window_s),
        max_age: Duration::from_secs(t.factions.max_age_h * 3600),
        num_replicas: t.replicas.factions,
        ..Default::default()
    }
}

/// The stream of a derived feed: sourced from `CANON` (a district, subjects rewritten to
/// `nimmerverse.district.<district>.canon.<gm_event>.<scene>`) or from `FACTIONS` (a faction).
pub fn feed_stream(t: &TransportFile, f: &FeedSpec) -> stream::Config {
    let source = match (&f.district, &f.faction) {
        (Some(d), _) => {
            // The template's placeholders in order: the wildcards of the source pattern.
            let mut order: Vec<(usize, &str)> = ["{gm_event}", "{scene}"]
                .iter()
                .filter_map(|p| t.canon.subject.find(p).map(|i| (i, *p)))
                .collect();
            order.sort();
            let wildcard = |p: &str| order.iter().position(|(_, q)| *q == p).map_or(0, |i| i + 1);
            stream::Source {
                name: t.canon.stream.clone(),
                subject_transforms: vec![stream::SubjectTransform {
                    source: t.canon_subject("*", d, "*"),
                    destination: format!(
                        "nimmerverse.district.{d}.canon.{{{{wildcard({})}}}}.{{{{wildcard({})}}}}",
                        wildcard("{gm_event}"),
                        wildcard("{scene}")
                    ),
                }],
                ..Default::default()
            }
        }
        (None, faction) => stream::Source {
            name: t.factions.stream.clone(),
            filter_subject: Some(t.faction_subject(faction.as_deref().unwrap_or_default())),
            ..Default::default()
        },
    };
    stream::Config {
        name: f.name.clone(),
        sources: Some(vec![source]),
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: Duration::from_secs(t.canon.max_age_h * 3600),
        num_replicas: t.replicas.feeds,
        ..Default::default()
    }
}

/// Creates or updates every feed of `transport.toml` (existing consumers keep running); feeds no longer listed
/// are left alone. Returns the names applied.
pub async fn ensure_feeds(js: &jetstream::Context, t: &TransportFile) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for f in &t.feeds {
        nimmer_wire::subjects::ensure_stream(js, feed_stream(t, f))
            .await
            .map_err(|e| CompositorError::Nats(format!("feed {}: {e}", f.name)))?;
        names.push(f.name.clone());
    }
    Ok(names)
}

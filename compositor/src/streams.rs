//! The JetStream objects the compositors use, created or brought up to date at start: the `RESULTS` stream
//! (the gateway creates it too, with the same settings) and its shared durable pull consumer, the `CANON` and
//! `PLAYERS` streams (settings from `transport.toml`), and the stream that keeps dead letters.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use nimmer_config::TransportFile;

use crate::error::{CompositorError, Result};

/// The subjects `RESULTS` holds (as the gateway publishes them).
pub const RESULTS_SUBJECTS: &str = "nimmerverse.results.>";
/// The stream that stores dead letters.
pub const DEAD_LETTER_STREAM: &str = "DEADLETTER";

/// Creates (or updates) the streams and returns the compositors' shared consumer.
pub async fn ensure(
    js: &jetstream::Context,
    t: &TransportFile,
) -> Result<consumer::Consumer<consumer::pull::Config>> {
    let results = js
        .get_or_create_stream(stream::Config {
            name: t.results.stream.clone(),
            subjects: vec![RESULTS_SUBJECTS.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            duplicate_window: Duration::from_secs(600),
            max_age: Duration::from_secs(7 * 24 * 3600),
            ..Default::default()
        })
        .await
        .map_err(|e| CompositorError::Nats(format!("stream {}: {e}", t.results.stream)))?;
    js.create_or_update_stream(canon_stream(t))
        .await
        .map_err(|e| CompositorError::Nats(format!("stream {}: {e}", t.canon.stream)))?;
    js.create_or_update_stream(players_stream(t))
        .await
        .map_err(|e| CompositorError::Nats(format!("stream {}: {e}", t.players.stream)))?;
    js.create_or_update_stream(stream::Config {
        name: DEAD_LETTER_STREAM.into(),
        subjects: vec![t.results.dead_letter.clone()],
        max_age: Duration::from_secs(30 * 24 * 3600),
        ..Default::default()
    })
    .await
    .map_err(|e| CompositorError::Nats(format!("stream {DEAD_LETTER_STREAM}: {e}")))?;
    results
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
        .map_err(|e| CompositorError::Nats(format!("consumer {}: {e}", t.results.consumer)))
}

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
        ..Default::default()
    }
}

/// `PLAYERS`' settings from `transport.toml`.
pub fn players_stream(t: &TransportFile) -> stream::Config {
    stream::Config {
        name: t.players.stream.clone(),
        subjects: vec![t.players_filter()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(t.players.duplicate_window_s),
        max_age: Duration::from_secs(t.players.max_age_h * 3600),
        ..Default::default()
    }
}

//! Subjects are built here and nowhere else: `nimmerverse.<component>.<scope>.<topic>`. Also the request
//! limits both fronts enforce, and (feature `jetstream`) the results stream's settings, which the gateway and
//! the compositors both create (whichever starts first); its name comes from `transport.toml`.

use crate::dialog::{Kind, Uid};

/// Requests to gateways: `nimmerverse.gateway.<kind>.<zone>`.
pub const REQUEST_SUBJECTS: &str = "nimmerverse.gateway.>";
/// The queue group gateways share requests in.
pub const QUEUE_GROUP: &str = "nimmer-gateway";
/// Finished dialogs: `nimmerverse.results.<gm_event>.<district>.<scene>`.
pub const RESULTS_SUBJECTS: &str = "nimmerverse.results.>";
/// Largest request body accepted, over HTTP and NATS.
pub const BODY_LIMIT: usize = 256 * 1024;

/// The subject a request for `kind` in `zone` is sent on.
pub fn request(kind: Kind, zone: &str) -> String {
    format!("nimmerverse.gateway.{}.{zone}", kind.as_str())
}

/// The `(kind, zone)` of a request subject, if it is one.
pub fn parse_request(subject: &str) -> Option<(&str, &str)> {
    let rest = subject.strip_prefix("nimmerverse.gateway.")?;
    let (kind, zone) = rest.split_once('.')?;
    (!zone.contains('.')).then_some((kind, zone))
}

/// Where a GM shard takes requests to open events: `nimmerverse.gm.<shard>.open`.
pub fn gm_open(shard: &str) -> String {
    format!("nimmerverse.gm.{shard}.open")
}

/// The queue group a shard's processes share its requests in (one of them opens each event).
pub fn gm_queue_group(shard: &str) -> String {
    format!("nimmer-gm-{shard}")
}

/// The subject a dialog's result is published on.
pub fn results(uid: &Uid) -> String {
    format!(
        "nimmerverse.results.{}.{}.{}",
        uid.gm_event, uid.district, uid.scene
    )
}

/// The results stream's settings: work-queue retention (a result is gone once a compositor acked it),
/// deduplication by `Nats-Msg-Id` over ten minutes, a week's retention for results nobody took, `replicas`
/// copies on a JetStream cluster (transport.toml `[replicas] results`).
#[cfg(feature = "jetstream")]
pub fn results_stream(name: &str, replicas: usize) -> async_nats::jetstream::stream::Config {
    use async_nats::jetstream::stream;
    use std::time::Duration;
    stream::Config {
        name: name.to_string(),
        subjects: vec![RESULTS_SUBJECTS.into()],
        retention: stream::RetentionPolicy::WorkQueue,
        duplicate_window: Duration::from_secs(600),
        max_age: Duration::from_secs(7 * 24 * 3600),
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Creates stream `config.name`, or brings an existing one up to `config` (replicas included). Unlike
/// async-nats's `create_or_update_stream`, it asks whether the stream exists first: on a JetStream cluster an
/// update of a stream that does not exist yet is never answered. Nor is a create while another process's
/// create of the same stream is being applied (two compositors starting together): a create that times out
/// is followed by another look, which finds the stream the other process made (likewise two updates at once:
/// the looks are spread by a random pause).
#[cfg(feature = "jetstream")]
pub async fn ensure_stream(
    js: &async_nats::jetstream::Context,
    config: async_nats::jetstream::stream::Config,
) -> Result<(), String> {
    use async_nats::jetstream::ErrorCode;
    use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
    let mut last = String::new();
    for attempt in 0..8u32 {
        if attempt > 0 {
            // 100 to 600 ms, different per process.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
                ^ std::process::id().wrapping_mul(2_654_435_761);
            tokio::time::sleep(std::time::Duration::from_millis(
                100 + u64::from(nanos % 500),
            ))
            .await;
        }
        match js.get_stream(&config.name).await {
            Ok(_) => match js.update_stream(config.clone()).await {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == CreateStreamErrorKind::TimedOut => last = e.to_string(),
                Err(e) => return Err(e.to_string()),
            },
            Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
            {
                match js.create_stream(config.clone()).await {
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == CreateStreamErrorKind::TimedOut => last = e.to_string(),
                    // Made meanwhile by another process: bring it up to this config on the next look.
                    Err(e) if matches!(e.kind(), CreateStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NAME_EXIST) => {
                        last = e.to_string()
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
            Err(e) if e.kind() == GetStreamErrorKind::Request => last = e.to_string(),
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(last)
}

/// The servers of a `--nats` value: one URL, or several separated by commas (the nodes of a cluster, so that a
/// process can connect, and reconnect, while any one of them is down). Empty entries are skipped.
pub fn nats_urls(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nats_list_is_split_on_commas() {
        assert_eq!(
            nats_urls("nats://a:1, nats://b:2,,nats://c:3"),
            ["nats://a:1", "nats://b:2", "nats://c:3"]
        );
        assert_eq!(nats_urls("nats://a:1"), ["nats://a:1"]);
    }

    #[test]
    fn a_request_subject_parses_back_to_kind_and_zone() {
        let s = request(Kind::Moment, "plaza-1");
        assert_eq!(s, "nimmerverse.gateway.moment.plaza-1");
        assert_eq!(parse_request(&s), Some(("moment", "plaza-1")));
        assert_eq!(parse_request("nimmerverse.gateway.dialog"), None);
        assert_eq!(parse_request("nimmerverse.gateway.dialog.a.b"), None);
        assert_eq!(parse_request("other.gateway.dialog.a"), None);
    }

    #[test]
    fn a_result_subject_is_scoped_by_event_district_and_scene() {
        let uid = Uid {
            gm_event: "ev7".into(),
            district: "harbour".into(),
            scene: "pier".into(),
            slot: "s1".into(),
        };
        assert_eq!(results(&uid), "nimmerverse.results.ev7.harbour.pier");
    }
}

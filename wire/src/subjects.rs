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

/// The subject a dialog's result is published on.
pub fn results(uid: &Uid) -> String {
    format!(
        "nimmerverse.results.{}.{}.{}",
        uid.gm_event, uid.district, uid.scene
    )
}

/// The results stream's settings: work-queue retention (a result is gone once a compositor acked it),
/// deduplication by `Nats-Msg-Id` over ten minutes, a week's retention for results nobody took.
#[cfg(feature = "jetstream")]
pub fn results_stream(name: &str) -> async_nats::jetstream::stream::Config {
    use async_nats::jetstream::stream;
    use std::time::Duration;
    stream::Config {
        name: name.to_string(),
        subjects: vec![RESULTS_SUBJECTS.into()],
        retention: stream::RetentionPolicy::WorkQueue,
        duplicate_window: Duration::from_secs(600),
        max_age: Duration::from_secs(7 * 24 * 3600),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

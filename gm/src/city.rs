//! The self-running city: events opened over the city's zones at a Poisson rate through the GM shards
//! ([`drive`]), and what the design cares about, sampled while it runs ([`sample`]): events opened, completed
//! and open (directors), how long events take, canon lag, and the sizes that pruning must keep flat (the
//! active register, the outbox, the streams). `nimmer city` and `city-bench --workload events` share both.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use nimmer_wire::gm::{OpenEvent, Opened};
use rand::{Rng, SeedableRng};

use crate::open::Templates;

/// How the city opens events.
#[derive(Debug, Clone)]
pub struct CityPlan {
    /// Zones events happen in (`<district>-<n>`, n below this).
    pub zones: usize,
    /// Mean events opened per second, all shards together.
    pub rate: f64,
    pub duration: Duration,
    pub seed: u64,
}

/// What the driver counted.
#[derive(Debug, Default)]
pub struct Opens {
    pub opened: AtomicU64,
    /// Refused or unanswered (no shard process, a full process, NATS away).
    pub failed: AtomicU64,
}

/// The templates the city opens on its own: every one that no other template raises (those open when their
/// raiser completes).
pub fn openable(t: &Templates) -> Vec<String> {
    let raised: Vec<&str> = t
        .catalog
        .events
        .values()
        .flat_map(|e| e.raises.iter().map(|r| r.template.as_str()))
        .collect();
    t.catalog
        .events
        .keys()
        .filter(|k| !raised.contains(&k.as_str()))
        .cloned()
        .collect()
}

/// A value for a template's declared value `name` (players, ships and rumours from small tables).
fn value(name: &str, rng: &mut impl Rng) -> String {
    const SHIPS: &[&str] = &[
        "Gull",
        "Marlin",
        "Saint Brendan",
        "Northern Star",
        "Kestrel",
    ];
    const RUMOURS: &[&str] = &[
        "the guild sells short weights",
        "the harbour master takes bribes",
        "a ship came in with no crew",
        "the lighthouse keeper saw a sea serpent",
    ];
    match name {
        "player" => format!("p{}", rng.random_range(0..2000)),
        "ship" => SHIPS[rng.random_range(0..SHIPS.len())].into(),
        "rumour" => RUMOURS[rng.random_range(0..RUMOURS.len())].into(),
        other => format!("{other}-{}", rng.random_range(0..100)),
    }
}

/// Opens events at `plan.rate` (exponential gaps) for `plan.duration`, each on the shard the map names,
/// without waiting for one open before the next; returns once every open was answered.
pub async fn drive(
    client: async_nats::Client,
    templates: Arc<Templates>,
    plan: CityPlan,
    opens: Arc<Opens>,
) {
    let names = openable(&templates);
    let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed);
    let start = Instant::now();
    let mut next = Duration::ZERO;
    let mut inflight = futures::stream::FuturesUnordered::new();
    let mut i = 0u64;
    while next < plan.duration {
        let t = &templates.catalog.events[&names[rng.random_range(0..names.len())]];
        let values = t
            .values
            .iter()
            .map(|v| (v.clone(), value(v, &mut rng)))
            .collect();
        let zone = format!("{}-{}", t.district, rng.random_range(0..plan.zones));
        let req = OpenEvent {
            template: t.name.clone(),
            gm_event: Some(format!("city-{}-{i}", plan.seed)),
            district: None,
            zone: Some(zone),
            values,
        };
        i += 1;
        let gap = -(1.0 - rng.random::<f64>()).ln() / plan.rate;
        next += Duration::from_secs_f64(gap);
        let shard = templates.route(&req).unwrap_or_default();
        let (client, opens) = (client.clone(), opens.clone());
        inflight.push(async move {
            let ok = open(&client, &shard, &req).await;
            let n = if ok { &opens.opened } else { &opens.failed };
            n.fetch_add(1, Ordering::Relaxed);
        });
        let wait = next.saturating_sub(start.elapsed());
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                Some(()) = inflight.next() => {}
            }
        }
    }
    while inflight.next().await.is_some() {}
}

async fn open(client: &async_nats::Client, shard: &str, req: &OpenEvent) -> bool {
    let Ok(payload) = serde_json::to_vec(req) else {
        return false;
    };
    let subject = nimmer_wire::subjects::gm_open(shard);
    match tokio::time::timeout(
        Duration::from_secs(10),
        client.request(subject, payload.into()),
    )
    .await
    {
        Ok(Ok(reply)) => match serde_json::from_slice::<Opened>(&reply.payload) {
            Ok(_) => true,
            Err(_) => {
                tracing::warn!(shard, answer = %String::from_utf8_lossy(&reply.payload), "an open was refused");
                false
            }
        },
        Ok(Err(e)) => {
            tracing::warn!(shard, error = %e, "an open went unanswered");
            false
        }
        Err(_) => false,
    }
}

/// One look at the city.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Open events (director rows: the active register).
    pub open_events: i64,
    pub completed_events: i64,
    /// Scene rows of open events (the canon register's active part).
    pub scene_rows: i64,
    /// Outbox rows the relay has not published yet.
    pub outbox_rows: i64,
    pub canon_rows: i64,
    /// Event durations (open to completion) of events completed in the last `window`, seconds: p50, p95.
    pub event_s: (f64, f64),
    /// Canon lag (dialog finished to canon row) of rows made in the last `window`, seconds: p50, p95.
    pub canon_lag_s: (f64, f64),
    /// Bytes per stream.
    pub stream_bytes: BTreeMap<String, u64>,
}

/// Samples the register, canon and the streams (`window`: how far back durations and lags look).
pub async fn sample(
    pool: &sqlx::PgPool,
    js: &async_nats::jetstream::Context,
    streams: &[&str],
    window: Duration,
) -> crate::Result<Sample> {
    let count =
        |sql: &'static str| async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await };
    let pcts = |sql: &'static str| async move {
        sqlx::query_as::<_, (Option<f64>, Option<f64>)>(sql)
            .bind(window.as_secs_f64())
            .fetch_one(pool)
            .await
            .map(|(a, b)| (a.unwrap_or(f64::NAN), b.unwrap_or(f64::NAN)))
    };
    let mut s = Sample {
        open_events: count("SELECT count(*) FROM directors").await?,
        completed_events: count("SELECT count(*) FROM events WHERE status = 'completed'").await?,
        scene_rows: count("SELECT count(*) FROM scenes").await?,
        outbox_rows: count("SELECT count(*) FROM outbox").await?,
        canon_rows: count("SELECT count(*) FROM canon").await?,
        event_s: pcts(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d), percentile_cont(0.95) WITHIN GROUP (ORDER BY d)
             FROM (SELECT extract(epoch FROM completed_at - opened_at)::float8 AS d FROM events
                   WHERE completed_at > now() - make_interval(secs => $1)) x",
        )
        .await?,
        canon_lag_s: pcts(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d), percentile_cont(0.95) WITHIN GROUP (ORDER BY d)
             FROM (SELECT extract(epoch FROM created_at - finished_at)::float8 AS d FROM canon
                   WHERE created_at > now() - make_interval(secs => $1)) x",
        )
        .await?,
        stream_bytes: BTreeMap::new(),
    };
    for name in streams {
        if let Ok(mut st) = js.get_stream(*name).await
            && let Ok(info) = st.info().await
        {
            s.stream_bytes.insert(name.to_string(), info.state.bytes);
        }
    }
    Ok(s)
}

/// Reading Prometheus text from the processes' `/metrics` (tokens/s per tier, slot latency).
pub mod prom {
    /// `metric`'s series in `text` whose labels contain every `filters` pair (`tier="driver"`), as (labels,
    /// value).
    fn series<'a>(text: &'a str, metric: &str, filters: &[&str]) -> Vec<(&'a str, f64)> {
        text.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(metric)?;
                let (labels, value) = match rest.strip_prefix('{') {
                    Some(r) => r.split_once("} ")?,
                    None => ("", rest.strip_prefix(' ')?),
                };
                filters
                    .iter()
                    .all(|f| labels.contains(f))
                    .then(|| Some((labels, value.trim().parse().ok()?)))?
            })
            .collect()
    }

    /// The sum of `metric`'s matching series (a counter summed over its other labels).
    pub fn sum(text: &str, metric: &str, filters: &[&str]) -> f64 {
        series(text, metric, filters).iter().map(|s| s.1).sum()
    }

    /// Histogram `metric`'s cumulative bucket counts by upper bound, summed over the matching series.
    pub fn buckets(text: &str, metric: &str, filters: &[&str]) -> Vec<(f64, f64)> {
        let mut by_le: std::collections::BTreeMap<u64, (f64, f64)> = Default::default();
        for (labels, v) in series(text, &format!("{metric}_bucket"), filters) {
            let Some(le) = labels
                .split(',')
                .find_map(|kv| kv.strip_prefix("le=\""))
                .map(|x| x.trim_end_matches('"'))
            else {
                continue;
            };
            let le: f64 = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::INFINITY)
            };
            by_le.entry(le.to_bits()).or_insert((le, 0.0)).1 += v;
        }
        let mut out: Vec<(f64, f64)> = by_le.into_values().collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }

    /// The `q` quantile of what was observed between two bucket readings (the upper bound of the bucket it
    /// falls in; NaN when nothing was).
    pub fn quantile(now: &[(f64, f64)], before: &[(f64, f64)], q: f64) -> f64 {
        let at = |b: &[(f64, f64)], le: f64| b.iter().find(|x| x.0 == le).map_or(0.0, |x| x.1);
        let total = now.last().map_or(0.0, |l| l.1 - at(before, l.0));
        if total <= 0.0 {
            return f64::NAN;
        }
        now.iter()
            .find(|(le, c)| c - at(before, *le) >= q * total)
            .map_or(f64::NAN, |x| x.0)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn counters_sum_over_labels_and_quantiles_come_from_bucket_deltas() {
            let a = "nimmer_tokens_total{tier=\"driver\",class=\"x\",kind=\"completion\"} 10\n\
                     nimmer_tokens_total{tier=\"driver\",class=\"y\",kind=\"completion\"} 5\n\
                     nimmer_tokens_total{tier=\"driver\",class=\"y\",kind=\"prompt\"} 99\n\
                     h_bucket{k=\"a\",le=\"0.1\"} 1\nh_bucket{k=\"a\",le=\"1\"} 2\nh_bucket{k=\"a\",le=\"+Inf\"} 2\n";
            assert_eq!(
                sum(
                    a,
                    "nimmer_tokens_total",
                    &["tier=\"driver\"", "kind=\"completion\""]
                ),
                15.0
            );
            let b = "h_bucket{k=\"a\",le=\"0.1\"} 1\nh_bucket{k=\"a\",le=\"1\"} 12\nh_bucket{k=\"a\",le=\"+Inf\"} 13\n";
            let (before, now) = (buckets(a, "h", &[]), buckets(b, "h", &[]));
            assert_eq!(quantile(&now, &before, 0.5), 1.0);
            assert_eq!(quantile(&now, &before, 0.99), f64::INFINITY);
            assert!(quantile(&before, &before, 0.5).is_nan());
        }
    }
}

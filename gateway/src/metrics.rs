//! Prometheus metrics: the recorder (installed once per process) and the names and labels the gateway
//! records, so they are spelled in one place. The engine records its batch sizes and step times itself
//! (`nimmer_batch_*`, `nimmer_step_seconds`, `nimmer_step_target_tokens`).
//!
//! Per tier and zone class: `nimmer_requests_total{outcome}` (admitted, or rejected with the reason),
//! `nimmer_tokens_total{kind=prompt|completion}` (tokens/s is its rate), `nimmer_slot_wait_seconds` and
//! `nimmer_ttft_seconds` histograms, `nimmer_degraded_total`. Per tier: `nimmer_slots_in_use`,
//! `nimmer_slots_capacity`, `nimmer_queue_depth`. Gateway-wide: `nimmer_zones_active`,
//! `nimmer_config_version`, `nimmer_config_reloads_total{result}`, `nimmer_results_published_total{result}`,
//! `nimmer_results_durable_seconds{via=jetstream|spool|memory}` (what an answer waited for), `nimmer_results_spooled`;
//! trait-LoRAs: `nimmer_lora_resident`, `nimmer_lora_resident_bytes`, `nimmer_lora_loads_total`,
//! `nimmer_lora_evictions_total`, `nimmer_lora_load_seconds`.

use std::sync::OnceLock;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use nimmer_config::TierName;

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// The process-wide Prometheus recorder; installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Prefix("nimmer_batch".into()), BATCH_BUCKETS)
            })
            .expect("bucket lists are not empty")
            .install_recorder()
            .expect("the Prometheus recorder is the process's only recorder")
    })
}

pub fn admitted(tier: TierName, class: &str) {
    counter!("nimmer_requests_total", "tier" => tier.as_str(), "class" => class.to_string(), "outcome" => "admitted")
        .increment(1);
}

/// `reason`: over_budget (queue full or token rate), deadline, invalid, ...
pub fn rejected(tier: TierName, class: &str, reason: &'static str) {
    counter!("nimmer_requests_total", "tier" => tier.as_str(), "class" => class.to_string(), "outcome" => reason)
        .increment(1);
}

pub fn degraded(class: &str, reason: &'static str) {
    counter!("nimmer_degraded_total", "class" => class.to_string(), "reason" => reason)
        .increment(1);
}

pub fn slot_wait(tier: TierName, class: &str, secs: f64) {
    histogram!("nimmer_slot_wait_seconds", "tier" => tier.as_str(), "class" => class.to_string())
        .record(secs);
}

pub fn finished(tier: TierName, class: &str, prompt: usize, completion: usize, ttft_s: f64) {
    let labels = [
        ("tier", tier.as_str().to_string()),
        ("class", class.to_string()),
    ];
    histogram!("nimmer_ttft_seconds", &labels).record(ttft_s);
    counter!("nimmer_tokens_total", "tier" => tier.as_str(), "class" => class.to_string(), "kind" => "prompt")
        .increment(prompt as u64);
    counter!("nimmer_tokens_total", "tier" => tier.as_str(), "class" => class.to_string(), "kind" => "completion")
        .increment(completion as u64);
}

pub fn slots(tier: TierName, in_use: usize, capacity: usize, queued: usize) {
    gauge!("nimmer_slots_in_use", "tier" => tier.as_str()).set(in_use as f64);
    gauge!("nimmer_slots_capacity", "tier" => tier.as_str()).set(capacity as f64);
    gauge!("nimmer_queue_depth", "tier" => tier.as_str()).set(queued as f64);
}

pub fn zones_active(n: usize) {
    gauge!("nimmer_zones_active").set(n as f64);
}

pub fn config_version(v: u64) {
    gauge!("nimmer_config_version").set(v as f64);
}

pub fn config_reload(ok: bool) {
    counter!("nimmer_config_reloads_total", "result" => if ok { "applied" } else { "rejected" })
        .increment(1);
}

pub fn loras(s: &nimmer_loras::RegistryStats) {
    gauge!("nimmer_lora_resident").set(s.resident as f64);
    gauge!("nimmer_lora_resident_bytes").set(s.resident_bytes as f64);
    counter!("nimmer_lora_loads_total").absolute(s.loads);
    counter!("nimmer_lora_evictions_total").absolute(s.evictions);
}

pub fn lora_load(secs: f64) {
    histogram!("nimmer_lora_load_seconds").record(secs);
}

pub fn result_published(ok: bool) {
    counter!("nimmer_results_published_total", "result" => if ok { "acked" } else { "failed" })
        .increment(1);
}

/// A finished dialog became durable (acked by JetStream, or synced to the spool, or only held in memory when
/// there is no spool) after `secs`.
pub fn result_durable(via: &'static str, secs: f64) {
    histogram!("nimmer_results_durable_seconds", "via" => via).record(secs);
}

/// Results in the spool waiting for JetStream.
pub fn results_spooled(n: usize) {
    gauge!("nimmer_results_spooled").set(n as f64);
}

/// A finished dialog waited for room in the results queue.
pub fn results_backpressure() {
    counter!("nimmer_results_backpressure_total").increment(1);
}

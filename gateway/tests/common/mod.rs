//! Helpers of the gateway's tests on fake tiers: a gateway on scripted tiers behind `http::app()`, requests
//! through `oneshot` (no model, no socket), and polling.
#![allow(dead_code)] // each test binary uses some of them

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use nimmer_config::{Config, Sources};
use nimmer_gateway::tier::fake::Fakes;
use nimmer_gateway::{Auth, Gateway, http};
use serde_json::{Value, json};
use tower::ServiceExt;

/// Each dialog its own slot: a repeated UID is a repeat of one line (it gets the first answer).
pub static NEXT_SLOT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

/// The embedded budgets with each `(from, to)` replaced once.
pub fn budgets(edits: &[(&str, &str)]) -> String {
    let mut text = Sources::embedded().budgets;
    for (from, to) in edits {
        assert!(text.contains(from), "budgets.toml has no `{from}`");
        text = text.replacen(from, to, 1);
    }
    text
}

/// The Driver with one slot and a queue of `queue`.
pub fn one_driver_slot(queue: usize) -> String {
    budgets(&[(
        "[tiers.driver]\nslots = 128\nreserved_slots = 32\nqueue = 256",
        &format!("[tiers.driver]\nslots = 1\nqueue = {queue}"),
    )])
}

pub fn gateway(budgets_toml: &str, fakes: &Fakes) -> (Arc<Gateway>, Router) {
    let mut sources = Sources::embedded();
    sources.budgets = budgets_toml.to_string();
    let config = Config::parse(sources, "test").expect("test budgets are valid");
    let gw = Arc::new(Gateway::with_tiers(config, None, fakes.tiers()));
    let app = http::app(gw.clone(), Auth::default());
    (gw, app)
}

pub fn dialog(zone: &str, kind: &str, prompt: &str) -> Value {
    json!({ "uid": format!("ev1/docks/pier/s{}", NEXT_SLOT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)), "zone": zone, "kind": kind, "npc": { "id": "mira" },
            "prompt": prompt, "max_tokens": 4 })
}

/// Sends `body` to `path`; the status, the headers and the JSON answer (`null` when not JSON).
pub async fn send(
    app: &Router,
    path: &str,
    body: &Value,
) -> (StatusCode, header::HeaderMap, Value) {
    let req = Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (parts.status, parts.headers, json)
}

pub async fn get(app: &Router, path: &str) -> (StatusCode, Value) {
    let req = Request::get(path).body(Body::empty()).expect("request");
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Polls `check` every 5 ms until it holds (panics after 10 s).
pub async fn until(what: &str, check: impl Fn() -> bool) {
    for _ in 0..2000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting until {what}");
}

pub fn queued(gw: &Gateway, zone: &str) -> usize {
    gw.zones()
        .get(zone)
        .and_then(|z| z.queued.get(&nimmer_gateway::Tier::Driver).copied())
        .unwrap_or(0)
}

pub fn spawn_send(app: &Router, body: Value) -> tokio::task::JoinHandle<(StatusCode, Value)> {
    let app = app.clone();
    tokio::spawn(async move {
        let (s, _, v) = send(&app, "/v1/dialog", &body).await;
        (s, v)
    })
}

pub async fn put(app: &Router, path: &str, body: &Value) -> (StatusCode, Value) {
    let req = Request::put(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

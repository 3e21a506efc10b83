//! Stopping requests on fake tiers: `DELETE /v1/requests/{id}` ends a streamed dialog mid-generation (its
//! stream ends with a `cancelled` error, the tier's sequence is dropped) and then is a 404; a dialog with
//! `supersede: true` stops the line still waiting or running for the same NPC in the same zone (409 saying by
//! whom) and runs itself; without it both run; an OpenAI stream stops by its response `id`.

mod common;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::{gateway, spawn_send, until};
use http_body_util::BodyExt;
use nimmer_config::Sources;
use nimmer_gateway::tier::fake::Fakes;
use serde_json::{Value, json};
use tower::ServiceExt;

async fn delete(app: &Router, path: &str) -> (StatusCode, Value) {
    let req = Request::delete(path).body(Body::empty()).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// POSTs `body` and reads the whole (SSE) response body as text, in a task.
fn spawn_stream(app: &Router, path: &str, body: Value) -> tokio::task::JoinHandle<String> {
    let (app, path) = (app.clone(), path.to_string());
    tokio::spawn(async move {
        let req = Request::post(path.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    })
}

fn line(uid: &str, npc: &str, supersede: bool) -> Value {
    json!({ "uid": uid, "zone": "docks", "kind": "dialog", "npc": { "id": npc },
            "prompt": "Say something.", "max_tokens": 40, "supersede": supersede })
}

#[tokio::test]
async fn delete_stops_a_streamed_dialog_mid_generation() {
    let fakes = Fakes::new(40, Duration::from_millis(20));
    let (gw, app) = gateway(&Sources::embedded().budgets, &fakes);
    let mut body = line("ev1/docks/pier/k1", "mira", false);
    body["stream"] = json!(true);
    let stream = spawn_stream(&app, "/v1/dialog", body);
    let f = fakes.driver.clone();
    until("the dialog runs", move || {
        f.running.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    // The UID is the id (its slashes are part of the path).
    let (status, v) = delete(&app, "/v1/requests/ev1/docks/pier/k1").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["cancelled"], "ev1/docks/pier/k1");
    let sse = tokio::time::timeout(Duration::from_secs(5), stream)
        .await
        .unwrap()
        .unwrap();
    assert!(sse.contains("event: token"), "{sse}");
    assert!(
        sse.contains("event: error") && sse.contains("\"kind\":\"cancelled\""),
        "{sse}"
    );
    assert!(!sse.contains("event: done"), "{sse}");
    let f = fakes.driver.clone();
    until("the tier's sequence is dropped", move || {
        f.cancelled.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    assert!(gw.requests().is_empty(), "unregistered");
    let (status, _) = delete(&app, "/v1/requests/ev1/docks/pier/k1").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_superseding_line_stops_the_npcs_running_one_and_only_that() {
    let fakes = Fakes::new(3, Duration::ZERO);
    let (gw, app) = gateway(&Sources::embedded().budgets, &fakes);
    fakes.driver.hold();
    let first = spawn_send(&app, line("ev1/docks/pier/a1", "mira", false));
    let other = spawn_send(&app, line("ev1/docks/pier/t1", "tom", false));
    let f = fakes.driver.clone();
    until("both wait in the tier", move || f.submitted() == 2).await;
    // Without supersede, another line of mira's would just run as well; with it, mira's first line stops.
    let second = spawn_send(&app, line("ev1/docks/pier/a2", "mira", true));
    let (status, v) = tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["kind"], "cancelled");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("superseded by `ev1/docks/pier/a2`"),
        "{v}"
    );
    fakes.driver.release();
    let (status, v) = second.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = other.await.unwrap();
    assert_eq!(status, StatusCode::OK, "tom's line is not mira's: {v}");
    assert!(gw.requests().is_empty());
    let both = [
        line("ev1/docks/pier/a3", "mira", false),
        line("ev1/docks/pier/a4", "mira", false),
    ];
    for b in both {
        let (status, v) = spawn_send(&app, b).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{v}");
    }
}

#[tokio::test]
async fn an_openai_stream_stops_by_its_response_id() {
    let fakes = Fakes::new(40, Duration::from_millis(20));
    let (_gw, app) = gateway(&Sources::embedded().budgets, &fakes);
    let body = json!({ "model": "driver", "stream": true, "max_tokens": 40,
                       "messages": [{ "role": "user", "content": "hi" }] });
    let stream = spawn_stream(&app, "/v1/chat/completions", body);
    let f = fakes.driver.clone();
    until("the completion runs", move || {
        f.running.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    // The first Driver slot of a fresh gateway: its response id.
    let (status, v) = delete(&app, "/v1/requests/chatcmpl-driver-1").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let sse = tokio::time::timeout(Duration::from_secs(5), stream)
        .await
        .unwrap()
        .unwrap();
    assert!(sse.contains("\"id\":\"chatcmpl-driver-1\""), "{sse}");
    assert!(
        sse.contains("event: error") && sse.contains("\"type\":\"cancelled\""),
        "{sse}"
    );
    assert!(!sse.contains("[DONE]"), "{sse}");
}

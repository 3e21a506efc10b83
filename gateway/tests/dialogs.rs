//! What one dialog may carry and how a repeat is answered, on fake tiers: the limits in budgets.toml
//! `[dialogs]` (422 naming the field, before any tier work) and idempotency (a repeat gets the first answer).

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::*;
use http_body_util::BodyExt;
use nimmer_config::Sources;
use nimmer_gateway::tier::fake::Fakes;
use serde_json::json;
use tower::ServiceExt;

#[tokio::test]
async fn a_dialog_naming_more_participants_than_the_budget_allows_is_refused_naming_the_field() {
    let fakes = Fakes::new(2, Duration::ZERO);
    let budgets =
        Sources::embedded()
            .budgets
            .replacen("max_participants = 64", "max_participants = 3", 1);
    let (_gw, app) = gateway(&budgets, &fakes);
    let mut body = dialog("a", "dialog", "x");
    body["participants"] = json!(["p1", "p2", "p3", "p4"]);
    let (status, _, v) = send(&app, "/v1/dialog", &body).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["field"], "participants", "{v}");
    assert_eq!(fakes.driver.submitted(), 0);
    body["participants"] = json!(["p1", "p2", "p3"]);
    let (status, _, v) = send(&app, "/v1/dialog", &body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn a_dialog_over_the_prompt_limits_is_refused_naming_the_field_before_any_tier_work() {
    let fakes = Fakes::new(2, Duration::ZERO);
    let budgets = Sources::embedded()
        .budgets
        .replacen("max_messages = 256", "max_messages = 3", 1)
        .replacen("max_prompt_chars = 65536", "max_prompt_chars = 20", 1);
    let (_gw, app) = gateway(&budgets, &fakes);
    let msg = |content: &str| json!({ "role": "user", "content": content });
    let chat = |messages: Vec<serde_json::Value>| {
        let mut b = dialog("a", "dialog", "x");
        b.as_object_mut().unwrap().remove("prompt");
        b["messages"] = json!(messages);
        b
    };
    let refused = [
        (
            chat(vec![msg("a"), msg("b"), msg("c"), msg("d")]),
            "messages",
            "4 messages",
        ),
        (
            chat(vec![msg("0123456789"), msg("0123456789ü")]),
            "messages",
            "21 characters",
        ),
        (
            dialog("a", "dialog", &"ü".repeat(21)),
            "prompt",
            "21 characters",
        ),
        (
            json!({ "uid": "ev1/docks/pier/cls", "zone": "a", "kind": "classify",
                    "classifier": "ternary-gate", "prompt": "x".repeat(21) }),
            "input",
            "21 characters",
        ),
    ];
    for (body, field, says) in refused {
        let (status, _, v) = send(&app, "/v1/dialog", &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert_eq!(v["field"], field, "{v}");
        assert!(v.to_string().contains(says), "{v}");
    }
    // The OpenAI-compatible route has the same limits.
    let body = json!({ "model": "driver", "messages": [msg("a"), msg("b"), msg("c"), msg("d")] });
    let (status, _, v) = send(&app, "/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(fakes.driver.submitted(), 0, "nothing reached a tier");
    // At the limits: served.
    let (status, _, v) = send(
        &app,
        "/v1/dialog",
        &chat(vec![msg("0123456789"), msg("0123456789")]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn a_repeated_dialog_gets_the_first_answer_whether_it_still_runs_or_is_done() {
    let fakes = Fakes::new(3, Duration::ZERO);
    let (gw, app) = gateway(&Sources::embedded().budgets, &fakes);
    let mut body = dialog("a", "dialog", "x");
    body["uid"] = json!("ev1/docks/pier/repeat");
    // Twice at once: one runs, the other waits for its answer.
    fakes.driver.hold();
    let first = spawn_send(&app, body.clone());
    until("the first runs", || fakes.driver.submitted() == 1).await;
    let second = spawn_send(&app, body.clone());
    until("the repeat waits", || gw.idempotency().len() == 1).await;
    fakes.driver.release();
    let ((s1, v1), (s2, v2)) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK), "{v1} {v2}");
    assert_eq!(v1, v2, "the same answer to both callers");
    // Later: the stored answer, as a stream too (its final event).
    let (s3, _, v3) = send(&app, "/v1/dialog", &body).await;
    assert_eq!((s3, &v3), (StatusCode::OK, &v1));
    body["stream"] = json!(true);
    let req = Request::post("/v1/dialog")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let sse = String::from_utf8_lossy(&bytes);
    assert!(sse.contains("event: done"), "{sse}");
    assert!(sse.contains(v1["text"].as_str().unwrap()), "{sse}");
    assert_eq!(fakes.driver.submitted(), 1, "one generation for all four");
    // Another idempotency key is another line.
    body["stream"] = json!(false);
    body["idempotency_key"] = json!("retry-2");
    let (s4, _, _) = send(&app, "/v1/dialog", &body).await;
    assert_eq!(s4, StatusCode::OK);
    assert_eq!(fakes.driver.submitted(), 2);
}

#[tokio::test]
async fn a_repeat_of_a_refused_dialog_runs_afresh() {
    let fakes = Fakes::new(3, Duration::ZERO);
    let (gw, app) = gateway(&Sources::embedded().budgets, &fakes);
    let mut body = dialog("a", "dialog", "x");
    body["uid"] = json!("ev1/docks/pier/refused");
    fakes.driver.kill();
    let (s1, _, _) = send(&app, "/v1/dialog", &body).await;
    assert_eq!(s1, StatusCode::SERVICE_UNAVAILABLE);
    assert!(gw.idempotency().is_empty(), "a failure keeps no answer");
    let (s2, _, _) = send(&app, "/v1/dialog", &body).await;
    assert_eq!(s2, StatusCode::SERVICE_UNAVAILABLE);
}

/// Two gateways (and later a third) on one nats-server share first answers: a repeat on B while A runs the
/// dialog gets A's answer without running it, a gateway started later gets it from the bucket, and a first
/// that fails frees the key everywhere, so the repeat on B runs it.
#[tokio::test]
async fn a_repeat_on_another_gateway_gets_the_first_answer_and_runs_when_the_first_failed() {
    use nimmer_gateway::shared_answers::SharedAnswers;
    let server = nimmer_services::NatsServer::start();
    let budgets = Sources::embedded().budgets;
    let start = |fakes: &Fakes| {
        let (gw, app) = gateway(&budgets, fakes);
        let url = server.url.clone();
        async move {
            let client = async_nats::connect(&url).await.unwrap();
            gw.share_answers(SharedAnswers::start(client, Duration::from_secs(600), 1));
            until("the answers bucket exists", || {
                gw.shared_answers().unwrap().ready()
            })
            .await;
            (gw, app)
        }
    };
    let (fa, fb) = (Fakes::new(3, Duration::ZERO), Fakes::new(3, Duration::ZERO));
    let (_gw_a, app_a) = start(&fa).await;
    let (gw_b, app_b) = start(&fb).await;

    let mut body = dialog("a", "dialog", "x");
    body["uid"] = json!("ev1/docks/pier/shared");
    fa.driver.hold();
    let first = spawn_send(&app_a, body.clone());
    until("A runs it", || fa.driver.submitted() == 1).await;
    let second = spawn_send(&app_b, body.clone());
    until("B waits", || gw_b.idempotency().len() == 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    fa.driver.release();
    let ((s1, v1), (s2, v2)) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK), "{v1} {v2}");
    assert_eq!(v1, v2, "the same answer through both gateways");
    assert_eq!(fb.driver.submitted(), 0, "B did not run it");

    let fc = Fakes::new(3, Duration::ZERO);
    let (_gw_c, app_c) = start(&fc).await;
    let (s3, _, v3) = send(&app_c, "/v1/dialog", &body).await;
    assert_eq!((s3, &v3), (StatusCode::OK, &v1));
    assert_eq!(fc.driver.submitted(), 0, "C answered from the bucket");

    // The first fails on A while B waits: B runs it.
    body["uid"] = json!("ev1/docks/pier/shared-2");
    fa.driver.hold();
    let first = spawn_send(&app_a, body.clone());
    until("A runs the second", || fa.driver.submitted() == 2).await;
    let second = spawn_send(&app_b, body.clone());
    until("B waits", || gw_b.idempotency().len() == 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    fa.driver.kill();
    let ((s1, _), (s2, v2)) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!(s1, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(s2, StatusCode::OK, "{v2}");
    assert_eq!(
        fb.driver.submitted(),
        1,
        "B ran it once A's claim was freed"
    );
}

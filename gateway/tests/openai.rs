//! OpenAI's text completions (`POST /v1/completions`) on fake tiers: whole and streamed (the same text,
//! `text_completion` chunks, `[DONE]`), the raw prompt reaching the tier as text, and what is not supported
//! refused with a 422 naming the field before any tier is asked.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::{gateway, send};
use http_body_util::BodyExt;
use nimmer_config::Sources;
use nimmer_gateway::tier::fake::Fakes;
use serde_json::{Value, json};
use tower::ServiceExt;

#[tokio::test]
async fn text_completions_are_served_whole_and_streamed() {
    let fakes = Fakes::new(3, Duration::ZERO);
    let (_gw, app) = gateway(&Sources::embedded().budgets, &fakes);
    let body = json!({ "model": "driver", "prompt": "The harbour at dawn", "max_tokens": 8, "temperature": 0 });
    let (status, _, v) = send(&app, "/v1/completions", &body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"), "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(text, "w0 w1 w2 ");
    let finish = v["choices"][0]["finish_reason"].clone();
    assert!(finish.is_string(), "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let req = Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(streamed.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let sse = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let data: Vec<&str> = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let joined: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(joined, text);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], finish);
    assert_eq!(last["usage"]["completion_tokens"], 3);
    // A list of one prompt is one prompt; the default of 16 new tokens applies.
    let (status, _, v) = send(
        &app,
        "/v1/completions",
        &json!({ "model": "theia", "prompt": ["Bells"] }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(fakes.driver.submitted() + fakes.theia.submitted(), 3);
}

#[tokio::test]
async fn what_completions_do_not_support_is_refused_by_field() {
    let fakes = Fakes::new(3, Duration::ZERO);
    let (_gw, app) = gateway(&Sources::embedded().budgets, &fakes);
    let base = json!({ "model": "driver", "prompt": "x" });
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    for (body, field) in [
        (with("model", json!("gpt-3.5-turbo-instruct")), "model"),
        (with("n", json!(2)), "n"),
        (with("echo", json!(true)), "echo"),
        (with("logprobs", json!(2)), "logprobs"),
        (with("suffix", json!("end")), "suffix"),
        (with("prompt", json!(["a", "b"])), "prompt"),
        (with("prompt", json!("")), "prompt"),
        (with("user", json!("a b")), "user"),
        (with("colour", json!(1)), "colour"),
    ] {
        let (status, _, v) = send(&app, "/v1/completions", &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body} -> {v}");
        assert!(
            v["field"] == field || v["error"].as_str().unwrap_or("").contains(field),
            "{body} -> {v}"
        );
    }
    assert_eq!(fakes.driver.submitted(), 0, "nothing reached a tier");
}

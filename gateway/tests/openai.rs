//! OpenAI's surface on fake tiers: text completions (`POST /v1/completions`) whole and streamed (the same
//! text, `text_completion` chunks, `[DONE]`), the raw prompt reaching the tier as text; the models list
//! (tiers and `driver:<adapter>`); embeddings as floats and as base64 (the same vector); and what is not
//! supported refused with a 422 naming the field before any tier is asked.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine as _;
use common::{gateway, get, send};
use http_body_util::BodyExt;
use nimmer_config::Sources;
use nimmer_gateway::tier::fake::Fakes;
use nimmer_tiers::ResponseFormat;
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
        (with("logprobs", json!(21)), "logprobs"),
        (with("suffix", json!("end")), "suffix"),
        (with("prompt", json!(["a", "b"])), "prompt"),
        (with("prompt", json!("")), "prompt"),
        (with("user", json!("a b")), "user"),
        (with("colour", json!(1)), "colour"),
    ] {
        let (status, _, v) = send(&app, "/v1/completions", &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body} -> {v}");
        assert!(
            v["error"]["param"] == field
                || v["error"]["message"].as_str().unwrap_or("").contains(field),
            "{body} -> {v}"
        );
    }
    assert_eq!(fakes.driver.submitted(), 0, "nothing reached a tier");
}

#[tokio::test]
async fn models_list_the_tiers_and_each_adapter_as_a_driver_model() {
    let fakes = Fakes::new(3, Duration::ZERO);
    let (_gw, app) = gateway(&Sources::embedded().budgets, &fakes);
    let (status, v) = get(&app, "/v1/models").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for id in ["driver", "theia", "saturn", "driver:sailor", "driver:terse"] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    assert!(
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["object"] == "model")
    );
    // An adapter no trait voices is a 422 naming the model.
    let (status, _, v) = send(
        &app,
        "/v1/chat/completions",
        &json!({ "model": "driver:nosuch", "messages": [{ "role": "user", "content": "hi" }] }),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["param"], "model", "{v}");
    assert_eq!(v["error"]["code"], 422, "OpenAI's error shape: {v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("nosuch"),
        "{v}"
    );
    assert_eq!(fakes.driver.submitted(), 0);
}

#[tokio::test]
async fn embeddings_come_as_floats_or_base64_of_the_same_vectors() {
    let fakes = Fakes::new(3, Duration::ZERO);
    let (_gw, app) = gateway(&Sources::embedded().budgets, &fakes);
    let body = json!({ "model": "saturn", "input": ["the tide turns", "bells at noon"] });
    let (status, _, v) = send(&app, "/v1/embeddings", &body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "saturn");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["index"], 1);
    assert_eq!(data[1]["object"], "embedding");
    let floats: Vec<f32> = serde_json::from_value(data[0]["embedding"].clone()).unwrap();
    let norm: f32 = floats.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "normalized: {norm}");
    assert_eq!(v["usage"]["prompt_tokens"], 6);
    assert_eq!(v["usage"]["total_tokens"], 6);

    let mut b64 = body.clone();
    b64["encoding_format"] = json!("base64");
    let (status, _, v) = send(&app, "/v1/embeddings", &b64).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, floats);

    // One string is one input; asking for the encoder's own width is fine.
    let (status, _, v) = send(
        &app,
        "/v1/embeddings",
        &json!({ "model": "saturn", "input": "the tide turns", "dimensions": floats.len() }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let again: Vec<f32> = serde_json::from_value(v["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(again, floats);
}

#[tokio::test]
async fn what_embeddings_do_not_support_is_refused_by_field() {
    let fakes = Fakes::new(3, Duration::ZERO);
    let (_gw, app) = gateway(&Sources::embedded().budgets, &fakes);
    let base = json!({ "model": "saturn", "input": "x" });
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let many: Vec<String> = (0..65).map(|i| format!("t{i}")).collect();
    for (body, field) in [
        (with("model", json!("text-embedding-3-small")), "model"),
        (with("input", json!([1, 2, 3])), "input"),
        (with("input", json!([])), "input"),
        (with("input", json!(["a", " "])), "input"),
        (with("input", json!(many)), "input"),
        (with("dimensions", json!(3)), "dimensions"),
        (with("encoding_format", json!("int8")), "encoding_format"),
        (with("user", json!("a b")), "user"),
        (with("colour", json!(1)), "colour"),
    ] {
        let (status, _, v) = send(&app, "/v1/embeddings", &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body} -> {v}");
        assert!(
            v["error"]["param"] == field
                || v["error"]["message"].as_str().unwrap_or("").contains(field),
            "{body} -> {v}"
        );
    }
}

#[tokio::test]
async fn a_response_format_reaches_the_tier_and_a_broken_schema_is_refused_before_it() {
    let fakes = Fakes::new(3, Duration::ZERO);
    let (_gw, app) = gateway(&Sources::embedded().budgets, &fakes);
    let schema = json!({ "type": "object", "properties": { "line": { "type": "string" } }, "required": ["line"] });
    let chat = |format: Value| json!({ "model": "driver", "messages": [{ "role": "user", "content": "hi" }], "response_format": format });
    let (status, _, v) = send(
        &app,
        "/v1/chat/completions",
        &chat(json!({ "type": "json_schema", "json_schema": { "name": "npc", "schema": schema, "strict": true } })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, _, v) = send(
        &app,
        "/v1/chat/completions",
        &chat(json!({ "type": "json_object" })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, _, v) = send(
        &app,
        "/v1/chat/completions",
        &chat(json!({ "type": "text" })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let mut dialog = common::dialog("docks", "dialog", "Say something.");
    dialog["response_format"] = json!({ "type": "json_object" });
    let (status, _, v) = send(&app, "/v1/dialog", &dialog).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let formats = fakes.driver.formats.lock().unwrap().clone();
    assert_eq!(
        formats,
        [
            Some(ResponseFormat::JsonSchema { schema }),
            Some(ResponseFormat::JsonObject),
            None,
            Some(ResponseFormat::JsonObject),
        ]
    );

    for (format, field, says) in [
        (
            json!({ "type": "json_schema", "json_schema": { "name": "npc", "schema": { "type": "strnig" } } }),
            "response_format",
            "does not compile",
        ),
        (
            json!({ "type": "json_schema", "json_schema": { "name": "npc" } }),
            "response_format.json_schema.schema",
            "schema",
        ),
        (json!({ "type": "yaml" }), "response_format", "yaml"),
    ] {
        let (status, _, v) = send(&app, "/v1/chat/completions", &chat(format.clone())).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{format} -> {v}");
        let text = v.to_string();
        assert!(
            text.contains(field) && text.contains(says),
            "{format} -> {v}"
        );
    }
    let mut classify = common::dialog("docks", "classify", "A storm.");
    classify["classifier"] = json!("mood");
    classify["response_format"] = json!({ "type": "json_object" });
    let (status, _, v) = send(&app, "/v1/dialog", &classify).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(
        v["field"], "response_format",
        "the game route's own shape: {v}"
    );
    assert_eq!(fakes.driver.submitted(), 4, "refusals reached no tier");
}

#[tokio::test]
async fn log_probabilities_come_in_both_openai_shapes() {
    let fakes = Fakes::new(3, Duration::ZERO);
    let (_gw, app) = gateway(&Sources::embedded().budgets, &fakes);
    let chat = json!({ "model": "driver", "messages": [{ "role": "user", "content": "hi" }],
                       "logprobs": true, "top_logprobs": 2 });
    let (status, _, v) = send(&app, "/v1/chat/completions", &chat).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3);
    assert_eq!(content[1]["token"], "w1 ");
    assert_eq!(content[1]["logprob"], -0.25);
    assert_eq!(content[1]["bytes"], json!(b"w1 ".to_vec()));
    assert_eq!(content[1]["top_logprobs"].as_array().unwrap().len(), 2);
    assert_eq!(content[1]["top_logprobs"][1]["token"], "w2 ");
    // Without logprobs: null; top_logprobs alone is refused.
    let (_, _, v) = send(
        &app,
        "/v1/chat/completions",
        &json!({ "model": "driver", "messages": [{ "role": "user", "content": "hi" }] }),
    )
    .await;
    assert!(v["choices"][0]["logprobs"].is_null(), "{v}");
    let (status, _, v) = send(&app, "/v1/chat/completions", &json!({ "model": "driver", "messages": [{ "role": "user", "content": "hi" }], "top_logprobs": 2 })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"]["param"], "top_logprobs", "{v}");

    let (status, _, v) = send(
        &app,
        "/v1/completions",
        &json!({ "model": "driver", "prompt": "The bell", "logprobs": 1 }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"], json!(["w0 ", "w1 ", "w2 "]));
    assert_eq!(lp["token_logprobs"], json!([-0.25, -0.25, -0.25]));
    assert_eq!(lp["text_offset"], json!([0, 3, 6]));
    assert_eq!(lp["top_logprobs"][2], json!({ "w2 ": -0.25 }));
}

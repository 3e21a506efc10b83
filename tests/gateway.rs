//! The gateway over HTTP on 127.0.0.1:0 with the real models: every kind, SSE, the OpenAI-compatible API,
//! deadlines, disconnects, and a table of bad inputs that each get a precise 4xx while the gateway keeps serving.

use std::sync::OnceLock;
use std::time::Duration;

use futures::StreamExt;
use nimmer_e2e::http::{client, sse};
use serde_json::{Value, json};

/// Each dialog its own slot: a repeated UID is a repeat of one line (it gets the first answer).
static NEXT_SLOT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

const SYSTEM: &str = "You are a helpful assistant.";

fn base() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| nimmer_e2e::start_gateway(nimmer_e2e::config()))
}

fn dialog(kind: &str, user: &str) -> Value {
    json!({
        "uid": format!("ev7/harbour/pier/slot{}", NEXT_SLOT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)), "zone": "harbour-3", "kind": kind,
        "npc": { "id": "mira" },
        "messages": [{ "role": "system", "content": SYSTEM }, { "role": "user", "content": user }],
        "max_tokens": 24, "participants": ["p1", "p2"], "faction": "guild",
    })
}

async fn post(path: &str, body: &Value) -> (u16, Value) {
    nimmer_e2e::http::post(base(), path, body).await
}

#[tokio::test]
async fn dialog_is_served_by_the_driver() {
    let (status, v) = post(
        "/v1/dialog",
        &dialog("dialog", "What is the capital of France?"),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["text"].as_str().unwrap().contains("Paris"), "{v}");
    assert_eq!(v["tier"], "driver");
    assert_eq!(v["slot"]["zone"], "harbour-3");
    assert_eq!(v["uid"]["district"], "harbour");
    assert_eq!(v["degraded"], false);
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert!(v["timings"]["ttft_ms"].as_f64().unwrap() > 0.0);
}

#[tokio::test]
async fn deep_and_moment_are_served_by_theia() {
    for kind in ["deep", "moment"] {
        let (status, v) = post(
            "/v1/dialog",
            &dialog(kind, "What is the capital of France?"),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["tier"], "theia", "{kind}");
        assert!(v["text"].as_str().unwrap().contains("Paris"), "{v}");
    }
}

#[tokio::test]
async fn classify_is_served_by_saturn() {
    let body = json!({ "uid": "ev7/harbour/pier/classify1", "zone": "harbour-3", "kind": "classify", "classifier": "ternary-gate", "prompt": "You saved my life, thank you!" });
    let (status, v) = post("/v1/dialog", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["tier"], "saturn");
    assert_eq!(v["classification"]["label"], "+1");
    let (status, v) = post(
        "/v1/classify",
        &json!({ "classifier": "voice-selection", "inputs": ["Run, the soldiers are coming!"] }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["results"][0]["label"], "fearful");
}

#[tokio::test]
async fn a_streamed_dialog_sends_tokens_then_the_same_response() {
    let mut body = dialog("dialog", "What is the capital of France?");
    let (_, plain) = post("/v1/dialog", &body).await;
    // Another line (the same UID would be a repeat, answered with the first answer).
    body["idempotency_key"] = json!("streamed-again");
    body["stream"] = json!(true);
    let resp = client()
        .post(format!("{}/v1/dialog", base()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = sse(resp).await;
    let tokens: String = events
        .iter()
        .filter(|(e, _)| e == "token")
        .map(|(_, d)| {
            serde_json::from_str::<Value>(d).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let (last, data) = events.last().unwrap();
    assert_eq!(last, "done");
    let done: Value = serde_json::from_str(data).unwrap();
    assert_eq!(tokens, plain["text"].as_str().unwrap());
    assert_eq!(done["text"], plain["text"]);
    // The same counts (the second run may take its prompt's KV from the prefix cache).
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(done["usage"][k], plain["usage"][k], "{k}");
    }
}

#[tokio::test]
async fn openai_chat_completions_work_plain_and_streamed() {
    let body = json!({ "model": "driver", "messages": [{ "role": "system", "content": SYSTEM }, { "role": "user", "content": "What is the capital of France?" }], "max_tokens": 24, "temperature": 0 });
    let (status, v) = post("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(content.contains("Paris"), "{v}");
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);
    let mut body = body;
    body["stream"] = json!(true);
    let resp = client()
        .post(format!("{}/v1/chat/completions", base()))
        .json(&body)
        .send()
        .await
        .unwrap();
    let events = sse(resp).await;
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, content);
    let last = chunks.last().unwrap();
    assert!(last["choices"][0]["finish_reason"].is_string());
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(last["usage"][k], v["usage"][k], "{k}");
    }
    // The same prompt again: its KV came from the prefix cache (OpenAI's field for it).
    assert!(
        last["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            >= 16,
        "{last}"
    );
}

#[tokio::test]
async fn openai_text_completions_continue_a_raw_prompt() {
    let body = json!({ "model": "driver", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0 });
    let (status, v) = post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(!text.is_empty(), "{v}");
    // No chat template: the prompt is the text as given, so it costs its own tokens only.
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!((4..=8).contains(&prompt_tokens), "{v}");
}

/// What game code asks for: a line it can act on.
fn npc_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "line": { "type": "string", "maxLength": 80 },
            "emotion": { "enum": ["calm", "angry", "afraid", "glad"] },
            "action": { "enum": ["none", "wave", "walk_away", "draw_weapon"] }
        },
        "required": ["line", "emotion", "action"],
        "additionalProperties": false
    })
}

#[tokio::test]
async fn a_json_schema_shapes_the_drivers_answer_on_chat_and_dialog() {
    let messages = json!([
        { "role": "system", "content": "You are Mira, a dock worker. Answer as JSON." },
        { "role": "user", "content": "A stranger asks you the way to the market." }
    ]);
    let body = json!({
        "model": "driver", "messages": messages, "max_tokens": 96, "temperature": 0,
        "response_format": { "type": "json_schema", "json_schema": { "name": "npc_line", "schema": npc_schema(), "strict": true } },
    });
    let (status, v) = post("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let answer: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {content}"));
    let obj = answer.as_object().unwrap();
    assert_eq!(obj.len(), 3, "{answer}");
    assert!(
        answer["line"].as_str().unwrap().chars().count() <= 80,
        "{answer}"
    );
    assert!(["calm", "angry", "afraid", "glad"].contains(&answer["emotion"].as_str().unwrap()));
    assert!(
        ["none", "wave", "walk_away", "draw_weapon"].contains(&answer["action"].as_str().unwrap())
    );

    // The same on /v1/dialog, and any JSON object with `json_object`.
    let mut d = dialog("dialog", "Greet the stranger.");
    d["max_tokens"] = json!(64);
    d["response_format"] = json!({ "type": "json_object" });
    let (status, v) = post("/v1/dialog", &d).await;
    assert_eq!(status, 200, "{v}");
    let text = v["text"].as_str().unwrap();
    if v["finish_reason"] == "stop" {
        let parsed: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(parsed.is_object(), "{text}");
    } else {
        assert!(text.trim_start().starts_with('{'), "{v}");
    }

    // A schema that does not compile is a 422 that says why, before any slot.
    let mut bad = body.clone();
    bad["response_format"]["json_schema"]["schema"] =
        json!({ "type": "object", "properties": { "a": { "type": "strnig" } } });
    let (status, v) = post("/v1/chat/completions", &bad).await;
    assert_eq!(status, 422, "{v}");
    assert!(v.to_string().contains("strnig"), "{v}");
}

#[tokio::test]
async fn embeddings_come_from_saturns_encoder() {
    let body = json!({ "model": "saturn", "input": ["The tide is coming in.", "The sea rises over the pier.", "I owe you three coins."] });
    let (status, v) = post("/v1/embeddings", &body).await;
    assert_eq!(status, 200, "{v}");
    let vecs: Vec<Vec<f32>> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| serde_json::from_value(d["embedding"].clone()).unwrap())
        .collect();
    assert_eq!(vecs.len(), 3);
    assert_eq!(vecs[0].len(), 384, "MiniLM's width");
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    assert!((dot(&vecs[0], &vecs[0]) - 1.0).abs() < 1e-3, "normalized");
    assert!(
        dot(&vecs[0], &vecs[1]) > dot(&vecs[0], &vecs[2]),
        "the two sea lines are closer than the debt"
    );
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() >= 15, "{v}");
}

#[tokio::test]
async fn a_repeated_persona_is_served_from_the_prefix_cache_and_shows_in_zones_and_metrics() {
    let persona = "You are Brannoc, the lamplighter of Saltmarket. You are old, patient and superstitious. \
        You light the gas lamps of the market square every evening at dusk and you believe the lamps keep \
        the drowned sailors from walking up from the harbour. You speak slowly and you always mention the \
        weather. You distrust the new electric lights of the northern districts. Answer in one sentence.";
    let body = json!({
        "uid": "ev7/saltmarket/square/slot2", "zone": "saltmarket-1", "kind": "dialog",
        "npc": { "id": "brannoc" },
        "messages": [{ "role": "system", "content": persona }, { "role": "user", "content": "Good evening!" }],
        "max_tokens": 8,
    });
    let (status, first) = post("/v1/dialog", &body).await;
    assert_eq!(status, 200, "{first}");
    // The persona's next line (another slot): its prompt's KV comes from the prefix cache.
    let mut next = body.clone();
    next["uid"] = json!("ev7/saltmarket/square/slot3");
    let (status, again) = post("/v1/dialog", &next).await;
    assert_eq!(status, 200, "{again}");
    let prompt = again["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        again["usage"]["cached_tokens"].as_u64().unwrap(),
        (prompt - 1) / 16 * 16,
        "{again}"
    );
    assert_eq!(again["text"], first["text"], "the cached run says the same");
    let zones = nimmer_e2e::http::get(base(), "/v1/zones").await;
    let z = &zones["zones"]["saltmarket-1"]["prefix_cache"];
    assert!(
        z["cached_tokens"].as_u64().unwrap() >= (prompt - 1) / 16 * 16,
        "{zones}"
    );
    assert!(
        z["prompt_tokens"].as_u64().unwrap() >= 2 * prompt,
        "{zones}"
    );
    let driver = &zones["prefix_cache"]["driver"];
    assert!(driver["hits"].as_u64().unwrap() >= 1, "{zones}");
    assert!(driver["blocks"].as_u64().unwrap() >= 4, "{zones}");
    let metrics = nimmer_e2e::http::get_text(base(), "/metrics").await;
    for m in [
        "nimmer_prefix_cache_hits_total",
        "nimmer_prefix_cache_cached_tokens_total",
        "nimmer_prefix_cache_blocks",
    ] {
        assert!(
            metrics.contains(&format!("{m}{{tier=\"driver\"}}")),
            "{m} missing"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_cannot_start_before_its_deadline_gets_504() {
    // An idle engine admits a request within a millisecond, so keep it busy first: a ~1,000-token prompt
    // prefills over several long steps, and the engine admits new sequences only between steps.
    let mut busy = dialog(
        "dialog",
        &"Tell me everything about the harbour. ".repeat(120),
    );
    busy["zone"] = json!("harbour-9");
    let busy = tokio::spawn(async move { post("/v1/dialog", &busy).await });
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let mut body = dialog("dialog", "Tell me about the harbour.");
    body["deadline_ms"] = json!(1);
    let (status, v) = post("/v1/dialog", &body).await;
    assert_eq!(status, 504, "{v}");
    assert_eq!(v["kind"], "deadline");
    assert_eq!(busy.await.unwrap().0, 200);
}

#[tokio::test]
async fn a_client_that_disconnects_frees_its_slot() {
    let mut body = dialog("dialog", "Count slowly from one to one thousand.");
    body["zone"] = json!("disconnect-zone");
    body["stream"] = json!(true);
    body["max_tokens"] = json!(500);
    body["sampling"] = json!({ "ignore_eos": true });
    let resp = client()
        .post(format!("{}/v1/dialog", base()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let in_use = || async {
        let v: Value = client()
            .get(format!("{}/v1/zones", base()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["zones"]["disconnect-zone"]["slots_in_use"]["driver"]
            .as_u64()
            .unwrap_or(0)
    };
    assert_eq!(in_use().await, 1);
    drop(stream);
    for _ in 0..100 {
        if in_use().await == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the slot was not freed after the client disconnected");
}

/// (name, JSON body, or raw body, expected status, field the error must name)
type Case = (
    &'static str,
    Option<Value>,
    Option<&'static str>,
    u16,
    Option<&'static str>,
);

#[tokio::test]
async fn bad_input_gets_a_precise_4xx_and_the_gateway_keeps_serving() {
    let ok = dialog("dialog", "hi");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = ok.clone();
        f(&mut v);
        v
    };
    let cases: Vec<Case> = vec![
        ("malformed JSON", None, Some("{\"uid\": "), 400, None),
        (
            "wrong type",
            Some(with(&|v| v["max_tokens"] = json!("many"))),
            None,
            422,
            Some("max_tokens"),
        ),
        (
            "unknown kind",
            Some(with(&|v| v["kind"] = json!("shout"))),
            None,
            422,
            Some("kind"),
        ),
        (
            "unknown field",
            Some(with(&|v| v["mood"] = json!("happy"))),
            None,
            422,
            Some("mood"),
        ),
        (
            "empty messages",
            Some(with(&|v| v["messages"] = json!([]))),
            None,
            422,
            Some("messages"),
        ),
        (
            "messages and prompt",
            Some(with(&|v| v["prompt"] = json!("x"))),
            None,
            422,
            Some("messages"),
        ),
        (
            "max_tokens out of range",
            Some(with(&|v| v["max_tokens"] = json!(1_000_000))),
            None,
            422,
            Some("max_tokens"),
        ),
        (
            "temperature out of range",
            Some(with(&|v| v["sampling"] = json!({ "temperature": -2 }))),
            None,
            422,
            Some("temperature"),
        ),
        (
            "wildcard in uid",
            Some(with(&|v| v["uid"] = json!("ev7/>/pier/slot1"))),
            None,
            422,
            Some("uid.district"),
        ),
        (
            "dot in zone",
            Some(with(&|v| v["zone"] = json!("harbour.3"))),
            None,
            422,
            Some("zone"),
        ),
        (
            "short uid",
            Some(with(&|v| v["uid"] = json!("ev7/harbour"))),
            None,
            422,
            Some("uid"),
        ),
        (
            "trait weight",
            Some(with(&|v| v["npc"]["traits"] = json!({ "gruff": 3.0 }))),
            None,
            422,
            Some("npc.traits"),
        ),
        (
            "unknown trait",
            Some(with(&|v| v["npc"]["traits"] = json!({ "jolly": 1.0 }))),
            None,
            422,
            Some("npc.traits"),
        ),
        (
            "unknown classifier",
            Some(
                json!({ "uid": "a/b/c/d", "zone": "z", "kind": "classify", "classifier": "nope", "prompt": "hi" }),
            ),
            None,
            422,
            Some("classifier"),
        ),
        (
            "unknown role",
            Some(with(&|v| v["messages"][0]["role"] = json!("wizard"))),
            None,
            422,
            Some("messages"),
        ),
        (
            "prompt over the context",
            Some(with(&|v| {
                v["messages"][1]["content"] = json!("word ".repeat(3000))
            })),
            None,
            422,
            Some("messages"),
        ),
        ("oversize body", None, Some("OVERSIZE"), 413, None),
    ];
    for (name, json_body, raw, want, field) in cases {
        let req = client()
            .post(format!("{}/v1/dialog", base()))
            .header("content-type", "application/json");
        let req = match (json_body, raw) {
            (Some(b), _) => req.body(b.to_string()),
            (None, Some("OVERSIZE")) => {
                req.body(format!("{{\"prompt\": \"{}\"}}", "x".repeat(300 * 1024)))
            }
            (None, Some(r)) => req.body(r.to_string()),
            _ => unreachable!(),
        };
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(status, want, "{name}: {v}");
        assert!(v["error"].is_string(), "{name}: {v}");
        if let Some(f) = field {
            let got = v["field"].as_str().unwrap_or("");
            assert!(
                got == f || got.ends_with(f) || v["error"].as_str().unwrap().contains(f),
                "{name}: field {got:?}, want {f}: {v}"
            );
        }
    }
    let resp = client()
        .post(format!("{}/v1/dialog", base()))
        .body(ok.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415);
    let (status, v) = post(
        "/v1/chat/completions",
        &json!({ "model": "gpt-4", "messages": [{ "role": "user", "content": "hi" }] }),
    )
    .await;
    assert_eq!((status, v["error"]["param"].as_str()), (422, Some("model")));
    let (status, v) = post("/v1/dialog", &dialog("dialog", "Say hello.")).await;
    assert_eq!(status, 200, "still serving: {v}");
    assert_eq!(
        client()
            .get(format!("{}/healthz", base()))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
}

//! HTTP helpers the gateway tests share: a client with a generous timeout (debug builds on 2 cores are slow),
//! JSON posts and gets, and polling until a condition holds.

use std::time::Duration;

use serde_json::Value;

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("http client")
}

/// POSTs `body` as JSON; the status and the JSON answer (`null` when it is not JSON).
pub async fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = client()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .expect("request sent");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// GETs a JSON document.
pub async fn get(base: &str, path: &str) -> Value {
    client()
        .get(format!("{base}{path}"))
        .send()
        .await
        .expect("request sent")
        .json()
        .await
        .expect("a JSON answer")
}

/// GETs a text document (`/metrics`).
pub async fn get_text(base: &str, path: &str) -> String {
    client()
        .get(format!("{base}{path}"))
        .send()
        .await
        .expect("request sent")
        .text()
        .await
        .expect("a text answer")
}

/// Polls `check` every 100 ms until it holds (at most `secs`); returns whether it did.
pub async fn eventually<F: std::future::Future<Output = bool>>(
    secs: u64,
    mut check: impl FnMut() -> F,
) -> bool {
    for _ in 0..secs * 10 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Reads an SSE body into (event, data) pairs.
pub async fn sse(resp: reqwest::Response) -> Vec<(String, String)> {
    let text = resp.text().await.unwrap();
    text.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            let mut ev = String::from("message");
            let mut data = String::new();
            for line in b.lines() {
                if let Some(e) = line.strip_prefix("event: ").or(line.strip_prefix("event:")) {
                    ev = e.trim().to_string();
                } else if let Some(d) = line.strip_prefix("data: ").or(line.strip_prefix("data:")) {
                    data.push_str(d);
                }
            }
            (ev, data)
        })
        .collect()
}

/// Starts a streamed request and returns its open body once the first bytes arrived: the request holds its
/// slot until the returned value is dropped.
pub async fn hold_stream(base: &str, body: &Value) -> Box<dyn std::any::Any + Send> {
    use futures::StreamExt;
    let r = client()
        .post(format!("{base}/v1/dialog"))
        .json(body)
        .send()
        .await
        .expect("request sent");
    assert_eq!(r.status().as_u16(), 200);
    let mut s = Box::pin(r.bytes_stream());
    s.next()
        .await
        .expect("a first chunk")
        .expect("a first chunk");
    Box::new(s)
}

//! Errors on the OpenAI routes in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, which
//! the official clients read (they show `error.message`; a plain string there reads as "Error code: 422"
//! and nothing more). The game routes keep nimmer's flat shape (`error`, `kind`, `field`). A layer, so
//! extractor rejections (a malformed body) are reshaped too.

use axum::body::{Body, to_bytes};
use axum::extract::Request;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::middleware::Next;
use axum::response::Response;
use serde_json::{Value, json};

/// Error bodies are small; anything larger is passed on as it is.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Reshapes a JSON error response; everything else passes untouched.
pub(super) async fn reshape(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let json = resp
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(resp.status().is_client_error() || resp.status().is_server_error()) || !json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = to_bytes(body, MAX_ERROR_BODY).await else {
        return Response::from_parts(parts, Body::empty());
    };
    let Ok(flat) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    let Some(message) = flat["error"].as_str() else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    let shaped = json!({ "error": {
        "message": message,
        "type": flat["kind"],
        "param": flat["field"],
        "code": parts.status.as_u16(),
    }});
    let out = shaped.to_string();
    parts.headers.remove(CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(out))
}

//! The console's routes on fake tiers: `/ui` is one page served without the ops token (it holds no data),
//! `/v1/status` shows each tier, and `budgets.toml` is read as text and replaced through the hot reload's
//! checks: a valid text is the next version at once, an invalid key or a syntax error is a 422 that names it
//! and changes nothing.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::{gateway, get};
use http_body_util::BodyExt;
use nimmer_config::Sources;
use nimmer_gateway::tier::fake::Fakes;
use serde_json::Value;
use tower::ServiceExt;

async fn put_budgets(app: &axum::Router, text: &str) -> (StatusCode, Value) {
    let req = Request::put("/v1/config/budgets")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from(text.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn the_console_page_status_and_budget_edits() {
    let fakes = Fakes::new(3, Duration::ZERO);
    let budgets = Sources::embedded().budgets;
    let (gw, app) = gateway(&budgets, &fakes);

    let resp = app
        .clone()
        .oneshot(Request::get("/ui").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&html).contains("/v1/status"));

    let (status, v) = get(&app, "/v1/status").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["version"], 1);
    for tier in ["driver", "theia", "saturn"] {
        assert_eq!(v["tiers"][tier]["health"]["status"], "ready", "{v}");
        assert!(v["tiers"][tier]["slots"].as_u64().unwrap() > 0, "{v}");
    }

    let req = Request::get("/v1/config/budgets")
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.headers()["x-config-version"], "1");
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert_eq!(text, budgets);

    let bad_key = budgets.replacen(
        "[classes.plaza]\nweight = 2.0",
        "[classes.plaza]\nweight = -1.0",
        1,
    );
    let (status, v) = put_budgets(&app, &bad_key).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["field"], "classes.plaza.weight", "{v}");
    let (status, v) = put_budgets(&app, "[zones\nidle_ttl_s = 3").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["field"], "budgets.toml", "{v}");
    assert!(v["error"].as_str().unwrap().contains("line 1"), "{v}");
    assert_eq!(gw.live().version, 1, "nothing changed");

    let good = budgets.replacen(
        "[classes.plaza]\nweight = 2.0",
        "[classes.plaza]\nweight = 3.0",
        1,
    );
    let (status, v) = put_budgets(&app, &good).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["version"], 2);
    assert!(
        v["persisted"].is_null(),
        "the embedded config has no file: {v}"
    );
    assert_eq!(gw.live().config.budgets.weight("plaza"), 3.0);
}

//! `GET /ui`: the ops console, one self-contained page compiled into the binary (no build step, no files to
//! ship). The page holds no data: it reads the ops routes (`/v1/status`, `/v1/zones`, `/v1/adapters`,
//! `/v1/config/budgets`, `/metrics`) with the ops bearer token the operator gives it (kept in the tab's
//! session storage), every two seconds, and edits `budgets.toml` through `PUT /v1/config/budgets`.

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::IntoResponse;

const PAGE: &str = include_str!("ui/console.html");

pub(super) async fn page() -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, "text/html; charset=utf-8"),
            (CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}

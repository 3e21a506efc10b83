//! The nimmer gateway: the front door NPC services talk to.
//!
//! - [`api`]: request/response types; parsing into validated requests (UIDs and zones are NATS-safe tokens).
//! - [`core`]: the three tiers, routing by kind, slot permits, degradation from Theia to Driver.
//! - [`http`]: axum handlers (JSON and SSE), OpenAI-compatible chat completions.
//! - [`fair`]: fair slot allocation across zones (pure, unit-tested).
//! - [`error`]: the error type and its status codes.
//!
//! The `nimmer` binary (`src/main.rs`) parses arguments and calls [`serve`].

pub mod api;
pub mod core;
pub mod error;
pub mod fair;
pub mod http;

use std::sync::Arc;

/// Serves the HTTP API on `listener` until `shutdown` resolves; in-flight responses finish first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    gw: Arc<core::Gateway>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, http::app(gw))
        .with_graceful_shutdown(shutdown)
        .await
}

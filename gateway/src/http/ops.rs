//! The ops routes: zones (`GET /v1/zones`, `PUT /v1/zones/{id}`), each tier at a glance (`GET /v1/status`),
//! the configuration in effect and `budgets.toml` as text (read, and edited through the hot reload's checks),
//! Prometheus metrics, and the trait-LoRA adapters (list, load or replace, delete, prefetch). An unknown adapter is a
//! 404 wherever it is named; an unknown trait is a 422.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use nimmer_loras::LoraError;
use serde_json::json;

use super::ValidJson;
use crate::error::ApiError;
use crate::personas::ZonePut;
use crate::state::Gateway;

pub(super) async fn zones(State(gw): State<Arc<Gateway>>) -> Json<serde_json::Value> {
    Json(json!({ "zones": gw.zones(), "prefix_cache": gw.prefix_caches() }))
}

pub(super) async fn put_zone(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req = ZonePut::parse(&body)?;
    Ok(Json(crate::personas::put_zone(&gw, &id, req).await?))
}

/// The configuration in effect: its version, origin and every value (models, tiers, classifiers, budgets).
pub(super) async fn config(State(gw): State<Arc<Gateway>>) -> Json<serde_json::Value> {
    let live = gw.live();
    let c = &live.config;
    let applied = live
        .applied_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Json(json!({
        "version": live.version,
        "applied_at_ms": applied,
        "origin": c.origin,
        "budgets": c.budgets,
        "tiers": c.tiers,
        "classifiers": c.classifiers,
    }))
}

/// Each tier's health, slots, engine load and prefix cache, and the config version.
pub(super) async fn status(State(gw): State<Arc<Gateway>>) -> Json<serde_json::Value> {
    let live = gw.live();
    Json(json!({
        "version": live.version,
        "origin": live.config.origin,
        "tiers": gw.tier_status(),
        "zones_active": gw.zones().values().filter(|z| z.info.is_some()).count(),
    }))
}

/// `budgets.toml` in effect, as text; its version in `X-Config-Version`.
pub(super) async fn budgets_text(State(gw): State<Arc<Gateway>>) -> Response {
    let live = gw.live();
    (
        [
            (CONTENT_TYPE, "text/plain; charset=utf-8".to_string()),
            (
                axum::http::HeaderName::from_static("x-config-version"),
                live.version.to_string(),
            ),
        ],
        live.config.sources.budgets.clone(),
    )
        .into_response()
}

/// A new `budgets.toml` (the body, as text): checked as a hot reload checks it, then in effect as the next
/// version and written to the config directory. A 422 names the key (or the line of a syntax error).
pub(super) async fn put_budgets(
    State(gw): State<Arc<Gateway>>,
    body: Bytes,
) -> Result<Json<crate::config_edit::Applied>, ApiError> {
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::invalid("budgets.toml", "the body is not UTF-8 text"))?;
    Ok(Json(crate::config_edit::apply_budgets(&gw, text)?))
}

pub(super) async fn prometheus() -> Response {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::handle().render(),
    )
        .into_response()
}

/// The registry's adapters, each with the traits that select it (from `[traits]`), and the whole map.
fn adapters_body(gw: &Gateway) -> serde_json::Value {
    let live = gw.live();
    let traits = &live.config.budgets.traits;
    let adapters: Vec<serde_json::Value> = gw
        .loras()
        .list()
        .into_iter()
        .map(|a| {
            let serves: Vec<&String> = traits
                .iter()
                .filter(|(_, adapter)| **adapter == a.name)
                .map(|(t, _)| t)
                .collect();
            let mut v = json!(a);
            v["traits"] = json!(serves);
            v
        })
        .collect();
    json!({
        "adapters": adapters,
        "stats": gw.loras().stats(),
        "traits": live.config.budgets.traits,
        "dir": gw.loras_dir().map(|d| d.display().to_string()),
    })
}

pub(super) async fn list_adapters(State(gw): State<Arc<Gateway>>) -> Json<serde_json::Value> {
    Json(adapters_body(&gw))
}

/// `POST /v1/adapters` body: load (or replace) adapter `name` from the PEFT folder `path`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LoadAdapter {
    name: String,
    path: String,
}

fn lora_error(e: LoraError) -> ApiError {
    match e {
        LoraError::Io { .. } => ApiError::invalid("path", e.to_string()),
        other => ApiError::invalid("adapter", other.to_string()),
    }
}

pub(super) async fn load_adapter(
    State(gw): State<Arc<Gateway>>,
    ValidJson(req): ValidJson<LoadAdapter>,
) -> Result<Json<serde_json::Value>, ApiError> {
    crate::api::check_token("name", &req.name)?;
    let gw2 = gw.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        gw2.loras().load(&req.name, std::path::Path::new(&req.path))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(lora_error)?;
    crate::metrics::lora_load(loaded.took.as_secs_f64());
    crate::metrics::loras(&gw.loras().stats());
    tracing::info!(adapter = %loaded.info.name, version = loaded.info.version, ms = loaded.took.as_millis() as u64, "adapter loaded");
    Ok(Json(
        json!({ "adapter": loaded.info, "load_ms": loaded.took.as_secs_f64() * 1e3 }),
    ))
}

pub(super) async fn delete_adapter(
    State(gw): State<Arc<Gateway>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !gw.loras().remove(&name) {
        return Err(ApiError::NotFound {
            what: format!("adapter `{name}`"),
        });
    }
    crate::metrics::loras(&gw.loras().stats());
    Ok(Json(json!({ "deleted": name })))
}

/// `POST /v1/adapters/prefetch` body: adapters to make resident, by name or by trait.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Prefetch {
    #[serde(default)]
    adapters: Vec<String>,
    #[serde(default)]
    traits: Vec<String>,
}

pub(super) async fn prefetch_adapters(
    State(gw): State<Arc<Gateway>>,
    ValidJson(req): ValidJson<Prefetch>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let live = gw.live();
    let mut names = req.adapters;
    for t in &req.traits {
        let a = live
            .config
            .budgets
            .traits
            .get(t)
            .ok_or_else(|| ApiError::invalid("traits", format!("unknown trait `{t}`")))?;
        names.push(a.clone());
    }
    let gw2 = gw.clone();
    let warmed = tokio::task::spawn_blocking(move || {
        names
            .iter()
            .map(|n| match gw2.loras().get(n) {
                Ok(Some(_)) => Ok(n.clone()),
                Ok(None) => Err(ApiError::NotFound {
                    what: format!("adapter `{n}`"),
                }),
                Err(e) => Err(lora_error(e)),
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    crate::metrics::loras(&gw.loras().stats());
    Ok(Json(json!({ "resident": warmed })))
}

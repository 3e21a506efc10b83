//! `POST /v1/embeddings`: OpenAI's embeddings on Saturn's sentence encoder (`model` = `saturn`): one
//! L2-normalized vector per input text, as JSON floats or, as the official client asks by default, base64
//! of little-endian `f32`s. Admitted like classification (a Saturn slot of the zone `user` names).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;

use super::ValidJson;
use crate::Tier;
use crate::admission;
use crate::error::ApiError;
use crate::state::Gateway;

/// Inputs one request may embed.
const MAX_INPUTS: usize = 64;

/// `POST /v1/embeddings` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingsRequest {
    /// `saturn`.
    pub model: String,
    pub input: Input,
    #[serde(default)]
    pub encoding_format: Option<Format>,
    /// Accepted only as the encoder's own width (vectors are never truncated).
    #[serde(default)]
    pub dimensions: Option<usize>,
    /// The zone whose Saturn slot the request takes (default `_embeddings`).
    #[serde(default)]
    pub user: Option<String>,
}

/// Text, texts, or anything else (token ids, which this server refuses: its encoder tokenizes for itself).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Input {
    One(String),
    Many(Vec<String>),
    Other(serde_json::Value),
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Float,
    Base64,
}

impl EmbeddingsRequest {
    /// The texts to embed; what is not supported is a 422 naming the field.
    fn texts(&self) -> Result<Vec<String>, ApiError> {
        if self.model != "saturn" {
            return Err(ApiError::invalid(
                "model",
                format!("unknown embedding model `{}` (saturn)", self.model),
            ));
        }
        let texts = match &self.input {
            Input::One(t) => vec![t.clone()],
            Input::Many(ts) => ts.clone(),
            Input::Other(v) => {
                let given = if v.is_array() {
                    "a list of token ids"
                } else {
                    "not text"
                };
                return Err(ApiError::invalid(
                    "input",
                    format!("{given}: send a string or a list of strings (this server tokenizes)"),
                ));
            }
        };
        if texts.is_empty() || texts.len() > MAX_INPUTS {
            return Err(ApiError::invalid(
                "input",
                format!("give 1 to {MAX_INPUTS} texts"),
            ));
        }
        if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
            return Err(ApiError::invalid("input", format!("text {i} is empty")));
        }
        if let Some(u) = &self.user {
            crate::api::check_token("user", u)?;
        }
        Ok(texts)
    }
}

pub(super) async fn embeddings(
    State(gw): State<Arc<Gateway>>,
    ValidJson(req): ValidJson<EmbeddingsRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let texts = req.texts()?;
    let zone = req.user.as_deref().unwrap_or("_embeddings");
    let _permit = admission::slot(&gw, Tier::Saturn, zone, 0, None).await?;
    let out = gw.tiers().saturn.embed(texts).await?;
    let width = out.first().map_or(0, |e| e.vector.len());
    if let Some(d) = req.dimensions
        && d != width
    {
        return Err(ApiError::invalid(
            "dimensions",
            format!("the saturn encoder gives {width} dimensions; {d} was asked"),
        ));
    }
    let base64 = req.encoding_format == Some(Format::Base64);
    let tokens: usize = out.iter().map(|e| e.tokens).sum();
    let data: Vec<serde_json::Value> = out
        .into_iter()
        .enumerate()
        .map(|(index, e)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = e.vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(e.vector)
            };
            json!({ "object": "embedding", "index": index, "embedding": embedding })
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    })))
}

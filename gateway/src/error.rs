//! The gateway's errors. [`ApiError`] is what a request gets: each kind maps to a status code and a JSON body
//! `{"error": message, "kind": kind, "field": field?}`; internal details are logged, never sent.
//! [`GatewayError`] is what starting or serving a gateway can fail with.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use nimmer_tiers::TierError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the body is not JSON.
    #[error("malformed JSON: {message}")]
    Malformed { message: String },
    /// 422: well-formed but invalid.
    #[error("`{field}`: {message}")]
    Invalid { field: String, message: String },
    /// 413
    #[error("request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// 415
    #[error("expected Content-Type: application/json")]
    UnsupportedMediaType,
    /// 429 with Retry-After.
    #[error(
        "the {tier} tier is saturated ({capacity} slots in use); retry after {retry_after_s} s"
    )]
    Saturated {
        tier: String,
        capacity: usize,
        retry_after_s: u64,
    },
    /// 429 with Retry-After: the zone spent its token rate on this tier.
    #[error("zone `{zone}` is over its {tier} token rate; retry after {retry_after_s} s")]
    OverRate {
        tier: String,
        zone: String,
        retry_after_s: u64,
    },
    /// 401
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// 404
    #[error("{what} not found")]
    NotFound { what: String },
    /// 504
    #[error("the deadline of {deadline_ms} ms passed before the request could start")]
    Deadline { deadline_ms: u64 },
    /// 503
    #[error("the {tier} tier is not available")]
    Unavailable { tier: String },
    /// 503: the GM shard an event routes to cannot take it now.
    #[error("GM shard `{shard}`: {why}")]
    ShardUnavailable { shard: String, why: String },
    /// 409: stopped by `DELETE /v1/requests/{id}` or superseded by a newer line for its NPC.
    #[error("the request was {why}")]
    Cancelled { why: String },
    /// 500; details are logged only.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// A JSON body that did not deserialize: a 422 naming the field (`root` when it is the body itself), or
    /// a 400 when it is not JSON at all.
    pub fn from_json(e: serde_path_to_error::Error<serde_json::Error>, root: &str) -> Self {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => Self::invalid(
                if path == "." { root.to_string() } else { path },
                inner.to_string(),
            ),
            _ => Self::Malformed {
                message: inner.to_string(),
            },
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Malformed { .. } => StatusCode::BAD_REQUEST,
            Self::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Saturated { .. } | Self::OverRate { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::Deadline { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Unavailable { .. } | Self::ShardUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Cancelled { .. } => StatusCode::CONFLICT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Malformed { .. } => "malformed",
            Self::Invalid { .. } => "invalid",
            Self::TooLarge { .. } => "too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::Saturated { .. } => "over_budget",
            Self::OverRate { .. } => "over_rate",
            Self::Unauthorized => "unauthorized",
            Self::NotFound { .. } => "not_found",
            Self::Deadline { .. } => "deadline",
            Self::Unavailable { .. } => "unavailable",
            Self::ShardUnavailable { .. } => "shard_unavailable",
            Self::Cancelled { .. } => "cancelled",
            Self::Internal(_) => "internal",
        }
    }
}

impl From<TierError> for ApiError {
    fn from(e: TierError) -> Self {
        match e {
            TierError::InvalidRequest { field, message } => Self::invalid(field, message),
            e @ TierError::ContextExceeded { .. } => Self::invalid("messages", e.to_string()),
            e @ TierError::KvBudgetExceeded { .. } => Self::invalid("max_tokens", e.to_string()),
            e @ TierError::UnknownClassifier { .. } => Self::invalid("classifier", e.to_string()),
            e @ TierError::Template(_) => Self::invalid("messages", e.to_string()),
            TierError::QueueFull { tier, capacity } => Self::Saturated {
                tier,
                capacity,
                retry_after_s: 1,
            },
            TierError::EngineDown { tier } => Self::Unavailable { tier },
            other => Self::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(detail) = &self {
            tracing::error!(error = %detail, "internal error");
        }
        let mut body = serde_json::json!({ "error": self.to_string(), "kind": self.kind() });
        if let Some(f) = self.field() {
            body["field"] = f.into();
        }
        let mut resp = (self.status(), axum::Json(body)).into_response();
        match self {
            Self::Saturated { retry_after_s, .. } | Self::OverRate { retry_after_s, .. } => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
            }
            Self::Unauthorized => {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        resp
    }
}

/// Starting or serving a gateway failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("starting the tiers: {0}")]
    Tiers(#[from] TierError),
    #[error("connecting to NATS at {url}: {message}")]
    NatsConnect { url: String, message: String },
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
    #[error("subscribing to {subject}: {message}")]
    Subscribe { subject: String, message: String },
    #[error("watching {dir}: {source}")]
    Watch {
        dir: String,
        #[source]
        source: notify::Error,
    },
    #[error("event templates or shard map: {0}")]
    Events(#[from] nimmer_config::ConfigError),
    #[error("serving HTTP: {0}")]
    Http(#[from] std::io::Error),
    #[error(
        "tiers.toml: `tiers.{tier}.via = \"nats\"` needs a NATS server (`nimmer serve --nats URL`)"
    )]
    RemoteWithoutNats { tier: String },
}

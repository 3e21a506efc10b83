//! The one error type of the GM crate.

#[derive(Debug, thiserror::Error)]
pub enum GmError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("a director's record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("gateway or results: {0}")]
    Service(String),
    #[error("the walk: {0}")]
    Walk(#[from] crate::walk::WalkError),
    #[error("compositor schema: {0}")]
    Schema(#[from] nimmer_compositor::CompositorError),
}

pub type Result<T> = std::result::Result<T, GmError>;

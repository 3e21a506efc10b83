//! The one error type of the compositor crate.

#[derive(Debug, thiserror::Error)]
pub enum CompositorError {
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migrating the canon schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("nats: {0}")]
    Nats(String),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Store(String),
    #[error("postgres did not answer within {0} ms")]
    DbTimeout(u64),
}

impl CompositorError {
    pub(crate) fn nats(e: impl std::fmt::Display) -> Self {
        Self::Nats(e.to_string())
    }
}

pub type Result<T, E = CompositorError> = std::result::Result<T, E>;

//! Budgets edited over the API (the ops console's editor): the new `budgets.toml` goes through the same
//! checks as a hot reload and, if valid, becomes the next config version at once and is written to the
//! gateway's config directory (atomically: a temporary file renamed over the old), so the file stays the
//! source of truth and the watcher, reading back the same text, applies nothing twice. On the embedded
//! config there is no file: the edit lives until restart, and the answer says so.

use std::io::Write;
use std::path::PathBuf;

use nimmer_config::ConfigError;

use crate::error::ApiError;
use crate::state::Gateway;

/// What an applied edit became.
#[derive(Debug, serde::Serialize)]
pub struct Applied {
    pub version: u64,
    /// The file written; `None` on the embedded config (the edit lasts until restart).
    pub persisted: Option<PathBuf>,
}

/// Checks `text` as `budgets.toml`, applies it and writes it. A file or key error is a 422 naming the key
/// (`field`: the TOML key, or `budgets.toml` with the line for a syntax error); nothing changes then.
pub fn apply_budgets(gw: &Gateway, text: &str) -> Result<Applied, ApiError> {
    gw.live().config.with_budgets(text).map_err(refusal)?;
    let staged = match gw.config_dir() {
        Some(dir) => Some(stage(dir, text).map_err(|e| {
            ApiError::Internal(format!("writing budgets.toml in {}: {e}", dir.display()))
        })?),
        None => None,
    };
    let version = gw.apply_budgets(text).map_err(refusal)?;
    crate::metrics::config_reload(true);
    let persisted = match staged {
        Some((tmp, path)) => {
            std::fs::rename(&tmp, &path).map_err(|e| {
                ApiError::Internal(format!(
                    "version {version} is in effect but {} was not replaced: {e}",
                    path.display()
                ))
            })?;
            Some(path)
        }
        None => None,
    };
    tracing::info!(version, file = ?persisted, "budgets edited over the API");
    Ok(Applied { version, persisted })
}

/// Writes `text` beside `budgets.toml` (fsynced), to be renamed over it.
fn stage(dir: &std::path::Path, text: &str) -> std::io::Result<(PathBuf, PathBuf)> {
    let path = dir.join("budgets.toml");
    let tmp = dir.join(".budgets.toml.edit");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok((tmp, path))
}

fn refusal(e: ConfigError) -> ApiError {
    crate::metrics::config_reload(false);
    match e {
        ConfigError::Invalid { key, rule, .. } => ApiError::Invalid {
            field: key,
            message: rule,
        },
        ConfigError::Parse { message, .. } => ApiError::Invalid {
            field: "budgets.toml".into(),
            message,
        },
        other => ApiError::Invalid {
            field: "budgets.toml".into(),
            message: other.to_string(),
        },
    }
}

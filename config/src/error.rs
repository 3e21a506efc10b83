//! The one error type of the config crate: every variant names the file, and where it applies the key and rule.

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: `{key}`: {rule}")]
    Invalid {
        file: String,
        key: String,
        rule: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(file: &str, key: impl Into<String>, rule: impl Into<String>) -> Self {
        Self::Invalid {
            file: file.to_string(),
            key: key.into(),
            rule: rule.into(),
        }
    }

    pub(crate) fn parse(file: &str, e: toml::de::Error) -> Self {
        Self::Parse {
            file: file.to_string(),
            message: e.to_string().trim_end().to_string(),
        }
    }
}

//! The TOML files ops edit, parsed and validated.
//!
//! `Config::load(dir)` reads `tiers.toml` (models, tiers and their engine limits) and `classifiers.toml`
//! (Saturn's classifiers) from one directory, rejects unknown keys, then checks fields against each other.
//! Every error names the file, the key and the rule. The repository's `config/` folder holds the defaults;
//! they are also embedded in the binary ([`Config::embedded`]) so `nimmer` runs with no files at all.

mod classifiers;
mod error;
mod tiers;

pub use classifiers::{ClassifierSpec, ClassifiersFile, LabelSpec};
pub use error::ConfigError;
pub use tiers::{
    Backend, Device, FileSpec, LlmTierSpec, ModelFormat, ModelSpec, Precision, SaturnTierSpec,
    TiersFile, WheelSource,
};

use std::path::{Path, PathBuf};

/// Default `tiers.toml`, compiled into the binary.
pub const DEFAULT_TIERS_TOML: &str = include_str!("../tiers.toml");
/// Default `classifiers.toml`, compiled into the binary.
pub const DEFAULT_CLASSIFIERS_TOML: &str = include_str!("../classifiers.toml");

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from (a directory, or `<embedded>`), for messages.
    pub origin: String,
    pub tiers: TiersFile,
    pub classifiers: ClassifiersFile,
}

impl Config {
    /// Loads and validates `tiers.toml` and `classifiers.toml` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        let read = |name: &str| -> Result<(PathBuf, String), ConfigError> {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
                file: path.display().to_string(),
                source,
            })?;
            Ok((path, text))
        };
        let (tp, tiers) = read("tiers.toml")?;
        let (cp, classifiers) = read("classifiers.toml")?;
        Self::from_strs(
            &tp.display().to_string(),
            &tiers,
            &cp.display().to_string(),
            &classifiers,
            dir.display().to_string(),
        )
    }

    /// The defaults compiled into the binary.
    pub fn embedded() -> Self {
        Self::from_strs(
            "<embedded>/tiers.toml",
            DEFAULT_TIERS_TOML,
            "<embedded>/classifiers.toml",
            DEFAULT_CLASSIFIERS_TOML,
            "<embedded>".into(),
        )
        .expect("embedded config is validated by its own unit test")
    }

    /// Parses and validates both files from strings (`*_file` names them in errors).
    pub fn from_strs(
        tiers_file: &str,
        tiers: &str,
        classifiers_file: &str,
        classifiers: &str,
        origin: String,
    ) -> Result<Self, ConfigError> {
        let tiers = TiersFile::parse(tiers_file, tiers)?;
        let classifiers = ClassifiersFile::parse(classifiers_file, classifiers)?;
        Ok(Self {
            origin,
            tiers,
            classifiers,
        })
    }

    /// The model a tier runs.
    pub fn model(&self, name: &str) -> Option<&ModelSpec> {
        self.tiers.models.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_load_and_validate() {
        let c = Config::embedded();
        assert!(c.model(&c.tiers.tiers.driver.model).is_some());
        assert!(c.model(&c.tiers.tiers.theia.model).is_some());
        assert!(c.model(&c.tiers.tiers.saturn.model).is_some());
        for name in [
            "voice-selection",
            "trait-salience",
            "audit-overseer",
            "ternary-gate",
        ] {
            assert!(c.classifiers.classifiers.contains_key(name), "{name}");
        }
    }

    #[test]
    fn repository_config_dir_matches_embedded() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let c = Config::load(dir).unwrap();
        assert_eq!(
            c.tiers.tiers.driver.model,
            Config::embedded().tiers.tiers.driver.model
        );
    }
}

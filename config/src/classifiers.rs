//! `classifiers.toml`: Saturn's classifiers, each a set of labels defined by exemplar phrases
//! (nearest centroid with a temperature) or by a trained linear head in safetensors.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ConfigError;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifiersFile {
    pub classifiers: BTreeMap<String, ClassifierSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierSpec {
    /// Softmax temperature over cosine similarities (or head logits are divided by it).
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    pub labels: Vec<LabelSpec>,
    /// Optional trained linear head: safetensors with `weight` `[labels x dim]` and `bias` `[labels]`.
    #[serde(default)]
    pub head: Option<String>,
}

fn default_temperature() -> f32 {
    0.05
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSpec {
    pub name: String,
    #[serde(default)]
    pub exemplars: Vec<String>,
}

impl ClassifiersFile {
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let c: Self = toml::from_str(text).map_err(|e| ConfigError::parse(file, e))?;
        for (name, spec) in &c.classifiers {
            let key = |k: &str| format!("classifiers.{name}.{k}");
            if !(spec.temperature.is_finite() && spec.temperature > 0.0) {
                return Err(ConfigError::invalid(
                    file,
                    key("temperature"),
                    "must be a number greater than 0",
                ));
            }
            if spec.labels.len() < 2 {
                return Err(ConfigError::invalid(
                    file,
                    key("labels"),
                    "a classifier needs at least two labels",
                ));
            }
            let mut seen = std::collections::BTreeSet::new();
            for (i, l) in spec.labels.iter().enumerate() {
                if !seen.insert(&l.name) {
                    return Err(ConfigError::invalid(
                        file,
                        key(&format!("labels[{i}].name")),
                        format!("duplicate label `{}`", l.name),
                    ));
                }
                if spec.head.is_none() && l.exemplars.iter().all(|e| e.trim().is_empty()) {
                    return Err(ConfigError::invalid(
                        file,
                        key(&format!("labels[{i}].exemplars")),
                        "without a `head`, every label needs at least one non-empty exemplar",
                    ));
                }
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_without_exemplars_is_rejected() {
        let t =
            "[classifiers.x]\nlabels = [{ name = \"a\", exemplars = [\"hi\"] }, { name = \"b\" }]";
        let e = ClassifiersFile::parse("classifiers.toml", t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("classifiers.x.labels[1].exemplars"), "{e}");
    }

    #[test]
    fn duplicate_labels_are_rejected() {
        let t = "[classifiers.x]\nlabels = [{ name = \"a\", exemplars = [\"hi\"] }, { name = \"a\", exemplars = [\"yo\"] }]";
        let e = ClassifiersFile::parse("classifiers.toml", t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("duplicate label"), "{e}");
    }

    #[test]
    fn a_non_positive_temperature_is_rejected() {
        let t = "[classifiers.x]\ntemperature = 0.0\nlabels = [{ name = \"a\", exemplars = [\"hi\"] }, { name = \"b\", exemplars = [\"yo\"] }]";
        let e = ClassifiersFile::parse("classifiers.toml", t)
            .unwrap_err()
            .to_string();
        assert!(e.contains("temperature"), "{e}");
    }
}

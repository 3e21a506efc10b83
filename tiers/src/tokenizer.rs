//! The tokenizer and chat template of an LLM: built from a GGUF file itself, or read from a Hugging Face
//! model directory (`tokenizer.json`, `tokenizer_config.json`).
//!
//! gpt2-style byte-level BPE from `tokenizer.ggml.tokens` + `tokenizer.ggml.merges`. The pre-tokenizer follows
//! `tokenizer.ggml.pre`: for `smollm` (and other llama.cpp pre-types that split digits one by one) digits are
//! split individually before the byte-level split, which makes ids match llama.cpp's. Control tokens
//! (`<|im_start|>`, ...) are added as special tokens so the rendered template encodes them as single ids.
//! The chat template (`tokenizer.chat_template`, Jinja) is rendered with minijinja.

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Result, TierError};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Tokenizer + chat template + special ids of one model.
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    template: Option<String>,
    bos: Option<String>,
    eos: Option<String>,
    /// Token ids that end generation.
    pub eos_ids: Vec<u32>,
}

fn meta<'a>(ct: &'a Content, key: &str) -> Option<&'a Value> {
    ct.metadata.get(key)
}

impl ChatTokenizer {
    pub fn from_gguf(ct: &Content, path: &Path) -> Result<Self> {
        let bad = |m: String| TierError::model_file(path, m);
        let model = meta(ct, "tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("");
        if model != "gpt2" {
            return Err(bad(format!(
                "tokenizer.ggml.model is `{model}`; only gpt2-style byte-level BPE is supported"
            )));
        }
        let tokens: Vec<String> = meta(ct, "tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| bad("no tokenizer.ggml.tokens".into()))?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(format!("tokenizer.ggml.tokens: {e}")))?;
        let merges: Vec<(String, String)> = meta(ct, "tokenizer.ggml.merges")
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| bad("no tokenizer.ggml.merges".into()))?
            .iter()
            .map(|v| {
                let s = v.to_string().map_err(|e| e.to_string())?;
                let (a, b) = s
                    .split_once(' ')
                    .ok_or_else(|| format!("merge `{s}` has no space"))?;
                Ok((a.to_string(), b.to_string()))
            })
            .collect::<std::result::Result<_, String>>()
            .map_err(|e| bad(format!("tokenizer.ggml.merges: {e}")))?;
        let types: Vec<i32> = meta(ct, "tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.iter().map(|t| t.to_i32().unwrap_or(1)).collect())
            .unwrap_or_default();
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| bad(format!("building BPE: {e}")))?;
        let pre = meta(ct, "tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("default");
        let byte_level = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
        let pre_tokenizer = match pre {
            // llama.cpp pre-types whose regex splits every digit on its own before the gpt2 split.
            "smollm" | "starcoder" | "refact" | "command-r" => Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level,
            ]),
            "gpt2" | "default" => Sequence::new(vec![byte_level]),
            other => {
                return Err(bad(format!(
                    "tokenizer.ggml.pre `{other}` is not supported"
                )));
            }
        };
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        // Control (3) and user-defined (4) tokens are matched whole in text.
        let special: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == 3 || **t == 4)
            .map(|(i, _)| AddedToken::from(tokens[i].clone(), true))
            .collect();
        tokenizer
            .add_special_tokens(special)
            .map_err(|e| bad(format!("adding control tokens: {e}")))?;
        let id_of = |key: &str| meta(ct, key).and_then(|v| v.to_u32().ok());
        let name_of = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        let eos_id = id_of("tokenizer.ggml.eos_token_id");
        let template = meta(ct, "tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        Ok(Self::assemble(
            tokenizer,
            template,
            name_of(id_of("tokenizer.ggml.bos_token_id")),
            name_of(eos_id),
        ))
    }

    /// From a Hugging Face model directory: `tokenizer.json`, and the chat template and special tokens from
    /// `tokenizer_config.json` when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer =
            Tokenizer::from_file(&tok_path).map_err(|e| TierError::model_file(&tok_path, e))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| TierError::model_file(&cfg_path, e))?,
            Err(_) => serde_json::Value::Null,
        };
        // Special tokens are either plain strings or `{"content": ...}` objects.
        let token = |key: &str| {
            let v = &cfg[key];
            v.as_str()
                .or_else(|| v["content"].as_str())
                .map(str::to_string)
        };
        let template = cfg["chat_template"].as_str().map(str::to_string);
        Ok(Self::assemble(
            tokenizer,
            template,
            token("bos_token"),
            token("eos_token"),
        ))
    }

    fn assemble(
        tokenizer: Tokenizer,
        template: Option<String>,
        bos: Option<String>,
        eos: Option<String>,
    ) -> Self {
        let vocab = tokenizer.get_vocab(true);
        let mut eos_ids: Vec<u32> = eos
            .as_ref()
            .and_then(|t| vocab.get(t).copied())
            .into_iter()
            .collect();
        // Chat models end a turn with their end-of-turn token, which may differ from EOS.
        for t in ["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"] {
            if let Some(&id) = vocab.get(t)
                && !eos_ids.contains(&id)
            {
                eos_ids.push(id);
            }
        }
        Self {
            tokenizer,
            template,
            bos,
            eos,
            eos_ids,
        }
    }

    /// The underlying `tokenizers` tokenizer (e.g. to save it as `tokenizer.json`).
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.template.as_deref()
    }

    /// Encodes text; special-token markup in `text` becomes the special ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| TierError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| TierError::Tokenizer(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Renders `messages` through the model's chat template, ending with the assistant's turn prefix.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String> {
        let template = self.template.as_deref().ok_or_else(|| {
            TierError::Template(
                "the model file has no tokenizer.chat_template; send a raw prompt".into(),
            )
        })?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| TierError::Template(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos.clone().unwrap_or_default(),
            eos_token => self.eos.clone().unwrap_or_default(),
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| TierError::Template(e.to_string()))
    }
}

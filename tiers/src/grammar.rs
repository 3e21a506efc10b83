//! Structured output: a response format (any JSON object, or JSON that a given schema accepts) compiled by
//! llguidance into a grammar over the model's tokens. Each step of a constrained sequence masks the tokens the
//! grammar cannot take next, so whatever the model samples parses; the sequence ends when the grammar does.
//!
//! A tier compiles each distinct format once and keeps the compiled parser in a small LRU ([`Grammars`]);
//! a request clones it. Compiling is bounded by llguidance's limits (lexer fuel, grammar size), so a
//! pathological schema fails fast with a message instead of stalling; a schema that does not compile is a
//! [`TierError::InvalidRequest`] on `response_format` saying why.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{self, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TierError};
use crate::tokenizer::ChatTokenizer;

/// Compiled formats a tier keeps.
const CACHED: usize = 64;
/// The largest schema accepted, as JSON text.
const MAX_SCHEMA_BYTES: usize = 64 * 1024;

/// What the output must be (OpenAI's `response_format`, minus `text`, which is no constraint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject,
    /// JSON that `schema` accepts.
    JsonSchema { schema: serde_json::Value },
}

impl ResponseFormat {
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            Self::JsonObject => TopLevelGrammar::from_json_schema(serde_json::json!({
                "type": "object"
            })),
            Self::JsonSchema { schema } => TopLevelGrammar::from_json_schema(schema.clone()),
        }
    }

    /// The cache key: the format as JSON text (equal formats, equal keys).
    fn key(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

fn invalid(message: String) -> TierError {
    TierError::InvalidRequest {
        field: "response_format",
        message,
    }
}

/// One sequence's grammar: masks logits before sampling and follows each sampled token.
pub struct Constraint {
    matcher: Box<Matcher>,
    /// A mask that could not be computed, for the sampler to report.
    failed: Option<TierError>,
}

impl Constraint {
    /// Sets every token the grammar cannot take next to -inf. If the mask cannot be computed the failure is
    /// kept for [`Constraint::take_failure`] (masks run in parallel, away from whoever reports).
    pub fn mask(&mut self, logits: &mut [f32]) {
        let allowed: SimpleVob = match self.matcher.compute_mask_or_eos() {
            Ok(m) => m,
            Err(e) => {
                self.failed = Some(TierError::Grammar(e.to_string()));
                return;
            }
        };
        // Word by word: whole words of allowed (inside a string) or refused (between keys) tokens are the
        // common case and cost one comparison per 32 tokens.
        let n = logits.len();
        allowed.iter_unset_entries(|i| {
            if i < n {
                logits[i] = f32::NEG_INFINITY;
            }
        });
        for l in logits.iter_mut().skip(allowed.len()) {
            *l = f32::NEG_INFINITY;
        }
    }

    /// The failure of the last [`Constraint::mask`], if it failed.
    pub fn take_failure(&mut self) -> Option<TierError> {
        self.failed.take()
    }

    /// Whether the grammar may take `token` next (one token checked, no mask computed).
    pub fn allows(&mut self, token: u32) -> Result<bool> {
        self.matcher
            .validate_tokens(&[token])
            .map(|n| n == 1)
            .map_err(|e| TierError::Grammar(e.to_string()))
    }

    /// Takes the sampled token; `true` once the grammar has ended (nothing more may follow).
    pub fn accept(&mut self, token: u32) -> Result<bool> {
        self.matcher
            .consume_token(token)
            .map_err(|e| TierError::Grammar(e.to_string()))?;
        Ok(self.matcher.is_stopped())
    }
}

/// Compiles response formats for one tokenizer and keeps the last 64 compiled.
pub struct Grammars {
    factory: ParserFactory,
    cache: Mutex<VecDeque<(String, Arc<TokenParser>)>>,
}

impl Grammars {
    /// For a model whose logits have `vocab` entries and whose tokenizer is `tok` (its first end-of-turn
    /// token ends a grammar).
    pub fn new(tok: &ChatTokenizer, vocab: usize) -> Result<Self> {
        let text = tok
            .inner()
            .to_string(false)
            .map_err(|e| TierError::Tokenizer(e.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| TierError::Tokenizer(e.to_string()))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| TierError::Tokenizer(format!("token bytes: {e}")))?;
        words.resize(words.len().max(vocab), Vec::new());
        let eos = *tok.eos_ids.first().ok_or_else(|| {
            TierError::Tokenizer("no end-of-sequence token to end a grammar".into())
        })?;
        let info = TokRxInfo::new(words.len() as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Env {
            trie,
            tokenizer: tok.inner().clone(),
        });
        Self::with_env(env)
    }

    /// Over a tokenizer of single bytes (tests and fake tiers: formats compile and fail as they would on a
    /// model).
    pub fn single_byte() -> Self {
        Self::with_env(toktrie::ApproximateTokEnv::single_byte_env()).expect("a byte vocabulary")
    }

    fn with_env(env: TokEnv) -> Result<Self> {
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| TierError::Grammar(e.to_string()))?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits {
            initial_lexer_fuel: 1_000_000,
            step_lexer_fuel: 200_000,
            max_grammar_size: 200_000,
            ..ParserLimits::default()
        };
        Ok(Self {
            factory,
            cache: Mutex::new(VecDeque::new()),
        })
    }

    /// The compiled parser of `format`, from the cache or compiled now (bounded; milliseconds for the
    /// schemas NPCs use). Call off the async runtime when it may not be cached.
    pub fn compile(&self, format: &ResponseFormat) -> Result<Arc<TokenParser>> {
        let key = format.key();
        if let Some(p) = self.cached(&key) {
            return Ok(p);
        }
        if key.len() > MAX_SCHEMA_BYTES {
            return Err(invalid(format!(
                "the schema is {} bytes; at most {MAX_SCHEMA_BYTES}",
                key.len()
            )));
        }
        let parser = self
            .factory
            .create_parser(format.grammar())
            .map_err(|e| invalid(format!("the schema does not compile: {e}")))?;
        let parser = Arc::new(parser);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHED {
            cache.pop_back();
        }
        cache.push_front((key, parser.clone()));
        Ok(parser)
    }

    /// Whether `format` is compiled already (a constraint for it costs a clone).
    pub fn is_cached(&self, format: &ResponseFormat) -> bool {
        self.cached(&format.key()).is_some()
    }

    fn cached(&self, key: &str) -> Option<Arc<TokenParser>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let i = cache.iter().position(|(k, _)| k == key)?;
        let hit = cache.remove(i)?;
        let parser = hit.1.clone();
        cache.push_front(hit);
        Some(parser)
    }

    /// A fresh constraint for one sequence.
    pub fn constraint(&self, format: &ResponseFormat) -> Result<Constraint> {
        let parser = self.compile(format)?;
        let matcher = Matcher::new(Ok(parser.deep_clone()));
        if let Some(e) = matcher.get_error() {
            return Err(invalid(e));
        }
        Ok(Constraint {
            matcher: Box::new(matcher),
            failed: None,
        })
    }
}

/// The model's own tokenizer behind llguidance's token trie (forced text is tokenized as the model would).
struct Env {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        match std::str::from_utf8(s) {
            Ok(text) => match self.tokenizer.encode_fast(text, false) {
                Ok(enc) => enc.get_ids().to_vec(),
                Err(_) => self.trie.greedy_tokenize(s),
            },
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> ResponseFormat {
        ResponseFormat::JsonSchema {
            schema: serde_json::json!({
                "type": "object",
                "properties": { "line": { "type": "string" }, "mood": { "enum": ["calm", "angry"] } },
                "required": ["line", "mood"],
                "additionalProperties": false
            }),
        }
    }

    /// Drives a constraint over single bytes, always taking the first allowed byte of `want` or else the
    /// first allowed token: the output must parse.
    #[test]
    fn a_constrained_walk_ends_in_json_the_schema_accepts() {
        let g = Grammars::single_byte();
        let mut c = g.constraint(&schema()).unwrap();
        let mut out = Vec::new();
        let want = br#"{"line": "Fair winds.", "mood": "calm"}"#;
        for step in 0..200 {
            let mut logits = vec![0.0f32; 262];
            c.mask(&mut logits);
            assert!(c.take_failure().is_none());
            let allowed: Vec<u32> = (0..logits.len() as u32)
                .filter(|&i| logits[i as usize].is_finite())
                .collect();
            assert!(!allowed.is_empty(), "step {step}: nothing allowed");
            let pick = want
                .get(out.len())
                .map(|&b| u32::from(b))
                .filter(|b| allowed.contains(b))
                .unwrap_or(allowed[0]);
            if pick >= 256 {
                break;
            }
            out.push(pick as u8);
            if c.accept(pick).unwrap() {
                break;
            }
        }
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["mood"], "calm");
        assert_eq!(v["line"], "Fair winds.");
    }

    #[test]
    fn one_token_is_checked_without_a_mask_and_without_being_taken() {
        let g = Grammars::single_byte();
        let mut c = g.constraint(&schema()).unwrap();
        assert!(!c.allows(u32::from(b'x')).unwrap());
        assert!(c.allows(u32::from(b'{')).unwrap());
        assert!(c.allows(u32::from(b'{')).unwrap(), "checking took nothing");
        assert!(!c.accept(u32::from(b'{')).unwrap());
        assert!(!c.allows(u32::from(b'{')).unwrap());
    }

    #[test]
    fn each_format_compiles_once() {
        let g = Grammars::single_byte();
        assert!(!g.is_cached(&schema()));
        let a = g.compile(&schema()).unwrap();
        assert!(g.is_cached(&schema()));
        assert!(Arc::ptr_eq(&a, &g.compile(&schema()).unwrap()));
        g.compile(&ResponseFormat::JsonObject).unwrap();
        assert!(g.is_cached(&schema()));
    }

    #[test]
    fn a_schema_that_does_not_compile_says_why() {
        let g = Grammars::single_byte();
        let bad = ResponseFormat::JsonSchema {
            schema: serde_json::json!({ "type": "object", "properties": { "a": { "type": "strnig" } } }),
        };
        match g.compile(&bad) {
            Err(TierError::InvalidRequest { field, message }) => {
                assert_eq!(field, "response_format");
                assert!(message.contains("strnig"), "{message}");
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("compiled"),
        }
    }
}

//! Shared helpers for the end-to-end tests: the default config and its models, fetched (and verified) through
//! the same code path `nimmer models fetch` uses, and small helpers to run requests to completion.

use std::path::PathBuf;
use std::sync::OnceLock;

use nimmer_config::Config;
use nimmer_tiers::fetch::{Verify, ensure_model};
use nimmer_tiers::{Completion, Event, GenerateRequest, LlmHandle, Prompt, SamplingParams};
use tokio::sync::mpsc::UnboundedReceiver;

/// The embedded default configuration.
pub fn config() -> Config {
    Config::embedded()
}

/// Path of a model file of the default config, fetched on first use.
pub fn model_file(model: &str, file: &str) -> PathBuf {
    let c = config();
    let dir = ensure_model(&c.tiers, model, Verify::Cached)
        .unwrap_or_else(|e| panic!("fetching {model}: {e}"));
    dir.join(file)
}

/// The Driver's GGUF.
pub fn driver_gguf() -> PathBuf {
    let c = config();
    model_file(&c.tiers.tiers.driver.model, "model.gguf")
}

/// One Driver engine per test binary, on the default config.
pub fn driver() -> &'static LlmHandle {
    static DRIVER: OnceLock<LlmHandle> = OnceLock::new();
    DRIVER.get_or_init(|| {
        let c = config();
        LlmHandle::start("driver", &c.tiers.tiers.driver, &driver_gguf()).expect("driver starts")
    })
}

/// The result of one request run to completion.
#[derive(Debug, Clone)]
pub struct Output {
    pub tokens: Vec<u32>,
    pub text: String,
    pub done: Completion,
}

/// Drains a request's stream.
pub fn collect(mut rx: UnboundedReceiver<Event>) -> Output {
    let (mut tokens, mut text) = (Vec::new(), String::new());
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token { id, text: t } => {
                tokens.push(id);
                text.push_str(&t);
            }
            Event::Done(done) => return Output { tokens, text, done },
            Event::Error(e) => panic!("engine error: {e}"),
        }
    }
    panic!("stream ended without Done");
}

/// A chat request with an explicit system message (the 135M model needs one).
pub fn chat(system: &str, user: &str, params: SamplingParams) -> GenerateRequest {
    use nimmer_tiers::tokenizer::Message;
    GenerateRequest {
        prompt: Prompt::Chat(vec![
            Message::new("system", system),
            Message::new("user", user),
        ]),
        params,
    }
}

/// Runs one request alone, to completion.
pub fn run(h: &LlmHandle, req: GenerateRequest) -> Output {
    collect(h.generate(req).expect("request accepted"))
}

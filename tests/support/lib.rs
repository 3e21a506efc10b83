//! Shared helpers for the end-to-end tests: the default config and its models, fetched (and verified) through
//! the same code path `nimmer models fetch` uses, and small helpers to run requests to completion.

pub mod browser;
pub mod http;

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

/// The default configuration with `tiers.toml` edited by `edit`.
pub fn config_with(edit: impl FnOnce(&str) -> String) -> Config {
    let mut sources = nimmer_config::Sources::embedded();
    sources.tiers = edit(&sources.tiers);
    Config::parse(sources, "test").expect("edited config is valid")
}

/// The default configuration with `tiers.toml` and `budgets.toml` edited.
pub fn config_with_budgets(
    tiers: impl FnOnce(&str) -> String,
    budgets: impl FnOnce(&str) -> String,
) -> Config {
    let mut sources = nimmer_config::Sources::embedded();
    sources.tiers = tiers(&sources.tiers);
    sources.budgets = budgets(&sources.budgets);
    Config::parse(sources, "test").expect("edited config is valid")
}

/// The default configuration plus a `[models.NAME]` block (`model_toml`) that the Driver tier runs.
pub fn config_with_driver_model(name: &str, model_toml: &str) -> Config {
    config_with(|base| {
        let (head, tail) = base.split_at(base.find("[tiers.driver]").expect("driver section"));
        format!(
            "{head}\n{model_toml}\n{}",
            tail.replacen(
                "model = \"smollm2-135m-instruct-q4_1\"",
                &format!("model = \"{name}\""),
                1
            )
        )
    })
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
        LlmHandle::start(
            "driver",
            &c.tiers.tiers.driver,
            nimmer_tiers::EngineLimits::of(&c.budgets.tiers.driver),
            &driver_gguf(),
        )
        .expect("driver starts")
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
            Event::Token { id, text: t, .. } => {
                tokens.push(id);
                text.push_str(&t);
            }
            Event::Done(done) => return Output { tokens, text, done },
            Event::Error(e) => panic!("engine error: {e}"),
            Event::Expired => panic!("expired without a deadline"),
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
        lora: None,
        deadline: None,
        share: Default::default(),
    }
}

/// Runs one request alone, to completion.
pub fn run(h: &LlmHandle, req: GenerateRequest) -> Output {
    collect(h.generate(req).expect("request accepted"))
}

/// candle's own `quantized_llama` on the Driver's file: the reference our forward pass is checked against.
pub fn reference_model() -> candle_transformers::models::quantized_llama::ModelWeights {
    let path = driver_gguf();
    let mut f = std::fs::File::open(&path).expect("driver gguf");
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).expect("gguf header");
    candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        ct,
        &mut f,
        &candle_core::Device::Cpu,
    )
    .expect("reference model")
}

/// The reference's logits for the last of `tokens`, fed at position `pos`.
pub fn reference_logits(
    m: &mut candle_transformers::models::quantized_llama::ModelWeights,
    tokens: &[u32],
    pos: usize,
) -> Vec<f32> {
    use candle_core::IndexOp;
    let input = candle_core::Tensor::new(tokens, &candle_core::Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("input");
    m.forward(&input, pos)
        .and_then(|l| l.i(0))
        .and_then(|l| l.to_vec1::<f32>())
        .expect("reference forward")
}

/// Our logits for the last of `tokens`, appended to `kv`.
pub fn our_logits(
    model: &nimmer_tiers::llama::Llama,
    kv: &mut nimmer_tiers::llama::KvCache,
    ws: &mut nimmer_tiers::llama::Workspace,
    tokens: &[u32],
) -> Vec<f32> {
    let mut chunk = [nimmer_tiers::llama::Chunk {
        tokens,
        kv,
        logits: true,
        lora: None,
    }];
    model.forward(&mut chunk, ws).expect("forward").remove(0)
}

/// A prompt rendered through the Driver's chat template with a system message.
pub fn chat_ids(
    tok: &nimmer_tiers::tokenizer::ChatTokenizer,
    system: &str,
    user: &str,
) -> Vec<u32> {
    use nimmer_tiers::tokenizer::Message;
    tok.encode(
        &tok.render_chat(&[Message::new("system", system), Message::new("user", user)])
            .expect("template"),
    )
    .expect("encode")
}

/// Starts a gateway on `127.0.0.1:0` on its own runtime thread; returns its base URL. The server lives as long
/// as the test process.
/// The embedded configuration written to a temporary directory (for a gateway that watches or edits its
/// files), and that configuration loaded from it.
pub fn config_dir() -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = nimmer_config::Sources::embedded();
    for (file, text) in [
        ("tiers.toml", &src.tiers),
        ("classifiers.toml", &src.classifiers),
        ("budgets.toml", &src.budgets),
    ] {
        std::fs::write(dir.path().join(file), text).expect("write config");
    }
    let config = Config::load(dir.path()).expect("the embedded config loads");
    (dir, config)
}

pub fn start_gateway(config: Config) -> String {
    start_gateway_with(config, nimmer_gateway::Options::default())
}

/// Starts a gateway with serving options (config directory to watch, bearer tokens, NATS).
pub fn start_gateway_with(config: Config, opts: nimmer_gateway::Options) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let dir = opts.config_dir.clone();
            let gw = tokio::task::spawn_blocking(move || {
                nimmer_gateway::Gateway::start(config, dir.as_deref())
            })
            .await
            .expect("join")
            .expect("gateway starts");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            tx.send(format!("http://{}", listener.local_addr().expect("addr")))
                .expect("send addr");
            nimmer_gateway::run(
                listener,
                std::sync::Arc::new(gw),
                opts,
                std::future::pending(),
            )
            .await
            .expect("serve");
        });
    });
    rx.recv().expect("gateway started")
}

pub use nimmer_services::NatsServer;

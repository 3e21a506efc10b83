//! The LLM engine actor of one tier worker (Driver, Theia).
//!
//! [`LlmHandle`] is a cheap `Clone` handle over a bounded channel; [`LlmHandle::generate`] validates and tokenizes
//! a request on the caller's side (errors come back at once), then queues it. The engine runs on its own OS
//! thread and owns the model, the waiting queue and the running sequences with their KV caches. Between two
//! steps it takes new requests, drops sequences whose receiver is gone (freeing their KV), admits waiting ones
//! within `max_batch` and the KV memory budget, and runs one batched forward pass: one token for every
//! decoding sequence plus prefill chunks under the per-step token budget. Tokens stream back per request.

mod sched;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use nimmer_config::LlmTierSpec;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Result, TierError};
use nimmer_loras::Blend;

use crate::llama::{CandleLlama, Chunk, Decoder, Llama, LlamaConfig};
use crate::sampling::{Sampler, SamplingParams, TextStream};
use crate::tokenizer::{ChatTokenizer, Message};

pub use sched::{SeqState, admit_count, plan_step};

/// What to generate from.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Rendered through the model's chat template, ending with the assistant's turn.
    Chat(Vec<Message>),
    /// Raw text, encoded as is (special-token markup is honoured).
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub params: SamplingParams,
    /// The trait-LoRA blend to run with; `None` runs the base model.
    pub lora: Option<Arc<Blend>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
}

/// Summary sent when a sequence ends.
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Time from queueing to admission into the running batch.
    pub queue_ms: f64,
    /// Time from queueing to the first token.
    pub ttft_ms: f64,
    pub total_ms: f64,
}

/// One item of a request's stream.
#[derive(Debug, Clone)]
pub enum Event {
    /// A generated token and the text it makes visible (may be empty while text is held back).
    Token {
        id: u32,
        text: String,
    },
    Done(Completion),
    /// The engine failed this request (logged on the engine side).
    Error(String),
}

/// The engine limits ops may change while it runs (budgets.toml): read by the engine before every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineLimits {
    /// Most tokens one step runs (decode rows + prefill chunks).
    pub batch_token_budget: usize,
    /// KV-cache bytes all running sequences may hold together; admission respects it.
    pub kv_memory_bytes: usize,
}

impl EngineLimits {
    /// The limits an LLM tier's budget sets (validated to be present for LLM tiers).
    pub fn of(b: &nimmer_config::TierBudget) -> Self {
        Self {
            batch_token_budget: b.batch_token_budget.unwrap_or(256),
            kv_memory_bytes: b.kv_memory_mib.unwrap_or(1024) << 20,
        }
    }
}

/// [`EngineLimits`] shared between the handles and the engine thread.
struct LiveLimits {
    batch_token_budget: AtomicUsize,
    kv_memory_bytes: AtomicUsize,
}

impl LiveLimits {
    fn get(&self) -> EngineLimits {
        EngineLimits {
            batch_token_budget: self.batch_token_budget.load(Ordering::Relaxed),
            kv_memory_bytes: self.kv_memory_bytes.load(Ordering::Relaxed),
        }
    }
}

/// Facts about a running tier, shared by all handles.
pub struct TierInfo {
    pub name: String,
    pub tokenizer: ChatTokenizer,
    pub model: LlamaConfig,
    pub context: usize,
    limits: LiveLimits,
    pub queue_capacity: usize,
    pub weight_bytes: usize,
    /// Which kernels run the model.
    pub kernel: String,
}

enum Command {
    Generate { seq: Box<NewSeq> },
}

struct NewSeq {
    prompt: Vec<u32>,
    params: SamplingParams,
    lora: Option<Arc<Blend>>,
    events: mpsc::UnboundedSender<Event>,
    enqueued: Instant,
}

/// Handle to a tier's engine thread. The engine stops when every handle is dropped.
#[derive(Clone)]
pub struct LlmHandle {
    tx: mpsc::Sender<Command>,
    info: Arc<TierInfo>,
}

impl LlmHandle {
    /// Loads the model on a new engine thread and returns once it is ready (or failed to load).
    pub fn start(
        name: &str,
        spec: &LlmTierSpec,
        limits: EngineLimits,
        gguf: &Path,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel(spec.queue);
        let (ready_tx, ready_rx) = oneshot::channel();
        let spec = spec.clone();
        let path = gguf.to_path_buf();
        let tier = name.to_string();
        std::thread::Builder::new()
            .name(format!("nimmer-{name}"))
            .spawn(move || {
                let threads = if spec.threads == 0 {
                    std::thread::available_parallelism().map_or(1, |n| n.get())
                } else {
                    spec.threads
                };
                let pool = match rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name({
                        let tier = tier.clone();
                        move |i| format!("nimmer-{tier}-k{i}")
                    })
                    .build()
                {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = ready_tx
                            .send(Err(TierError::Device(format!("kernel thread pool: {e}"))));
                        return;
                    }
                };
                match spec.backend() {
                    nimmer_config::Backend::Nimmer => {
                        match pool.install(|| Llama::load(&path, spec.precision, spec.context)) {
                            Ok((model, tok)) => {
                                serve(model, tok, (tier, spec, limits), pool, ready_tx, rx)
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                            }
                        }
                    }
                    nimmer_config::Backend::Candle => {
                        let loaded = crate::device(spec.device).and_then(|d| {
                            pool.install(|| {
                                CandleLlama::load(&path, spec.precision, spec.context, &d)
                            })
                        });
                        match loaded {
                            Ok((model, tok)) => {
                                serve(model, tok, (tier, spec, limits), pool, ready_tx, rx)
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                            }
                        }
                    }
                }
            })
            .map_err(|e| TierError::Device(format!("spawning engine thread: {e}")))?;
        let info = ready_rx
            .blocking_recv()
            .map_err(|_| TierError::EngineDown { tier: name.into() })??;
        Ok(Self { tx, info })
    }

    pub fn info(&self) -> &TierInfo {
        &self.info
    }

    /// The engine limits in effect.
    pub fn limits(&self) -> EngineLimits {
        self.info.limits.get()
    }

    /// Changes the engine limits; the engine applies them before its next step. Running sequences keep their
    /// KV memory: a lower budget only delays admissions.
    pub fn set_limits(&self, l: EngineLimits) {
        let live = &self.info.limits;
        live.batch_token_budget
            .store(l.batch_token_budget.max(1), Ordering::Relaxed);
        live.kv_memory_bytes
            .store(l.kv_memory_bytes, Ordering::Relaxed);
    }

    /// Tokenizes the prompt as the engine will see it.
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let tok = &self.info.tokenizer;
        let ids = match prompt {
            Prompt::Chat(m) => {
                if m.is_empty() {
                    return Err(TierError::InvalidRequest {
                        field: "messages",
                        message: "must not be empty".into(),
                    });
                }
                if let Some(bad) = m
                    .iter()
                    .find(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant"))
                {
                    return Err(TierError::InvalidRequest {
                        field: "messages",
                        message: format!("unknown role `{}` (system, user, assistant)", bad.role),
                    });
                }
                tok.encode(&tok.render_chat(m)?)?
            }
            Prompt::Text(t) => tok.encode(t)?,
            Prompt::Tokens(t) => {
                if let Some(bad) = t.iter().find(|&&t| t as usize >= self.info.model.vocab) {
                    return Err(TierError::InvalidRequest {
                        field: "prompt",
                        message: format!(
                            "token id {bad} is outside the vocabulary of {}",
                            self.info.model.vocab
                        ),
                    });
                }
                t.clone()
            }
        };
        if ids.is_empty() {
            return Err(TierError::InvalidRequest {
                field: "prompt",
                message: "must not be empty".into(),
            });
        }
        Ok(ids)
    }

    /// Validates and queues a request; the returned receiver streams its tokens. Dropping it cancels the request.
    pub fn generate(&self, req: GenerateRequest) -> Result<mpsc::UnboundedReceiver<Event>> {
        req.params.validate()?;
        let prompt = self.tokenize(&req.prompt)?;
        let info = &self.info;
        if prompt.len() + req.params.max_tokens > info.context {
            return Err(TierError::ContextExceeded {
                tier: info.name.clone(),
                tokens: prompt.len(),
                max_tokens: req.params.max_tokens,
                context: info.context,
            });
        }
        let need = (prompt.len() + req.params.max_tokens) * info.model.kv_bytes_per_token();
        let kv_budget = info.limits.get().kv_memory_bytes;
        if need > kv_budget {
            return Err(TierError::KvBudgetExceeded {
                tier: info.name.clone(),
                needed_mib: need as f64 / (1 << 20) as f64,
                budget_mib: kv_budget >> 20,
            });
        }
        let (events, rx) = mpsc::unbounded_channel();
        let seq = Box::new(NewSeq {
            prompt,
            params: req.params,
            lora: req.lora.filter(|b| !b.is_empty()),
            events,
            enqueued: Instant::now(),
        });
        self.tx
            .try_send(Command::Generate { seq })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => TierError::QueueFull {
                    tier: info.name.clone(),
                    capacity: info.queue_capacity,
                },
                mpsc::error::TrySendError::Closed(_) => TierError::EngineDown {
                    tier: info.name.clone(),
                },
            })?;
        Ok(rx)
    }
}

/// Runs the engine loop of a loaded model on this thread after reporting readiness.
fn serve<M: Decoder>(
    model: M,
    tokenizer: ChatTokenizer,
    (tier, spec, limits): (String, LlmTierSpec, EngineLimits),
    pool: rayon::ThreadPool,
    ready_tx: oneshot::Sender<Result<Arc<TierInfo>>>,
    rx: mpsc::Receiver<Command>,
) {
    let cfg = model.config();
    if spec.context > cfg.train_context {
        tracing::warn!(tier = %tier, context = spec.context, trained = cfg.train_context, "configured context exceeds the model's training context");
    }
    let info = Arc::new(TierInfo {
        name: tier.clone(),
        tokenizer,
        model: cfg.clone(),
        context: spec.context,
        limits: LiveLimits {
            batch_token_budget: AtomicUsize::new(limits.batch_token_budget.max(1)),
            kv_memory_bytes: AtomicUsize::new(limits.kv_memory_bytes),
        },
        queue_capacity: spec.queue,
        weight_bytes: model.weight_bytes(),
        kernel: model.kernel(),
    });
    tracing::info!(tier = %tier, weights_mib = info.weight_bytes >> 20, kernel = %info.kernel, threads = pool.current_num_threads(), "engine ready");
    if spec.device == nimmer_config::Device::Cuda && spec.precision != nimmer_config::Precision::F32
    {
        tracing::warn!(tier = %tier, precision = ?spec.precision, "quantized weights on CUDA run candle's quantized kernels, whose greedy text differed from the CPU's (measured on the Driver's Q4_1 file); precision = \"f32\" matches the CPU");
    }
    if ready_tx.send(Ok(info.clone())).is_err() {
        return;
    }
    Engine {
        model,
        info,
        spec,
        pool,
        waiting: VecDeque::new(),
        running: Vec::new(),
        kv_used: 0,
        ws: M::Workspace::default(),
    }
    .run(rx);
}

/// A sequence owned by the engine.
struct Seq<C> {
    new: NewSeq,
    /// Prompt tokens already in the KV cache.
    prefilled: usize,
    generated: Vec<u32>,
    /// Last sampled token, fed on the next decode step.
    last: u32,
    kv: Option<C>,
    kv_bytes: usize,
    sampler: Sampler,
    text: TextStream,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
}

struct Engine<M: Decoder> {
    model: M,
    info: Arc<TierInfo>,
    spec: LlmTierSpec,
    pool: rayon::ThreadPool,
    waiting: VecDeque<Seq<M::Cache>>,
    running: Vec<Seq<M::Cache>>,
    kv_used: usize,
    ws: M::Workspace,
}

impl<M: Decoder> Engine<M> {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            if self.waiting.is_empty() && self.running.is_empty() {
                match rx.blocking_recv() {
                    Some(c) => self.accept(c),
                    None => return,
                }
            }
            while let Ok(c) = rx.try_recv() {
                self.accept(c);
            }
            self.drop_cancelled();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
        }
    }

    fn accept(&mut self, c: Command) {
        let Command::Generate { seq } = c;
        let kv_bytes =
            (seq.prompt.len() + seq.params.max_tokens) * self.info.model.kv_bytes_per_token();
        let sampler = Sampler::new(seq.params.clone());
        let text = TextStream::new(seq.params.stop.clone());
        self.waiting.push_back(Seq {
            new: *seq,
            prefilled: 0,
            generated: Vec::new(),
            last: 0,
            kv: None,
            kv_bytes,
            sampler,
            text,
            admitted: None,
            first_token: None,
        });
    }

    fn drop_cancelled(&mut self) {
        self.waiting.retain(|s| !s.new.events.is_closed());
        let before = self.running.len();
        let mut freed = 0;
        self.running.retain(|s| {
            let keep = !s.new.events.is_closed();
            if !keep {
                freed += s.kv_bytes;
            }
            keep
        });
        self.kv_used -= freed;
        if self.running.len() != before {
            tracing::debug!(tier = %self.info.name, cancelled = before - self.running.len(), "dropped cancelled sequences");
        }
    }

    fn admit(&mut self) {
        let needs: Vec<usize> = self.waiting.iter().map(|s| s.kv_bytes).collect();
        let free_slots = self.spec.max_batch.saturating_sub(self.running.len());
        let budget = self.info.limits.get().kv_memory_bytes;
        let n = admit_count(&needs, free_slots, budget.saturating_sub(self.kv_used));
        for mut s in self.waiting.drain(..n) {
            s.kv = Some(
                self.model
                    .new_cache(s.new.prompt.len() + s.new.params.max_tokens),
            );
            s.admitted = Some(Instant::now());
            self.kv_used += s.kv_bytes;
            self.running.push(s);
        }
    }

    fn step(&mut self) {
        let states: Vec<SeqState> = self
            .running
            .iter()
            .map(|s| SeqState {
                prefill_left: s.new.prompt.len() - s.prefilled,
            })
            .collect();
        // Every running sequence decodes each step, whatever the (possibly just lowered) budget.
        let budget = self
            .info
            .limits
            .get()
            .batch_token_budget
            .max(self.running.len());
        let plan = plan_step(&states, budget);
        let tier = self.info.name.clone();
        metrics::histogram!("nimmer_batch_size", "tier" => tier.clone())
            .record(plan.iter().filter(|&&n| n > 0).count() as f64);
        metrics::histogram!("nimmer_batch_tokens", "tier" => tier)
            .record(plan.iter().sum::<usize>() as f64);
        let mut chunks = Vec::with_capacity(self.running.len());
        for (s, &n) in self.running.iter_mut().zip(&plan) {
            if n == 0 {
                continue;
            }
            let kv = s.kv.as_mut().expect("running sequences hold a KV cache");
            if s.prefilled < s.new.prompt.len() {
                let end = s.prefilled + n;
                chunks.push(Chunk {
                    tokens: &s.new.prompt[s.prefilled..end],
                    kv,
                    logits: end == s.new.prompt.len(),
                    lora: s.new.lora.as_deref(),
                });
            } else {
                chunks.push(Chunk {
                    tokens: std::slice::from_ref(&s.last),
                    kv,
                    logits: true,
                    lora: s.new.lora.as_deref(),
                });
            }
        }
        let (model, ws) = (&self.model, &mut self.ws);
        let result = self
            .pool
            .install(|| Decoder::forward(model, &mut chunks, ws));
        drop(chunks);
        let mut logits = match result {
            Ok(l) => l.into_iter(),
            Err(e) => {
                tracing::error!(tier = %self.info.name, error = %e, "forward pass failed; failing the running batch");
                for s in self.running.drain(..) {
                    let _ = s.new.events.send(Event::Error(e.to_string()));
                }
                self.kv_used = 0;
                return;
            }
        };
        let mut finished = vec![false; self.running.len()];
        for ((i, s), &n) in self.running.iter_mut().enumerate().zip(&plan) {
            if n == 0 {
                continue;
            }
            if s.prefilled < s.new.prompt.len() {
                s.prefilled += n;
                if s.prefilled < s.new.prompt.len() {
                    continue;
                }
            }
            let mut l = logits
                .next()
                .expect("one logits row per sequence that asked");
            finished[i] = deliver(&self.info, s, &mut l);
        }
        let mut freed = 0;
        let mut i = 0;
        self.running.retain(|s| {
            let done = finished[i];
            i += 1;
            if done {
                freed += s.kv_bytes;
            }
            !done
        });
        self.kv_used -= freed;
    }
}

/// Samples and streams one token; returns whether the sequence is finished.
fn deliver<C>(info: &TierInfo, s: &mut Seq<C>, logits: &mut [f32]) -> bool {
    let history: Vec<u32> = if s.new.params.repetition_penalty != 1.0 {
        s.new.prompt.iter().chain(&s.generated).copied().collect()
    } else {
        Vec::new()
    };
    let tok = s.sampler.sample(logits, &history);
    let now = Instant::now();
    s.first_token.get_or_insert(now);
    let tokenizer = &info.tokenizer;
    let eos = !s.new.params.ignore_eos && tokenizer.eos_ids.contains(&tok);
    let mut text = String::new();
    if !eos {
        s.generated.push(tok);
        s.last = tok;
        match tokenizer.decode(&s.generated) {
            Ok(full) => text = s.text.push(&full),
            Err(e) => tracing::warn!(error = %e, "detokenizing"),
        }
    }
    let at_limit = s.generated.len() >= s.new.params.max_tokens
        || s.new.prompt.len() + s.generated.len() >= info.context;
    let reason = if eos || s.text.stopped {
        Some(FinishReason::Stop)
    } else if at_limit {
        Some(FinishReason::Length)
    } else {
        None
    };
    if reason.is_some()
        && !s.text.stopped
        && let Ok(full) = tokenizer.decode(&s.generated)
    {
        text.push_str(&s.text.finish(&full));
    }
    if !eos && s.new.events.send(Event::Token { id: tok, text }).is_err() {
        return true;
    }
    match reason {
        None => false,
        Some(finish_reason) => {
            let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1e3;
            let q = s.new.enqueued;
            let _ = s.new.events.send(Event::Done(Completion {
                finish_reason,
                prompt_tokens: s.new.prompt.len(),
                completion_tokens: s.generated.len(),
                queue_ms: ms(q, s.admitted.unwrap_or(q)),
                ttft_ms: ms(q, s.first_token.unwrap_or(now)),
                total_ms: ms(q, now),
            }));
            true
        }
    }
}

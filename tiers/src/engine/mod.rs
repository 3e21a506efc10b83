//! The LLM engine actor of one tier worker (Driver, Theia).
//!
//! [`LlmHandle`] is a cheap `Clone` handle over a bounded channel; [`LlmHandle::generate`] validates and tokenizes
//! a request on the caller's side (errors come back at once), then queues it. The engine runs on its own OS
//! thread (`worker.rs`) and owns the model and the `queue.rs` state (waiting and running sequences, their KV
//! caches and leases). Between two steps it takes new requests, drops sequences whose receiver is gone or whose
//! deadline passed before admission, admits waiting ones (fewest resident per zone weight first) within the
//! `resident` count and the KV memory budget, and runs one batched forward pass over at most `step_rows` of the
//! resident sequences, chosen by weighted fair share of the tokens each zone was served (`fair.rs`): one token
//! for every decoding row plus prefill chunks under the per-step token budget. Sequences left out of a step
//! keep their KV and continue later. Tokens stream back per request.

mod choose;
mod fair;
mod pace;
mod prefix;
mod queue;
mod sched;
mod service;
mod worker;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use nimmer_config::LlmTierSpec;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Result, TierError};
use nimmer_loras::Blend;

use crate::grammar::Grammars;
use crate::llama::{CandleLlama, Llama, LlamaConfig};
use crate::sampling::SamplingParams;
use crate::tokenizer::{ChatTokenizer, Message};
use queue::NewSeq;
use worker::serve;

pub use fair::jain;
pub use nimmer_config::Schedule;
pub use prefix::{BLOCK_TOKENS, PrefixSnapshot, PrefixStats};
pub use service::{ZoneService, ZoneServiceView};

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
    /// Not admitted into the running batch by then: dropped from the queue with [`Event::Expired`] before
    /// any model work.
    pub deadline: Option<Instant>,
    /// Whose share of the engine's steps it runs on.
    pub share: Share,
}

/// The zone a sequence runs for: steps share their rows and tokens across zones by `weight`, and within a
/// zone higher `priority` runs first. Requests that name no zone share one (`Share::default()`).
#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    pub zone: Arc<str>,
    /// The zone's class (labels the per-class service figures in `/metrics`).
    pub class: Arc<str>,
    /// The class's weight (> 0).
    pub weight: f64,
    pub priority: i32,
}

impl Default for Share {
    fn default() -> Self {
        Self {
            zone: "".into(),
            class: "".into(),
            weight: 1.0,
            priority: 0,
        }
    }
}

impl Share {
    pub fn zone(zone: &str, class: &str, weight: f64, priority: i32) -> Self {
        Self {
            zone: zone.into(),
            class: class.into(),
            weight,
            priority,
        }
    }
}

pub use nimmer_wire::FinishReason;

/// Summary sent when a sequence ends.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Completion {
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache (not computed again).
    pub cached_tokens: usize,
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
        /// When the request asked for `logprobs`.
        logprobs: Option<Box<crate::sampling::TokenLogprobs>>,
    },
    Done(Completion),
    /// The request's deadline passed while it waited for admission; it never ran.
    Expired,
    /// The engine failed this request (logged on the engine side).
    Error(String),
}

/// The engine limits ops may change while it runs (budgets.toml): read by the engine before every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineLimits {
    /// Most tokens one step runs (decode rows + prefill chunks).
    pub batch_token_budget: usize,
    /// KV-cache bytes all running sequences and the prefix cache may hold together; admission respects it.
    pub kv_memory_bytes: usize,
    /// Bytes the prefix cache may keep (within `kv_memory_bytes`; 0 turns it off).
    pub prefix_cache_bytes: usize,
    /// Most sequences held with their KV at once (running or paused).
    pub resident: usize,
    /// Most sequences one step runs (the engine caps it at its `max_batch`).
    pub step_rows: usize,
    /// Wall time a step aims to stay within: its rows and tokens are sized from the measured cost of recent
    /// steps (`None`: no bound but `step_rows` and `batch_token_budget`).
    pub step_target: Option<std::time::Duration>,
    pub schedule: Schedule,
}

impl EngineLimits {
    /// The limits an LLM tier's budget sets (validated to be present for LLM tiers).
    pub fn of(b: &nimmer_config::TierBudget) -> Self {
        Self {
            batch_token_budget: b.batch_token_budget.unwrap_or(256),
            kv_memory_bytes: b.kv_memory_mib.unwrap_or(1024) << 20,
            prefix_cache_bytes: b.prefix_cache_mib() << 20,
            resident: b.resident.unwrap_or(b.slots),
            step_rows: b.step_rows.unwrap_or(usize::MAX),
            step_target: b
                .step_target_ms
                .filter(|&ms| ms > 0)
                .map(std::time::Duration::from_millis),
            schedule: b.schedule,
        }
    }
}

/// [`EngineLimits`] shared between the handles and the engine thread.
struct LiveLimits(std::sync::Mutex<EngineLimits>);

impl LiveLimits {
    fn new(l: EngineLimits) -> Self {
        let live = Self(std::sync::Mutex::new(l));
        live.set(l);
        live
    }

    fn get(&self) -> EngineLimits {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, l: EngineLimits) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = EngineLimits {
            batch_token_budget: l.batch_token_budget.max(1),
            resident: l.resident.max(1),
            step_rows: l.step_rows.max(1),
            ..l
        };
    }
}

/// Facts about a running tier, shared by all handles.
pub struct TierInfo {
    pub name: String,
    pub tokenizer: ChatTokenizer,
    /// Names the model's KV in the prefix cache (its file and precision).
    pub model_id: String,
    pub model: LlamaConfig,
    pub context: usize,
    limits: LiveLimits,
    pub queue_capacity: usize,
    pub weight_bytes: usize,
    /// Which kernels run the model.
    pub kernel: String,
    /// What the prefix cache did.
    pub prefix: Arc<PrefixStats>,
    /// Pins to release, read by the engine before every step.
    unpins: std::sync::Mutex<Vec<u64>>,
    /// Structured-output grammars over this tokenizer (built at the first request that asks for one).
    grammars: std::sync::OnceLock<Arc<Grammars>>,
    /// Tokens served and owed per zone.
    pub service: ZoneService,
    /// What the engine holds, as of its last loop.
    load: std::sync::Mutex<EngineLoad>,
}

/// What an engine holds now (for routing across workers and for views): refreshed by the engine thread
/// between steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct EngineLoad {
    /// Sequences the last step ran.
    pub running: usize,
    /// Sequences holding KV (running or paused by the fair planner).
    pub resident: usize,
    /// Sequences queued for admission.
    pub waiting: usize,
    /// KV bytes leased by resident sequences and held by the prefix cache.
    pub kv_used_bytes: usize,
    /// `kv_memory_mib` in bytes.
    pub kv_budget_bytes: usize,
}

enum Command {
    Generate {
        seq: Box<NewSeq>,
    },
    /// Read the unpin list (`TierInfo::unpins`).
    Wake,
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
                        let _ = ready_tx.send(Err(TierError::Spawn {
                            what: "the kernel thread pool".into(),
                            message: e.to_string(),
                        }));
                        return;
                    }
                };
                match spec.backend() {
                    nimmer_config::Backend::Nimmer => {
                        match pool.install(|| Llama::load(&path, spec.precision, spec.context)) {
                            Ok((model, tok)) => {
                                serve(model, tok, (tier, spec, limits, &path), pool, ready_tx, rx)
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
                                serve(model, tok, (tier, spec, limits, &path), pool, ready_tx, rx)
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                            }
                        }
                    }
                }
            })
            .map_err(|e| TierError::Spawn {
                what: format!("the {name} engine thread"),
                message: e.to_string(),
            })?;
        let info = ready_rx
            .blocking_recv()
            .map_err(|_| TierError::EngineDown { tier: name.into() })??;
        Ok(Self { tx, info })
    }

    pub fn info(&self) -> &TierInfo {
        &self.info
    }

    /// The tier's structured-output grammars (built on first use: blocking, about a tenth of a second).
    pub fn grammars(&self) -> Result<Arc<Grammars>> {
        let info = &self.info;
        if let Some(g) = info.grammars.get() {
            return Ok(g.clone());
        }
        let built = Arc::new(Grammars::new(&info.tokenizer, info.model.vocab)?);
        Ok(info.grammars.get_or_init(|| built).clone())
    }

    /// Whether the engine thread still runs (it ends when it panics or its model fails for good).
    pub fn is_running(&self) -> bool {
        !self.tx.is_closed()
    }

    /// What the prefix cache holds and did.
    pub fn prefix_cache(&self) -> PrefixSnapshot {
        self.info.prefix.snapshot()
    }

    /// The engine limits in effect.
    pub fn limits(&self) -> EngineLimits {
        self.info.limits.get()
    }

    /// Changes the engine limits; the engine applies them before its next step. Running sequences keep their
    /// KV memory: a lower budget only delays admissions.
    pub fn set_limits(&self, l: EngineLimits) {
        self.info.limits.set(l);
        // An idle engine has nothing to apply them to; a busy one reads them before its next step.
    }

    /// What the engine holds now.
    pub fn load(&self) -> EngineLoad {
        *self.info.load.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tokens each zone was served and owed by this engine's steps (zones seen in the last ten minutes).
    pub fn zone_service(&self) -> Vec<ZoneServiceView> {
        self.info.service.snapshot()
    }

    /// Tokenizes the prompt as the engine will see it.
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        tokenize(&self.info.tokenizer, self.info.model.vocab, prompt)
    }

    /// Validates and queues a request; the returned receiver streams its tokens. Dropping it cancels the request.
    pub fn generate(&self, req: GenerateRequest) -> Result<mpsc::UnboundedReceiver<Event>> {
        let (seq, rx) = self.prepare(req)?;
        self.send(seq)?;
        Ok(rx)
    }

    /// Prefills `prompt` (run with `lora`) into the prefix cache and pins its blocks under `id`: they are
    /// never evicted until [`LlmHandle::unpin`] (a persona of an NPC present in an active zone). Queued like a
    /// generation of one token; an engine with its prefix cache off only runs it.
    pub fn pin(&self, id: u64, prompt: Prompt, lora: Option<Arc<Blend>>) -> Result<()> {
        let (mut seq, _rx) = self.prepare(GenerateRequest {
            prompt,
            params: SamplingParams::greedy(1),
            lora,
            deadline: None,
            share: Share::default(),
        })?;
        seq.pin = Some(id);
        self.send(seq)
    }

    /// Releases the blocks pinned under `id` (they become evictable; also when the pin is still queued).
    pub fn unpin(&self, id: u64) {
        self.info
            .unpins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id);
        // A busy engine reads the list before its next step anyway; an idle one wakes for it.
        let _ = self.tx.try_send(Command::Wake);
    }

    fn prepare(
        &self,
        req: GenerateRequest,
    ) -> Result<(Box<NewSeq>, mpsc::UnboundedReceiver<Event>)> {
        req.params.validate()?;
        if !(req.share.weight.is_finite() && req.share.weight > 0.0) {
            return Err(TierError::InvalidRequest {
                field: "weight",
                message: format!("must be a number > 0, got {}", req.share.weight),
            });
        }
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
        let constraint = match &req.params.response_format {
            Some(f) => Some(self.grammars()?.constraint(f)?),
            None => None,
        };
        let lora = req.lora.filter(|b| !b.is_empty());
        let root = prefix::chain_root(&info.model_id, lora.as_deref());
        let (events, rx) = mpsc::unbounded_channel();
        let seq = Box::new(NewSeq {
            prompt,
            params: req.params,
            lora,
            events,
            enqueued: Instant::now(),
            deadline: req.deadline,
            root,
            pin: None,
            share: req.share,
            constraint,
        });
        Ok((seq, rx))
    }

    fn send(&self, seq: Box<NewSeq>) -> Result<()> {
        let info = &self.info;
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
            })
    }
}

/// Tokenizes `prompt` as an engine with `tok` and a vocabulary of `vocab` sees it: chat messages through the
/// model's template (roles checked), raw text as is, token ids checked against the vocabulary; never empty.
pub fn tokenize(tok: &ChatTokenizer, vocab: usize, prompt: &Prompt) -> Result<Vec<u32>> {
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
            if let Some(bad) = t.iter().find(|&&t| t as usize >= vocab) {
                return Err(TierError::InvalidRequest {
                    field: "prompt",
                    message: format!("token id {bad} is outside the vocabulary of {}", vocab),
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

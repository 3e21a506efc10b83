//! Scripted fake tiers for fast tests of the gateway (no model): a generation streams `words` tokens
//! (`"w0 "`, `"w1 "`, …) one per `token_delay`, honours cancellation (a dropped receiver) and deadlines (a
//! request whose deadline passed before it started gets `Expired`), and counts what it saw, so a test can
//! assert that a request never reached the tier. [`FakeLlm::hold`] makes generations wait until
//! [`FakeLlm::release`], to keep slots busy for as long as a test needs. Not for serving.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use nimmer_loras::BaseShape;
use nimmer_tiers::{
    Classification, Completion, Embedding, EngineLimits, Event, FinishReason, GenerateRequest,
    Grammars, Prompt, ResponseFormat, Schedule, Share, TierError, TokenLogprobs, ZoneServiceView,
};
use tokio::sync::{Notify, mpsc};

use super::{ClassifierTier, Events, Health, LlmTier, Tiers};

/// What a fake LLM tier does and what it saw.
pub struct FakeLlm {
    name: String,
    /// Tokens each generation streams (fewer when `max_tokens` is lower).
    pub words: usize,
    pub token_delay: Duration,
    limits: Mutex<EngineLimits>,
    alive: AtomicBool,
    held: AtomicBool,
    release: Notify,
    /// Requests submitted.
    pub submitted: AtomicUsize,
    /// Generations whose receiver was dropped before they finished.
    pub cancelled: AtomicUsize,
    /// Generations running now.
    pub running: AtomicUsize,
    /// Prompt lengths (tokens) in submission order: tests tell requests apart by them.
    pub prompts: Mutex<Vec<usize>>,
    /// The share (zone, class, weight, priority) of each submitted request, in submission order.
    pub shares: Mutex<Vec<Share>>,
    /// Tokens streamed per zone (the fake's service book: owed = served, it does not schedule).
    served: Mutex<std::collections::BTreeMap<String, (String, u64)>>,
    /// Pins held now: id → (prompt, whether it ran with a blend).
    pub pins: Mutex<std::collections::BTreeMap<u64, (Prompt, bool)>>,
    /// The `response_format` of each submitted request, in submission order (the fake does not enforce it).
    pub formats: Mutex<Vec<Option<ResponseFormat>>>,
    /// Formats compile against a byte vocabulary, so a broken schema fails as on a model.
    grammars: Arc<Grammars>,
}

impl FakeLlm {
    pub fn new(name: &str, words: usize, token_delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            words,
            token_delay,
            limits: Mutex::new(EngineLimits {
                batch_token_budget: 256,
                kv_memory_bytes: 1 << 30,
                prefix_cache_bytes: 0,
                resident: 32,
                step_rows: 32,
                step_target: None,
                schedule: Schedule::Fair,
            }),
            alive: AtomicBool::new(true),
            held: AtomicBool::new(false),
            release: Notify::new(),
            submitted: AtomicUsize::new(0),
            cancelled: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            prompts: Mutex::new(Vec::new()),
            shares: Mutex::new(Vec::new()),
            served: Mutex::new(Default::default()),
            pins: Mutex::new(Default::default()),
            formats: Mutex::new(Vec::new()),
            grammars: Arc::new(Grammars::single_byte()),
        })
    }

    /// From now on the tier is down: submissions fail, running generations end with an error.
    pub fn kill(&self) {
        self.alive.store(false, Ordering::SeqCst);
        self.release.notify_waiters();
    }

    /// Generations started from now on wait (before their first token) until [`FakeLlm::release`].
    pub fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
    }

    /// Lets held generations (and later ones) run.
    pub fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
        self.release.notify_waiters();
    }

    pub fn submitted(&self) -> usize {
        self.submitted.load(Ordering::SeqCst)
    }

    async fn run(
        self: Arc<Self>,
        req: GenerateRequest,
        prompt: usize,
        tx: mpsc::UnboundedSender<Event>,
    ) {
        let started = Instant::now();
        if req.deadline.is_some_and(|d| d <= started) {
            let _ = tx.send(Event::Expired);
            return;
        }
        self.running.fetch_add(1, Ordering::SeqCst);
        let _running = Running(&self.running);
        loop {
            let wait = self.release.notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
            if !self.held.load(Ordering::SeqCst) || !self.alive.load(Ordering::SeqCst) {
                break;
            }
            tokio::select! {
                _ = wait => {}
                _ = tx.closed() => {
                    self.cancelled.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
        }
        let n = self.words.min(req.params.max_tokens);
        for i in 0..n {
            if !self.alive.load(Ordering::SeqCst) {
                // As a remote tier reports a lost worker with none left.
                let _ = tx.send(Event::Error(format!("the {} tier went away", self.name)));
                return;
            }
            if i > 0 && !self.token_delay.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(self.token_delay) => {}
                    _ = tx.closed() => {}
                }
            }
            if tx
                .send(Event::Token {
                    id: i as u32,
                    text: format!("w{i} "),
                    // Word i has log probability -0.25; the next words are less likely.
                    logprobs: req.params.logprobs.map(|n| {
                        Box::new(TokenLogprobs {
                            token: format!("w{i} "),
                            logprob: -0.25,
                            top: (0..n)
                                .map(|k| ((i + k) as u32, format!("w{} ", i + k), -0.25 - k as f32))
                                .collect(),
                        })
                    }),
                })
                .is_err()
            {
                self.cancelled.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
        {
            let mut served = self.served.lock().expect("served lock");
            let e = served.entry(req.share.zone.to_string()).or_default();
            e.0 = req.share.class.to_string();
            e.1 += (prompt + n) as u64;
        }
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let _ = tx.send(Event::Done(Completion {
            finish_reason: FinishReason::Length,
            prompt_tokens: prompt,
            cached_tokens: 0,
            completion_tokens: n,
            queue_ms: 0.0,
            ttft_ms: ms,
            total_ms: ms,
        }));
    }
}

/// Counts a generation as running while it lives.
struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Holds the fake tier's `Arc` so [`LlmTier::submit`] can spawn its generations.
pub struct FakeLlmTier(pub Arc<FakeLlm>);

impl FakeLlmTier {
    fn start(&self, req: GenerateRequest) -> Result<Events, TierError> {
        let fake = &self.0;
        if !fake.alive.load(Ordering::SeqCst) {
            return Err(TierError::EngineDown {
                tier: fake.name.clone(),
            });
        }
        let prompt = self.tokenize(&req.prompt)?.len();
        fake.submitted.fetch_add(1, Ordering::SeqCst);
        fake.prompts.lock().expect("prompts lock").push(prompt);
        fake.shares
            .lock()
            .expect("shares lock")
            .push(req.share.clone());
        fake.formats
            .lock()
            .expect("formats lock")
            .push(req.params.response_format.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(fake.clone().run(req, prompt, tx));
        Ok(rx)
    }
}

impl LlmTier for FakeLlmTier {
    fn lora_base(&self) -> BaseShape {
        BaseShape {
            n_layer: 1,
            dim: 8,
            n_head: 1,
            n_kv_head: 1,
            head_dim: 8,
            ffn: 16,
            rope_interleaved: false,
        }
    }

    /// One token per whitespace-separated word (plus one per chat message).
    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, TierError> {
        let n = match prompt {
            Prompt::Chat(m) => m
                .iter()
                .map(|m| 1 + m.content.split_whitespace().count())
                .sum(),
            Prompt::Text(t) => t.split_whitespace().count(),
            Prompt::Tokens(t) => t.len(),
        };
        if n == 0 {
            return Err(TierError::InvalidRequest {
                field: "prompt",
                message: "must not be empty".into(),
            });
        }
        Ok(vec![1; n])
    }

    fn submit(&self, req: GenerateRequest) -> BoxFuture<'static, Result<Events, TierError>> {
        Box::pin(std::future::ready(self.start(req)))
    }

    fn grammars(&self) -> Result<Arc<Grammars>, TierError> {
        Ok(self.0.grammars.clone())
    }

    fn pin(
        &self,
        id: u64,
        prompt: Prompt,
        lora: Option<Arc<nimmer_loras::Blend>>,
    ) -> Result<(), TierError> {
        if !self.0.alive.load(Ordering::SeqCst) {
            return Err(TierError::EngineDown {
                tier: self.0.name.clone(),
            });
        }
        self.tokenize(&prompt)?;
        let lora = lora.is_some_and(|b| !b.is_empty());
        self.0
            .pins
            .lock()
            .expect("pins lock")
            .insert(id, (prompt, lora));
        Ok(())
    }

    fn unpin(&self, id: u64) {
        self.0.pins.lock().expect("pins lock").remove(&id);
    }

    fn limits(&self) -> EngineLimits {
        *self.0.limits.lock().expect("limits lock")
    }

    fn zone_service(&self) -> Vec<ZoneServiceView> {
        let served = self.0.served.lock().expect("served lock");
        served
            .iter()
            .map(|(zone, (class, n))| ZoneServiceView {
                zone: zone.clone(),
                class: class.clone(),
                tokens_served: *n,
                tokens_owed: *n as f64,
                share_ratio: (*n > 0).then_some(1.0),
            })
            .collect()
    }

    fn set_limits(&self, limits: EngineLimits) {
        *self.0.limits.lock().expect("limits lock") = limits;
    }

    fn health(&self) -> Health {
        if self.0.alive.load(Ordering::SeqCst) {
            Health::Ready
        } else {
            Health::Down {
                reason: format!("the {} fake was killed", self.0.name),
            }
        }
    }
}

/// A classifier that labels every input `"calm"`.
pub struct FakeClassifier {
    pub alive: AtomicBool,
}

impl ClassifierTier for FakeClassifier {
    fn classify(
        &self,
        _classifier: &str,
        inputs: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<Classification>, TierError>> {
        Box::pin(async move {
            Ok(inputs
                .iter()
                .map(|_| Classification {
                    label: "calm".into(),
                    scores: [("calm".to_string(), 1.0)].into_iter().collect(),
                    latency_ms: 0.0,
                })
                .collect())
        })
    }

    /// A unit vector of 8 dimensions hashed from the text (equal texts, equal vectors), one token per word.
    fn embed(&self, inputs: Vec<String>) -> BoxFuture<'static, Result<Vec<Embedding>, TierError>> {
        Box::pin(async move {
            Ok(inputs
                .iter()
                .map(|text| {
                    let mut h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                    });
                    let mut vector: Vec<f32> = (0..8)
                        .map(|_| {
                            h = h.rotate_left(8).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                            (h >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                        })
                        .collect();
                    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
                    vector.iter_mut().for_each(|x| *x /= norm);
                    Embedding {
                        vector,
                        tokens: text.split_whitespace().count(),
                    }
                })
                .collect())
        })
    }

    fn health(&self) -> Health {
        if self.alive.load(Ordering::SeqCst) {
            Health::Ready
        } else {
            Health::Down {
                reason: "the saturn fake was killed".into(),
            }
        }
    }
}

/// Fake Driver and Theia (both `words` tokens, `token_delay` apart) and a fake Saturn.
pub struct Fakes {
    pub driver: Arc<FakeLlm>,
    pub theia: Arc<FakeLlm>,
    pub saturn: Arc<FakeClassifier>,
}

impl Fakes {
    pub fn new(words: usize, token_delay: Duration) -> Self {
        Self {
            driver: FakeLlm::new("driver", words, token_delay),
            theia: FakeLlm::new("theia", words, token_delay),
            saturn: Arc::new(FakeClassifier {
                alive: AtomicBool::new(true),
            }),
        }
    }

    pub fn tiers(&self) -> Tiers {
        Tiers {
            driver: Arc::new(FakeLlmTier(self.driver.clone())),
            theia: Arc::new(FakeLlmTier(self.theia.clone())),
            saturn: self.saturn.clone(),
        }
    }
}

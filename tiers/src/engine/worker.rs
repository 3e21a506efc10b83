//! The engine thread's loop: it only moves data between the channel, the [`Queue`] and the decoder. Between
//! two steps it takes new requests, lets the queue drop cancelled and expired ones and admit waiting ones, then
//! runs one batched forward pass (one token for every decoding sequence plus prefill chunks under the token
//! budget) and streams each sampled token back.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Instant;

use nimmer_config::LlmTierSpec;
use tokio::sync::{mpsc, oneshot};

use super::queue::{Queue, Seq};
use super::{Command, Completion, EngineLimits, Event, FinishReason, LiveLimits, TierInfo};
use crate::error::Result;
use crate::llama::{Chunk, Decoder};
use crate::tokenizer::ChatTokenizer;

/// Runs the engine loop of a loaded model on this thread after reporting readiness.
pub(super) fn serve<M: Decoder>(
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
    let batch_size = metrics::histogram!("nimmer_batch_size", "tier" => tier.clone());
    let batch_tokens = metrics::histogram!("nimmer_batch_tokens", "tier" => tier);
    Engine {
        queue: Queue::new(cfg.kv_bytes_per_token()),
        model,
        info,
        max_batch: spec.max_batch,
        pool,
        ws: M::Workspace::default(),
        batch_size,
        batch_tokens,
    }
    .run(rx);
}

struct Engine<M: Decoder> {
    model: M,
    info: Arc<TierInfo>,
    max_batch: usize,
    pool: rayon::ThreadPool,
    queue: Queue<M::Cache>,
    ws: M::Workspace,
    batch_size: metrics::Histogram,
    batch_tokens: metrics::Histogram,
}

impl<M: Decoder> Engine<M> {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            if self.queue.is_idle() {
                match rx.blocking_recv() {
                    Some(Command::Generate { seq }) => self.queue.accept(*seq),
                    None => return,
                }
            }
            while let Ok(Command::Generate { seq }) = rx.try_recv() {
                self.queue.accept(*seq);
            }
            let now = Instant::now();
            let gone = self.queue.drop_gone(now);
            if gone.cancelled + gone.expired > 0 {
                tracing::debug!(tier = %self.info.name, cancelled = gone.cancelled, expired = gone.expired, "dropped sequences");
            }
            let model = &self.model;
            let kv_budget = self.info.limits.get().kv_memory_bytes;
            self.queue.admit(self.max_batch, kv_budget, now, |tokens| {
                model.new_cache(tokens)
            });
            if !self.queue.running().is_empty() {
                self.step();
            }
        }
    }

    fn step(&mut self) {
        let plan = self.queue.plan(self.info.limits.get().batch_token_budget);
        self.batch_size
            .record(plan.iter().filter(|&&n| n > 0).count() as f64);
        self.batch_tokens.record(plan.iter().sum::<usize>() as f64);
        let mut chunks = Vec::with_capacity(plan.len());
        for (s, &n) in self.queue.running_mut().iter_mut().zip(&plan) {
            if n == 0 {
                continue;
            }
            let prefilling = s.prefilling();
            let kv = s.kv.as_mut().expect("running sequences hold a KV cache");
            let (tokens, logits) = if prefilling {
                let end = s.prefilled + n;
                (&s.new.prompt[s.prefilled..end], end == s.new.prompt.len())
            } else {
                (std::slice::from_ref(&s.last), true)
            };
            chunks.push(Chunk {
                tokens,
                kv,
                logits,
                lora: s.new.lora.as_deref(),
            });
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
                self.queue.fail_running(&e.to_string());
                return;
            }
        };
        let mut finished = vec![false; plan.len()];
        for ((i, s), &n) in self.queue.running_mut().iter_mut().enumerate().zip(&plan) {
            if n == 0 {
                continue;
            }
            if s.prefilling() {
                s.prefilled += n;
                if s.prefilling() {
                    continue;
                }
            }
            let mut l = logits
                .next()
                .expect("one logits row per sequence that asked");
            finished[i] = deliver(&self.info, s, &mut l);
        }
        self.queue.retire(&finished);
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

//! The engine thread's loop: it only moves data between the channel, the [`Queue`] and the decoder. Between
//! two steps it takes new requests, lets the queue drop cancelled and expired ones and admit waiting ones, then
//! runs one batched forward pass over the rows the queue plans (one token for every decoding row plus prefill
//! chunks under the token budget, both sized to the step's target time by the cost of recent steps,
//! `pace.rs`; resident sequences left out keep their KV), books each zone's service, and
//! streams each sampled token back. Around the step it moves KV between sequences and the prefix
//! cache (`prefix.rs`): admitted sequences start from their longest cached prefix, every block a step
//! completes is offered to the cache, and pin sequences pin their prompt's blocks when they end.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use nimmer_config::LlmTierSpec;
use tokio::sync::{mpsc, oneshot};

use super::choose;
use super::pace::StepCost;
use super::prefix::{BLOCK_TOKENS, BlockHash, PrefixCache, PrefixStats, extend_chain};
use super::queue::{Queue, Seq, StepLimits};
use super::service::ZoneService;
use super::{
    Command, Completion, EngineLimits, EngineLoad, Event, FinishReason, LiveLimits, TierInfo,
};
use crate::error::{Result, TierError};
use crate::llama::{Chunk, Decoder};
use crate::sampling::TokenLogprobs;
use crate::tokenizer::ChatTokenizer;

/// Runs the engine loop of a loaded model on this thread after reporting readiness.
pub(super) fn serve<M: Decoder>(
    model: M,
    tokenizer: ChatTokenizer,
    (tier, spec, limits, path): (String, LlmTierSpec, EngineLimits, &std::path::Path),
    pool: rayon::ThreadPool,
    ready_tx: oneshot::Sender<Result<Arc<TierInfo>>>,
    rx: mpsc::Receiver<Command>,
) {
    let cfg = model.config();
    if spec.context > cfg.train_context {
        tracing::warn!(tier = %tier, context = spec.context, trained = cfg.train_context, "configured context exceeds the model's training context");
    }
    let prefix = Arc::new(PrefixStats::default());
    let info = Arc::new(TierInfo {
        name: tier.clone(),
        tokenizer,
        model_id: format!(
            "{}:{:?}",
            path.file_name().unwrap_or_default().to_string_lossy(),
            spec.precision
        ),
        model: cfg.clone(),
        context: spec.context,
        limits: LiveLimits::new(limits),
        queue_capacity: spec.queue,
        weight_bytes: model.weight_bytes(),
        kernel: model.kernel(),
        prefix: prefix.clone(),
        unpins: Default::default(),
        grammars: Default::default(),
        service: ZoneService::new(&tier),
        load: Default::default(),
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
    let batch_tokens = metrics::histogram!("nimmer_batch_tokens", "tier" => tier.clone());
    let step_seconds = metrics::histogram!("nimmer_step_seconds", "tier" => tier.clone());
    let step_target_tokens = metrics::gauge!("nimmer_step_target_tokens", "tier" => tier.clone());
    let block_bytes = cfg.kv_bytes_per_token() * BLOCK_TOKENS;
    Engine {
        prefix: PrefixCache::new(block_bytes, limits.prefix_cache_bytes, prefix),
        pins: HashMap::new(),
        unpinned_early: HashSet::new(),
        gauges: PrefixGauges::new(&tier),
        queue: Queue::new(cfg.kv_bytes_per_token()),
        model,
        info,
        max_batch: spec.max_batch,
        pool,
        ws: M::Workspace::default(),
        batch_size,
        batch_tokens,
        step_seconds,
        step_target_tokens,
        cost: StepCost::new(),
        last_rows: 0,
    }
    .run(rx);
}

struct Engine<M: Decoder> {
    model: M,
    info: Arc<TierInfo>,
    max_batch: usize,
    pool: rayon::ThreadPool,
    queue: Queue<M::Cache>,
    prefix: PrefixCache<M::Block>,
    /// Blocks pinned per pin id, and pins released before their sequence ended.
    pins: HashMap<u64, Vec<BlockHash>>,
    unpinned_early: HashSet<u64>,
    gauges: PrefixGauges,
    ws: M::Workspace,
    batch_size: metrics::Histogram,
    batch_tokens: metrics::Histogram,
    /// Wall time of each step (plan, forward pass, sampling, streaming, prefix sharing).
    step_seconds: metrics::Histogram,
    /// Rows of the last step (0 once the engine is idle).
    last_rows: usize,
    /// What recent steps cost: sizes steps to `step_target`.
    cost: StepCost,
    /// The tokens a step may run under `step_target` (0: no target).
    step_target_tokens: metrics::Gauge,
}

impl<M: Decoder> Engine<M> {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            if self.queue.is_idle() {
                match rx.blocking_recv() {
                    Some(cmd) => self.take(cmd),
                    None => return,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.take(cmd);
            }
            self.release_pins();
            let now = Instant::now();
            let gone = self.queue.drop_gone(now);
            if gone.cancelled + gone.expired > 0 {
                tracing::debug!(tier = %self.info.name, cancelled = gone.cancelled, expired = gone.expired, "dropped sequences");
            }
            self.admit(now);
            if self.queue.running().is_empty() {
                self.last_rows = 0;
            } else {
                self.step();
            }
            self.gauges.publish(&self.info.prefix);
            self.publish_load();
        }
    }

    /// Shares what the engine holds (read by routing and views on other threads).
    fn publish_load(&mut self) {
        let limits = self.info.limits.get();
        let load = EngineLoad {
            // Sequences that ended in the last step are gone from `resident`.
            running: self.last_rows.min(self.queue.running().len()),
            resident: self.queue.running().len(),
            waiting: self.queue.waiting_len(),
            kv_used_bytes: self.queue.kv_used() + self.prefix.bytes(),
            kv_budget_bytes: limits.kv_memory_bytes,
        };
        *self.info.load.lock().unwrap_or_else(|e| e.into_inner()) = load;
    }

    fn take(&mut self, cmd: Command) {
        match cmd {
            Command::Generate { seq } => self.queue.accept(*seq),
            Command::Wake => {}
        }
    }

    /// Unpins what the handles asked to release; a pin released before it ran is remembered so it never pins.
    fn release_pins(&mut self) {
        let ids = std::mem::take(&mut *self.info.unpins.lock().unwrap_or_else(|e| e.into_inner()));
        for id in ids {
            match self.pins.remove(&id) {
                Some(chain) => self.prefix.unpin(&chain, chain.len()),
                // Still queued or running: it must not pin when it ends. (A pin that failed is forgotten.)
                None if self.queue.holds_pin(id) => {
                    self.unpinned_early.insert(id);
                }
                None => {}
            }
        }
    }

    /// Pins the prompt blocks (of `chain`) of a finished pin sequence under its id.
    fn pin_chain(&mut self, id: u64, chain: &[BlockHash], prompt_len: usize) {
        if self.unpinned_early.remove(&id) {
            return;
        }
        let full = (prompt_len / BLOCK_TOKENS).min(chain.len());
        let n = self.prefix.pin(&chain[..full]);
        if let Some(old) = self.pins.insert(id, chain[..n].to_vec()) {
            self.prefix.unpin(&old, old.len());
        }
        tracing::debug!(tier = %self.info.name, id, blocks = n, "prefix pinned");
    }

    /// Admits waiting sequences within the resident count and the KV memory left beside the prefix cache
    /// (evicting cached blocks when the next waiting sequence needs their bytes), and gives each admitted
    /// sequence the longest cached prefix of its prompt.
    fn admit(&mut self, now: Instant) {
        let limits = self.info.limits.get();
        self.prefix.set_budget(limits.prefix_cache_bytes);
        let model = &self.model;
        let beside = |p: &PrefixCache<M::Block>| limits.kv_memory_bytes.saturating_sub(p.bytes());
        let mut n = self
            .queue
            .admit(limits.resident, beside(&self.prefix), now, |t| {
                model.new_cache(t)
            });
        // Evict only when that admits the next waiting sequence: a partial eviction would cost cached
        // blocks and admit nothing.
        if let Some(short) = self.queue.shortfall(limits.resident, beside(&self.prefix))
            && self.prefix.evictable_bytes() >= short
        {
            self.prefix.evict_bytes(short);
            n += self
                .queue
                .admit(limits.resident, beside(&self.prefix), now, |t| {
                    model.new_cache(t)
                });
        }
        if !self.prefix.enabled() {
            return;
        }
        let running = self.queue.running_mut();
        let at = running.len() - n;
        for s in &mut running[at..] {
            reuse_prefix(model, &mut self.prefix, s, &self.info.name);
        }
    }

    fn step(&mut self) {
        let started = Instant::now();
        let limits = self.info.limits.get();
        let target = limits
            .step_target
            .and_then(|t| self.cost.tokens_within(t.as_secs_f64()));
        self.step_target_tokens.set(target.unwrap_or(0) as f64);
        let (plan, service) = self.queue.plan(StepLimits {
            rows: limits.step_rows.min(self.max_batch),
            tokens: limits.batch_token_budget,
            target,
            schedule: limits.schedule,
        });
        self.info.service.record(&service, Instant::now());
        self.last_rows = plan.iter().filter(|&&n| n > 0).count();
        self.batch_size.record(self.last_rows as f64);
        let step_tokens: usize = plan.iter().sum();
        self.batch_tokens.record(step_tokens as f64);
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
        // The sequences that sample this step, with their logits.
        let mut rows: Vec<(usize, Vec<f32>)> = Vec::new();
        for ((i, s), &n) in self.queue.running_mut().iter_mut().enumerate().zip(&plan) {
            if n == 0 {
                continue;
            }
            s.kv_len += n;
            if s.prefilling() {
                s.prefilled += n;
                if s.prefilling() {
                    continue;
                }
            }
            let l = logits
                .next()
                .expect("one logits row per sequence that asked");
            rows.push((i, l));
        }
        let chosen = choose::tokens(&self.pool, self.queue.running_mut(), rows);
        let mut finished = vec![false; plan.len()];
        for (i, tok) in chosen {
            finished[i] = deliver(&self.info, &mut self.queue.running_mut()[i], tok);
        }
        if self.prefix.enabled() {
            for (s, &n) in self.queue.running_mut().iter_mut().zip(&plan) {
                if n > 0 {
                    share_prefix(&self.model, &mut self.prefix, s, &self.info.name);
                }
            }
        }
        for i in (0..finished.len()).filter(|&i| finished[i]) {
            let s = &self.queue.running()[i];
            if let Some(id) = s.new.pin {
                // Split borrow: the queue lends the sequence, the engine pins in its cache.
                let (chain, prompt_len) = (s.chain.clone(), s.new.prompt.len());
                self.pin_chain(id, &chain, prompt_len);
            }
        }
        self.queue.retire(&finished);
        let secs = started.elapsed().as_secs_f64();
        self.step_seconds.record(secs);
        self.cost.record(step_tokens, secs);
        tracing::trace!(tier = %self.info.name, rows = self.last_rows, tokens = step_tokens, ms = secs * 1e3, "step");
    }
}

/// Fills a newly admitted sequence's cache with the longest cached prefix of its prompt. At least one
/// prompt token is always left to prefill (its logits start the reply), so a fully cached prompt recomputes
/// its last block.
fn reuse_prefix<M: Decoder>(
    model: &M,
    prefix: &mut PrefixCache<M::Block>,
    s: &mut Seq<M::Cache>,
    tier: &str,
) {
    let prompt = &s.new.prompt;
    extend_chain(&s.new.root, &mut s.chain, prompt);
    let blocks = prefix.lookup(&s.chain, (prompt.len() - 1) / BLOCK_TOKENS, prompt.len());
    if blocks.is_empty() {
        return;
    }
    let tokens = blocks.len() * BLOCK_TOKENS;
    let kv = s.kv.as_mut().expect("admitted sequences hold a KV cache");
    match model.reuse_blocks(kv, &blocks, tokens) {
        Ok(()) => {
            s.prefilled = tokens;
            s.kv_len = tokens;
            s.cached = tokens;
            s.shared = blocks.len();
        }
        Err(e) => {
            tracing::warn!(tier, error = %e, "reusing cached prefix blocks; prefilling the whole prompt")
        }
    }
}

/// Offers the prefix cache every block of the sequence's KV (prompt, then generated tokens) completed since
/// the last step, so the same persona, scene or the conversation's next turn finds them.
fn share_prefix<M: Decoder>(
    model: &M,
    prefix: &mut PrefixCache<M::Block>,
    s: &mut Seq<M::Cache>,
    tier: &str,
) {
    let full = s.kv_len / BLOCK_TOKENS;
    if s.shared >= full {
        return;
    }
    if s.chain.len() < full {
        let tokens: Vec<u32> = s
            .new
            .prompt
            .iter()
            .chain(&s.generated)
            .take(full * BLOCK_TOKENS)
            .copied()
            .collect();
        extend_chain(&s.new.root, &mut s.chain, &tokens);
    }
    let kv = s.kv.as_mut().expect("running sequences hold a KV cache");
    while s.shared < full {
        let i = s.shared;
        let (h, parent) = (s.chain[i], i.checked_sub(1).map(|p| s.chain[p]));
        if !prefix.contains(&h) {
            if !prefix.make_room(parent.as_ref()) {
                return;
            }
            match model.share_block(kv, i * BLOCK_TOKENS, BLOCK_TOKENS) {
                Ok(Some(block)) => {
                    if !prefix.insert(h, parent, block) {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(tier, error = %e, "sharing a KV block with the prefix cache");
                    return;
                }
            }
        }
        s.shared += 1;
    }
}

/// The prefix cache's figures in `/metrics`, per tier.
struct PrefixGauges {
    lookups: metrics::Counter,
    hits: metrics::Counter,
    prompt_tokens: metrics::Counter,
    cached_tokens: metrics::Counter,
    evictions: metrics::Counter,
    blocks: metrics::Gauge,
    pinned: metrics::Gauge,
    bytes: metrics::Gauge,
}

impl PrefixGauges {
    fn new(tier: &str) -> Self {
        let t = tier.to_string();
        Self {
            lookups: metrics::counter!("nimmer_prefix_cache_lookups_total", "tier" => t.clone()),
            hits: metrics::counter!("nimmer_prefix_cache_hits_total", "tier" => t.clone()),
            prompt_tokens: metrics::counter!("nimmer_prefix_cache_prompt_tokens_total", "tier" => t.clone()),
            cached_tokens: metrics::counter!("nimmer_prefix_cache_cached_tokens_total", "tier" => t.clone()),
            evictions: metrics::counter!("nimmer_prefix_cache_evictions_total", "tier" => t.clone()),
            blocks: metrics::gauge!("nimmer_prefix_cache_blocks", "tier" => t.clone()),
            pinned: metrics::gauge!("nimmer_prefix_cache_pinned_blocks", "tier" => t.clone()),
            bytes: metrics::gauge!("nimmer_prefix_cache_bytes", "tier" => t),
        }
    }

    fn publish(&self, stats: &PrefixStats) {
        let s = stats.snapshot();
        self.lookups.absolute(s.lookups);
        self.hits.absolute(s.hits);
        self.prompt_tokens.absolute(s.prompt_tokens);
        self.cached_tokens.absolute(s.cached_tokens);
        self.evictions.absolute(s.evicted_blocks);
        self.blocks.set(s.blocks as f64);
        self.pinned.set(s.pinned_blocks as f64);
        self.bytes.set(s.bytes as f64);
    }
}

/// Streams the token chosen for `s` (by [`choose::tokens`]); returns whether the sequence is finished.
fn deliver<C>(info: &TierInfo, s: &mut Seq<C>, chosen: Result<choose::Chosen>) -> bool {
    let (tok, raw) = match chosen {
        Ok(c) => (c.token, c.logprobs),
        Err(e) => return fail(s, e),
    };
    let now = Instant::now();
    s.first_token.get_or_insert(now);
    let tokenizer = &info.tokenizer;
    let constrained = s.new.constraint.is_some();
    let eos = (constrained || !s.new.params.ignore_eos) && tokenizer.eos_ids.contains(&tok);
    // The grammar ends the output once it is complete (its mask then allows only the end).
    let grammar_done = match &mut s.new.constraint {
        Some(c) if !eos => match c.accept(tok) {
            Ok(done) => done,
            Err(e) => return fail(s, e),
        },
        _ => false,
    };
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
    let reason = if eos || grammar_done || s.text.stopped {
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
    let piece = |id: u32| tokenizer.decode(&[id]).unwrap_or_default();
    let logprobs = raw.map(|r| {
        Box::new(TokenLogprobs {
            token: piece(tok),
            logprob: r.logprob,
            top: r
                .top
                .into_iter()
                .map(|(id, lp)| (id, piece(id), lp))
                .collect(),
        })
    });
    if !eos
        && s.new
            .events
            .send(Event::Token {
                id: tok,
                text,
                logprobs,
            })
            .is_err()
    {
        return true;
    }
    match reason {
        None => false,
        Some(finish_reason) => {
            let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1e3;
            let q = s.new.enqueued;
            tracing::debug!(
                tier = %info.name,
                zone = %s.new.share.zone,
                prompt = s.new.prompt.len(),
                cached = s.cached,
                generated = s.generated.len(),
                queue_ms = ms(q, s.admitted.unwrap_or(q)),
                ttft_ms = ms(q, s.first_token.unwrap_or(now)),
                total_ms = ms(q, now),
                "sequence done"
            );
            let _ = s.new.events.send(Event::Done(Completion {
                finish_reason,
                prompt_tokens: s.new.prompt.len(),
                cached_tokens: s.cached,
                completion_tokens: s.generated.len(),
                queue_ms: ms(q, s.admitted.unwrap_or(q)),
                ttft_ms: ms(q, s.first_token.unwrap_or(now)),
                total_ms: ms(q, now),
            }));
            true
        }
    }
}

/// Ends a sequence whose grammar failed mid-decode (an internal fault, logged; the client sees an error).
fn fail<C>(s: &mut Seq<C>, e: TierError) -> bool {
    tracing::error!(error = %e, "structured output failed mid-decode");
    let _ = s.new.events.send(Event::Error(e.to_string()));
    true
}

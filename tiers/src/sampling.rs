//! Choosing the next token from logits (greedy, temperature, top-k, top-p, repetition penalty, seeded RNG),
//! and turning a growing list of ids into streamed text that never shows a stop string.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TierError};

/// Per-request sampling settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = all).
    pub top_p: f32,
    /// > 1 discourages tokens already in the prompt or output (HF/CTRL style).
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
    pub max_tokens: usize,
    /// Generation stops before any of these strings; they are never streamed.
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens (benchmarks that need a fixed length; ignored under a
    /// `response_format`, whose grammar says where the output ends).
    pub ignore_eos: bool,
    /// Structured output: every sampled token keeps the text a prefix of this format's language.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_format: Option<crate::grammar::ResponseFormat>,
    /// Report each sampled token's log probability under the model, and the `n` most likely tokens
    /// (0 to [`MAX_TOP_LOGPROBS`]) with theirs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<usize>,
}

/// The most alternatives a token's log probabilities may list.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A sampled token's log probability under the model's own distribution (before temperature, penalties and
/// grammar masks), with the most likely tokens at that step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    /// The token's own text (decoded alone: a piece of a multi-byte character shows as U+FFFD).
    pub token: String,
    pub logprob: f32,
    /// `(token id, its text, log probability)`, most likely first.
    pub top: Vec<(u32, String, f32)>,
}

/// Log-sum-exp of `logits` (the normalizer of their softmax).
pub fn logsumexp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln()
}

/// The `n` largest logits' ids, largest first.
pub fn top_ids(logits: &[f32], n: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(ids.len());
    if n == 0 {
        return Vec::new();
    }
    let by_desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    ids.select_nth_unstable_by(n - 1, by_desc);
    ids.truncate(n);
    ids.sort_unstable_by(by_desc);
    ids
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: None,
            max_tokens: 128,
            stop: Vec::new(),
            ignore_eos: false,
            response_format: None,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            ..Self::default()
        }
    }

    /// Rejects out-of-range values with the field they concern.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, message: &str| {
            Err(TierError::InvalidRequest {
                field,
                message: message.into(),
            })
        };
        if !(self.temperature.is_finite() && (0.0..=100.0).contains(&self.temperature)) {
            return bad("temperature", "must be between 0 and 100");
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        if !(self.repetition_penalty.is_finite()
            && self.repetition_penalty > 0.0
            && self.repetition_penalty <= 10.0)
        {
            return bad("repetition_penalty", "must be in (0, 10]");
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be at least 1");
        }
        if self.stop.len() > 8 || self.stop.iter().any(|s| s.is_empty() || s.len() > 256) {
            return bad("stop", "at most 8 non-empty strings of up to 256 bytes");
        }
        if self.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return bad("top_logprobs", "at most 20");
        }
        Ok(())
    }
}

/// Stateful sampler of one sequence.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self {
            params,
            rng,
            scratch: Vec::new(),
        }
    }

    /// Picks the next token; `history` is prompt + output so far (for the repetition penalty). `logits` is the
    /// sampler's scratch: penalized, and overwritten with exp weights when it samples with a temperature.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = std::collections::HashSet::with_capacity(history.len());
            for &t in history {
                if seen.insert(t)
                    && let Some(l) = logits.get_mut(t as usize)
                {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature;
        if p.top_k == 0 && p.top_p >= 1.0 {
            // No truncation: draw in vocabulary order from the unnormalized weights, no sort.
            let sum = exp_weights(logits, inv_t);
            return draw_blocks(logits, sum, &mut self.rng)
                .map_or_else(|| argmax(logits), |i| i as u32);
        }
        let c = &mut self.scratch;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l * inv_t)),
        );
        let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            c.truncate(p.top_k);
        }
        let max = c.iter().map(|e| e.1).fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for e in c.iter_mut() {
            e.1 = (e.1 - max).exp();
            sum += e.1;
        }
        if p.top_p < 1.0 {
            nucleus(c, sum * p.top_p);
            sum = c.iter().map(|e| e.1).sum();
        }
        let r = self.rng.random::<f32>() * sum;
        pick(c.iter().map(|e| e.1), r).map_or(c.first().map_or(0, |e| e.0), |k| c[k].0)
    }
}

/// Keeps the most likely weights whose sum first reaches `mass`, most likely first: sorts only the head of
/// the distribution (the top 64, doubling until it holds `mass`), not the whole vocabulary.
fn nucleus(c: &mut Vec<(u32, f32)>, mass: f32) {
    let by_weight_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
    let mut m = 64.min(c.len());
    loop {
        if m < c.len() {
            c.select_nth_unstable_by(m - 1, by_weight_desc);
        }
        c[..m].sort_unstable_by(by_weight_desc);
        let mut acc = 0.0;
        if let Some(keep) = c[..m].iter().position(|e| {
            acc += e.1;
            acc >= mass
        }) {
            c.truncate(keep + 1);
            return;
        }
        if m == c.len() {
            return;
        }
        m = (m * 2).min(c.len());
    }
}

/// Where `r` (0 <= r < the weights' sum) falls among `weights`: the first index whose running sum passes r,
/// or the last positive weight when rounding leaves r past them all (never a zero weight).
fn pick(weights: impl Iterator<Item = f32>, mut r: f32) -> Option<usize> {
    let mut last = None;
    for (i, w) in weights.enumerate() {
        if r < w {
            return Some(i);
        }
        r -= w;
        if w > 0.0 {
            last = Some(i);
        }
    }
    last
}

/// Draws an index of a whole vocabulary with probability weight / `sum`, skipping 64 weights at a time by
/// their (vectorized) sums.
fn draw_blocks(weights: &[f32], sum: f32, rng: &mut StdRng) -> Option<usize> {
    let mut r = rng.random::<f32>() * sum;
    let mut last = None;
    for (b, block) in weights.chunks(64).enumerate() {
        let s = lanes_sum(block);
        if r < s {
            return pick(block.iter().copied(), r).map(|i| b * 64 + i);
        }
        r -= s;
        if s > 0.0 {
            last = block.iter().rposition(|&w| w > 0.0).map(|i| b * 64 + i);
        }
    }
    last
}

/// Sum of `v` in eight lanes (vectorizes).
fn lanes_sum(v: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut chunks = v.chunks_exact(8);
    for ch in &mut chunks {
        for (a, x) in acc.iter_mut().zip(ch) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Largest of `v` in eight lanes, NaN ignored (vectorizes); -inf when empty or all NaN.
fn lanes_max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut chunks = v.chunks_exact(8);
    for ch in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(ch) {
            *a = if x > *a { x } else { *a };
        }
    }
    acc.iter()
        .chain(chunks.remainder())
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Replaces `logits` with exp((logit - max) / T) (`inv_t` = 1/T) and returns their sum: eight lanes at a time
/// (the compiler vectorizes [`exp_neg`]).
fn exp_weights(logits: &mut [f32], inv_t: f32) -> f32 {
    let max = lanes_max(logits);
    if !max.is_finite() {
        logits.iter_mut().for_each(|l| *l = 0.0);
        return 0.0;
    }
    for l in logits.iter_mut() {
        *l = exp_neg((*l - max) * inv_t);
    }
    lanes_sum(logits)
}

/// e^x for x <= 0 (0 below -87 and for NaN), to about 2 ulp: x = n·ln2 + r with |r| <= ln2/2, e^r by its
/// degree-6 Taylor polynomial, 2^n through the exponent bits. Branch-free so a loop over it vectorizes.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let keep = x >= -87.0;
    let x = if keep { x } else { -87.0 };
    // Round to nearest by the float adder (1.5 * 2^23 pushes the fraction out), which vectorizes.
    const SHIFT: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + SHIFT;
    let n = t - SHIFT;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // t's low bits hold n (its ulp is 1): 2^n from them, without a float-to-int conversion.
    let ni = t.to_bits().wrapping_sub(SHIFT.to_bits());
    let scale = f32::from_bits(ni.wrapping_add(127) << 23);
    if keep { p * scale } else { 0.0 }
}

/// Index of the largest value (first one on ties).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Streams the text of a growing id list, holding back what could still turn into a stop string and
/// anything that ends inside a multi-byte character.
#[derive(Default)]
pub struct TextStream {
    stop: Vec<String>,
    emitted: usize,
    /// Full text when a stop string was found (truncated before it).
    pub stopped: bool,
}

impl TextStream {
    pub fn new(stop: Vec<String>) -> Self {
        Self {
            stop,
            emitted: 0,
            stopped: false,
        }
    }

    /// Given the full decoded text so far, returns the new text that is safe to show.
    /// Sets `stopped` when a stop string appears; the text is then cut before it.
    pub fn push(&mut self, full: &str) -> String {
        if let Some(at) = self.stop.iter().filter_map(|s| full.find(s.as_str())).min() {
            self.stopped = true;
            return self.take(full, at);
        }
        if full.ends_with('\u{FFFD}') {
            return String::new();
        }
        let hold = self
            .stop
            .iter()
            .map(|s| s.len().saturating_sub(1))
            .max()
            .unwrap_or(0);
        let mut end = full.len().saturating_sub(hold);
        while !full.is_char_boundary(end) {
            end -= 1;
        }
        self.take(full, end)
    }

    /// Everything not yet shown (at the end of generation).
    pub fn finish(&mut self, full: &str) -> String {
        let end = full.trim_end_matches('\u{FFFD}').len();
        self.take(full, end)
    }

    fn take(&mut self, full: &str, end: usize) -> String {
        if end <= self.emitted {
            return String::new();
        }
        let s = full[self.emitted..end].to_string();
        self.emitted = end;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_probabilities_are_normalized_and_the_top_comes_first() {
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let lse = logsumexp(&logits);
        let total: f32 = logits.iter().map(|l| (l - lse).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert_eq!(top_ids(&logits, 2), [1, 2]);
        assert_eq!(top_ids(&logits, 9), [1, 2, 0, 3]);
        assert!(top_ids(&logits, 0).is_empty());
    }

    #[test]
    fn the_vectorized_exp_matches_the_library_s() {
        for i in 0..=86_900 {
            let x = -(i as f32) * 1e-3;
            let (got, want) = (exp_neg(x), x.exp());
            assert!((got - want).abs() <= 3e-7 * want, "e^{x}: {got} vs {want}");
        }
        assert_eq!(exp_neg(-200.0), 0.0);
        assert_eq!(exp_neg(f32::NAN), 0.0);
        assert_eq!(exp_neg(0.0), 1.0);
    }

    /// Draws `n` tokens from `logits` under `p` and returns each token's frequency.
    fn frequencies(p: SamplingParams, logits: &[f32], n: usize) -> Vec<f64> {
        let mut s = Sampler::new(p);
        let mut f = vec![0.0; logits.len()];
        for _ in 0..n {
            f[s.sample(&mut logits.to_vec(), &[]) as usize] += 1.0 / n as f64;
        }
        f
    }

    #[test]
    fn a_draw_past_the_weights_by_rounding_takes_the_last_positive_one() {
        assert_eq!(pick([0.25, 0.5].into_iter(), 0.3), Some(1));
        assert_eq!(pick([0.5, 0.0, 0.0].into_iter(), 0.7), Some(0));
        assert_eq!(pick([0.0, 0.0].into_iter(), 0.0), None);
    }

    #[test]
    fn temperature_sampling_follows_the_softmax() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7) % 11) as f32 * 0.4 - 2.0).collect();
        let p = SamplingParams {
            temperature: 0.8,
            seed: Some(3),
            ..SamplingParams::default()
        };
        let w: Vec<f64> = logits.iter().map(|&l| (l as f64 / 0.8).exp()).collect();
        let z: f64 = w.iter().sum();
        let f = frequencies(p, &logits, 200_000);
        for (i, (got, want)) in f.iter().zip(w.iter().map(|w| w / z)).enumerate() {
            assert!((got - want).abs() < 0.005, "token {i}: {got} vs {want}");
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_head_that_reaches_p() {
        // Probabilities 0.5, 0.25, 0.125, ... over 200 tokens: top_p 0.8 keeps the first three.
        let logits: Vec<f32> = (0..200)
            .map(|i| -(i as f32) * std::f32::consts::LN_2)
            .collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.8,
            seed: Some(5),
            ..SamplingParams::default()
        };
        let f = frequencies(p, &logits, 70_000);
        for (i, want) in [4.0 / 7.0, 2.0 / 7.0, 1.0 / 7.0].into_iter().enumerate() {
            assert!((f[i] - want).abs() < 0.01, "token {i}: {} vs {want}", f[i]);
        }
        assert!(f[3..].iter().all(|&x| x == 0.0));
        // Past the first sorted head of 64: a flat distribution keeps 160 of 200 tokens.
        let flat = vec![0.0f32; 200];
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.8,
            seed: Some(6),
            ..SamplingParams::default()
        };
        let kept = frequencies(p, &flat, 20_000)
            .iter()
            .filter(|&&x| x > 0.0)
            .count();
        assert_eq!(kept, 160);
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy(1));
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn the_same_seed_gives_the_same_choices() {
        let p = SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            ..SamplingParams::default()
        };
        let logits: Vec<f32> = (0..100).map(|i| (i % 13) as f32 * 0.3).collect();
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(&p), draw(&p));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let p = SamplingParams {
            temperature: 1.5,
            top_k: 1,
            seed: Some(1),
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(p);
        for _ in 0..10 {
            assert_eq!(s.sample(&mut [0.0, 1.0, 0.5], &[]), 1);
        }
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy(1)
        };
        let mut s = Sampler::new(p);
        assert_eq!(s.sample(&mut [0.0, 3.0, 2.0], &[1]), 2);
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        let p = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("top_p"));
    }

    #[test]
    fn a_stop_string_is_never_streamed() {
        let mut t = TextStream::new(vec!["END".into()]);
        let mut out = String::new();
        for full in [
            "Hello",
            "Hello E",
            "Hello EN",
            "Hello END",
            "Hello END more",
        ] {
            out += &t.push(full);
            if t.stopped {
                break;
            }
        }
        assert!(t.stopped);
        assert_eq!(out, "Hello ");
    }

    #[test]
    fn text_ending_in_a_partial_character_is_held_back() {
        let mut t = TextStream::new(vec![]);
        assert_eq!(t.push("caf\u{FFFD}"), "");
        assert_eq!(t.push("café"), "café");
    }
}

//! Choosing each step's tokens: the sampler for every sequence that samples, within its grammar for one with a
//! `response_format`.
//!
//! A grammar's mask costs tens of microseconds over a 49k vocabulary, most of a constrained step's overhead,
//! so it is computed only where needed: a constrained sequence that samples without truncation (no top-k or
//! top-p) first draws from its unmasked logits, and the draw stands when the grammar allows it (checking one
//! token is cheap). That is exactly sampling from the masked distribution: an allowed token x is drawn with
//! p(x), and a refused draw (probability 1 - Z, Z the allowed mass) is drawn again from the masked logits,
//! giving x another p(x)/Z·(1 - Z), in all p(x)/Z; greedy decoding keeps its argmax. (The mask also leaves
//! out non-canonical tokenizations of text the grammar forces; a draw spelling the same bytes otherwise
//! stands, and the answer still follows the grammar.) Refused draws, and
//! constrained sequences with truncation (which must mask before truncating), are masked in parallel on the
//! engine's pool, then sampled.

use rayon::prelude::*;

use super::queue::Seq;
use crate::error::Result;
use crate::grammar::Constraint;
use crate::sampling::{logsumexp, top_ids};

/// A row's choice: the token, and what was kept to report its log probabilities (the raw logits' normalizer
/// and the ids of the most likely tokens), when asked.
pub(super) struct Chosen {
    pub token: u32,
    pub logprobs: Option<Raw>,
}

/// A row's raw logits kept before sampling: their normalizer, the top ids, and the logits.
type Before = (f32, Vec<u32>, Vec<f32>);

/// The model's raw distribution at one step, as much as logprobs need.
pub(super) struct Raw {
    pub logprob: f32,
    /// (id, log probability), most likely first.
    pub top: Vec<(u32, f32)>,
}

/// The token of each row (running index, logits), in the rows' order, with its log probabilities when the
/// sequence asked for them (of the raw logits, before penalties, temperature and masks).
pub(super) fn tokens<C>(
    pool: &rayon::ThreadPool,
    running: &mut [Seq<C>],
    rows: Vec<(usize, Vec<f32>)>,
) -> Vec<(usize, Result<Chosen>)> {
    // Per row asking for logprobs: the raw logits' normalizer, top ids and a copy to read the chosen one.
    let mut raws: Vec<Option<Before>> = rows
        .iter()
        .map(|(i, l)| {
            running[*i]
                .new
                .params
                .logprobs
                .map(|n| (logsumexp(l), top_ids(l, n), l.clone()))
        })
        .collect();
    let chosen = choose(pool, running, rows);
    chosen
        .into_iter()
        .zip(raws.iter_mut())
        .map(|((i, t), raw)| {
            let t = t.map(|token| Chosen {
                token,
                logprobs: raw.take().map(|(lse, top, l)| Raw {
                    logprob: l[token as usize] - lse,
                    top: top
                        .into_iter()
                        .map(|id| (id, l[id as usize] - lse))
                        .collect(),
                }),
            });
            (i, t)
        })
        .collect()
}

fn choose<C>(
    pool: &rayon::ThreadPool,
    running: &mut [Seq<C>],
    rows: Vec<(usize, Vec<f32>)>,
) -> Vec<(usize, Result<u32>)> {
    let mut out: Vec<(usize, Option<Result<u32>>)> = Vec::with_capacity(rows.len());
    // Logits of the rows that need their grammar's mask, by their place in `out`.
    let mut to_mask: Vec<(usize, Vec<f32>)> = Vec::new();
    for (i, mut logits) in rows {
        let s = &mut running[i];
        let chosen = match (s.new.constraint.is_some(), lazy(s)) {
            (false, _) => Some(Ok(sample(s, &mut logits))),
            (true, true) => {
                // The sampler works in the row (penalties, exp weights): keep the logits a refused draw
                // is masked and drawn again from.
                let p = &s.new.params;
                let keep =
                    (p.repetition_penalty != 1.0 || p.temperature > 0.0).then(|| logits.clone());
                let draft = sample(s, &mut logits);
                let c = s.new.constraint.as_mut().expect("constrained");
                match c.allows(draft) {
                    Ok(true) => Some(Ok(draft)),
                    Ok(false) => {
                        to_mask.push((out.len(), keep.unwrap_or(logits)));
                        None
                    }
                    Err(e) => Some(Err(e)),
                }
            }
            (true, false) => {
                to_mask.push((out.len(), logits));
                None
            }
        };
        out.push((i, chosen));
    }
    if !to_mask.is_empty() {
        mask(pool, running, &out, &mut to_mask);
        for (slot, mut logits) in to_mask {
            let s = &mut running[out[slot].0];
            let failed = s.new.constraint.as_mut().and_then(Constraint::take_failure);
            out[slot].1 = Some(match failed {
                Some(e) => Err(e),
                None => Ok(sample(s, &mut logits)),
            });
        }
    }
    out.into_iter()
        .map(|(i, t)| (i, t.expect("every row chose")))
        .collect()
}

/// Whether a draw from the unmasked logits may stand (no truncation that masking must precede).
fn lazy<C>(s: &Seq<C>) -> bool {
    let p = &s.new.params;
    p.top_k == 0 && p.top_p >= 1.0
}

/// Masks `to_mask` by their sequences' grammars, in parallel when there are several.
fn mask<C>(
    pool: &rayon::ThreadPool,
    running: &mut [Seq<C>],
    out: &[(usize, Option<Result<u32>>)],
    to_mask: &mut [(usize, Vec<f32>)],
) {
    // Disjoint borrows of the constraints, in running order (`out` lists each sequence once).
    let mut wanted: Vec<(usize, usize)> = to_mask
        .iter()
        .enumerate()
        .map(|(k, (slot, _))| (out[*slot].0, k))
        .collect();
    wanted.sort_unstable();
    let mut constraints: Vec<Option<&mut Constraint>> = (0..to_mask.len()).map(|_| None).collect();
    let mut want = wanted.iter().peekable();
    for (i, s) in running.iter_mut().enumerate() {
        if let Some(&&(w, k)) = want.peek()
            && w == i
        {
            constraints[k] = s.new.constraint.as_mut();
            want.next();
        }
    }
    let mut jobs: Vec<(&mut Constraint, &mut [f32])> = constraints
        .into_iter()
        .zip(to_mask.iter_mut())
        .filter_map(|(c, (_, l))| c.map(|c| (c, l.as_mut_slice())))
        .collect();
    if jobs.len() > 1 {
        pool.install(|| jobs.par_iter_mut().for_each(|(c, l)| c.mask(l)));
    } else {
        jobs.iter_mut().for_each(|(c, l)| c.mask(l));
    }
}

/// The sampler's choice on `logits` (repetition penalty over prompt and output).
fn sample<C>(s: &mut Seq<C>, logits: &mut [f32]) -> u32 {
    let history: Vec<u32> = if s.new.params.repetition_penalty != 1.0 {
        s.new.prompt.iter().chain(&s.generated).copied().collect()
    } else {
        Vec::new()
    };
    s.sampler.sample(logits, &history)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::sync::mpsc;

    use super::*;
    use crate::engine::Share;
    use crate::engine::queue::{NewSeq, Queue};
    use crate::grammar::{Grammars, ResponseFormat};
    use crate::sampling::SamplingParams;

    /// One resident sequence under a JSON schema, sampling at `temperature` with `seed`, its output so far
    /// `{"mood":"` (the grammar allows the first letter of either mood next).
    fn constrained(g: &Grammars, temperature: f32, seed: u64) -> Queue<usize> {
        let format = ResponseFormat::JsonSchema {
            schema: serde_json::json!({
                "type": "object",
                "properties": { "mood": { "enum": ["calm", "angry"] } },
                "required": ["mood"]
            }),
        };
        let (events, _rx) = mpsc::unbounded_channel();
        let mut q = Queue::new(1);
        q.accept(NewSeq {
            prompt: vec![1; 4],
            params: SamplingParams {
                temperature,
                seed: Some(seed),
                ..SamplingParams::greedy(8)
            },
            lora: None,
            events,
            enqueued: Instant::now(),
            deadline: None,
            root: [0; 16],
            pin: None,
            share: Share::default(),
            constraint: Some(g.constraint(&format).expect("schema compiles")),
        });
        assert_eq!(q.admit(1, 1 << 20, Instant::now(), |t| t), 1);
        let c = q.running_mut()[0].new.constraint.as_mut().unwrap();
        for &b in br#"{"mood":""# {
            assert!(!c.accept(u32::from(b)).unwrap());
        }
        q
    }

    /// A refused draw at a temperature is drawn again from the masked logits, not from the weights the first
    /// draw left in the row: a token the grammar allows with a far larger logit than the other allowed ones
    /// is taken every time (from the weights it would be close to a uniform pick among the allowed tokens).
    #[test]
    fn a_refused_draw_at_a_temperature_is_drawn_again_from_the_masked_logits() {
        let g = Grammars::single_byte();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        // The tokens the grammar allows next.
        let mut probe = constrained(&g, 0.0, 0);
        let mut allowed = vec![0.0f32; 262];
        probe.running_mut()[0]
            .new
            .constraint
            .as_mut()
            .unwrap()
            .mask(&mut allowed);
        let allowed: Vec<usize> = (0..allowed.len())
            .filter(|&i| allowed[i].is_finite())
            .collect();
        assert!(allowed.len() >= 2, "the test needs a choice: {allowed:?}");
        let (favourite, refused) = (allowed[allowed.len() - 1], usize::from(b'x'));
        assert!(!allowed.contains(&refused));
        for seed in 0..40 {
            let mut q = constrained(&g, 0.7, seed);
            // The refused token all but certainly wins the unmasked draw.
            let mut logits = vec![0.0f32; 262];
            logits[refused] = 20.0;
            logits[favourite] = 10.0;
            let chosen = tokens(&pool, q.running_mut(), vec![(0, logits)]);
            let token = chosen[0].1.as_ref().expect("a token").token;
            assert_eq!(token as usize, favourite, "seed {seed}");
        }
    }
}

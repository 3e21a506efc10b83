//! Weighted fair choice of one engine step's rows across zones (issue 13): a pure planner over the resident
//! sequences, in the manner of the Virtual Token Counter (Sheng et al., OSDI 2024).
//!
//! Each zone has a virtual counter: the tokens it was served (prefill and decode) divided by its weight. A step
//! picks, again and again, the next sequence of the zone with the lowest counter (charging it tentatively),
//! until the step's rows or tokens run out; sequences not picked are paused for the step and keep their KV. A
//! zone that becomes active is lifted to the lowest counter among the active zones, so it is served at once but
//! cannot hoard credit from its idle time; the step that prefills it runs the newcomers alone (the zones that
//! stayed active pause for that one step, never two in a row), so its first token is not held up behind a
//! flood's batch. While zones compete, a step may also be held to the tokens that fit a target time
//! (`pace.rs`), so whoever arrives during it waits little. Within a zone, higher priority goes first, then
//! earlier arrival.
//! Counters of zones that are neither active nor owed anything are forgotten (bounded state).

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

/// A resident sequence the step may run.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate<Z> {
    pub zone: Z,
    /// The zone's class weight (> 0).
    pub weight: f64,
    /// Higher runs first within the zone.
    pub priority: i32,
    /// Admission order (lower first within a priority).
    pub arrival: u64,
    /// Prompt tokens not yet in the KV cache; 0 when decoding (one token a step).
    pub prefill_left: usize,
}

/// The zones' virtual counters, carried from step to step.
#[derive(Debug)]
pub struct FairClock<Z> {
    served: HashMap<Z, f64>,
    /// The zones of the last step.
    active: HashSet<Z>,
    /// Whether the last step ran newcomers alone (never two steps in a row).
    alone_last: bool,
}

impl<Z: Eq + Hash + Clone> Default for FairClock<Z> {
    fn default() -> Self {
        Self::new()
    }
}

impl<Z: Eq + Hash + Clone> FairClock<Z> {
    pub fn new() -> Self {
        Self {
            served: HashMap::new(),
            active: HashSet::new(),
            alone_last: false,
        }
    }

    /// Zones with a counter (active ones and those still owed service).
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.served.len()
    }

    /// Tokens to run for each candidate this step (same order; 0 = paused), at most `max_rows` sequences and
    /// `token_budget` tokens in all, and charges the zones for them. With a `target` (the tokens that fit the
    /// step's target time) and more than one zone, rows and tokens are held to it, plus the prompts of zones
    /// with nothing decoding yet (waiting for their first token): a step stays short for whoever arrives
    /// during it, and a newcomer's prompt is not spread over more steps than `token_budget` makes it.
    ///
    /// A decoding sequence costs one token; a prefilling one gets a chunk of what is left of the budget after
    /// one token for each decoding sequence that fair order would serve before the prompt is done (those of
    /// zones whose counter is below this zone's once charged the whole prompt), so a long prompt never stalls
    /// the zones it competes with, and a zone far behind a flood in service gets its prompt in whole.
    pub fn plan(
        &mut self,
        cands: &[Candidate<Z>],
        max_rows: usize,
        token_budget: usize,
        target: Option<usize>,
    ) -> Vec<usize> {
        let mut plan = vec![0; cands.len()];
        if cands.is_empty() {
            self.served.clear();
            self.active.clear();
            self.alone_last = false;
            return plan;
        }
        // Per zone: its candidates in run order, and its weight.
        let mut zones: HashMap<&Z, (f64, Vec<usize>)> = HashMap::new();
        // Zones in order of first appearance: ties between counters go to the earlier one, deterministically.
        let mut order: Vec<&Z> = Vec::new();
        for (i, c) in cands.iter().enumerate() {
            zones
                .entry(&c.zone)
                .or_insert_with(|| {
                    order.push(&c.zone);
                    (c.weight.max(f64::MIN_POSITIVE), Vec::new())
                })
                .1
                .push(i);
        }
        for (_, list) in zones.values_mut() {
            list.sort_by_key(|&i| (std::cmp::Reverse(cands[i].priority), cands[i].arrival));
            list.reverse(); // pop() yields the next one
        }
        // Lift newcomers (and zones back from idle) to the lowest counter among the zones that stayed active;
        // when none stayed, every zone starts even (idle time earns no credit).
        let continuing = zones
            .keys()
            .filter(|z| self.active.contains(**z))
            .filter_map(|z| self.served.get(*z))
            .copied()
            .fold(f64::INFINITY, f64::min);
        let floor = if continuing.is_finite() {
            continuing
        } else {
            zones
                .keys()
                .filter_map(|z| self.served.get(*z))
                .copied()
                .fold(0.0, f64::max)
        };
        // Forget idle zones that are owed nothing (their counter would be lifted anyway); an idle zone that
        // was served ahead of the others keeps its counter until the others catch up.
        let keep_ahead = continuing.is_finite();
        self.served
            .retain(|z, v| zones.contains_key(z) || (keep_ahead && *v > floor));
        let mut t: Vec<(&Z, f64)> = order
            .iter()
            .map(|z| {
                let v = self.served.get(*z).copied().unwrap_or(floor).max(floor);
                (*z, v)
            })
            .collect();
        // A zone that just became active and waits for its first token makes this step latency-critical: the
        // zones that stayed active (their decode rows and prompts) wait one step, so the newcomer's step is
        // as short as its own prompt. Never two steps in a row, so a stream of newcomers costs the others at
        // most every other step.
        let newcomer = |c: &Candidate<Z>| c.prefill_left > 0 && !self.active.contains(&c.zone);
        let newcomers_alone = keep_ahead && !self.alone_last && cands.iter().any(newcomer);
        let runs = |c: &Candidate<Z>| !newcomers_alone || !self.active.contains(&c.zone);
        // Per zone (as `t`): its decoding sequences not yet picked that may run this step.
        let mut decoders: Vec<usize> = t
            .iter()
            .map(|(z, _)| {
                zones[*z]
                    .1
                    .iter()
                    .filter(|&&i| cands[i].prefill_left == 0 && runs(&cands[i]))
                    .count()
            })
            .collect();
        let (mut rows, mut budget) = (max_rows, token_budget);
        // The target holds while zones compete; the prompts of zones with nothing decoding yet (newcomers,
        // a long prompt past its first chunk) wait for their first token and run on top of it.
        if let Some(n) = target.filter(|_| zones.len() > 1) {
            let (first_rows, first_tokens) = t
                .iter()
                .zip(&decoders)
                .filter(|&(_, &d)| d == 0)
                .flat_map(|((z, _), _)| zones[*z].1.iter().map(|&i| &cands[i]))
                .filter(|c| c.prefill_left > 0 && runs(c))
                .fold((0, 0), |(r, t), c| (r + 1, t + c.prefill_left));
            rows = rows.min(n.saturating_add(first_rows)).max(1);
            budget = budget.min(n.saturating_add(first_tokens)).max(rows);
        }
        while rows > 0 && budget > 0 {
            // The zone with the lowest tentative counter that still has a candidate.
            let Some(k) = t
                .iter()
                .enumerate()
                .filter(|(_, (z, _))| !zones[*z].1.is_empty())
                .min_by(|a, b| a.1.1.total_cmp(&b.1.1))
                .map(|(k, _)| k)
            else {
                break;
            };
            let z = t[k].0;
            let (w, list) = zones.get_mut(z).expect("zone of a candidate");
            let i = list.pop().expect("non-empty");
            let c = &cands[i];
            let n = if !runs(c) {
                0
            } else if c.prefill_left == 0 {
                decoders[k] -= 1;
                1
            } else {
                // Leave a token for each decoding row that fair order serves before this prompt is done
                // (zones whose counter is below this zone's once charged the whole prompt).
                let done_at = t[k].1 + c.prefill_left as f64 / *w;
                let ahead: usize = t
                    .iter()
                    .zip(&decoders)
                    .filter(|((_, v), _)| *v < done_at)
                    .map(|(_, &d)| d)
                    .sum();
                let reserve = ahead.min(rows - 1);
                c.prefill_left.min(budget.saturating_sub(reserve))
            };
            if n == 0 {
                continue;
            }
            plan[i] = n;
            rows -= 1;
            budget -= n;
            t[k].1 += n as f64 / *w;
        }
        self.alone_last = newcomers_alone;
        self.active.clear();
        for (z, v) in t {
            self.served.insert(z.clone(), v);
            self.active.insert(z.clone());
        }
        plan
    }
}

/// What each zone is owed of a step's `total` tokens: shares by weight, none above its demand, what a
/// satisfied zone leaves going to the others by weight (water-filling). `zones` holds (weight, demand).
pub fn owed(zones: &[(f64, usize)], total: usize) -> Vec<f64> {
    let mut out = vec![0.0; zones.len()];
    let mut open: Vec<usize> = (0..zones.len()).filter(|&i| zones[i].1 > 0).collect();
    let mut left = total as f64;
    while !open.is_empty() && left > 0.0 {
        let w: f64 = open.iter().map(|&i| zones[i].0).sum();
        let full: Vec<usize> = open
            .iter()
            .copied()
            .filter(|&i| zones[i].1 as f64 <= left * zones[i].0 / w)
            .collect();
        if full.is_empty() {
            for &i in &open {
                out[i] = left * zones[i].0 / w;
            }
            break;
        }
        for &i in &full {
            out[i] = zones[i].1 as f64;
            left -= out[i];
        }
        open.retain(|i| !full.contains(i));
    }
    out
}

/// Jain's fairness index of `x` (1 = all equal, 1/n = one takes everything).
pub fn jain(x: &[f64]) -> f64 {
    let (s, s2) = x.iter().fold((0.0, 0.0), |(s, s2), v| (s + v, s2 + v * v));
    if s2 == 0.0 {
        1.0
    } else {
        s * s / (x.len() as f64 * s2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(zone: u32, weight: f64, arrival: u64) -> Candidate<u32> {
        Candidate {
            zone,
            weight,
            priority: 0,
            arrival,
            prefill_left: 0,
        }
    }

    /// A sequence of `zone` (weight 1) with `prefill_left` prompt tokens to go.
    fn pre(zone: u32, arrival: u64, prefill_left: usize) -> Candidate<u32> {
        Candidate {
            prefill_left,
            ..dec(zone, 1.0, arrival)
        }
    }

    /// Runs `steps` steps over a fixed backlog and returns tokens per zone.
    fn run(
        clock: &mut FairClock<u32>,
        cands: &[Candidate<u32>],
        rows: usize,
        steps: usize,
    ) -> HashMap<u32, usize> {
        let mut got = HashMap::new();
        for _ in 0..steps {
            for (c, n) in cands.iter().zip(clock.plan(cands, rows, 256, None)) {
                *got.entry(c.zone).or_default() += n;
            }
        }
        got
    }

    #[test]
    fn a_new_zone_gets_a_row_at_the_next_step_when_one_zone_holds_every_row() {
        let mut clock = FairClock::new();
        let flood: Vec<_> = (0..48).map(|i| dec(1, 1.0, i)).collect();
        run(&mut clock, &flood, 32, 50);
        let mut all = flood.clone();
        all.push(dec(2, 1.0, 100));
        let plan = clock.plan(&all, 32, 256, None);
        assert_eq!(plan[48], 1, "the newcomer runs in the very next step");
        assert_eq!(plan.iter().filter(|&&n| n > 0).count(), 32);
    }

    #[test]
    fn backlogged_zones_of_weights_one_and_two_get_tokens_one_to_two_in_every_200_step_window() {
        let mut clock = FairClock::new();
        let cands: Vec<_> = (0..24)
            .map(|i| dec(1, 1.0, i))
            .chain((0..24).map(|i| dec(2, 2.0, 100 + i)))
            .collect();
        // Tokens per zone at each of 400 steps; then every window of 200 consecutive steps.
        let steps: Vec<(usize, usize)> = (0..400)
            .map(|_| {
                let plan = clock.plan(&cands, 16, 256, None);
                let of = |z| {
                    cands
                        .iter()
                        .zip(&plan)
                        .filter(|(c, _)| c.zone == z)
                        .map(|(_, n)| n)
                        .sum()
                };
                (of(1), of(2))
            })
            .collect();
        for w in steps.windows(200) {
            let (a, b) = w.iter().fold((0, 0), |(a, b), s| (a + s.0, b + s.1));
            let ratio = b as f64 / a as f64;
            assert!((ratio - 2.0).abs() <= 0.2, "weight 2 : weight 1 = {ratio}");
        }
    }

    #[test]
    fn equal_zones_share_evenly_whatever_their_backlog() {
        let mut clock = FairClock::new();
        let mut cands = Vec::new();
        for (zone, n) in [(1, 40), (2, 3), (3, 12), (4, 7)] {
            cands.extend((0..n).map(|i| dec(zone, 1.0, zone as u64 * 1000 + i)));
        }
        // 4 rows a step: each zone has at least one sequence to run, so each is owed a quarter.
        let got = run(&mut clock, &cands, 4, 200);
        let x: Vec<f64> = (1..=4).map(|z| got[&z] as f64).collect();
        assert!(jain(&x) >= 0.95, "Jain's index {} of {x:?}", jain(&x));
    }

    #[test]
    fn a_zone_back_from_idle_gets_its_share_not_a_burst() {
        let mut clock = FairClock::new();
        let a: Vec<_> = (0..16).map(|i| dec(1, 1.0, i)).collect();
        let b: Vec<_> = (0..16).map(|i| dec(2, 1.0, 100 + i)).collect();
        let both: Vec<_> = a.iter().chain(&b).cloned().collect();
        run(&mut clock, &both, 8, 20);
        // Zone 2 idles for 100 steps while zone 1 runs alone, then returns.
        run(&mut clock, &a, 8, 100);
        let got = run(&mut clock, &both, 8, 10);
        assert_eq!(got[&1], got[&2], "equal shares after the return: {got:?}");
    }

    #[test]
    fn priority_then_arrival_orders_a_zone_s_sequences() {
        let mut clock = FairClock::new();
        let mut cands: Vec<_> = (0..4).map(|i| dec(1, 1.0, i)).collect();
        cands[3].priority = 5;
        let plan = clock.plan(&cands, 2, 256, None);
        assert_eq!(plan, vec![1, 0, 0, 1]);
    }

    #[test]
    fn a_long_prefill_leaves_a_token_for_every_decoding_row() {
        let mut clock = FairClock::new();
        let mut cands = vec![pre(9, 0, 1000)];
        cands.extend((0..10).map(|i| dec(1, 1.0, 10 + i)));
        let plan = clock.plan(&cands, 32, 64, None);
        assert_eq!(plan[0], 54);
        assert!(plan[1..].iter().all(|&n| n == 1), "{plan:?}");
    }

    #[test]
    fn a_newcomer_s_first_step_runs_it_alone_never_two_steps_in_a_row() {
        let mut clock = FairClock::new();
        // Zone 1 decodes and prefills, step after step.
        let mut cands: Vec<_> = (0..8).map(|i| dec(1, 1.0, i)).collect();
        cands.push(pre(1, 8, 200));
        for _ in 0..5 {
            assert_eq!(clock.plan(&cands, 32, 256, None)[8], 200);
        }
        // A quiet zone arrives with a 40-token prompt: its step runs its prompt alone.
        cands.push(pre(2, 100, 40));
        let plan = clock.plan(&cands, 32, 256, None);
        assert_eq!(plan[9], 40, "{plan:?}");
        assert!(
            plan[..9].iter().all(|&n| n == 0),
            "the flood waits a step: {plan:?}"
        );
        // The next step (zone 2 now decoding) runs zone 1's rows and prompt again.
        cands[9].prefill_left = 0;
        let plan = clock.plan(&cands, 32, 256, None);
        assert_eq!(plan[8], 200);
        assert!(
            plan[..8].iter().chain(&plan[9..]).all(|&n| n == 1),
            "{plan:?}"
        );
        // Newcomers at every step: zone 1's prompt still runs every other step.
        let mut ran = 0;
        for k in 0..10 {
            let mut now = cands.clone();
            now.push(pre(100 + k, 200 + k as u64, 40));
            ran += (clock.plan(&now, 32, 256, None)[8] > 0) as usize;
        }
        assert_eq!(ran, 5);
    }

    #[test]
    fn a_target_holds_a_step_to_its_tokens_but_a_newcomer_s_prompt_runs_whole() {
        let mut clock = FairClock::new();
        // Two zones decode 20 rows each and zone 1 has a prompt waiting; 16 tokens fit the target.
        let mut cands: Vec<_> = (0..40).map(|i| dec(1 + i % 2, 1.0, i as u64)).collect();
        cands.push(pre(1, 40, 30));
        for _ in 0..3 {
            let plan = clock.plan(&cands, 32, 256, Some(16));
            assert_eq!(plan.iter().sum::<usize>(), 16, "{plan:?}");
            assert!(plan.iter().filter(|&&n| n > 0).count() <= 16);
        }
        // A quiet zone arrives with a 40-token prompt: its step runs all of it (alone), and the next one
        // (with another newcomer's 12 tokens, not alone) holds the rest to the target.
        cands.push(pre(3, 100, 40));
        let plan = clock.plan(&cands, 32, 256, Some(16));
        assert_eq!(plan[41], 40, "{plan:?}");
        assert_eq!(plan.iter().sum::<usize>(), 40);
        cands[41].prefill_left = 0;
        cands.push(pre(4, 101, 12));
        let plan = clock.plan(&cands, 32, 256, Some(16));
        assert_eq!(plan[42], 12, "{plan:?}");
        assert_eq!(plan.iter().sum::<usize>(), 16 + 12, "{plan:?}");
    }

    #[test]
    fn a_long_prompt_is_chunked_by_the_budget_not_the_target() {
        let mut clock = FairClock::new();
        // A lone zone: no other zone to hold the step for.
        assert_eq!(clock.plan(&[pre(1, 0, 1000)], 32, 256, Some(16)), vec![256]);
        // Past its first chunk, beside a decoding zone: still whole chunks (it waits for its first token).
        let mut clock = FairClock::new();
        let mut cands: Vec<_> = (0..8).map(|i| dec(2, 1.0, i)).collect();
        clock.plan(&cands, 32, 256, Some(16));
        cands.push(pre(1, 8, 1000));
        assert_eq!(
            clock.plan(&cands, 32, 256, Some(16))[8],
            256,
            "its step alone"
        );
        for _ in 0..3 {
            let plan = clock.plan(&cands, 32, 256, Some(16));
            assert_eq!(plan[8], 248, "{plan:?}");
            assert!(plan[..8].iter().all(|&n| n == 1), "{plan:?}");
        }
    }

    #[test]
    fn a_prompt_of_a_zone_behind_the_flood_runs_whole_in_a_step_held_to_its_target() {
        let mut clock = FairClock::new();
        // Zone 1 floods (30 decoding rows); zone 2 decodes one row; 16 tokens fit the target.
        let mut cands: Vec<_> = (0..30).map(|i| dec(1, 1.0, i)).collect();
        cands.push(dec(2, 1.0, 30));
        for _ in 0..20 {
            let plan = clock.plan(&cands, 32, 256, Some(16));
            assert_eq!(plan[30], 1, "{plan:?}");
        }
        // Zone 2, far behind zone 1 in service, sends another line: its 11-token prompt runs at once and
        // whole (zone 1's rows give way), the step still within its 16 tokens.
        cands.push(pre(2, 31, 11));
        let plan = clock.plan(&cands, 32, 256, Some(16));
        assert_eq!((plan[30], plan[31]), (1, 11), "{plan:?}");
        assert_eq!(plan.iter().sum::<usize>(), 16, "{plan:?}");
    }

    #[test]
    fn owed_shares_by_weight_and_gives_what_a_zone_cannot_use_to_the_others() {
        assert_eq!(owed(&[(1.0, 100), (2.0, 100)], 30), vec![10.0, 20.0]);
        assert_eq!(
            owed(&[(1.0, 2), (1.0, 100), (1.0, 0)], 30),
            vec![2.0, 28.0, 0.0]
        );
        assert_eq!(owed(&[(1.0, 5), (1.0, 5)], 30), vec![5.0, 5.0]);
        assert!(owed(&[], 30).is_empty());
    }

    #[test]
    fn idle_zones_owed_nothing_are_forgotten() {
        let mut clock = FairClock::new();
        for z in 0..100u32 {
            clock.plan(&[dec(z, 1.0, 0)], 4, 16, None);
        }
        assert!(clock.tracked() <= 1, "{} counters kept", clock.tracked());
        assert!(clock.plan(&[], 4, 16, None).is_empty());
        assert_eq!(clock.tracked(), 0);
    }
}

//! How many tokens a step may run to finish within a target wall time, from the cost per token of the
//! engine's own recent steps (an exponentially weighted ratio of their seconds to their tokens).
//!
//! The engine takes requests only between steps, so a request that arrives waits for the step in progress:
//! bounding the step bounds that wait (the quiet zone's first token under a flood, issue 13), as Sarathi-Serve
//! sizes its token budget from a latency target. The ratio follows the machine and its load (a co-located
//! tier that shares the cores stretches every step). It ignores the fixed part of a step (the model's ~1,000
//! ops whatever the batch), so it overstates a token's cost for small steps and understates it for large
//! ones; that error shrinks as steps settle at the target: steps of n tokens that take t seconds are sized
//! n·target/t next, whose fixed point is a step of exactly the target. An affine fit was tried first and
//! dropped: steps held near one size give it too little spread, and its noisy fixed part made the steps
//! swing.

/// The weighted cost per token of recent steps.
#[derive(Debug, Clone)]
pub struct StepCost {
    /// Weight of the past at each new step.
    decay: f64,
    /// Weighted sums of tokens and seconds.
    tokens: f64,
    secs: f64,
}

impl Default for StepCost {
    fn default() -> Self {
        Self::new()
    }
}

/// The fewest tokens a bounded step runs: fewer would pay the step's fixed part for little (a target below
/// what the machine can do still leaves a useful step).
pub const LEAST_TOKENS: usize = 8;

impl StepCost {
    /// Weighs the last ~50 steps.
    pub fn new() -> Self {
        Self {
            decay: 0.98,
            tokens: 0.0,
            secs: 0.0,
        }
    }

    /// Takes a step that ran `tokens` tokens in `secs`.
    pub fn record(&mut self, tokens: usize, secs: f64) {
        if tokens == 0 || !secs.is_finite() || secs < 0.0 {
            return;
        }
        self.tokens = self.tokens * self.decay + tokens as f64;
        self.secs = self.secs * self.decay + secs;
    }

    /// Seconds per token of recent steps, once a step has been seen.
    pub fn per_token(&self) -> Option<f64> {
        (self.tokens > 0.0 && self.secs > 0.0).then(|| self.secs / self.tokens)
    }

    /// The most tokens a step may run to finish within `target` seconds, at least [`LEAST_TOKENS`]; `None`
    /// before any step was seen.
    pub fn tokens_within(&self, target: f64) -> Option<usize> {
        let per = self.per_token()?;
        // (Within rounding of a whole token, a quotient is that token.)
        let fits = (target / per + 1e-9).floor();
        Some(fits.clamp(LEAST_TOKENS as f64, 1e9) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine whose steps cost `fixed` plus `per` a token.
    fn settle(c: &mut StepCost, target: f64, fixed: f64, per: f64, steps: usize) -> usize {
        let mut n = 32;
        for _ in 0..steps {
            c.record(n, fixed + per * n as f64);
            n = c.tokens_within(target).unwrap();
        }
        n
    }

    #[test]
    fn steps_settle_where_they_take_the_target() {
        let mut c = StepCost::new();
        // 5 ms + 1.5 ms a token: (30 - 5) / 1.5 = 16.7 tokens fit 30 ms.
        assert_eq!(settle(&mut c, 0.030, 0.005, 0.0015, 300), 16);
    }

    #[test]
    fn the_steps_follow_the_machine_as_its_load_changes() {
        let mut c = StepCost::new();
        assert_eq!(settle(&mut c, 0.030, 0.004, 0.001, 300), 26);
        // A co-located tier starts sharing the cores: steps take half as long again. (30 - 6) / 1.5 = 16.
        let n = settle(&mut c, 0.030, 0.006, 0.0015, 300);
        assert!((15..=16).contains(&n), "{n}");
    }

    #[test]
    fn a_target_below_what_the_machine_can_do_still_runs_useful_steps() {
        let mut c = StepCost::new();
        assert_eq!(settle(&mut c, 0.005, 0.010, 0.001, 100), LEAST_TOKENS);
    }

    #[test]
    fn nothing_is_bounded_before_a_step_and_idle_steps_are_ignored() {
        let mut c = StepCost::new();
        assert_eq!(c.tokens_within(0.030), None);
        c.record(0, 0.001);
        c.record(8, f64::NAN);
        assert_eq!(c.tokens_within(0.030), None);
        c.record(10, 0.010);
        assert_eq!(c.tokens_within(0.030), Some(30));
    }
}

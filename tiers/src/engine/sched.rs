//! The first-come-first-served step plan (`schedule = "fcfs"`), pure so it is unit-tested: how many tokens
//! each running sequence runs in the next step (every decoding sequence one token; prefill chunks share what
//! is left of the budget in arrival order). The fair plan is `fair.rs`.

/// What the planner needs to know about a running sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqState {
    /// Prompt tokens not yet in the KV cache (0 once decoding).
    pub prefill_left: usize,
}

/// Tokens to run for each running sequence this step (same order as the input); 0 = skip this step.
///
/// Decoding sequences always get their one token (the budget is validated to be at least `max_batch`);
/// prefilling sequences are served first come, first served with what remains of `token_budget`.
pub fn plan_step(running: &[SeqState], token_budget: usize) -> Vec<usize> {
    let decoding = running.iter().filter(|s| s.prefill_left == 0).count();
    let mut left = token_budget.saturating_sub(decoding);
    running
        .iter()
        .map(|s| {
            if s.prefill_left == 0 {
                1
            } else {
                let n = s.prefill_left.min(left);
                left -= n;
                n
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(prefill_left: usize) -> SeqState {
        SeqState { prefill_left }
    }

    #[test]
    fn every_decoding_sequence_runs_one_token_per_step() {
        assert_eq!(plan_step(&[s(0), s(0), s(0)], 8), vec![1, 1, 1]);
    }

    #[test]
    fn prefill_is_chunked_to_what_the_budget_leaves_after_decodes() {
        assert_eq!(plan_step(&[s(0), s(100), s(0)], 10), vec![1, 8, 1]);
    }

    #[test]
    fn later_prefills_wait_for_earlier_ones() {
        assert_eq!(plan_step(&[s(5), s(100), s(3)], 12), vec![5, 7, 0]);
    }

    #[test]
    fn a_short_prompt_joins_while_others_decode() {
        assert_eq!(plan_step(&[s(0), s(0), s(4)], 32), vec![1, 1, 4]);
    }
}

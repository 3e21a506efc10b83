//! Pure scheduling decisions of the batching loop, free of models and channels so they can be unit-tested:
//! which waiting sequences to admit (batch slots and KV memory) and how many tokens each running sequence
//! runs in the next step (every decoding sequence one token; prefill chunks share what is left of the budget).

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

/// How many of the waiting sequences (in order, each needing `kv_need[i]` bytes) to admit, given free batch
/// slots and free KV bytes. Admission is in order: the head of the queue is never skipped for a smaller one.
pub fn admit_count(kv_need: &[usize], free_slots: usize, mut kv_free: usize) -> usize {
    let mut n = 0;
    for &need in kv_need.iter().take(free_slots) {
        if need > kv_free {
            break;
        }
        kv_free -= need;
        n += 1;
    }
    n
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

    #[test]
    fn head_of_queue_is_not_skipped_for_a_smaller_request() {
        assert_eq!(admit_count(&[50, 10], 4, 40), 0);
    }

    #[test]
    fn admission_stops_at_free_slots() {
        assert_eq!(admit_count(&[1, 1, 1], 2, 100), 2);
    }

    #[test]
    fn admission_respects_kv_memory() {
        assert_eq!(admit_count(&[30, 30, 30], 8, 70), 2);
    }
}

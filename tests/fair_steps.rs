//! The fair step planner on the real Driver: with one row a step, two zones' sequences take turns, each paused
//! while the other runs, and each one's greedy output is token for token what it is when it runs alone (its
//! KV stays in place while paused; the kernels are batch-invariant).

use std::time::Instant;

use nimmer_config::Backend;
use nimmer_e2e::{chat, config, driver_gguf, run};
use nimmer_tiers::{EngineLimits, Event, GenerateRequest, LlmHandle, SamplingParams, Share};

const SYSTEM: &str = "You are a fisherman in a busy port city. Answer in one or two sentences.";

/// A Driver engine of its own that runs one row a step (prefix cache off: every run computes its prompt).
fn one_row_engine(backend: Backend) -> LlmHandle {
    let c = config();
    let mut spec = c.tiers.tiers.driver.clone();
    spec.backend = Some(backend);
    let limits = EngineLimits {
        step_rows: 1,
        resident: 4,
        prefix_cache_bytes: 0,
        ..EngineLimits::of(&c.budgets.tiers.driver)
    };
    LlmHandle::start("driver", &spec, limits, &driver_gguf()).expect("driver starts")
}

fn line(zone: &str, user: &str) -> GenerateRequest {
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(24)
    };
    GenerateRequest {
        share: Share::zone(zone, "street", 1.0, 0),
        ..chat(SYSTEM, user, params)
    }
}

/// Runs the request on its own thread; its tokens and when each arrived.
fn timed(h: &LlmHandle, req: GenerateRequest) -> std::thread::JoinHandle<Vec<(u32, Instant)>> {
    let mut rx = h.generate(req).expect("request accepted");
    std::thread::spawn(move || {
        let mut out = Vec::new();
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                Event::Token { id, .. } => out.push((id, Instant::now())),
                Event::Done(_) => return out,
                Event::Error(e) => panic!("engine error: {e}"),
                Event::Expired => panic!("expired without a deadline"),
            }
        }
        panic!("stream ended without Done")
    })
}

fn paused_sequences_resume_unchanged(backend: Backend) {
    let h = one_row_engine(backend);
    let (ua, ub) = ("What did you catch today?", "Why is the harbour closed?");
    let alone_a = run(&h, line("a", ua)).tokens;
    let alone_b = run(&h, line("b", ub)).tokens;
    let (ta, tb) = (timed(&h, line("a", ua)), timed(&h, line("b", ub)));
    let (a, b) = (ta.join().unwrap(), tb.join().unwrap());
    let ids = |v: &[(u32, Instant)]| v.iter().map(|t| t.0).collect::<Vec<_>>();
    assert_eq!(ids(&a), alone_a, "zone a's line with pauses vs alone");
    assert_eq!(ids(&b), alone_b, "zone b's line with pauses vs alone");
    // One row a step: the two lines overlapped in time only if each was paused for the other.
    let (a0, a1) = (a[0].1, a[a.len() - 1].1);
    let (b0, b1) = (b[0].1, b[b.len() - 1].1);
    assert!(
        b0 < a1 && a0 < b1,
        "the two lines took turns instead of running one after the other"
    );
    // And they took turns fairly: every zone got its share of the steps' tokens.
    for z in h.zone_service() {
        let ratio = z.share_ratio.expect("owed tokens");
        assert!(
            (0.8..=1.25).contains(&ratio),
            "zone {} got {ratio:.2} of its share",
            z.zone
        );
    }
}

#[test]
fn a_paused_sequence_resumes_with_its_greedy_output_unchanged() {
    paused_sequences_resume_unchanged(Backend::Nimmer);
}

#[test]
fn a_paused_sequence_resumes_unchanged_on_the_candle_backend() {
    paused_sequences_resume_unchanged(Backend::Candle);
}

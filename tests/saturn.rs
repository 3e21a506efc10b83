//! Saturn end to end on the real MiniLM model: each shipped classifier labels a fixed set of examples.

use std::sync::OnceLock;

use nimmer_tiers::SaturnHandle;

fn saturn() -> &'static SaturnHandle {
    static S: OnceLock<SaturnHandle> = OnceLock::new();
    S.get_or_init(|| {
        let c = nimmer_e2e::config();
        let dir = nimmer_e2e::model_file(&c.tiers.tiers.saturn.model, "model.safetensors")
            .parent()
            .unwrap()
            .to_path_buf();
        SaturnHandle::start(&c.tiers.tiers.saturn, &dir, &c.classifiers, None)
            .expect("saturn starts")
    })
}

/// The examples are new sentences, not exemplars from `classifiers.toml`.
fn check(classifier: &str, cases: &[(&str, &str)]) {
    let inputs = cases.iter().map(|(t, _)| t.to_string()).collect();
    let out = saturn().classify_blocking(classifier, inputs).unwrap();
    let wrong: Vec<_> = cases
        .iter()
        .zip(&out)
        .filter(|((_, want), got)| got.label != *want)
        .map(|((t, want), got)| format!("{t:?}: want {want}, got {} {:?}", got.label, got.scores))
        .collect();
    assert!(wrong.is_empty(), "{classifier}:\n{}", wrong.join("\n"));
}

#[test]
fn voice_selection_labels_its_examples() {
    check(
        "voice-selection",
        &[
            (
                "Get away from me or you'll regret it, you filthy rat!",
                "angry",
            ),
            (
                "Please hide me, the wolves are howling outside the door.",
                "fearful",
            ),
            (
                "Welcome back, my friend! What a joy to see you again!",
                "cheerful",
            ),
            (
                "Since my wife died, I just sit by the window all day.",
                "sad",
            ),
        ],
    );
}

#[test]
fn trait_salience_labels_its_examples() {
    check(
        "trait-salience",
        &[
            ("Fifty gold pieces, and I want them up front.", "greed"),
            (
                "You're cold, take my cloak and sit by the fire.",
                "kindness",
            ),
            (
                "What's inside that locked tower? I have to find out.",
                "curiosity",
            ),
            ("Say that again and I'll smash your teeth in.", "aggression"),
        ],
    );
}

#[test]
fn audit_overseer_labels_its_examples() {
    check(
        "audit-overseer",
        &[
            ("The baker's bread is best on market day.", "ok"),
            (
                "I'm a large language model and can't role-play that.",
                "meta",
            ),
            (
                "Send me your bank password so I can check your account.",
                "unsafe",
            ),
        ],
    );
}

#[test]
fn ternary_gate_labels_its_examples() {
    check(
        "ternary-gate",
        &[
            ("You sold our secrets to the enemy.", "-1"),
            ("The bell tower rings at noon.", "0"),
            ("You found my missing son and brought him home.", "+1"),
        ],
    );
}

#[test]
fn scores_are_a_distribution_and_latency_is_reported() {
    let out = saturn()
        .classify_blocking("ternary-gate", vec!["Thank you for your help.".into()])
        .unwrap();
    let sum: f32 = out[0].scores.values().sum();
    assert!((sum - 1.0).abs() < 1e-4, "{sum}");
    assert!(out[0].latency_ms > 0.0);
}

#[test]
fn an_unknown_classifier_is_named_in_the_error() {
    let e = saturn()
        .classify_blocking("horoscope", vec!["hi".into()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("horoscope") && e.contains("voice-selection"),
        "{e}"
    );
}

#[test]
fn concurrent_requests_are_batched_and_each_gets_its_own_answer() {
    let s = saturn();
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || {
                let text = if i % 2 == 0 {
                    "You saved my life, thank you!"
                } else {
                    "You stole my horse, you traitor."
                };
                (
                    i,
                    s.classify_blocking("ternary-gate", vec![text.into()])
                        .unwrap()[0]
                        .label
                        .clone(),
                )
            })
        })
        .collect();
    for t in threads {
        let (i, label) = t.join().unwrap();
        assert_eq!(label, if i % 2 == 0 { "+1" } else { "-1" }, "request {i}");
    }
}

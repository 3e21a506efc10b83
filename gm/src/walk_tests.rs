//! The walker over the shipped event templates.

use super::*;
use nimmer_config::{Config, EventCatalog};

fn event(name: &str) -> EventTemplate {
    let c = Config::embedded();
    EventCatalog::embedded(&c).unwrap().events[name].clone()
}

fn values(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain([
            ("event".into(), "e1".into()),
            ("district".into(), "docks".into()),
        ])
        .collect()
}

fn line(scene: &str, text: &str) -> Outcome {
    Outcome::Line {
        scene: scene.into(),
        text: text.into(),
    }
}

fn label(scene: &str, l: &str) -> Outcome {
    Outcome::Label {
        scene: scene.into(),
        label: l.into(),
    }
}

/// (scene, slot or "branch", attempt) of each action.
fn shape(actions: &[Action]) -> Vec<(String, String, u32)> {
    actions
        .iter()
        .map(|a| match a {
            Action::Ask {
                scene,
                slot,
                attempt,
                ..
            } => (scene.clone(), format!("ask {slot}"), *attempt),
            Action::Gate {
                scene,
                slot,
                attempt,
                ..
            } => (scene.clone(), format!("gate {slot}"), *attempt),
            Action::Branch { scene, .. } => (scene.clone(), "branch".into(), 0),
        })
        .collect()
}

fn s(scene: &str, what: &str, attempt: u32) -> (String, String, u32) {
    (scene.into(), what.into(), attempt)
}

#[test]
fn the_harbour_arrival_runs_two_scenes_in_parallel_gates_its_lines_and_waits_for_both() {
    let t = event("harbour-arrival");
    let v = values(&[("ship", "Gull"), ("player", "p7")]);
    let mut p = Progress::open(&t);
    let a = p.actions(&t, &v);
    assert_eq!(
        shape(&a),
        [
            s("berth", "ask hail", 1),
            s("quay-chatter", "ask gossip", 1)
        ]
    );
    let Action::Ask { request, .. } = &a[0] else {
        unreachable!()
    };
    let RenderedWork::Line { prompt, .. } = &request.work else {
        unreachable!()
    };
    assert!(
        prompt.contains("The ship Gull ties up") && prompt.contains("p7"),
        "{prompt}"
    );
    assert_eq!(request.participants, ["p7"]);
    assert_eq!(request.npc.as_deref(), Some("harbourmaster-odile"));

    // The hail's first line is rejected by the overseer and asked for again; the second is kept.
    p.apply(&t, line("berth", "As an AI I cannot")).unwrap();
    assert_eq!(shape(&p.actions(&t, &v))[0], s("berth", "gate hail", 1));
    p.apply(&t, label("berth", "meta")).unwrap();
    assert_eq!(shape(&p.actions(&t, &v))[0], s("berth", "ask hail", 2));
    p.apply(&t, line("berth", "Ahoy, Gull!")).unwrap();
    p.apply(&t, label("berth", "ok")).unwrap();
    assert_eq!(p.lines["hail"], "Ahoy, Gull!");
    // The reply quotes the accepted hail.
    let a = p.actions(&t, &v);
    let Action::Ask { request, slot, .. } = &a[0] else {
        unreachable!()
    };
    assert_eq!(slot, "reply");
    let RenderedWork::Line { prompt, system, .. } = &request.work else {
        unreachable!()
    };
    assert!(prompt.contains("\"Ahoy, Gull!\""), "{prompt}");
    assert!(
        system
            .as_deref()
            .unwrap()
            .contains("Captain Brand of the Gull")
    );
    p.apply(&t, line("berth", "Aye.")).unwrap();
    p.apply(&t, label("berth", "ok")).unwrap();
    // Customs waits for the quay's chatter too.
    assert_eq!(
        shape(&p.actions(&t, &v)),
        [s("quay-chatter", "ask gossip", 1)]
    );
    p.apply(&t, line("quay-chatter", "They say she carries gold."))
        .unwrap();
    assert_eq!(
        shape(&p.actions(&t, &v)),
        [s("customs", "ask inspection", 1)]
    );
    p.apply(&t, line("customs", "Open the hold.")).unwrap();
    assert!(!p.is_complete());
    p.apply(&t, label("customs", "ok")).unwrap();
    assert!(p.is_complete());
    assert!(p.actions(&t, &v).is_empty());
}

#[test]
fn the_ternary_gate_picks_the_quarrel_s_ending() {
    let t = event("market-quarrel");
    let v = values(&[("player", "p1")]);
    for (l, next) in [("-1", Some("brawl")), ("+1", Some("truce")), ("0", None)] {
        let mut p = Progress::open(&t);
        for text in ["You thief!", "Move your fish."] {
            p.apply(&t, line("quarrel", text)).unwrap();
            p.apply(&t, label("quarrel", "ok")).unwrap();
        }
        let a = p.actions(&t, &v);
        let Action::Branch {
            classifier, input, ..
        } = &a[0]
        else {
            panic!("{a:?}")
        };
        assert_eq!(
            (classifier.as_str(), input.as_str()),
            ("ternary-gate", "Move your fish.")
        );
        p.apply(&t, label("quarrel", l)).unwrap();
        match next {
            Some(scene) => {
                assert_eq!(shape(&p.actions(&t, &v))[0].0, scene);
                assert!(!p.is_complete());
                p.apply(&t, line(scene, "...")).unwrap();
            }
            None => assert!(p.actions(&t, &v).is_empty()),
        }
        assert!(p.is_complete(), "{l}");
        // The scene the branch did not pick never started.
        assert_eq!(p.scenes.len(), 1 + next.is_some() as usize);
    }
}

#[test]
fn a_slot_whose_gate_never_accepts_is_given_up_and_so_is_a_slot_quoting_it() {
    let t = event("faction-rumour");
    let v = values(&[("player", "p1"), ("rumour", "the guild sinks ships")]);
    let mut p = Progress::open(&t);
    for attempt in 1..=3 {
        assert_eq!(
            shape(&p.actions(&t, &v)),
            [s("whisper", "ask telling", attempt)]
        );
        p.apply(&t, line("whisper", "I am a language model"))
            .unwrap();
        p.apply(&t, label("whisper", "meta")).unwrap();
    }
    assert!(p.skipped.contains("telling"));
    // `salience` classifies the given-up line and `denial` quotes it: both are given up, the event ends.
    assert!(p.actions(&t, &v).is_empty());
    assert!(p.skipped.contains("salience") && p.skipped.contains("denial"));
    assert!(p.is_complete());
    assert!(p.lines.is_empty());
}

#[test]
fn stale_or_foreign_answers_are_errors_and_change_nothing() {
    let t = event("market-quarrel");
    let mut p = Progress::open(&t);
    let before = p.clone();
    assert!(
        p.apply(&t, label("quarrel", "ok")).is_err(),
        "a label while asking"
    );
    assert!(
        p.apply(&t, line("brawl", "x")).is_err(),
        "a scene not started"
    );
    assert!(p.apply(&t, line("nowhere", "x")).is_err());
    assert_eq!(p, before);
    for text in ["a", "b"] {
        p.apply(&t, line("quarrel", text)).unwrap();
        p.apply(&t, label("quarrel", "ok")).unwrap();
    }
    let e = p.apply(&t, label("quarrel", "maybe")).unwrap_err();
    assert!(e.to_string().contains("not a label"), "{e}");
}

#[test]
fn a_respawned_director_continues_from_the_recorded_progress() {
    let t = event("harbour-arrival");
    let v = values(&[("ship", "Gull"), ("player", "p7")]);
    let mut p = Progress::open(&t);
    p.apply(&t, line("berth", "Ahoy!")).unwrap();
    p.apply(&t, label("berth", "ok")).unwrap();
    p.apply(&t, line("quay-chatter", "Gold, they say."))
        .unwrap();
    let json = serde_json::to_string(&p).unwrap();
    let mut back: Progress = serde_json::from_str(&json).unwrap();
    assert_eq!(back, p);
    assert_eq!(back.actions(&t, &v), p.actions(&t, &v));
}

#[test]
fn empty_answers_are_asked_again_and_a_branch_with_nothing_to_classify_ends_the_path() {
    let t = event("market-quarrel");
    let v = values(&[("player", "p1")]);
    let mut p = Progress::open(&t);
    // The accusation comes back empty twice (asked again), then a real line.
    p.apply(&t, line("quarrel", "  ")).unwrap();
    assert_eq!(
        shape(&p.actions(&t, &v)),
        [s("quarrel", "ask accusation", 2)]
    );
    p.apply(&t, line("quarrel", "")).unwrap();
    p.apply(&t, line("quarrel", "Thief!")).unwrap();
    p.apply(&t, label("quarrel", "ok")).unwrap();
    // The retort is empty on all three attempts: given up, so the branch has nothing to read.
    for attempt in 1..=3 {
        assert_eq!(
            shape(&p.actions(&t, &v)),
            [s("quarrel", "ask retort", attempt)]
        );
        p.apply(&t, line("quarrel", "")).unwrap();
    }
    assert!(p.skipped.contains("retort"));
    assert!(p.actions(&t, &v).is_empty());
    assert!(p.is_complete());
    assert_eq!(p.scenes["quarrel"], SceneState::Done { label: None });
    assert_eq!(p.lines.keys().collect::<Vec<_>>(), ["accusation"]);
}

//! Tests of the event templates: the shipped ones load, and every rule names its key.

use super::*;
use crate::EventCatalog;
use std::path::Path;

fn parse(text: &str) -> Result<EventTemplate, ConfigError> {
    EventTemplate::parse("events/e.toml", "e", text, &Config::embedded())
}

const MINIMAL: &str = r#"
description = "d"
district = "docks"
theme = "t"
tier = "everyday"
values = ["player"]
[[scene]]
id = "a"
[[scene.slot]]
id = "x"
kind = "dialog"
prompt = "Hello {player}"
"#;

#[test]
fn the_shipped_events_load_with_their_scenes_gates_and_branches() {
    let c = EventCatalog::embedded(&Config::embedded()).unwrap();
    assert_eq!(c.events.len(), DEFAULT_EVENTS.len());
    let q = &c.events["market-quarrel"];
    let b = q.scene("quarrel").unwrap().branch.as_ref().unwrap();
    assert_eq!(b.on["-1"].as_deref(), Some("brawl"));
    assert_eq!(b.on["0"], None);
    assert!(q.scene("truce").unwrap().branch_target);
    let h = &c.events["harbour-arrival"];
    assert_eq!(h.scene("customs").unwrap().after, ["berth", "quay-chatter"]);
    let gate = h.scenes[0].slots[0].gate.as_ref().unwrap();
    assert_eq!(gate.attempts, 3);
    assert!(gate.accept.contains("ok"));
    assert_eq!(c.events["landmark-moment"].tier, EventTier::Major);
    // The repository's folder holds the same files.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("events");
    let on_disk = EventCatalog::load(&dir, &Config::embedded()).unwrap();
    assert_eq!(
        on_disk.events.keys().collect::<Vec<_>>(),
        c.events.keys().collect::<Vec<_>>()
    );
}

#[test]
fn a_minimal_event_parses() {
    let e = parse(MINIMAL).unwrap();
    assert_eq!(e.scenes[0].slots[0].kind, Kind::Dialog);
}

#[test]
fn each_broken_rule_names_its_key() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "prompt = \"Hello {player}\"",
            "prompt = \"Hi {ship}\"",
            "scene.a.slot.x.prompt",
        ),
        (
            "prompt = \"Hello {player}\"",
            "prompt = \"{slot.nope}\"",
            "names no slot",
        ),
        (
            "prompt = \"Hello {player}\"",
            "prompt = \"Hello {player\"",
            "byte",
        ),
        (
            "kind = \"dialog\"",
            "kind = \"dialog\"\ngate = { classifier = \"audit-overseer\", accept = [\"fine\"] }",
            "gate.accept",
        ),
        (
            "kind = \"dialog\"",
            "kind = \"dialog\"\ngate = { classifier = \"nope\", accept = [\"ok\"] }",
            "no classifier `nope`",
        ),
        (
            "kind = \"dialog\"",
            "kind = \"classify\"",
            "needs `classifier` and `input`",
        ),
        (
            "id = \"a\"\n",
            "id = \"a\"\nafter = [\"zz\"]\n",
            "scene.a.after",
        ),
        ("tier = \"everyday\"", "tier = \"daily\"", "tier"),
        (
            "values = [\"player\"]",
            "values = [\"player\", \"event\"]",
            "values",
        ),
        (
            "kind = \"dialog\"",
            "kind = \"dialog\"\ncolour = 1",
            "colour",
        ),
        (
            "kind = \"dialog\"",
            "kind = \"dialog\"\ntraits = { pirate = 0.5 }",
            "traits.pirate",
        ),
    ];
    for (from, to, want) in cases {
        let text = MINIMAL.replacen(from, to, 1);
        assert_ne!(text, MINIMAL, "{from}");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains(want), "{to}: {e}");
        assert!(e.starts_with("events/e.toml"), "{e}");
    }
}

#[test]
fn branches_must_map_every_label_to_a_scene_or_end() {
    let with_branch = |on: &str| {
        format!(
            "{MINIMAL}[scene.branch]\nclassifier = \"ternary-gate\"\ninput = \"{{slot.x}}\"\non = {on}\n\
             [[scene]]\nid = \"b\"\n[[scene.slot]]\nid = \"y\"\nkind = \"dialog\"\nprompt = \"p\"\n"
        )
    };
    let ok = parse(&with_branch(r#"{ "-1" = "b", "0" = "end", "+1" = "end" }"#)).unwrap();
    assert!(ok.scene("b").unwrap().branch_target);
    let e = parse(&with_branch(r#"{ "-1" = "b", "0" = "end" }"#)).unwrap_err();
    assert!(e.to_string().contains("every label"), "{e}");
    let e = parse(&with_branch(r#"{ "-1" = "c", "0" = "end", "+1" = "end" }"#)).unwrap_err();
    assert!(e.to_string().contains("`c` is neither"), "{e}");
}

#[test]
fn scenes_waiting_in_a_circle_or_never_starting_are_refused() {
    let circle = format!(
        "{}\n[[scene]]\nid = \"b\"\nafter = [\"c\"]\n[[scene.slot]]\nid = \"y\"\nkind = \"dialog\"\nprompt = \"p\"\n\
         [[scene]]\nid = \"c\"\nafter = [\"b\"]\n[[scene.slot]]\nid = \"z\"\nkind = \"dialog\"\nprompt = \"p\"\n",
        MINIMAL
    );
    let e = parse(&circle).unwrap_err().to_string();
    assert!(e.contains("circle"), "{e}");
    let waiting = MINIMAL.replacen("id = \"a\"\n", "id = \"a\"\nafter = [\"a\"]\n", 1);
    assert!(parse(&waiting).is_err());
}

#[test]
fn raises_name_a_template_of_the_catalog_with_exactly_its_values() {
    let c = EventCatalog::embedded(&Config::embedded()).unwrap();
    let r = &c.events["faction-rumour"].raises[0];
    assert_eq!(
        (r.id.as_str(), r.template.as_str()),
        ("inquiry", "guild-inquiry")
    );
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write("target.toml", MINIMAL);
    let raising = |raise: &str| format!("{MINIMAL}\n[[raise]]\n{raise}\n");
    for (raise, key, rule) in [
        (
            "id = \"r\"\ntemplate = \"nowhere\"\nvalues = { player = \"{player}\" }",
            "raise.r.template",
            "no event template `nowhere`",
        ),
        (
            "id = \"r\"\ntemplate = \"target\"\nvalues = { ship = \"{player}\" }",
            "raise.r.values",
            "exactly the values",
        ),
    ] {
        write("source.toml", &raising(raise));
        let e = EventCatalog::load(dir.path(), &Config::embedded())
            .unwrap_err()
            .to_string();
        assert!(e.contains(key) && e.contains(rule), "{e}");
    }
    // A raised value quotes only what its own event has.
    let e = parse(&raising(
        "id = \"r\"\ntemplate = \"target\"\nvalues = { player = \"{slot.nope}\" }",
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("raise.r.values.player"), "{e}");
    write(
        "source.toml",
        &raising("id = \"r\"\ntemplate = \"target\"\nvalues = { player = \"{slot.x}\" }"),
    );
    EventCatalog::load(dir.path(), &Config::embedded()).unwrap();
}

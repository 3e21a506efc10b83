//! The trait-LoRAs shipped in `loras/adapters` (trained by `nimmer loras train` on `loras/data`) change the
//! Driver's behaviour measurably on the held-out prompts of `loras/data/eval.jsonl` (greedy, 96 tokens):
//! - `terse`: mean reply length in tokens at most half of the base model's;
//! - `sailor`: share of replies with a sea-dog marker word (arr, aye, matey, ye, yer) at least 0.5 above the
//!   base model's.
//!
//! And the default config maps the traits `terse` and `sailor` to them through the gateway.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nimmer_e2e::{chat, collect, driver};
use nimmer_loras::{Blend, load_peft};
use nimmer_tiers::SamplingParams;
use serde::Deserialize;

const MARKERS: [&str; 5] = ["arr", "aye", "matey", "ye", "yer"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[derive(Deserialize)]
struct Prompt {
    system: String,
    user: String,
}

fn eval_prompts() -> Vec<Prompt> {
    let text = std::fs::read_to_string(repo().join("loras/data/eval.jsonl")).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn has_marker(text: &str) -> bool {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .any(|w| MARKERS.contains(&w))
}

/// Replies of the Driver to every evaluation prompt with `blend` (all submitted at once: one batch).
fn replies(blend: Option<Arc<Blend>>) -> Vec<(usize, String)> {
    let params = SamplingParams {
        max_tokens: 96,
        ..SamplingParams::default()
    };
    let rxs: Vec<_> = eval_prompts()
        .iter()
        .map(|p| {
            let mut req = chat(&p.system, &p.user, params.clone());
            req.lora = blend.clone();
            driver().generate(req).expect("accepted")
        })
        .collect();
    rxs.into_iter()
        .map(|rx| {
            let o = collect(rx);
            (o.tokens.len(), o.text)
        })
        .collect()
}

fn adapter(name: &str) -> Arc<Blend> {
    let base = driver().info().model.lora_base();
    let a = load_peft(&repo().join("loras/adapters").join(name), name, &base)
        .unwrap_or_else(|e| panic!("shipped adapter {name}: {e}"));
    Arc::new(Blend {
        parts: vec![(Arc::new(a), 1.0)],
    })
}

fn mean_len(r: &[(usize, String)]) -> f64 {
    r.iter().map(|(n, _)| *n as f64).sum::<f64>() / r.len() as f64
}

fn marker_rate(r: &[(usize, String)]) -> f64 {
    r.iter().filter(|(_, t)| has_marker(t)).count() as f64 / r.len() as f64
}

#[test]
fn shipped_adapters_change_behaviour() {
    let base = replies(None);
    let terse = replies(Some(adapter("terse")));
    let sailor = replies(Some(adapter("sailor")));
    for (name, r) in [("base", &base), ("terse", &terse), ("sailor", &sailor)] {
        eprintln!(
            "{name:6}: mean reply {:5.1} tokens, marker rate {:.2}",
            mean_len(r),
            marker_rate(r)
        );
        for (_, t) in r.iter().take(3) {
            eprintln!("        {t:?}");
        }
    }
    assert!(
        mean_len(&terse) <= 0.5 * mean_len(&base),
        "terse: {:.1} tokens vs base {:.1}",
        mean_len(&terse),
        mean_len(&base)
    );
    assert!(
        marker_rate(&sailor) >= marker_rate(&base) + 0.5,
        "sailor: marker rate {:.2} vs base {:.2}",
        marker_rate(&sailor),
        marker_rate(&base)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_config_maps_traits_to_shipped_adapters() {
    let dir = repo().join("config");
    let config = nimmer_config::Config::load(&dir).unwrap();
    assert_eq!(config.budgets.traits.get("terse").unwrap(), "terse");
    assert_eq!(config.budgets.traits.get("sailor").unwrap(), "sailor");
    let base = nimmer_e2e::start_gateway_with(
        config,
        nimmer_gateway::Options {
            config_dir: Some(dir),
            ..Default::default()
        },
    );
    let client = reqwest::Client::new();
    let body = serde_json::json!({
        "uid": "ev/dist/scene/s1", "zone": "harbor", "kind": "dialog", "max_tokens": 96,
        "npc": { "id": "brannoch", "traits": { "sailor": 1.0 } },
        "messages": [
            { "role": "system", "content": "You are Brannoch, a dockworker at the harbor in the city of Nimmer. Stay in character and answer the player." },
            { "role": "user", "content": "Where can I buy a map of the city?" }
        ],
        "sampling": { "temperature": 0.0 },
    });
    let r = client
        .post(format!("{base}/v1/dialog"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["adapters"], serde_json::json!(["sailor@v1"]), "{v}");
    let listed: serde_json::Value = client
        .get(format!("{base}/v1/adapters"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = listed["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert!(
        names.contains(&"terse") && names.contains(&"sailor"),
        "{listed}"
    );
}

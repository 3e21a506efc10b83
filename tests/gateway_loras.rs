//! Trait-LoRAs through the gateway with the real Driver: `npc.traits` select adapters from the watched adapters
//! directory (`[traits]` in budgets.toml), the response names them with their versions, an unknown trait is a
//! 422, replacing an adapter's files under load completes every request (running ones on the old version, new
//! ones on the new), deleting an adapter in use does not break its request, and a corrupt adapter is rejected
//! with a precise error while the registry keeps serving.

use std::path::Path;

use futures::StreamExt;
use nimmer_e2e::http::{client, eventually, get, post};
use nimmer_loras::{Adapter, LoraPair, Module, peft::save_peft};
use serde_json::{Value, json};

/// Each dialog its own slot: a repeated UID is a repeat of one line (it gets the first answer).
static NEXT_SLOT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

const SYSTEM: &str = "You are a helpful assistant.";

/// Writes a random rank-8 adapter for the Driver's shape (read from its GGUF) into `dir`.
fn write_adapter(dir: &Path, seed: u32) {
    let base = nimmer_tiers::llama::Llama::load(
        &nimmer_e2e::driver_gguf(),
        nimmer_config::Precision::Native,
        16,
    )
    .unwrap()
    .0
    .cfg
    .lora_base();
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    let mut rnd = || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.1
    };
    let modules = [Module::Q, Module::V, Module::Down];
    let layers = (0..base.n_layer)
        .map(|_| {
            modules
                .iter()
                .map(|m| {
                    let (i, o) = m.dims(&base);
                    Some(LoraPair {
                        a: (0..8 * i).map(|_| rnd()).collect(),
                        b: (0..o * 8).map(|_| rnd()).collect(),
                    })
                })
                .collect()
        })
        .collect();
    let a = Adapter {
        name: String::new(),
        rank: 8,
        alpha: 16.0,
        scale: 2.0,
        modules: modules.to_vec(),
        layers,
        size_bytes: 0,
        digest: Default::default(),
    };
    // Write next to the target and rename into place, as a deploy would.
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    save_peft(&a, &base, &tmp).unwrap();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).unwrap();
}

fn body(traits: Value, max_tokens: usize, stream: bool) -> Value {
    json!({
        "uid": format!("ev/dist/scene/s{}", NEXT_SLOT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)), "zone": "tavern", "kind": "dialog", "max_tokens": max_tokens, "stream": stream,
        "npc": { "id": "bram", "traits": traits },
        "messages": [{ "role": "system", "content": SYSTEM }, { "role": "user", "content": "Tell me about the harbour." }],
        "sampling": { "temperature": 0.0, "ignore_eos": true },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traits_select_hot_swapped_adapters() {
    let cfg_dir = tempfile::tempdir().unwrap();
    let adapters_dir = cfg_dir.path().join("adapters");
    std::fs::create_dir(&adapters_dir).unwrap();
    write_adapter(&adapters_dir.join("gruff"), 1);
    write_adapter(&adapters_dir.join("terse"), 2);
    let src = nimmer_config::Sources::embedded();
    let budgets = src
        .budgets
        .replace("dir = \"../loras/adapters\"", "dir = \"adapters\"")
        .replace("terse = \"terse\"\n", "")
        .replace("sailor = \"sailor\"\n", "")
        .replace(
            "\n[traits]\n",
            "\n[traits]\ngruff = \"gruff\"\nterse = \"terse\"\nbroken = \"broken\"\n",
        );
    std::fs::write(cfg_dir.path().join("tiers.toml"), &src.tiers).unwrap();
    std::fs::write(cfg_dir.path().join("classifiers.toml"), &src.classifiers).unwrap();
    std::fs::write(cfg_dir.path().join("budgets.toml"), &budgets).unwrap();
    let config = nimmer_config::Config::load(cfg_dir.path()).unwrap();
    let base = nimmer_e2e::start_gateway_with(
        config,
        nimmer_gateway::Options {
            config_dir: Some(cfg_dir.path().to_path_buf()),
            ..Default::default()
        },
    );
    let list = get(&base, "/v1/adapters").await;
    assert_eq!(list["adapters"].as_array().unwrap().len(), 2, "{list}");
    let gruff = list["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "gruff")
        .expect("gruff listed");
    assert_eq!(
        (
            &gruff["version"],
            &gruff["rank"],
            &gruff["traits"],
            &gruff["resident"]
        ),
        (&json!(1), &json!(8), &json!(["gruff"]), &json!(true)),
        "{list}"
    );

    // Traits select adapters; the response names them; the adapter changes the reply.
    let (s, plain) = post(&base, "/v1/dialog", &body(json!({}), 12, false)).await;
    assert_eq!(s, 200, "{plain}");
    assert_eq!(plain["adapters"], json!([]));
    let (s, gruff) = post(
        &base,
        "/v1/dialog",
        &body(json!({ "gruff": 1.0 }), 12, false),
    )
    .await;
    assert_eq!(s, 200, "{gruff}");
    assert_eq!(gruff["adapters"], json!(["gruff@v1"]));
    assert_ne!(
        gruff["text"], plain["text"],
        "the adapter changes the greedy reply"
    );
    let (s, blend) = post(
        &base,
        "/v1/dialog",
        &body(json!({ "gruff": 0.5, "terse": 0.5 }), 4, false),
    )
    .await;
    assert_eq!(s, 200, "{blend}");
    assert_eq!(blend["adapters"], json!(["gruff@v1", "terse@v1"]));

    // Unknown traits, and traits whose adapter is missing, are 422s naming npc.traits.
    for traits in [json!({ "jolly": 1.0 }), json!({ "broken": 1.0 })] {
        let (s, v) = post(&base, "/v1/dialog", &body(traits, 4, false)).await;
        assert_eq!((s, v["field"].as_str()), (422, Some("npc.traits")), "{v}");
    }

    // Replace `gruff` under load: streams that started on v1 finish; new requests run v2.
    let mut running = Vec::new();
    for _ in 0..3 {
        let r = client()
            .post(format!("{base}/v1/dialog"))
            .json(&body(json!({ "gruff": 1.0 }), 48, true))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let mut s = r.bytes_stream();
        s.next().await.unwrap().unwrap();
        running.push(s);
    }
    write_adapter(&adapters_dir.join("gruff"), 3);
    assert!(
        eventually(20, || async {
            get(&base, "/v1/adapters").await["adapters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["name"] == "gruff" && a["version"] == 2)
        })
        .await,
        "the replaced adapter was loaded as version 2"
    );
    for mut s in running {
        let mut all = String::new();
        while let Some(chunk) = s.next().await {
            all.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
        assert!(
            all.contains("event: done"),
            "a running request finished: {all}"
        );
        assert!(all.contains("gruff@v1"), "it kept version 1: {all}");
    }
    let (s, v) = post(
        &base,
        "/v1/dialog",
        &body(json!({ "gruff": 1.0 }), 4, false),
    )
    .await;
    assert_eq!((s, &v["adapters"]), (200, &json!(["gruff@v2"])), "{v}");

    // Delete `terse` while a request uses it: that request completes; the next one is a 422.
    let r = client()
        .post(format!("{base}/v1/dialog"))
        .json(&body(json!({ "terse": 1.0 }), 32, true))
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let d = client()
        .delete(format!("{base}/v1/adapters/terse"))
        .send()
        .await
        .unwrap();
    assert_eq!(d.status().as_u16(), 200);
    let mut all = String::new();
    while let Some(chunk) = stream.next().await {
        all.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(all.contains("event: done"), "{all}");
    let (s, _) = post(
        &base,
        "/v1/dialog",
        &body(json!({ "terse": 1.0 }), 4, false),
    )
    .await;
    assert_eq!(s, 422);

    // A corrupt adapter by API: a precise error, and the registry keeps serving.
    let bad = cfg_dir.path().join("bad");
    write_adapter(&bad, 4);
    std::fs::write(bad.join("adapter_model.safetensors"), b"not safetensors").unwrap();
    let (s, v) = post(
        &base,
        "/v1/adapters",
        &json!({ "name": "broken", "path": bad }),
    )
    .await;
    assert_eq!(s, 422, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("adapter_model.safetensors"),
        "{v}"
    );
    // Loaded by API from a good path, then prefetched by trait.
    write_adapter(&bad, 5);
    let (s, v) = post(
        &base,
        "/v1/adapters",
        &json!({ "name": "broken", "path": bad }),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = post(
        &base,
        "/v1/adapters/prefetch",
        &json!({ "traits": ["broken", "gruff"] }),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = post(
        &base,
        "/v1/dialog",
        &body(json!({ "broken": 1.0 }), 4, false),
    )
    .await;
    assert_eq!((s, &v["adapters"]), (200, &json!(["broken@v1"])), "{v}");
    let m = client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("nimmer_lora_loads_total"), "{m}");
}

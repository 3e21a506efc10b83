//! Bad input never panics: missing, truncated, corrupt or wrong-checksum model files, unsupported
//! architectures, prompts longer than the context, and malformed requests each give an error that names
//! the file, tensor, field or limit.

use std::io::{Read, Write};

use candle_core::quantized::gguf_file::{self, Value};
use nimmer_config::{Config, Precision};
use nimmer_e2e::{chat, driver};
use nimmer_tiers::fetch::{Verify, check_file, ensure_model};
use nimmer_tiers::llama::Llama;
use nimmer_tiers::{GenerateRequest, Prompt, SamplingParams, TierError};

fn load_err(path: &std::path::Path) -> String {
    match Llama::load(path, Precision::Native, 2048) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_missing_model_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[models.local]\nformat = \"gguf\"\ndir = \"{}\"\nfiles = [{{ name = \"model.gguf\" }}]\n",
        dir.path().display()
    );
    let cfg = nimmer_e2e::config_with_driver_model("local", &toml);
    let e = ensure_model(&cfg.tiers, "local", Verify::Cached)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.gguf") && e.contains("missing"), "{e}");
}

#[test]
fn a_file_with_the_wrong_checksum_is_rejected_with_both_sums() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.gguf");
    std::fs::write(&p, b"GGUF but not really").unwrap();
    let e = check_file(&p, &"ab".repeat(32), Verify::Full).unwrap_err();
    assert!(matches!(e, TierError::Checksum { .. }), "{e}");
    assert!(e.to_string().contains(&"ab".repeat(32)));
}

#[test]
fn a_file_that_is_not_gguf_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("junk.gguf");
    std::fs::write(&p, vec![7u8; 4096]).unwrap();
    let e = load_err(&p);
    assert!(e.contains("junk.gguf") && e.contains("GGUF"), "{e}");
}

#[test]
fn a_truncated_model_names_the_file_and_tensor() {
    let src = nimmer_e2e::driver_gguf();
    let dir = tempfile::tempdir().unwrap();
    for (i, keep) in [(0, 200_000usize), (1, 40_000_000)].iter() {
        let p = dir.path().join(format!("cut{i}.gguf"));
        let mut buf = vec![0u8; *keep];
        std::fs::File::open(&src)
            .unwrap()
            .read_exact(&mut buf)
            .unwrap();
        std::fs::File::create(&p).unwrap().write_all(&buf).unwrap();
        let e = load_err(&p);
        assert!(e.contains(&format!("cut{i}.gguf")), "{e}");
    }
    // Cut inside the tensor data: the error names a tensor.
    let e = load_err(&dir.path().join("cut1.gguf"));
    assert!(e.contains("tensor `blk."), "{e}");
}

#[test]
fn an_unsupported_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bert.gguf");
    let arch = Value::String("bert".into());
    let mut f = std::fs::File::create(&p).unwrap();
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &[]).unwrap();
    drop(f);
    let e = load_err(&p);
    assert!(
        e.contains("unsupported architecture `bert`") && e.contains("bert.gguf"),
        "{e}"
    );
}

#[test]
fn a_prompt_longer_than_the_context_names_the_limit() {
    let long = "word ".repeat(3000);
    let e = driver()
        .generate(chat(
            "You are a helpful assistant.",
            &long,
            SamplingParams::greedy(16),
        ))
        .unwrap_err();
    assert!(
        matches!(e, TierError::ContextExceeded { context: 2048, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("2048"), "{e}");
}

#[test]
fn malformed_requests_name_the_field() {
    let h = driver();
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (
            GenerateRequest {
                prompt: Prompt::Chat(vec![]),
                params: SamplingParams::greedy(4),
                lora: None,
                deadline: None,
                share: Default::default(),
            },
            "messages",
        ),
        (
            GenerateRequest {
                prompt: Prompt::Text(String::new()),
                params: SamplingParams::greedy(4),
                lora: None,
                deadline: None,
                share: Default::default(),
            },
            "prompt",
        ),
        (
            GenerateRequest {
                prompt: Prompt::Tokens(vec![10_000_000]),
                params: SamplingParams::greedy(4),
                lora: None,
                deadline: None,
                share: Default::default(),
            },
            "prompt",
        ),
        (
            chat(
                "s",
                "u",
                SamplingParams {
                    max_tokens: 0,
                    ..SamplingParams::default()
                },
            ),
            "max_tokens",
        ),
        (
            chat(
                "s",
                "u",
                SamplingParams {
                    temperature: -1.0,
                    ..SamplingParams::default()
                },
            ),
            "temperature",
        ),
        (
            chat(
                "s",
                "u",
                SamplingParams {
                    top_p: 1.5,
                    ..SamplingParams::default()
                },
            ),
            "top_p",
        ),
        (
            chat(
                "s",
                "u",
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..SamplingParams::default()
                },
            ),
            "repetition_penalty",
        ),
        (
            chat(
                "s",
                "u",
                SamplingParams {
                    stop: vec![String::new()],
                    ..SamplingParams::default()
                },
            ),
            "stop",
        ),
        (
            GenerateRequest {
                prompt: Prompt::Chat(vec![nimmer_tiers::tokenizer::Message::new("wizard", "hi")]),
                params: SamplingParams::greedy(4),
                lora: None,
                deadline: None,
                share: Default::default(),
            },
            "messages",
        ),
    ];
    for (req, field) in cases {
        match h.generate(req) {
            Err(TierError::InvalidRequest { field: f, .. }) => assert_eq!(f, field),
            Err(other) => panic!("{field}: unexpected error {other}"),
            Ok(_) => panic!("{field}: accepted"),
        }
    }
    // The engine keeps serving.
    let out = nimmer_e2e::run(
        h,
        chat(
            "You are a helpful assistant.",
            "Hi!",
            SamplingParams::greedy(4),
        ),
    );
    assert!(!out.tokens.is_empty());
}

#[test]
fn a_broken_config_file_names_file_key_and_rule() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tiers.toml"),
        nimmer_config::DEFAULT_TIERS_TOML.replacen("max_batch = 32", "max_batch = 0", 1),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("classifiers.toml"),
        nimmer_config::DEFAULT_CLASSIFIERS_TOML,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("budgets.toml"),
        nimmer_config::DEFAULT_BUDGETS_TOML,
    )
    .unwrap();
    let e = Config::load(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("tiers.toml")
            && e.contains("tiers.driver.max_batch")
            && e.contains("greater than 0"),
        "{e}"
    );
    std::fs::write(dir.path().join("tiers.toml"), "this is = = not toml").unwrap();
    let e = Config::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("tiers.toml"), "{e}");
    std::fs::write(
        dir.path().join("tiers.toml"),
        nimmer_config::DEFAULT_TIERS_TOML,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("budgets.toml"),
        nimmer_config::DEFAULT_BUDGETS_TOML.replacen(
            "queue_timeout_ms = 30000",
            "queue_timeout_ms = 0",
            1,
        ),
    )
    .unwrap();
    let e = Config::load(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("budgets.toml") && e.contains("tiers.driver.queue_timeout_ms"),
        "{e}"
    );
}

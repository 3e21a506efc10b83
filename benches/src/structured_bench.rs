//! Structured-output benchmark: Driver decode tok/s with `c` concurrent sequences, each under a JSON schema
//! (llguidance masks every step) against the same sequences unconstrained, in interleaved rounds on one
//! engine; plus what compiling a schema costs (first compile, cached). Writes a Markdown block into
//! `benches/RESULTS.md` (key `structured-bench`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use nimmer_benches::{machine, pct, write_block};
use nimmer_config::Config;
use nimmer_tiers::fetch::{Verify, ensure_llm};
use nimmer_tiers::tokenizer::Message;
use nimmer_tiers::{
    Event, GenerateRequest, LlmHandle, Prompt, ResponseFormat, SamplingParams, Share,
};

#[derive(Parser)]
#[command(
    about = "Driver tok/s with a JSON schema on every request against without; records RESULTS.md"
)]
struct Args {
    /// Concurrent sequences per round.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Rounds; each runs both modes (alternating which goes first).
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Most tokens per sequence (unconstrained sequences run exactly this many; enough for every
    /// constrained answer to end).
    #[arg(long, default_value_t = 96)]
    gen_tokens: usize,
    /// Decode tok/s is measured over each sequence's first this many tokens in both modes (the same
    /// positions: constrained answers end earlier, and later positions decode over longer KV).
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Write the block into this file.
    #[arg(long)]
    write: Option<std::path::PathBuf>,
}

/// What an NPC brain asks for.
fn schema() -> ResponseFormat {
    ResponseFormat::JsonSchema {
        schema: serde_json::json!({
            "type": "object",
            "properties": {
                "line": { "type": "string", "maxLength": 120 },
                "emotion": { "enum": ["calm", "angry", "afraid", "glad", "sad"] },
                "action": { "enum": ["none", "wave", "walk_away", "draw_weapon", "point"] }
            },
            "required": ["line", "emotion", "action"],
            "additionalProperties": false
        }),
    }
}

/// One round of one mode: steady-state decode tok/s (every sequence has its first token, none is past the
/// window),
/// tokens generated, and whether every constrained answer parsed.
struct Round {
    tps: f64,
    tokens: usize,
    parsed: usize,
    /// The token ids of the first sequence's answer.
    first: Vec<u32>,
}

fn round(
    h: &LlmHandle,
    c: usize,
    gen_tokens: usize,
    window: usize,
    format: Option<ResponseFormat>,
) -> Result<Round> {
    let users = [
        "A stranger asks you the way to the market.",
        "The guard accuses you of stealing bread.",
        "A child asks why the bells are ringing.",
        "A merchant offers you a bad price for your fish.",
    ];
    let streams: Vec<_> = (0..c)
        .map(|i| {
            h.generate(GenerateRequest {
                prompt: Prompt::Chat(vec![
                    Message::new("system", "You are Mira, a dock worker. Answer as JSON."),
                    Message::new("user", users[i % users.len()]),
                ]),
                params: SamplingParams {
                    ignore_eos: format.is_none(),
                    response_format: format.clone(),
                    ..SamplingParams::greedy(gen_tokens)
                },
                lora: None,
                deadline: None,
                share: Share::zone(&format!("zone-{i}"), "street", 1.0, 0),
            })
        })
        .collect::<Result<_, _>>()?;
    let collectors: Vec<_> = streams
        .into_iter()
        .map(|mut rx| {
            std::thread::spawn(move || {
                let (mut times, mut text, mut ids) = (Vec::new(), String::new(), Vec::new());
                while let Some(ev) = rx.blocking_recv() {
                    match ev {
                        Event::Token { text: t, id, .. } => {
                            times.push(Instant::now());
                            text.push_str(&t);
                            ids.push(id);
                        }
                        Event::Done(_) => break,
                        Event::Error(e) => panic!("{e}"),
                        Event::Expired => panic!("expired without a deadline"),
                    }
                }
                (times, text, ids)
            })
        })
        .collect();
    let runs: Vec<(Vec<Instant>, String, Vec<u32>)> = collectors
        .into_iter()
        .map(|j| j.join().expect("collector"))
        .collect();
    let start = runs.iter().map(|r| r.0[0]).max().expect("tokens");
    // The same positions in both modes (a constrained answer ends early, and later positions decode over
    // longer KV): up to the moment the first sequence has `window` tokens.
    let end = runs
        .iter()
        .map(|r| r.0[window.min(r.0.len()) - 1])
        .min()
        .expect("tokens");
    let decoded = runs
        .iter()
        .flat_map(|r| &r.0)
        .filter(|&&t| t > start && t <= end)
        .count();
    Ok(Round {
        tps: decoded as f64 / end.duration_since(start).as_secs_f64().max(1e-9),
        tokens: runs.iter().map(|r| r.0.len()).sum(),
        parsed: runs
            .iter()
            .filter(|r| serde_json::from_str::<serde_json::Value>(&r.1).is_ok())
            .count(),
        first: runs[0].2.clone(),
    })
}

fn main() -> Result<()> {
    nimmer_benches::init_tracing();
    let args = Args::parse();
    let cfg = Config::embedded();
    let mut spec = cfg.tiers.tiers.driver.clone();
    let mut limits = nimmer_tiers::EngineLimits::of(&cfg.budgets.tiers.driver);
    limits.prefix_cache_bytes = 0;
    let c = args.concurrency;
    spec.max_batch = spec.max_batch.max(c);
    spec.queue = spec.queue.max(c);
    limits.resident = limits.resident.max(c);
    limits.step_rows = limits.step_rows.max(c);
    limits.batch_token_budget = limits.batch_token_budget.max(spec.max_batch);
    let model = ensure_llm(&cfg.tiers, &spec.model, Verify::Cached)?;
    let h = LlmHandle::start("driver", &spec, limits, &model).context("starting the Driver")?;

    let t = Instant::now();
    let grammars = h.grammars()?;
    let trie_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    grammars.compile(&schema())?;
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    for _ in 0..100 {
        grammars.constraint(&schema())?;
    }
    let cached_us = t.elapsed().as_secs_f64() * 1e6 / 100.0;
    eprintln!(
        "token trie {trie_ms:.0} ms, first compile {compile_ms:.1} ms, a constraint from the cache {cached_us:.0} µs"
    );

    let (mut free, mut bound, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut parsed, mut answers, mut bound_tokens) = (0, 0, 0);
    let mut replay = Vec::new();
    for r in 0..args.rounds {
        let one = |constrained: bool| -> Result<Round> {
            let out = round(
                &h,
                c,
                args.gen_tokens,
                args.window,
                constrained.then(schema),
            )?;
            std::thread::sleep(Duration::from_millis(200));
            Ok(out)
        };
        let (a, b) = if r % 2 == 0 {
            let a = one(false)?;
            (a, one(true)?)
        } else {
            let b = one(true)?;
            (one(false)?, b)
        };
        eprintln!(
            "round {r}: without {:.0} tok/s, with a schema {:.0} tok/s ({}/{c} answers parse, {} tokens)",
            a.tps, b.tps, b.parsed, b.tokens
        );
        ratios.push(b.tps / a.tps);
        replay = b.first.clone();
        free.push(a.tps);
        bound.push(b.tps);
        parsed += b.parsed;
        answers += c;
        bound_tokens += b.tokens;
    }
    // What the grammar costs per token: a constrained answer replayed through a fresh constraint (the mask
    // over the Driver's vocabulary, then the token taken), on this thread alone.
    let vocab = h.info().model.vocab;
    let t = Instant::now();
    let mut walk = grammars.constraint(&schema())?;
    let mut logits = vec![0f32; vocab];
    for &id in &replay {
        walk.mask(&mut logits);
        walk.accept(id)?;
    }
    let per_token_us = t.elapsed().as_secs_f64() * 1e6 / replay.len().max(1) as f64;
    eprintln!(
        "mask + accept: {per_token_us:.0} µs per token over {} tokens",
        replay.len()
    );
    let list = |v: &[f64], p: usize| {
        v.iter()
            .map(|x| format!("{x:.p$}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let table = format!(
        "Machine: {}\n\nCommand: `cargo run --release -p nimmer-benches --bin structured-bench -- --concurrency {c} --rounds {} --gen-tokens {} --window {} --write benches/RESULTS.md`\n\n\
| Driver, {c} concurrent, tokens 2-{} of each answer | decode tok/s (median; rounds) |\n|---|---|\n\
| without a response format | {:.0} ({}) |\n\
| every request under the NPC JSON schema | {:.0} ({}) |\n\n\
With the schema against without, median of per-round ratios: **{:.2}×** ({}). Constrained answers that parse as JSON: {parsed}/{answers} \
(mean {:.0} tokens each; unconstrained sequences run {} tokens). Cost of the grammar machinery: the Driver's token trie \
{trie_ms:.0} ms once per tier, the schema's first compile {compile_ms:.1} ms, a sequence's constraint from the cache {cached_us:.0} µs, \
a step's mask and the sampled token taken {per_token_us:.0} µs per sequence (one answer replayed on one thread).",
        machine(),
        args.rounds,
        args.gen_tokens,
        args.window,
        args.window,
        pct(&mut free.clone(), 0.5),
        list(&free, 0),
        pct(&mut bound.clone(), 0.5),
        list(&bound, 0),
        pct(&mut ratios.clone(), 0.5),
        list(&ratios, 2),
        bound_tokens as f64 / answers as f64,
        args.gen_tokens,
    );
    println!("{table}");
    if let Some(path) = &args.write {
        write_block(path, "structured-bench", &table)?;
    }
    Ok(())
}

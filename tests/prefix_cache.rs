//! The engine's prefix KV cache on the real Driver: every reply with the cache is token for token the reply
//! of an engine without it (a cached persona, a continued conversation, a blend of adapters), an adapter
//! replaced under the same name never reuses its old KV, the cache stays within its budget, and a request
//! cancelled mid-prefill leaves the blocks it shared intact.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use nimmer_e2e::{Output, collect, config, driver_gguf};
use nimmer_loras::{Adapter, Blend, load_peft};
use nimmer_tiers::tokenizer::Message;
use nimmer_tiers::{
    BLOCK_TOKENS, EngineLimits, GenerateRequest, LlmHandle, Prompt, SamplingParams,
};

const PERSONA: &str = "You are Marta Vell, the harbour-master of Lowgate, a fishing district on the cold \
northern edge of the city. You are fifty-three years old, broad-shouldered, and you have kept the harbour \
logbook for twenty-two years without missing a single tide. You speak in short, practical sentences and \
you distrust anyone who talks too long without saying anything. You know every boat in the harbour by the \
sound of its engine, and you know which captains pay their mooring fees and which ones hide from you \
behind the ice-house. Your late husband, Orrin, was lost in the storm of the Grey Winter, and you never \
speak of him to strangers. You keep a kettle on the stove in the harbour office at all times and you offer \
tea to anyone who comes in out of the rain, even people you dislike. You are proud of the new sea wall, \
which you fought the city council for six years to build. You think the council are soft, southern \
clerks who have never seen a wave taller than a house. Lately, smugglers have been using the old eastern \
pier at night, and you suspect that someone on the council is protecting them. You will not say this \
openly unless you trust the person you are talking to. When someone asks about the weather, you answer \
with the tide table and a warning. When someone is rude, you go quiet and look at the sea. You never lie, \
but you do not always say everything you know. Stay in character and answer in one or two sentences.";

fn engine(prefix_cache_bytes: usize, batch_token_budget: usize) -> LlmHandle {
    let c = config();
    let mut limits = EngineLimits::of(&c.budgets.tiers.driver);
    limits.prefix_cache_bytes = prefix_cache_bytes;
    limits.batch_token_budget = batch_token_budget;
    LlmHandle::start("driver", &c.tiers.tiers.driver, limits, &driver_gguf())
        .expect("driver starts")
}

/// An engine without a prefix cache: the reference every cached reply must equal.
fn uncached() -> &'static LlmHandle {
    static E: OnceLock<LlmHandle> = OnceLock::new();
    E.get_or_init(|| engine(0, 256))
}

fn request(messages: &[(&str, &str)], lora: Option<Arc<Blend>>, n: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: Prompt::Chat(messages.iter().map(|(r, c)| Message::new(r, c)).collect()),
        params: SamplingParams::greedy(n),
        lora,
        deadline: None,
        share: Default::default(),
    }
}

fn run(h: &LlmHandle, req: &GenerateRequest) -> Output {
    collect(h.generate(req.clone()).expect("accepted"))
}

fn adapter(name: &str) -> Adapter {
    let base = uncached().info().model.lora_base();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../loras/adapters");
    load_peft(&dir.join(name), name, &base).expect("shipped adapter")
}

#[test]
fn a_cached_persona_gives_the_tokens_an_uncached_engine_gives() {
    let h = engine(64 << 20, 256);
    let lines = [
        "Good evening. Is the harbour office still open?",
        "Who uses the old eastern pier at night?",
        "Will it rain tomorrow?",
    ];
    let mut persona_tokens = 0;
    for (i, line) in lines.iter().enumerate() {
        let req = request(&[("system", PERSONA), ("user", line)], None, 24);
        let want = run(uncached(), &req);
        let first = run(&h, &req);
        let again = run(&h, &req);
        assert_eq!(first.tokens, want.tokens, "line {i}, first run");
        assert_eq!(again.tokens, want.tokens, "line {i}, cached run");
        let p = first.done.prompt_tokens;
        assert!(p > 300, "the persona is a long prompt ({p} tokens)");
        // The whole prompt was cached by the first run; all but its last block is reused.
        assert_eq!(
            again.done.cached_tokens,
            (p - 1) / BLOCK_TOKENS * BLOCK_TOKENS
        );
        if i == 0 {
            assert_eq!(first.done.cached_tokens, 0);
            persona_tokens = again.done.cached_tokens;
        } else {
            // Another line of the same NPC reuses the persona's blocks.
            assert!(
                first.done.cached_tokens >= persona_tokens - 3 * BLOCK_TOKENS,
                "line {i} reused {} tokens",
                first.done.cached_tokens
            );
        }
    }
    let s = h.prefix_cache();
    assert!(s.hits >= 5 && s.cached_tokens > 0, "{s:?}");
}

#[test]
fn the_next_turn_of_a_conversation_reuses_the_previous_turns() {
    let h = engine(64 << 20, 256);
    let user1 = "I am new in Lowgate. What should I know about the harbour?";
    let turn1 = request(&[("system", PERSONA), ("user", user1)], None, 32);
    let r1 = run(&h, &turn1);
    assert_eq!(r1.tokens, run(uncached(), &turn1).tokens);
    let reply = r1.text.trim().to_string();
    let turn2 = request(
        &[
            ("system", PERSONA),
            ("user", user1),
            ("assistant", &reply),
            ("user", "And who should I stay away from?"),
        ],
        None,
        32,
    );
    let r2 = run(&h, &turn2);
    assert_eq!(r2.tokens, run(uncached(), &turn2).tokens);
    // The first turn's prompt and part of its reply came from the cache.
    let full_blocks_of_turn1 = r1.done.prompt_tokens / BLOCK_TOKENS * BLOCK_TOKENS;
    assert!(
        r2.done.cached_tokens > full_blocks_of_turn1,
        "turn 2 reused {} tokens; turn 1's prompt alone has {full_blocks_of_turn1} in full blocks",
        r2.done.cached_tokens
    );
}

#[test]
fn a_blend_is_cached_by_adapter_content_and_never_reuses_a_replaced_adapters_kv() {
    let h = engine(64 << 20, 256);
    let (terse, sailor) = (Arc::new(adapter("terse")), Arc::new(adapter("sailor")));
    let blend = Arc::new(Blend {
        parts: vec![(terse.clone(), 0.6), (sailor.clone(), 0.8)],
    });
    let msgs = [
        ("system", PERSONA),
        ("user", "What do you think of the council?"),
    ];
    let req = request(&msgs, Some(blend.clone()), 24);
    let want = run(uncached(), &req);
    assert_eq!(run(&h, &req).tokens, want.tokens);
    let again = run(&h, &req);
    assert_eq!(again.tokens, want.tokens);
    assert!(again.done.cached_tokens > 300);
    // The base model and another weighting are other chains.
    let base = run(&h, &request(&msgs, None, 4));
    assert_eq!(
        base.done.cached_tokens, 0,
        "the blend's KV is not the base's"
    );
    let reweighted = Arc::new(Blend {
        parts: vec![(terse.clone(), 0.6), (sailor.clone(), 0.7)],
    });
    let r = run(&h, &request(&msgs, Some(reweighted), 4));
    assert_eq!(r.done.cached_tokens, 0, "weights are part of the key");
    // `sailor` replaced under the same name by other weights: its old KV is never reused.
    let mut replaced = adapter("sailor");
    for layer in &mut replaced.layers {
        for p in layer.iter_mut().flatten() {
            for b in &mut p.b {
                *b *= 1.5;
            }
        }
    }
    assert_eq!(replaced.name, sailor.name);
    let swapped = Arc::new(Blend {
        parts: vec![(terse, 0.6), (Arc::new(replaced), 0.8)],
    });
    let req = request(&msgs, Some(swapped), 24);
    let out = run(&h, &req);
    assert_eq!(out.done.cached_tokens, 0, "same name, other content");
    assert_eq!(out.tokens, run(uncached(), &req).tokens);
}

#[test]
fn the_cache_stays_within_its_budget_and_evicts() {
    let block_bytes = uncached().info().model.kv_bytes_per_token() * BLOCK_TOKENS;
    let budget = 40 * block_bytes;
    let h = engine(budget, 256);
    for i in 0..6 {
        let system = format!("Your badge number is {i}{i}{i}. {PERSONA}");
        let req = request(&[("system", &system), ("user", "Hello there.")], None, 8);
        let out = run(&h, &req);
        let s = h.prefix_cache();
        assert!(
            s.bytes <= budget,
            "after persona {i}: {} > {budget}",
            s.bytes
        );
        assert_eq!(out.tokens, run(uncached(), &req).tokens, "persona {i}");
    }
    let s = h.prefix_cache();
    assert!(
        s.evicted_blocks > 0,
        "six personas do not fit 40 blocks: {s:?}"
    );
    assert!(s.blocks <= 40);
}

#[test]
fn cancelling_mid_prefill_leaves_the_shared_blocks_intact() {
    // 32 tokens a step: the persona takes a dozen steps to prefill.
    let h = engine(64 << 20, 32);
    let req = request(
        &[("system", PERSONA), ("user", "Tell me about the sea wall.")],
        None,
        16,
    );
    let rx = h.generate(req.clone()).expect("accepted");
    let t0 = Instant::now();
    while h.prefix_cache().blocks < 4 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "prefill never shared a block"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(rx);
    let left = h.prefix_cache().blocks;
    assert!(left >= 4);
    let out = run(&h, &req);
    assert!(
        out.done.cached_tokens >= 4 * BLOCK_TOKENS,
        "reused {}",
        out.done.cached_tokens
    );
    assert!(
        out.done.cached_tokens < out.done.prompt_tokens - BLOCK_TOKENS,
        "cancelled before the end"
    );
    assert_eq!(out.tokens, run(uncached(), &req).tokens);
}

fn wait_for(what: &str, check: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !check() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_pinned_persona_survives_eviction_pressure_until_it_is_unpinned() {
    let block_bytes = uncached().info().model.kv_bytes_per_token() * BLOCK_TOKENS;
    let h = engine(30 * block_bytes, 256);
    let persona = Prompt::Chat(vec![Message::new("system", PERSONA)]);
    h.pin(7, persona, None).expect("pin accepted");
    wait_for("the pin", || h.prefix_cache().pinned_blocks > 0);
    let pinned = h.prefix_cache().pinned_blocks;
    assert!(pinned >= 15, "{pinned} blocks pinned");
    let pressure = |h: &LlmHandle| {
        for i in 0..4 {
            let system = format!("Your badge number is {i}{i}{i}. {PERSONA}");
            run(
                h,
                &request(&[("system", &system), ("user", "Hello.")], None, 2),
            );
        }
    };
    pressure(&h);
    let s = h.prefix_cache();
    assert!(s.evicted_blocks > 0, "{s:?}");
    assert_eq!(s.pinned_blocks, pinned);
    assert!(s.bytes <= 30 * block_bytes);
    let line = request(
        &[("system", PERSONA), ("user", "Is the tea still hot?")],
        None,
        16,
    );
    let out = run(&h, &line);
    // Every pinned block inside the system message is reused (the last may hold the pin's own ending).
    assert!(
        out.done.cached_tokens >= (pinned - 1) * BLOCK_TOKENS,
        "reused {} of {pinned} pinned blocks' tokens",
        out.done.cached_tokens
    );
    assert_eq!(out.tokens, run(uncached(), &line).tokens);

    h.unpin(7);
    wait_for("the unpin", || h.prefix_cache().pinned_blocks == 0);
    pressure(&h);
    assert_eq!(
        run(&h, &line).done.cached_tokens,
        0,
        "released: evicted under pressure"
    );
}

#[test]
fn the_candle_decoder_shares_cached_blocks_token_exactly() {
    let candle = |prefix_cache_bytes: usize| {
        let c = config();
        let mut spec = c.tiers.tiers.driver.clone();
        spec.backend = Some(nimmer_config::Backend::Candle);
        let mut limits = EngineLimits::of(&c.budgets.tiers.driver);
        limits.prefix_cache_bytes = prefix_cache_bytes;
        LlmHandle::start("driver", &spec, limits, &driver_gguf()).expect("candle driver starts")
    };
    let (cached, reference) = (candle(64 << 20), candle(0));
    let user1 = "Good evening. Is the harbour office still open?";
    let turn1 = request(&[("system", PERSONA), ("user", user1)], None, 16);
    let want = run(&reference, &turn1);
    assert_eq!(run(&cached, &turn1).tokens, want.tokens, "first run");
    let again = run(&cached, &turn1);
    assert_eq!(again.tokens, want.tokens, "cached run");
    assert!(
        again.done.cached_tokens > 300,
        "reused {}",
        again.done.cached_tokens
    );
    // The next turn reuses the first turn's blocks, shared rows and all.
    let turn2 = request(
        &[
            ("system", PERSONA),
            ("user", user1),
            ("assistant", want.text.trim()),
            ("user", "Where can I get a cup of tea?"),
        ],
        None,
        16,
    );
    let out = run(&cached, &turn2);
    assert!(out.done.cached_tokens > again.done.cached_tokens);
    assert_eq!(out.tokens, run(&reference, &turn2).tokens);
}

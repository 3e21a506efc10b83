//! The persona workload (`city-bench --workload personas`): the city's NPCs with their real prompts
//! (`benches/data/city`: ~100 personas of 300-500 tokens, scenes, player lines). Conversations start with
//! Poisson arrivals; each talks to one NPC in one scene for several turns, every turn sending the whole
//! conversation so far (persona + scene, then the earlier lines and replies). Swept over arrival rates, once
//! with the prefix cache off and once on (a budgets reload between them), or against another
//! OpenAI-compatible server (`--target`, e.g. llama-server). Reports per rate: dialog lines/s, TTFT and slot
//! wait percentiles, prefill tokens saved; and the best lines/s whose TTFT p95 stayed within 1 s.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use nimmer_benches::{machine, pct, write_block};
use nimmer_config::Config;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Args;

/// One NPC of `personas.jsonl`.
#[derive(Debug, Clone, Deserialize)]
pub struct Persona {
    pub id: String,
    pub persona: String,
    #[serde(default)]
    pub voice: std::collections::BTreeMap<String, f32>,
}

/// The city workload's data.
pub struct CityData {
    pub personas: Vec<Persona>,
    pub scenes: Vec<String>,
    pub lines: Vec<String>,
}

impl CityData {
    pub fn load(dir: &Path) -> Result<Self> {
        let read =
            |f: &str| std::fs::read_to_string(dir.join(f)).with_context(|| format!("reading {f}"));
        let personas = read("personas.jsonl")?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<Vec<Persona>, _>>()
            .context("personas.jsonl")?;
        Ok(Self {
            personas,
            scenes: serde_json::from_str(&read("scenes.json")?).context("scenes.json")?,
            lines: serde_json::from_str(&read("lines.json")?).context("lines.json")?,
        })
    }
}

/// What the sweep runs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Conversations per rate.
    pub conversations: usize,
    pub turns: usize,
    /// NPCs the conversations pick from (the first of the file).
    pub npcs: usize,
    /// Conversation arrivals per second.
    pub rates: Vec<f64>,
    pub max_tokens: usize,
    /// Pause between a reply and the player's next line.
    pub think: Duration,
    /// Run each NPC with the trait-LoRAs of its voice (nimmer only).
    pub voices: bool,
    pub seed: u64,
}

/// Where lines go: nimmer's own dialog API, or an OpenAI-compatible server.
#[derive(Debug, Clone)]
pub enum Target {
    Nimmer(String),
    OpenAi(String),
}

/// What the client saw of one line.
#[derive(Debug, Clone, Default)]
struct Line {
    ok: bool,
    ttft_ms: f64,
    slot_wait_ms: f64,
    prompt_tokens: u64,
    cached_tokens: u64,
    reply: String,
}

/// One rate's figures.
#[derive(Debug, Clone)]
pub struct RateResult {
    pub rate: f64,
    pub lines: usize,
    pub failed: usize,
    pub lines_per_s: f64,
    pub ttft: [f64; 3],
    pub slot_wait: [f64; 3],
    pub saved: f64,
    /// TTFT p50 of the lines whose persona came from the cache (at least 256 prompt tokens reused).
    pub ttft_hit_p50: f64,
}

async fn send_line(client: &reqwest::Client, target: &Target, body: Value) -> Line {
    let t0 = Instant::now();
    let mut line = Line {
        ttft_ms: f64::NAN,
        slot_wait_ms: f64::NAN,
        ..Line::default()
    };
    let url = match target {
        Target::Nimmer(b) => format!("{b}/v1/dialog"),
        Target::OpenAi(b) => format!("{b}/v1/chat/completions"),
    };
    let Ok(resp) = client.post(url).json(&body).send().await else {
        return line;
    };
    if !resp.status().is_success() {
        return line;
    }
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let (mut event, mut done) = (String::new(), false);
    while let Some(Ok(chunk)) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(nl) = buf.find('\n') {
            let l = buf[..nl].trim_end_matches('\r').to_string();
            buf.drain(..=nl);
            if let Some(e) = l.strip_prefix("event: ") {
                event = e.to_string();
                continue;
            }
            let Some(data) = l.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
            match target {
                Target::Nimmer(_) => match event.as_str() {
                    "token" if line.ttft_ms.is_nan() => {
                        line.ttft_ms = t0.elapsed().as_secs_f64() * 1e3
                    }
                    "done" => {
                        line.reply = v["text"].as_str().unwrap_or("").to_string();
                        line.prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
                        line.cached_tokens = v["usage"]["cached_tokens"].as_u64().unwrap_or(0);
                        line.slot_wait_ms =
                            v["timings"]["slot_wait_ms"].as_f64().unwrap_or(f64::NAN);
                        done = true;
                    }
                    _ => {}
                },
                Target::OpenAi(_) => {
                    if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
                        if line.ttft_ms.is_nan() && !c.is_empty() {
                            line.ttft_ms = t0.elapsed().as_secs_f64() * 1e3;
                        }
                        line.reply.push_str(c);
                    }
                    // llama-server's last chunk carries `timings` (cache_n: prompt tokens from its cache).
                    if let Some(t) = v.get("timings") {
                        let (n, cached) = (t["prompt_n"].as_u64(), t["cache_n"].as_u64());
                        line.prompt_tokens = n.unwrap_or(0) + cached.unwrap_or(0);
                        line.cached_tokens = cached.unwrap_or(0);
                    }
                    if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                        line.prompt_tokens =
                            u["prompt_tokens"].as_u64().unwrap_or(line.prompt_tokens);
                        if let Some(c) = u["prompt_tokens_details"]["cached_tokens"].as_u64() {
                            line.cached_tokens = c;
                        }
                    }
                }
            }
        }
        if done {
            break;
        }
    }
    line.ok = done && line.ttft_ms.is_finite();
    line
}

fn body(
    target: &Target,
    plan: &Plan,
    npc: &Persona,
    zone: &str,
    k: usize,
    messages: &[Value],
) -> Value {
    match target {
        Target::Nimmer(_) => {
            let mut npc_json = json!({ "id": npc.id });
            if plan.voices && !npc.voice.is_empty() {
                npc_json["traits"] = json!(npc.voice);
            }
            json!({
                "uid": format!("personas{}/{zone}/c/k{k}n{}", nimmer_benches::run_id(), nimmer_benches::next_slot()), "zone": zone, "kind": "dialog", "npc": npc_json,
                "messages": messages, "max_tokens": plan.max_tokens, "stream": true,
                "sampling": { "temperature": 0.0 },
            })
        }
        Target::OpenAi(_) => json!({
            "model": "driver", "messages": messages, "max_tokens": plan.max_tokens, "stream": true,
            "temperature": 0.0, "cache_prompt": true,
        }),
    }
}

/// Runs one conversation: `turns` lines to one NPC in one scene, each with the whole history.
async fn conversation(
    client: reqwest::Client,
    target: Target,
    plan: Plan,
    npc: Persona,
    scene: String,
    lines: Vec<String>,
    id: usize,
) -> Vec<Line> {
    let zone = format!("district-{}", id % 8);
    let mut messages =
        vec![json!({ "role": "system", "content": format!("{}\n\nScene: {scene}", npc.persona) })];
    let mut out = Vec::new();
    for (turn, player) in lines.iter().enumerate() {
        if turn > 0 {
            tokio::time::sleep(plan.think).await;
        }
        messages.push(json!({ "role": "user", "content": player }));
        let line = send_line(
            &client,
            &target,
            body(&target, &plan, &npc, &zone, id * 100 + turn, &messages),
        )
        .await;
        let ok = line.ok;
        messages.push(json!({ "role": "assistant", "content": line.reply.trim() }));
        out.push(line);
        if !ok {
            break;
        }
    }
    out
}

/// One rate: conversations arrive (Poisson) and run; figures over all their lines.
pub async fn run_rate(
    target: &Target,
    data: &CityData,
    plan: &Plan,
    rate: f64,
) -> Result<RateResult> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .pool_max_idle_per_host(256)
        .build()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed ^ rate.to_bits());
    let npcs = plan.npcs.clamp(1, data.personas.len());
    let start = Instant::now();
    let mut next = start;
    let mut tasks = Vec::new();
    for c in 0..plan.conversations {
        tokio::time::sleep_until(next.into()).await;
        let npc = data.personas[rng.random_range(0..npcs)].clone();
        let scene = data.scenes[rng.random_range(0..data.scenes.len())].clone();
        let lines: Vec<String> = (0..plan.turns)
            .map(|_| data.lines[rng.random_range(0..data.lines.len())].clone())
            .collect();
        tasks.push(tokio::spawn(conversation(
            client.clone(),
            target.clone(),
            plan.clone(),
            npc,
            scene,
            lines,
            c,
        )));
        next += Duration::from_secs_f64(-rng.random::<f64>().max(1e-12).ln() / rate);
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    let wall = start.elapsed().as_secs_f64();
    let ok: Vec<&Line> = all.iter().filter(|l| l.ok).collect();
    let p3 = |mut v: Vec<f64>| -> [f64; 3] {
        v.retain(|x| x.is_finite());
        [pct(&mut v, 0.5), pct(&mut v, 0.95), pct(&mut v, 0.99)]
    };
    let mut hits: Vec<f64> = ok
        .iter()
        .filter(|l| l.cached_tokens >= 256)
        .map(|l| l.ttft_ms)
        .collect();
    let prompt: u64 = ok.iter().map(|l| l.prompt_tokens).sum();
    let cached: u64 = ok.iter().map(|l| l.cached_tokens).sum();
    Ok(RateResult {
        rate,
        lines: ok.len(),
        failed: all.len() - ok.len(),
        lines_per_s: ok.len() as f64 / wall,
        ttft: p3(ok.iter().map(|l| l.ttft_ms).collect()),
        slot_wait: p3(ok.iter().map(|l| l.slot_wait_ms).collect()),
        ttft_hit_p50: pct(&mut hits, 0.5),
        saved: if prompt == 0 {
            f64::NAN
        } else {
            cached as f64 / prompt as f64
        },
    })
}

/// The best lines/s among rates whose TTFT p95 stayed within 1 s.
pub fn best_within_1s(rs: &[RateResult]) -> Option<f64> {
    rs.iter()
        .filter(|r| r.ttft[1] <= 1000.0 && r.failed == 0)
        .map(|r| r.lines_per_s)
        .max_by(|a, b| a.total_cmp(b))
}

/// A markdown table of one sweep, headed by `name`.
pub fn table(name: &str, rs: &[RateResult]) -> String {
    let f = |v: f64| {
        if v.is_finite() {
            format!("{v:.0}")
        } else {
            "–".into()
        }
    };
    let mut s = format!(
        "{name}: best lines/s with TTFT p95 ≤ 1 s: **{}**\n\n| conv/s | lines | failed | lines/s | TTFT p50 / p95 / p99 ms | TTFT p50 of persona hits ms | slot wait p50 / p95 / p99 ms | prompt tokens from cache |\n|---|---|---|---|---|---|---|---|\n",
        best_within_1s(rs).map_or("none".into(), |v| format!("{v:.2}"))
    );
    for r in rs {
        s += &format!(
            "| {} | {} | {} | {:.2} | {} / {} / {} | {} | {} / {} / {} | {} |\n",
            r.rate,
            r.lines,
            r.failed,
            r.lines_per_s,
            f(r.ttft[0]),
            f(r.ttft[1]),
            f(r.ttft[2]),
            f(r.ttft_hit_p50),
            f(r.slot_wait[0]),
            f(r.slot_wait[1]),
            f(r.slot_wait[2]),
            if r.saved.is_finite() {
                format!("{:.0}%", r.saved * 100.0)
            } else {
                "–".into()
            }
        );
    }
    s
}

/// The header of a persona run in RESULTS.md.
pub fn header(label: &str, plan: &Plan, data: &CityData, command: &str) -> String {
    format!(
        "#### {label}\n\nMachine: {}. Command: `{command}`. {} conversations per rate, {} turns each (think time {} ms), \
         NPCs drawn from the first {} of {} personas (`benches/data/city`), a scene appended to each persona, \
         replies of at most {} tokens (greedy){}. Each turn sends the whole conversation so far; TTFT is measured \
         by the client over SSE on loopback.\n\n",
        machine(),
        plan.conversations,
        plan.turns,
        plan.think.as_millis(),
        plan.npcs,
        data.personas.len(),
        plan.max_tokens,
        if plan.voices {
            ", each NPC in its trait-LoRA voice"
        } else {
            ""
        },
    )
}

/// `--workload personas`: the sweep against another server (`--target`), or against an in-process nimmer
/// with its prefix cache off, then on (a budgets reload between the two).
pub fn main(args: &Args) -> Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/city");
    let data = CityData::load(&dir)?;
    let plan = Plan {
        conversations: args.conversations,
        turns: args.turns,
        npcs: args.npcs,
        rates: args.rates.clone(),
        max_tokens: args.max_tokens.min(40),
        think: Duration::from_millis(args.think_ms),
        voices: args.voices,
        seed: args.seed,
    };
    let command = format!(
        "cargo run --release -p nimmer-benches --bin city-bench -- --workload personas --label {} --rates {} --conversations {} --turns {} --npcs {}{}{}{} --write benches/RESULTS.md",
        args.label,
        args.rates
            .iter()
            .map(f64::to_string)
            .collect::<Vec<_>>()
            .join(","),
        args.conversations,
        args.turns,
        args.npcs,
        if args.voices { " --voices" } else { "" },
        if args.cache_only { " --cache-only" } else { "" },
        args.target
            .as_ref()
            .map_or(String::new(), |t| format!(" --target {t}")),
    );
    let mut text = header(&args.label, &plan, &data, &command);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let sweep = |target: Target| {
            let (data, plan) = (&data, &plan);
            async move {
                let mut rs = Vec::new();
                for &rate in &plan.rates {
                    let r = run_rate(&target, data, plan, rate).await?;
                    eprintln!("rate {rate}: {r:?}");
                    rs.push(r);
                }
                Ok::<_, anyhow::Error>(rs)
            }
        };
        if let Some(t) = &args.target {
            let rs = sweep(Target::OpenAi(t.trim_end_matches('/').to_string())).await?;
            text += &table(&format!("Server at {t}"), &rs);
            return Ok::<_, anyhow::Error>(());
        }
        let budgets = match &args.config {
            Some(d) => std::fs::read_to_string(d.join("budgets.toml"))?,
            None => nimmer_config::Sources::embedded().budgets,
        };
        let cfg = match &args.config {
            Some(d) => Config::load(d)?,
            None => Config::embedded(),
        };
        let (gw, base, stop_tx, server) = super::serve(cfg).await?;
        let mut off = None;
        if !args.cache_only {
            gw.apply_budgets(&without_prefix_cache(&budgets)?)?;
            let rs = sweep(Target::Nimmer(base.clone())).await?;
            text += &table("nimmer, prefix cache off", &rs);
            text += "\n";
            off = Some(rs);
        }
        gw.apply_budgets(&budgets)?;
        let on = sweep(Target::Nimmer(base.clone())).await?;
        text += &table("nimmer, prefix cache on (default budgets)", &on);
        if let Some(off) = off {
            let best = |r: &[RateResult]| best_within_1s(r);
            let ratio = match (best(&on), best(&off)) {
                (Some(a), Some(b)) => format!("{:.1}x", a / b),
                (Some(_), None) => "cached passes, uncached never does".into(),
                _ => "–".into(),
            };
            text += &format!(
                "\nWith the cache vs without: best lines/s at TTFT p95 ≤ 1 s {ratio}; at {} conv/s, TTFT p50 of the lines whose persona was cached {:.0} ms vs {:.0} ms for all lines uncached ({:.2}x).\n",
                on[0].rate,
                on[0].ttft_hit_p50,
                off[0].ttft[0],
                on[0].ttft_hit_p50 / off[0].ttft[0]
            );
        }
        let _ = stop_tx.send(());
        server.await??;
        Ok(())
    })?;
    println!("{text}");
    if let Some(path) = &args.write {
        write_block(path, &format!("city-bench:{}", args.label), &text)?;
    }
    Ok(())
}

/// `budgets.toml` text with the Driver's prefix cache off.
fn without_prefix_cache(budgets: &str) -> Result<String> {
    let mut t: toml::Table = toml::from_str(budgets)?;
    let driver = t
        .get_mut("tiers")
        .and_then(|v| v.get_mut("driver"))
        .and_then(|v| v.as_table_mut())
        .context("budgets.toml has no [tiers.driver]")?;
    driver.insert("prefix_cache_mib".into(), toml::Value::Integer(0));
    Ok(toml::to_string(&t)?)
}

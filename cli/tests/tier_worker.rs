//! `nimmer tier` as real child processes on a real nats-server: two Driver workers announce themselves (load
//! messages, the NATS service API's `$SRV.PING`); a gateway-side [`NatsLlm`] streams through them; the
//! worker serving a stream is killed with SIGKILL mid-stream and the stream continues on the other, its greedy
//! text token for token the in-process engine's; then the last worker is killed mid-stream and the stream
//! ends with an error within the heartbeat deadline (never a hang), the tier turns unhealthy and new requests
//! are refused at once.

mod support;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use nimmer_config::Config;
use nimmer_gateway::tier::LlmTier;
use nimmer_gateway::tier::remote::client::{NatsLlm, ShapeOf};
use nimmer_gateway::tier::remote::{DEAD_AFTER, LoadMsg, load_subject, service_name};
use nimmer_tiers::fetch::{Verify, ensure_llm};
use nimmer_tiers::tokenizer::Message;
use nimmer_tiers::{EngineLimits, Event, GenerateRequest, LlmHandle, Prompt, SamplingParams};
use support::busy_worker;

const SYSTEM: &str = "You are a fisherman in a busy port city.";

/// The worker process; killed (SIGKILL) on drop if still running.
struct Worker {
    child: Child,
    log: std::path::PathBuf,
}

impl Worker {
    fn start(nats: &str, name: &str, dir: &std::path::Path) -> Self {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_nimmer"))
            .args(["tier", "--tier", "driver", "--nats", nats, "--worker", name])
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("starting nimmer tier");
        Self { child, log }
    }

    fn kill(&mut self) {
        // SIGKILL by pid: no shutdown path runs.
        let _ = Command::new("kill")
            .args(["-9", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn line(user: &str, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: Prompt::Chat(vec![
            Message::new("system", SYSTEM),
            Message::new("user", user),
        ]),
        params: SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(max_tokens)
        },
        lora: None,
        deadline: None,
        share: Default::default(),
    }
}

/// Collects a stream to its end: the token ids and how it ended.
async fn drain(rx: &mut nimmer_gateway::tier::Events, ids: &mut Vec<u32>) -> Option<Event> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(Event::Token { id, .. })) => ids.push(id),
            Ok(other) => return other,
            Err(_) => panic!("the stream hung"),
        }
    }
}

#[test]
fn worker_processes_serve_the_driver_and_a_sigkilled_one_s_streams_move_to_another() {
    let server = nimmer_services::NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::embedded();
    let spec = &cfg.tiers.tiers.driver;
    let model = ensure_llm(&cfg.tiers, &spec.model, Verify::Cached).unwrap();
    let limits = EngineLimits::of(&cfg.budgets.tiers.driver);
    // The same engine in process: the gateway's tokenizer and the reference text.
    let local = LlmHandle::start("driver", spec, limits, &model).unwrap();
    let mut workers: HashMap<String, Worker> = ["w1", "w2"]
        .into_iter()
        .map(|w| (w.to_string(), Worker::start(&server.url, w, dir.path())))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = async_nats::connect(&server.url).await.unwrap();
        let mut loads = client.subscribe(load_subject("driver")).await.unwrap();
        let shape: Arc<dyn LlmTier> = Arc::new(local.clone());
        let llm = NatsLlm::connect(client.clone(), "driver", Arc::new(ShapeOf(shape)), limits)
            .await
            .unwrap();
        // Ready when both load their model and report (probing, not sleeping); the service answers PING.
        let t = Instant::now();
        while llm.live_workers().len() < 2 {
            let logs: Vec<String> = workers
                .values()
                .map(|w| std::fs::read_to_string(&w.log).unwrap_or_default())
                .collect();
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "workers not ready: {logs:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ping = format!("$SRV.PING.{}", service_name("driver"));
        assert!(client.request(ping, "".into()).await.is_ok());

        let user = "Tell me a long story about the sea.";
        let want = {
            let mut rx = local.generate(line(user, 96)).unwrap();
            let mut ids = Vec::new();
            assert!(matches!(
                drain(&mut rx, &mut ids).await,
                Some(Event::Done(_))
            ));
            ids
        };

        // SIGKILL the worker serving a stream: it continues on the other, token for token.
        let mut rx = llm.submit(line(user, 96)).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 8 {
            match rx.recv().await {
                Some(Event::Token { id, .. }) => got.push(id),
                other => panic!("before the kill: {other:?}"),
            }
        }
        let first = busy_worker(&mut loads, &[]).await;
        workers.get_mut(&first).unwrap().kill();
        let at_kill = got.len();
        let end = drain(&mut rx, &mut got).await;
        let Some(Event::Done(done)) = end else {
            panic!("expected the stream to finish on the other worker: {end:?}")
        };
        assert!(at_kill < 96, "the kill hit the sequence in flight");
        assert_eq!(got, want, "greedy text across the migration vs in process");
        assert_eq!(done.completion_tokens, 96);

        // SIGKILL the last worker mid-stream: an error within the heartbeat deadline, never a hang.
        let mut rx = llm.submit(line(user, 400)).await.unwrap();
        let mut ids = Vec::new();
        while ids.len() < 5 {
            match rx.recv().await {
                Some(Event::Token { id, .. }) => ids.push(id),
                other => panic!("before the kill: {other:?}"),
            }
        }
        let last = busy_worker(&mut loads, std::slice::from_ref(&first)).await;
        assert_ne!(last, first);
        workers.get_mut(&last).unwrap().kill();
        let killed = Instant::now();
        let end = drain(&mut rx, &mut ids).await;
        assert!(matches!(end, Some(Event::Error(_))), "{end:?}");
        assert!(ids.len() < 400, "the kill hit the sequence in flight");
        assert!(
            killed.elapsed() < DEAD_AFTER + Duration::from_secs(3),
            "{:?}",
            killed.elapsed()
        );
        let t = Instant::now();
        while llm.health().is_ready() {
            assert!(
                t.elapsed() < DEAD_AFTER + Duration::from_secs(2),
                "still healthy"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // With no worker left, a new request is refused at once.
        assert!(matches!(
            llm.submit(line(user, 4)).await,
            Err(nimmer_tiers::TierError::EngineDown { .. })
        ));
    });
}

/// `body` as another dialog (a repeated UID would be a repeat of one line: it gets the first answer).
fn with_uid(body: &serde_json::Value, uid: &str) -> String {
    let mut b = body.clone();
    b["uid"] = uid.into();
    b.to_string()
}

/// A child process with its own log file; SIGKILLed on drop if still running.
fn child(args: &[&str], log: &std::path::Path, config: &std::path::Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_nimmer"))
        .args(args)
        .env("NIMMER_CONFIG", config)
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .expect("starting nimmer")
}

#[test]
fn a_gateway_process_serves_its_driver_through_a_worker_process_when_tiers_toml_says_via_nats() {
    let server = nimmer_services::NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::create_dir(&config).unwrap();
    let src = nimmer_config::Sources::embedded();
    let tiers = src
        .tiers
        .replacen("[tiers.driver]\n", "[tiers.driver]\nvia = \"nats\"\n", 1);
    assert_ne!(tiers, src.tiers);
    for (name, text) in [
        ("tiers.toml", tiers.as_str()),
        ("budgets.toml", src.budgets.as_str()),
        ("classifiers.toml", src.classifiers.as_str()),
    ] {
        std::fs::write(config.join(name), text).unwrap();
    }
    let url = server.url.as_str();
    let mut worker = child(
        &["tier", "--tier", "driver", "--nats", url, "--worker", "w1"],
        &dir.path().join("worker.log"),
        &config,
    );
    let mut gateway = child(
        &[
            "serve",
            "--nats",
            url,
            "--listen",
            "127.0.0.1:0",
            "--spool",
            dir.path().join("spool").to_str().unwrap(),
        ],
        &dir.path().join("gateway.log"),
        &config,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let logs = || {
        ["worker.log", "gateway.log"]
            .map(|f| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default())
    };
    rt.block_on(async {
        let client = async_nats::connect(url).await.unwrap();
        let body = serde_json::json!({
            "uid": "ev1/docks/quay/s1",
            "messages": [{ "role": "system", "content": SYSTEM }, { "role": "user", "content": "What did you catch today?" }],
            "max_tokens": 8,
        });
        // Ready when the gateway answers on its NATS front and the worker has reported (probing).
        let t = Instant::now();
        let reply = loop {
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                client.request("nimmerverse.gateway.dialog.docks-1", body.to_string().into()),
            )
            .await;
            if let Ok(Ok(m)) = r {
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                if v.get("text").is_some() {
                    break v;
                }
            }
            assert!(t.elapsed() < Duration::from_secs(300), "not ready: {:?}", logs());
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(reply["tier"], "driver", "{reply}");
        assert_eq!(reply["usage"]["completion_tokens"], 8, "{reply}");
        // The worker follows budgets.toml as a gateway does: its engine's KV budget changes with an edit.
        let mut loads = client.subscribe(load_subject("driver")).await.unwrap();
        let budgets = std::fs::read_to_string(config.join("budgets.toml")).unwrap();
        assert!(budgets.contains("kv_memory_mib = 1024"));
        let budgets = budgets.replacen("kv_memory_mib = 1024", "kv_memory_mib = 512", 1);
        std::fs::write(config.join("budgets.toml"), budgets).unwrap();
        let t = Instant::now();
        loop {
            // (the engine reports its limits after a step)
            let _ = client
                .request("nimmerverse.gateway.dialog.docks-1", with_uid(&body, &format!("ev1/docks/quay/b{}", t.elapsed().as_nanos())).into())
                .await;
            let m = tokio::time::timeout(Duration::from_secs(5), loads.next())
                .await
                .expect("load messages")
                .unwrap();
            let l: LoadMsg = serde_json::from_slice(&m.payload).unwrap();
            if l.engine.is_some_and(|e| e.kv_budget_bytes == 512 << 20) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "budget not applied: {:?}", logs());
        }
        // The worker ran it: with the worker gone, the gateway's Driver is down (a clear error, no hang).
        let _ = Command::new("kill")
            .args(["-9", &worker.id().to_string()])
            .status();
        let _ = worker.wait();
        let m = tokio::time::timeout(
            Duration::from_secs(10),
            client.request("nimmerverse.gateway.dialog.docks-1", with_uid(&body, "ev1/docks/quay/s2").into()),
        )
        .await
        .expect("an answer, not a hang")
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["status"], 503, "{v}");
    });
    let _ = gateway.kill();
    let _ = gateway.wait();
}

//! `nimmer tier` as a real child process on a real nats-server: it announces itself through the NATS
//! service API (`$SRV.PING`), a gateway-side [`NatsLlm`] streams the Driver's greedy text through it token
//! for token as the same engine in process does, and when the worker is killed with SIGKILL mid-stream the
//! stream ends with an error within the heartbeat deadline (never a hang) and the tier turns unhealthy.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nimmer_config::Config;
use nimmer_gateway::tier::LlmTier;
use nimmer_gateway::tier::remote::client::{NatsLlm, ShapeOf};
use nimmer_gateway::tier::remote::{DEAD_AFTER, service_name};
use nimmer_tiers::fetch::{Verify, ensure_llm};
use nimmer_tiers::tokenizer::Message;
use nimmer_tiers::{EngineLimits, Event, GenerateRequest, LlmHandle, Prompt, SamplingParams};

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

#[test]
fn a_worker_process_serves_the_driver_and_its_sigkill_ends_streams_with_an_error() {
    let server = nimmer_services::NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::embedded();
    let spec = &cfg.tiers.tiers.driver;
    let model = ensure_llm(&cfg.tiers, &spec.model, Verify::Cached).unwrap();
    let limits = EngineLimits::of(&cfg.budgets.tiers.driver);
    // The same engine in process: the gateway's tokenizer and the reference text.
    let local = LlmHandle::start("driver", spec, limits, &model).unwrap();
    let mut worker = Worker::start(&server.url, "w1", dir.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = async_nats::connect(&server.url).await.unwrap();
        // Ready when the service answers its PING (the model loads first).
        let ping = format!("$SRV.PING.{}", service_name("driver"));
        let t = Instant::now();
        loop {
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                client.request(ping.clone(), "".into()),
            )
            .await;
            if matches!(r, Ok(Ok(_))) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "worker never answered; log: {}",
                std::fs::read_to_string(&worker.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let shape: Arc<dyn LlmTier> = Arc::new(local.clone());
        let llm = NatsLlm::connect(client, "driver", Arc::new(ShapeOf(shape)), limits)
            .await
            .unwrap();

        // Token for token what the engine gives in process.
        let user = "What did you catch today?";
        let want = {
            let mut rx = local.generate(line(user, 24)).unwrap();
            let mut ids = Vec::new();
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Token { id, .. } => ids.push(id),
                    Event::Done(_) => break,
                    other => panic!("{other:?}"),
                }
            }
            ids
        };
        let mut rx = llm.submit(line(user, 24)).await.unwrap();
        let mut got = Vec::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Token { id, .. } => got.push(id),
                Event::Done(c) => {
                    assert_eq!(c.completion_tokens, 24);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, want, "through the worker vs in process");

        // SIGKILL mid-stream: the stream ends with an error, not a hang.
        let mut rx = llm
            .submit(line("Tell me a long story about the sea.", 400))
            .await
            .unwrap();
        let mut tokens = 0;
        while tokens < 5 {
            match rx.recv().await {
                Some(Event::Token { .. }) => tokens += 1,
                other => panic!("before the kill: {other:?}"),
            }
        }
        worker.kill();
        let killed = Instant::now();
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                Ok(Some(Event::Token { .. })) => tokens += 1,
                Ok(other) => break other,
                Err(_) => panic!("the stream hung after the worker was killed"),
            }
        };
        assert!(matches!(end, Some(Event::Error(_))), "{end:?}");
        assert!(
            tokens < 400,
            "the kill hit the sequence in flight ({tokens} tokens)"
        );
        assert!(
            killed.elapsed() < DEAD_AFTER + Duration::from_secs(2),
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

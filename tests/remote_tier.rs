//! A tier served by a NATS tier worker (`nimmer_gateway::tier::remote`) against a real nats-server, on the
//! scripted fake engine (fast): tokens stream through the worker with the request's zone share, tier errors
//! cross the wire with their meaning, a dropped stream cancels the sequence on the worker, and a tier with no
//! worker is a clear "down"; requests go to the least loaded worker, those with trait-LoRAs to a worker holding
//! their adapters (refused when its adapter's content differs), and pins reach every worker; Saturn classifies
//! through its worker and is down without one. The real engine in a separate process, killed with SIGKILL, is in
//! `cli/tests/tier_worker.rs`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nimmer_gateway::tier::fake::{FakeLlmTier, Fakes};
use nimmer_gateway::tier::remote::client::{NatsLlm, ShapeOf};
use nimmer_gateway::tier::remote::saturn::{NatsSaturn, serve as serve_saturn};
use nimmer_gateway::tier::remote::worker;
use nimmer_gateway::tier::{ClassifierTier, LlmTier};
use nimmer_loras::{Adapter, Blend, LoraPair, Module, Registry};
use nimmer_tiers::{Event, GenerateRequest, Prompt, SamplingParams, Share, TierError};

fn request(zone: &str) -> GenerateRequest {
    GenerateRequest {
        prompt: Prompt::Tokens(vec![1, 2, 3]),
        params: SamplingParams::greedy(8),
        lora: None,
        deadline: None,
        share: Share::zone(zone, "plaza", 2.0, 1),
    }
}

async fn until(what: &str, check: impl Fn() -> bool) {
    for _ in 0..1000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

/// A worker serving the fake Driver, and a client tier that reaches it.
async fn remote(server: &nimmer_e2e::NatsServer, fakes: &Fakes) -> Arc<NatsLlm> {
    let fake: Arc<dyn LlmTier> = Arc::new(FakeLlmTier(fakes.driver.clone()));
    let wc = async_nats::connect(&server.url).await.unwrap();
    let served = fake.clone();
    let w = worker::Worker {
        tier: "driver".into(),
        name: "w1".into(),
        model: "fake".into(),
        llm: served,
        loras: None,
    };
    tokio::spawn(async move { worker::serve(wc, w, std::future::pending()).await });
    let client = async_nats::connect(&server.url).await.unwrap();
    let limits = fake.limits();
    let llm = NatsLlm::connect(client, "driver", Arc::new(ShapeOf(fake)), limits)
        .await
        .unwrap();
    let l = llm.clone();
    until("the worker reports its load", move || l.health().is_ready()).await;
    llm
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_stream_through_a_worker_with_the_zone_s_share() {
    let server = nimmer_e2e::NatsServer::start();
    let fakes = Fakes::new(3, Duration::from_millis(5));
    let llm = remote(&server, &fakes).await;
    assert_eq!(llm.live_workers(), ["w1"]);
    assert_eq!(LlmTier::workers(&*llm), ["w1"], "as the console shows them");
    let mut rx = llm.submit(request("plaza-3")).await.unwrap();
    let mut text = String::new();
    let done = loop {
        match rx.recv().await.expect("stream open") {
            Event::Token { text: t, .. } => text.push_str(&t),
            Event::Done(c) => break c,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(text, "w0 w1 w2 ");
    assert_eq!((done.prompt_tokens, done.completion_tokens), (3, 3));
    let share = fakes.driver.shares.lock().unwrap()[0].clone();
    assert_eq!(
        (&*share.zone, &*share.class, share.weight, share.priority),
        ("plaza-3", "plaza", 2.0, 1)
    );
    // The worker's engine books (3 prompt + 3 generated tokens) reach the gateway's views (every few load
    // messages).
    let l = llm.clone();
    until("the zone's service is reported", move || {
        l.zone_service()
            .iter()
            .any(|z| z.zone == "plaza-3" && z.tokens_served == 6)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_cancels_on_the_worker_and_errors_keep_their_meaning() {
    let server = nimmer_e2e::NatsServer::start();
    let fakes = Fakes::new(3, Duration::ZERO);
    let llm = remote(&server, &fakes).await;
    fakes.driver.hold();
    let rx = llm.submit(request("a")).await.unwrap();
    let f = fakes.driver.clone();
    until("the worker's engine runs it", move || {
        f.running.load(Ordering::SeqCst) == 1
    })
    .await;
    drop(rx);
    let f = fakes.driver.clone();
    until("the worker cancelled it", move || {
        f.cancelled.load(Ordering::SeqCst) == 1
    })
    .await;
    fakes.driver.kill();
    match llm.submit(request("a")).await {
        Err(TierError::EngineDown { tier }) => assert_eq!(tier, "driver"),
        other => panic!("expected EngineDown, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_without_workers_is_down_at_once() {
    let server = nimmer_e2e::NatsServer::start();
    let fakes = Fakes::new(3, Duration::ZERO);
    let client = async_nats::connect(&server.url).await.unwrap();
    let shape: Arc<dyn LlmTier> = Arc::new(FakeLlmTier(fakes.driver.clone()));
    let limits = shape.limits();
    let llm = NatsLlm::connect(client, "driver", Arc::new(ShapeOf(shape)), limits)
        .await
        .unwrap();
    assert!(!llm.health().is_ready());
    let t = std::time::Instant::now();
    assert!(matches!(
        llm.submit(request("a")).await,
        Err(TierError::EngineDown { .. })
    ));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "no hang: {:?}",
        t.elapsed()
    );
}

/// Writes adapter `name` for the fake tier's shape into `dir` (values from `seed`); returns the registry
/// that reads the directory.
fn write_adapter(dir: &std::path::Path, name: &str, seed: f32) -> Arc<Registry> {
    let base = FakeLlmTier(Fakes::new(1, Duration::ZERO).driver).lora_base();
    let modules = [Module::Q, Module::V];
    let layers = (0..base.n_layer)
        .map(|_| {
            modules
                .iter()
                .map(|m| {
                    let (i, o) = m.dims(&base);
                    Some(LoraPair {
                        a: (0..4 * i).map(|k| seed + k as f32 * 1e-3).collect(),
                        b: (0..o * 4).map(|k| seed - k as f32 * 1e-3).collect(),
                    })
                })
                .collect()
        })
        .collect();
    let a = Adapter {
        name: String::new(),
        rank: 4,
        alpha: 4.0,
        scale: 1.0,
        modules: modules.to_vec(),
        layers,
        size_bytes: 0,
        digest: Default::default(),
    };
    nimmer_loras::peft::save_peft(&a, &base, &dir.join(name)).unwrap();
    let reg = Arc::new(Registry::new(base, 64 << 20));
    assert!(reg.scan(dir).is_empty());
    reg
}

fn with_lora(zone: &str, reg: &Registry, name: &str) -> GenerateRequest {
    let adapter = reg.get(name).unwrap().expect("adapter loaded");
    GenerateRequest {
        lora: Some(Arc::new(Blend {
            parts: vec![(adapter, 1.0)],
        })),
        ..request(zone)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_to_the_least_loaded_worker_and_to_the_one_holding_their_adapters() {
    let server = nimmer_e2e::NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let held = write_adapter(dir.path(), "sailor", 0.01);
    let (f1, f2) = (Fakes::new(3, Duration::ZERO), Fakes::new(3, Duration::ZERO));
    // w1 holds the adapter; w2 has none.
    for (name, fakes, loras) in [("w1", &f2, Some(held.clone())), ("w2", &f1, None)] {
        let w = worker::Worker {
            tier: "driver".into(),
            name: name.into(),
            model: "fake".into(),
            llm: Arc::new(FakeLlmTier(fakes.driver.clone())),
            loras,
        };
        let wc = async_nats::connect(&server.url).await.unwrap();
        tokio::spawn(async move { worker::serve(wc, w, std::future::pending()).await });
    }
    let client = async_nats::connect(&server.url).await.unwrap();
    let shape: Arc<dyn LlmTier> = Arc::new(FakeLlmTier(f1.driver.clone()));
    let limits = shape.limits();
    let llm = NatsLlm::connect(client, "driver", Arc::new(ShapeOf(shape)), limits)
        .await
        .unwrap();
    let l = llm.clone();
    until("both workers report, w1 with its adapter", move || {
        let loads = l.worker_loads();
        loads.len() == 2 && !loads[0].adapters.is_empty()
    })
    .await;
    assert_eq!(llm.worker_loads()[0].adapters[0].0, "sailor");
    // (`f2` is w1's engine, `f1` w2's.) Held sequences keep their load: three with the adapter all go to w1,
    // which holds it...
    f1.driver.hold();
    f2.driver.hold();
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(
            llm.submit(with_lora("docks-1", &held, "sailor"))
                .await
                .unwrap(),
        );
    }
    assert_eq!((f1.driver.submitted(), f2.driver.submitted()), (0, 3));
    // ...and the next plain ones to w2, the least loaded.
    for _ in 0..2 {
        streams.push(llm.submit(request("docks-1")).await.unwrap());
    }
    assert_eq!((f1.driver.submitted(), f2.driver.submitted()), (2, 3));
    f1.driver.release();
    f2.driver.release();
    for mut rx in streams {
        while let Some(e) = rx.recv().await {
            assert!(!matches!(e, Event::Error(_)), "{e:?}");
        }
    }
    // Once both report idle, an adapter no worker holds goes to the first by name, w1; as its content
    // differs from w1's `sailor`, it is refused, naming `traits`.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let other = tempfile::tempdir().unwrap();
    let changed = write_adapter(other.path(), "sailor", 0.02);
    match llm.submit(with_lora("docks-1", &changed, "sailor")).await {
        Err(TierError::InvalidRequest { field, message }) => {
            assert_eq!(field, "traits");
            assert!(
                message.contains("w1's adapter `sailor` differs"),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    // Pins reach every worker; unpins release them everywhere.
    llm.pin(7, Prompt::Tokens(vec![1, 2, 3, 4]), None).unwrap();
    let (p1, p2) = (f1.driver.clone(), f2.driver.clone());
    until("both workers pinned", move || {
        p1.pins.lock().unwrap().len() == 1 && p2.pins.lock().unwrap().len() == 1
    })
    .await;
    // A worker that starts after the pin gets it too.
    let f3 = Fakes::new(3, Duration::ZERO);
    let w = worker::Worker {
        tier: "driver".into(),
        name: "w3".into(),
        model: "fake".into(),
        llm: Arc::new(FakeLlmTier(f3.driver.clone())),
        loras: None,
    };
    let wc = async_nats::connect(&server.url).await.unwrap();
    tokio::spawn(async move { worker::serve(wc, w, std::future::pending()).await });
    let p3 = f3.driver.clone();
    until("the late worker pinned", move || {
        p3.pins.lock().unwrap().len() == 1
    })
    .await;
    llm.unpin(7);
    let (p1, p2, p3) = (f1.driver.clone(), f2.driver.clone(), f3.driver.clone());
    until("every worker unpinned", move || {
        [&p1, &p2, &p3]
            .iter()
            .all(|p| p.pins.lock().unwrap().is_empty())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturn_classifies_and_embeds_through_a_worker_and_is_down_without_one() {
    let server = nimmer_e2e::NatsServer::start();
    let fakes = Fakes::new(1, Duration::ZERO);
    let wc = async_nats::connect(&server.url).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(serve_saturn(
        wc,
        "s1",
        "fake",
        fakes.saturn.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    let client = async_nats::connect(&server.url).await.unwrap();
    let saturn = NatsSaturn::connect(client).await.unwrap();
    let s = saturn.clone();
    until("the Saturn worker reports", move || s.health().is_ready()).await;
    assert_eq!(saturn.live_workers(), ["s1"]);
    assert_eq!(ClassifierTier::workers(&*saturn), ["s1"]);
    let out = saturn
        .classify("mood", vec!["calm seas".into(), "a storm".into()])
        .await
        .unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[1].label, "calm");
    let texts = vec!["calm seas".to_string(), "a storm at dusk".to_string()];
    let embs = saturn.embed(texts.clone()).await.unwrap();
    assert_eq!(
        embs,
        fakes.saturn.embed(texts).await.unwrap(),
        "the worker's vectors"
    );
    assert_eq!(embs[1].tokens, 4);
    let _ = stop.send(());
    worker.await.unwrap().unwrap();
    let t = std::time::Instant::now();
    assert!(matches!(
        saturn.classify("mood", vec!["x".into()]).await,
        Err(TierError::EngineDown { .. })
    ));
    assert!(t.elapsed() < Duration::from_secs(5), "no hang");
    let s = saturn.clone();
    until("Saturn is down", move || !s.health().is_ready()).await;
}

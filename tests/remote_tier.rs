//! A tier served by a NATS tier worker (`nimmer_gateway::tier::remote`) against a real nats-server, on the
//! scripted fake engine (fast): tokens stream through the worker with the request's zone share, tier errors
//! cross the wire with their meaning, a dropped stream cancels the sequence on the worker, and a tier with no
//! worker is a clear "down". The real engine in a separate process, killed with SIGKILL, is in
//! `cli/tests/tier_worker.rs`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nimmer_gateway::tier::LlmTier;
use nimmer_gateway::tier::fake::{FakeLlmTier, Fakes};
use nimmer_gateway::tier::remote::client::{NatsLlm, ShapeOf};
use nimmer_gateway::tier::remote::worker;
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
    tokio::spawn(
        async move { worker::serve(wc, "driver", "w1", served, std::future::pending()).await },
    );
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

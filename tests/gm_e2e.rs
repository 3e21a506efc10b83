//! A director against the real stack: the gateway (real Driver and Saturn) over NATS, JetStream RESULTS, a
//! compositor and PostgreSQL. It walks the market quarrel (overseer gates, a ternary-gate branch) to the end,
//! and canon holds exactly the lines its gates accepted, one row per slot.

use std::time::Duration;

use nimmer_config::{Config, EventCatalog};
use nimmer_gm::director::{self, Finished};
use nimmer_gm::{NatsServices, Progress, Register, Services};
use nimmer_wire::dialog::Uid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_director_walks_an_event_through_the_real_gateway_into_canon() {
    let nats = nimmer_e2e::NatsServer::start();
    let pg = nimmer_services::Postgres::start();
    // The repository's config: its adapters back the templates' traits.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("config");
    let config = Config::load(&dir).unwrap();
    let _base = nimmer_e2e::start_gateway_with(
        config.clone(),
        nimmer_gateway::Options {
            nats: Some(nats.url.clone()),
            config_dir: Some(dir.clone()),
            ..Default::default()
        },
    );
    let client = async_nats::connect(&nats.url).await.unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let compositor = tokio::spawn({
        let (t, url, client) = (
            nimmer_config::TransportFile::embedded(),
            pg.url.clone(),
            client.clone(),
        );
        async move {
            nimmer_compositor::serve(t, &url, client, async {
                let _ = rx.await;
            })
            .await
        }
    });
    let svc = NatsServices::new(client.clone(), Duration::from_secs(120));
    // The gateway subscribes once its models are loaded: probe until a classification is answered.
    let probe = Uid {
        gm_event: "probe".into(),
        district: "market".into(),
        scene: "p".into(),
        slot: "p".into(),
    };
    let mut ready = false;
    for i in 0..300 {
        let key = format!("probe-{i}");
        if svc
            .classify(&probe, "market", &key, "audit-overseer", "Fresh bread!")
            .await
            .is_ok()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ready, "the gateway answered over NATS");

    let pool = nimmer_compositor::connect(&pg.url, 2).await.unwrap();
    let tm = nimmer_gm::Templates {
        catalog: EventCatalog::load(&dir.join("events"), &config).unwrap(),
        map: nimmer_config::GmFile::load(&dir).unwrap(),
    };
    let t = tm.template("market-quarrel").unwrap().clone();
    let reg = Register::new(pool.clone(), "market", "gm-e2e", Duration::from_secs(30));
    let values = [("player".to_string(), "p9".to_string())].into();
    let lease = reg
        .open("ev-gm1", &t.name, "market", &values, &Progress::open(&t))
        .await
        .unwrap()
        .unwrap();
    let end = tokio::time::timeout(
        Duration::from_secs(300),
        director::run(&svc, &reg, &tm, lease),
    )
    .await
    .expect("the event completes within 5 minutes")
    .unwrap();
    let Finished::Completed(progress) = end else {
        panic!("{end:?}")
    };
    // The quarrel ran, then at most one ending (a branch label of "0" ends it there).
    assert!(progress.scenes.contains_key("quarrel") && progress.scenes.len() <= 2);
    let rows: Vec<(String, String, Vec<String>)> = sqlx::query_as(
        "SELECT slot, text, participants FROM canon WHERE gm_event = 'ev-gm1' ORDER BY slot",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let canon: Vec<(String, String)> = rows.iter().map(|r| (r.0.clone(), r.1.clone())).collect();
    let accepted: Vec<(String, String)> = progress.lines.clone().into_iter().collect();
    assert_eq!(
        canon, accepted,
        "canon holds exactly the accepted lines, one row per slot"
    );
    assert!(rows.iter().all(|r| r.2 == ["p9"]), "{rows:?}");
    let status: String = sqlx::query_scalar("SELECT status FROM events WHERE gm_event = 'ev-gm1'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(status, "completed");
    assert_eq!(reg.open_events().await.unwrap(), 0);
    let _ = stop.send(());
    compositor.await.unwrap().unwrap();
}

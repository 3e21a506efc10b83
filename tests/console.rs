//! The ops console (`/ui`) in a real browser: headless Chromium over the DevTools protocol against a gateway
//! with the real models, behind an ops token. The page loads and shows the tiers, a zone that a dialog
//! request activated appears in its zones table, and a budget edit made in the page's editor applies (the
//! version goes from 1 to 2, `/v1/config` shows the new value, `budgets.toml` on disk holds it) while an
//! invalid edit is refused with its key named in the page and changes nothing. A screenshot of the page is
//! kept at `target/test-artifacts/ops-console.png`.

use std::path::Path;
use std::time::Duration;

use nimmer_e2e::browser::Browser;
use serde_json::{Value, json};

const TOKEN: &str = "ops-secret";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// An ops route, with the token.
fn ops_get(base: &str, path: &str) -> Value {
    rt().block_on(async {
        let r = nimmer_e2e::http::client()
            .get(format!("{base}{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200, "{path}");
        r.json().await.expect("json")
    })
}

#[test]
fn the_console_shows_a_live_zone_and_applies_a_budget_edit_made_in_the_page() {
    let (dir, config) = nimmer_e2e::config_dir();
    let base = nimmer_e2e::start_gateway_with(
        config,
        nimmer_gateway::Options {
            config_dir: Some(dir.path().to_path_buf()),
            auth: nimmer_gateway::http::Auth {
                npc: Vec::new(),
                ops: vec![TOKEN.into()],
            },
            ..Default::default()
        },
    );
    // The data is behind the token; the page shell is not (it holds none).
    let status = rt().block_on(async {
        nimmer_e2e::http::client()
            .get(format!("{base}/v1/status"))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 401);

    // A dialog activates its zone.
    let (status, v) = rt().block_on(nimmer_e2e::http::post(
        &base,
        "/v1/dialog",
        &json!({
            "uid": "ev1/harbour/pier/console1", "zone": "plaza-console-7", "kind": "dialog",
            "messages": [{ "role": "system", "content": "You are a harbour guard." }, { "role": "user", "content": "Good morning." }],
            "max_tokens": 4,
        }),
    ));
    assert_eq!(status, 200, "{v}");

    let mut browser = Browser::launch();
    let page = browser.open(&format!("{base}/ui?token={TOKEN}"));
    browser.wait_for(
        &page,
        "document.body.dataset.loaded === '1'",
        "the page loads its data",
        Duration::from_secs(20),
    );
    let tiers = browser.eval(
        &page,
        "[...document.querySelectorAll('#tiers .tier')].map(t => t.dataset.tier)",
    );
    assert_eq!(tiers, json!(["driver", "theia", "saturn"]));
    let row = browser.wait_for(
        &page,
        "(document.querySelector('#zones tr[data-zone=\"plaza-console-7\"]') || {}).innerText",
        "the zone the dialog activated is listed",
        Duration::from_secs(10),
    );
    let row = row.as_str().unwrap().to_string();
    assert!(row.contains("plaza"), "its class: {row}");
    assert_eq!(
        browser.eval(&page, "document.getElementById('version').textContent"),
        "1"
    );

    // An invalid edit: refused, its key named in the page; nothing changes.
    browser.wait_for(
        &page,
        "document.getElementById('budgets-text').value.includes('[classes.plaza]')",
        "the editor holds budgets.toml",
        Duration::from_secs(10),
    );
    let edit = |from: &str, to: &str| {
        format!(
            "(() => {{ const t = document.getElementById('budgets-text'); t.value = t.value.replace({from:?}, {to:?}); \
             t.dispatchEvent(new Event('input')); document.getElementById('budgets-apply').click(); return true; }})()"
        )
    };
    let plaza = "[classes.plaza]\nweight = 2.0";
    browser.eval(&page, &edit(plaza, "[classes.plaza]\nweight = -1.0"));
    let refused = browser.wait_for(
        &page,
        "(r => r.className === 'bad' && r.textContent)(document.getElementById('budgets-result'))",
        "the page shows the refusal",
        Duration::from_secs(10),
    );
    assert!(
        refused.as_str().unwrap().contains("classes.plaza.weight"),
        "the key is named: {refused}"
    );
    assert_eq!(ops_get(&base, "/v1/config")["version"], 1);

    // A valid edit: the next version, in /v1/config and on disk.
    browser.eval(
        &page,
        "(() => { document.getElementById('budgets-reload').click(); return true; })()",
    );
    browser.wait_for(
        &page,
        &format!(
            "document.getElementById('budgets-text').value.includes({plaza:?}) && document.getElementById('budgets-result').textContent === ''"
        ),
        "the editor discards the bad edit",
        Duration::from_secs(10),
    );
    browser.eval(&page, &edit(plaza, "[classes.plaza]\nweight = 3.0"));
    let applied = browser.wait_for(
        &page,
        "(r => r.className === 'ok' && r.textContent)(document.getElementById('budgets-result'))",
        "the page shows the edit applied",
        Duration::from_secs(10),
    );
    assert!(applied.as_str().unwrap().contains("version 2"), "{applied}");
    let config = ops_get(&base, "/v1/config");
    assert_eq!(config["version"], 2);
    assert_eq!(config["budgets"]["classes"]["plaza"]["weight"], 3.0);
    let on_disk = std::fs::read_to_string(dir.path().join("budgets.toml")).unwrap();
    assert!(on_disk.contains("[classes.plaza]\nweight = 3.0"));
    browser.wait_for(
        &page,
        "document.getElementById('version').textContent === '2'",
        "the header shows the new version",
        Duration::from_secs(10),
    );

    let shot =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts/ops-console.png");
    browser.screenshot(&page, &shot);
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a real screenshot"
    );
    println!("screenshot: {}", shot.display());
}

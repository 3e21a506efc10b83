//! Headless Chromium (Debian's `chromium`, installed by `scripts/test.sh`) driven over the DevTools protocol:
//! a child process with its own profile directory and log file, found by the port it writes to
//! `DevToolsActivePort`; one WebSocket to the browser, pages attached as flat sessions. Enough to load a
//! page, read and change its DOM with JavaScript, wait for a condition and take a screenshot.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// How long one protocol call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Browser {
    child: Child,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    log: PathBuf,
    _profile: tempfile::TempDir,
}

/// A page (tab) of the browser: its DevTools session.
pub struct Page {
    session: String,
}

fn executable() -> String {
    if let Ok(c) = std::env::var("CHROMIUM") {
        return c;
    }
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return c.to_string();
        }
    }
    panic!(
        "no Chromium found: run scripts/test.sh (it installs Debian's `chromium`), or set CHROMIUM"
    )
}

impl Browser {
    /// Starts headless Chromium (its log beside the profile; the path is in every failure message).
    pub fn launch() -> Self {
        let profile = tempfile::tempdir().expect("profile dir");
        let log = profile.path().join("chromium.log");
        let exe = executable();
        let child = Command::new(&exe)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--window-size=1440,900",
                "about:blank",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{exe}`: {e}"));
        let port_file = profile.path().join("DevToolsActivePort");
        let started = Instant::now();
        let (port, path) = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let mut lines = text.lines();
                if let (Some(p), Some(w)) = (lines.next(), lines.next()) {
                    break (p.to_string(), w.to_string());
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "Chromium did not open its DevTools port in 30 s; its log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let url = format!("ws://127.0.0.1:{port}{path}");
        let (ws, _) = tungstenite::connect(&url).unwrap_or_else(|e| panic!("{url}: {e}"));
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(CALL_TIMEOUT)).expect("timeout");
        }
        Self {
            child,
            ws,
            next_id: 1,
            log,
            _profile: profile,
        }
    }

    /// Calls a DevTools method (on a page's session, or the browser's) and returns its result; events that
    /// arrive meanwhile are skipped.
    pub fn call(&mut self, page: Option<&Page>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(p) = page {
            msg["sessionId"] = json!(p.session);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .unwrap_or_else(|e| panic!("{method}: {e}; log {}", self.log.display()));
        loop {
            let m = self
                .ws
                .read()
                .unwrap_or_else(|e| panic!("{method}: {e}; log {}", self.log.display()));
            let Message::Text(text) = m else { continue };
            let v: Value = serde_json::from_str(&text).expect("DevTools sends JSON");
            if v["id"] == id {
                assert!(v["error"].is_null(), "{method}: {}", v["error"]);
                return v["result"].clone();
            }
        }
    }

    /// Opens `url` in a new tab.
    pub fn open(&mut self, url: &str) -> Page {
        let target = self.call(None, "Target.createTarget", json!({ "url": url }));
        let attached = self.call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        );
        Page {
            session: attached["sessionId"].as_str().expect("session").to_string(),
        }
    }

    /// Evaluates `expr` in the page (promises awaited) and returns its value.
    pub fn eval(&mut self, page: &Page, expr: &str) -> Value {
        self.try_eval(page, expr)
            .unwrap_or_else(|e| panic!("`{expr}` threw: {e}"))
    }

    /// Evaluates `expr` in the page: its value, or the exception it threw.
    fn try_eval(&mut self, page: &Page, expr: &str) -> Result<Value, String> {
        let r = self.call(
            Some(page),
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
        );
        if r["exceptionDetails"].is_null() {
            Ok(r["result"]["value"].clone())
        } else {
            Err(r["exceptionDetails"].to_string())
        }
    }

    /// Polls `expr` every 100 ms until it is truthy (panics with `what` after `within`). An expression that
    /// throws counts as not yet (the page may still be loading: no `document.body` before it is parsed).
    pub fn wait_for(&mut self, page: &Page, expr: &str, what: &str, within: Duration) -> Value {
        let started = Instant::now();
        loop {
            let last = match self.try_eval(page, expr) {
                Ok(v) if !(v.is_null() || v == false || v == "" || v == 0) => return v,
                Ok(v) => v.to_string(),
                Err(e) => format!("threw {e}"),
            };
            assert!(
                started.elapsed() < within,
                "{what}: not within {within:?} (`{expr}` last gave {last})"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Saves a PNG of the page's viewport.
    pub fn screenshot(&mut self, page: &Page, path: &Path) {
        let r = self.call(
            Some(page),
            "Page.captureScreenshot",
            json!({ "format": "png" }),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("data"))
            .expect("base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("artifact dir");
        }
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

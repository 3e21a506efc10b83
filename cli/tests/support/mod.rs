//! What the multi-process tests share: `nimmer` child processes with their own logs (SIGKILL by pid), a
//! configuration directory from the embedded sources with edits, a server-sent-events reader, a
//! `/metrics` reader and polling until a condition holds (probing, never a fixed sleep).

#![allow(dead_code)] // each test binary uses a part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;

/// A `nimmer` child process with its own log file; SIGKILLed on drop if still running.
pub struct Proc {
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// `nimmer ARGS` with `NIMMER_CONFIG=config`, its output in `log`.
    pub fn start(args: &[&str], config: &Path, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_nimmer"))
            .args(args)
            .env("NIMMER_CONFIG", config)
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("starting nimmer");
        Self { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL by pid: no shutdown path runs.
    pub fn kill(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A configuration directory `dir/name` holding the given tiers.toml and budgets.toml and the embedded
/// classifiers.toml.
pub fn config(dir: &Path, name: &str, tiers: &str, budgets: &str) -> PathBuf {
    let config = dir.join(name);
    std::fs::create_dir(&config).unwrap();
    let src = nimmer_config::Sources::embedded();
    for (file, text) in [
        ("tiers.toml", tiers),
        ("budgets.toml", budgets),
        ("classifiers.toml", src.classifiers.as_str()),
    ] {
        std::fs::write(config.join(file), text).unwrap();
    }
    config
}

/// `text` with `from` replaced once by `to`; fails when `from` is not there (an edit that silently did
/// nothing would test the defaults).
pub fn edit(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "`{from}` not found");
    text.replacen(from, to, 1)
}

/// A server-sent-events response read event by event.
pub struct Sse {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
}

impl Sse {
    pub fn of(r: reqwest::Response) -> Self {
        Self {
            body: Box::pin(r.bytes_stream()),
            buf: String::new(),
        }
    }

    /// The next `data:` payload (`None` at the end of the stream).
    pub async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(nl) = self.buf.find('\n') {
                let line: String = self.buf.drain(..=nl).collect();
                if let Some(d) = line.trim_end().strip_prefix("data:") {
                    return Some(d.trim().to_string());
                }
                continue;
            }
            let b = tokio::time::timeout(Duration::from_secs(30), self.body.next())
                .await
                .expect("the stream hung")?;
            self.buf.push_str(&String::from_utf8_lossy(&b.unwrap()));
        }
    }

    /// The next OpenAI chunk with content: its text (`None` when the stream ended first).
    pub async fn content(&mut self) -> Option<String> {
        while let Some(d) = self.next().await {
            if d == "[DONE]" {
                return None;
            }
            let v: serde_json::Value = serde_json::from_str(&d).unwrap();
            if let Some(t) = v["choices"][0]["delta"]["content"].as_str()
                && !t.is_empty()
            {
                return Some(t.to_string());
            }
        }
        None
    }
}

/// A gauge or counter of a gateway's `/metrics` (the line starting with `series`), 0 when absent.
pub async fn metric(http: &reqwest::Client, url: &str, series: &str) -> f64 {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Polls until `f` holds, failing with `what` after `limit`.
pub async fn until<F: std::future::Future<Output = bool>>(
    limit: Duration,
    what: &str,
    mut f: impl FnMut() -> F,
) {
    let t = Instant::now();
    while !f().await {
        assert!(t.elapsed() < limit, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// POSTs `body` as JSON to `url` + `path`: the status and the JSON answer (`null` when not JSON).
pub async fn post_json(
    http: &reqwest::Client,
    url: &str,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = http
        .post(format!("{url}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// The worker that reports a sequence in flight on a tier's load subject, skipping the ones named in
/// `killed` (their last reports may still wait in the subscription).
pub async fn busy_worker(loads: &mut async_nats::Subscriber, killed: &[String]) -> String {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), loads.next())
            .await
            .expect("load messages")
            .expect("subscription open");
        let l: nimmer_gateway::tier::remote::LoadMsg = serde_json::from_slice(&m.payload).unwrap();
        if l.in_flight > 0 && !killed.contains(&l.worker) {
            return l.worker;
        }
    }
}

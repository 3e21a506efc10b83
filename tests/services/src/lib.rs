//! The real services tests run against, started on free loopback ports with their data in temporary
//! directories and stopped on drop: [`NatsServer`] (JetStream, >= 2.10) and [`Postgres`]. `scripts/test.sh`
//! installs both; `NATS_SERVER` and `PG_BIN` point at them, else they are looked up where `scripts/test.sh`
//! puts them (`.tools/`, `/usr/lib/postgresql/*/bin`) and then on the PATH.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn wait_listening(port: u16, what: &str) {
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on {port}");
}

/// The nats-server `scripts/test.sh` installs into the workspace's `.tools/` (so `cargo test` alone finds it).
fn tools_nats_server() -> Option<String> {
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools");
    let mut found: Vec<PathBuf> = std::fs::read_dir(tools)
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin/nats-server"))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop().map(|p| p.display().to_string())
}

/// A nats-server with JetStream on a free loopback port, its store in a temp dir; killed on drop.
/// [`NatsServer::restart`] kills it and starts it again on the same port and store.
pub struct NatsServer {
    pub url: String,
    pub port: u16,
    bin: String,
    child: Option<Child>,
    store: tempfile::TempDir,
}

impl NatsServer {
    pub fn start() -> Self {
        let bin = std::env::var("NATS_SERVER")
            .ok()
            .or_else(tools_nats_server)
            .unwrap_or_else(|| "nats-server".into());
        let version = Command::new(&bin).arg("--version").output().unwrap_or_else(|e| {
            panic!(
                "cannot run `{bin}` ({e}): run scripts/test.sh, or set NATS_SERVER to a nats-server >= 2.10"
            )
        });
        let version = String::from_utf8_lossy(&version.stdout).to_string();
        let v: Vec<u32> = version
            .trim()
            .trim_start_matches("nats-server: v")
            .split('.')
            .filter_map(|p| p.parse().ok())
            .collect();
        assert!(
            v.len() >= 2 && (v[0], v[1]) >= (2, 10),
            "`{bin}` is {version:?}; JetStream features need nats-server >= 2.10"
        );
        let port = free_port();
        let mut s = Self {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            bin,
            child: None,
            store: tempfile::tempdir().expect("store dir"),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new(&self.bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        wait_listening(self.port, "nats-server");
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Where JetStream keeps its files.
    pub fn store_path(&self) -> &Path {
        self.store.path()
    }

    /// Kills the server (SIGKILL: no graceful shutdown).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again after [`NatsServer::kill`], same port and store.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A PostgreSQL server (its own cluster from `initdb`) on a free loopback port; stopped on drop. Runs as the
/// `postgres` system user when the tests run as root (PostgreSQL refuses root).
pub struct Postgres {
    /// `postgres://nimmer@127.0.0.1:<port>/nimmer`
    pub url: String,
    pub port: u16,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

fn pg_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PG_BIN") {
        return PathBuf::from(p);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p).unwrap_or_else(|| {
        panic!("no PostgreSQL server found (/usr/lib/postgresql/*/bin): run scripts/test.sh, or set PG_BIN")
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `bin` run as the `postgres` user when we are root.
fn as_pg_user(bin: &Path, root: bool) -> Command {
    if root {
        // setpriv execs in place (no wrapper process): the child is the server itself.
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

impl Postgres {
    pub fn start() -> Self {
        let bin = pg_bin();
        let root = is_root();
        let dir = tempfile::Builder::new()
            .prefix("nimmer-pg")
            .tempdir()
            .expect("pg dir");
        let data = dir.path().join("data");
        if root {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown of {} to postgres failed", dir.path().display());
        }
        let out = as_pg_user(&bin.join("initdb"), root)
            .args([
                "-A",
                "trust",
                "-U",
                "nimmer",
                "-E",
                "UTF8",
                "--no-locale",
                "-D",
            ])
            .arg(&data)
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let child = as_pg_user(&bin.join("postgres"), root)
            .arg("-D")
            .arg(&data)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-k"])
            .arg(dir.path())
            .args(["-c", "fsync=off", "-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres starts");
        wait_listening(port, "postgres");
        // Accepting connections is not the same as being ready: wait until `nimmer` can be created.
        let mut ready = false;
        for _ in 0..200 {
            let st = Command::new(bin.join("psql"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "nimmer"])
                .args(["-d", "postgres", "-qtc", "CREATE DATABASE nimmer"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if st.is_ok_and(|s| s.success()) {
                ready = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(ready, "postgres on {port} did not accept CREATE DATABASE");
        Self {
            url: format!("postgres://nimmer@127.0.0.1:{port}/nimmer"),
            port,
            child: Some(child),
            _dir: dir,
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGINT: fast shutdown.
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            for _ in 0..100 {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

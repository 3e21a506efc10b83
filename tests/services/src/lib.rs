//! The real services tests run against, started on free loopback ports with their data in temporary
//! directories and stopped on drop: [`NatsServer`] (JetStream, >= 2.10), [`NatsCluster`] (three of them
//! routed into one JetStream cluster) and [`Postgres`] (which tests may SIGKILL, restart, SIGSTOP and SIGCONT). `scripts/test.sh`
//! installs both; `NATS_SERVER` and `PG_BIN` point at them, else they are looked up where `scripts/test.sh`
//! puts them (`.tools/`, `/usr/lib/postgresql/*/bin`) and then on the PATH.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct free ports (the listeners are held until all are found, so none is handed out twice).
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("free port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("free port").port())
        .collect()
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
    /// `server_name` (cluster nodes only).
    pub name: Option<String>,
    bin: String,
    /// Arguments after the common ones (a cluster node's name, cluster port and routes).
    extra: Vec<String>,
    /// Monitoring port (cluster nodes only: readiness is the JetStream meta leader in `/jsz`).
    monitor: Option<u16>,
    child: Option<Child>,
    store: tempfile::TempDir,
}

impl NatsServer {
    pub fn start() -> Self {
        let mut s = Self::new(Vec::new(), None, None);
        s.spawn();
        s
    }

    fn new(extra: Vec<String>, name: Option<String>, monitor: Option<u16>) -> Self {
        Self::new_on(free_port(), extra, name, monitor)
    }

    fn new_on(port: u16, extra: Vec<String>, name: Option<String>, monitor: Option<u16>) -> Self {
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
        Self {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            name,
            bin,
            extra,
            monitor,
            child: None,
            store: tempfile::tempdir().expect("store dir"),
        }
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
            .args(&self.extra)
            .args(self.monitor.map(|m| format!("-m={m}")))
            .arg("-l")
            .arg(self.log_path())
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

    /// The server's log file (appended to across restarts): in `$NIMMER_TEST_LOGS` when set (kept after the
    /// test, named by port), else in its store.
    pub fn log_path(&self) -> PathBuf {
        match std::env::var_os("NIMMER_TEST_LOGS") {
            Some(d) => PathBuf::from(d).join(format!("nats-server-{}.log", self.port)),
            None => self.store.path().join("nats-server.log"),
        }
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

/// Three nats-servers on loopback routed into one JetStream cluster (`server_name` n0, n1, n2; cluster
/// `nimmer`), each with its own store; killed on drop. [`NatsCluster::start`] returns once the cluster has a
/// JetStream meta leader, so streams with 3 replicas can be created at once.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    pub fn start() -> Self {
        let ports = free_ports(9);
        let cluster_ports = &ports[0..3];
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes: Vec<NatsServer> = cluster_ports
            .iter()
            .enumerate()
            .map(|(i, cp)| {
                let name = format!("n{i}");
                let extra = vec![
                    format!("--server_name={name}"),
                    "--cluster_name=nimmer".into(),
                    format!("--cluster=nats://127.0.0.1:{cp}"),
                    format!("--routes={routes}"),
                ];
                NatsServer::new_on(ports[3 + i], extra, Some(name), Some(ports[6 + i]))
            })
            .collect();
        for n in &mut nodes {
            n.spawn();
        }
        let c = Self { nodes };
        c.wait_meta_leader();
        c
    }

    /// Every node's URL, comma-separated (what `--nats` takes).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node named `name` (`n0`..`n2`, as JetStream reports a stream's leader).
    pub fn node_mut(&mut self, name: &str) -> &mut NatsServer {
        self.nodes
            .iter_mut()
            .find(|n| n.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Waits (up to 30 s) until a running node reports a JetStream meta leader.
    pub fn wait_meta_leader(&self) {
        for _ in 0..300 {
            let ready = self.nodes.iter().filter(|n| n.child.is_some()).any(|n| {
                n.monitor
                    .and_then(|m| http_get(m, "/jsz"))
                    .is_some_and(|body| meta_leader(&body).is_some())
            });
            if ready {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the NATS cluster elected no JetStream meta leader in 30 s");
    }
}

/// The body of `GET path` on a loopback monitoring port.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

/// `meta_cluster.leader` of a `/jsz` body, when there is one.
fn meta_leader(jsz: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(jsz).ok()?;
    let leader = v.get("meta_cluster")?.get("leader")?.as_str()?;
    (!leader.is_empty()).then(|| leader.to_string())
}

/// A PostgreSQL server (its own cluster from `initdb`) on a free loopback port; stopped on drop. Runs as the
/// `postgres` system user when the tests run as root (PostgreSQL refuses root).
pub struct Postgres {
    /// `postgres://nimmer@127.0.0.1:<port>/nimmer`
    pub url: String,
    pub port: u16,
    child: Option<Child>,
    bin: PathBuf,
    root: bool,
    durable: bool,
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

/// How a test's PostgreSQL runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct PgOptions {
    /// `fsync` and `synchronous_commit` on (durable commits, as in production); off by default (faster tests).
    pub durable: bool,
}

impl Postgres {
    pub fn start() -> Self {
        Self::start_with(PgOptions::default())
    }

    pub fn start_with(opts: PgOptions) -> Self {
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
        let mut pg = Self {
            url: format!("postgres://nimmer@127.0.0.1:{port}/nimmer"),
            port,
            child: None,
            bin,
            root,
            durable: opts.durable,
            _dir: dir,
        };
        pg.spawn();
        // Accepting connections is not the same as being ready: wait until `nimmer` can be created.
        let mut ready = false;
        for _ in 0..200 {
            let st = Command::new(pg.bin.join("psql"))
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
        pg
    }

    /// Starts the server on the data directory, in its own process group.
    fn spawn(&mut self) {
        self.spawn_only();
        wait_listening(self.port, "postgres");
    }

    fn spawn_only(&mut self) {
        use std::os::unix::process::CommandExt;
        let sync = if self.durable { "on" } else { "off" };
        let child = as_pg_user(&self.bin.join("postgres"), self.root)
            .arg("-D")
            .arg(self._dir.path().join("data"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-k"])
            .arg(self._dir.path())
            .args(["-c", &format!("fsync={sync}")])
            .args(["-c", &format!("synchronous_commit={sync}")])
            .args(["-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("postgres starts");
        self.child = Some(child);
    }

    /// Sends `signal` to the postmaster and then to every process it forked (its backends and helpers put
    /// themselves in their own sessions, so a process-group signal would miss them).
    fn signal_all(&self, signal: &str) {
        let Some(c) = &self.child else { return };
        let pid = c.id().to_string();
        let children = Command::new("pgrep")
            .args(["-P", &pid])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let _ = Command::new("kill").args([signal, &pid]).status();
        let children: Vec<&str> = children.split_whitespace().collect();
        if !children.is_empty() {
            let _ = Command::new("kill").arg(signal).args(children).status();
        }
    }

    /// SIGKILLs the server and its backends (no shutdown, no checkpoint: a crash).
    pub fn kill(&mut self) {
        self.signal_all("-KILL");
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        // Backends that outlive the postmaster hold its shared memory; wait until they are gone.
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", self.port)).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts it again after [`Postgres::kill`] on the same data (crash recovery runs) and port.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            self.spawn_only();
            // A start refused (the killed server's processes still hold its shared memory) exits at once.
            loop {
                match self.child.as_mut().map(|c| c.try_wait()) {
                    Some(Ok(None)) => {
                        if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                            return;
                        }
                    }
                    _ => {
                        self.child = None;
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("postgres did not start again on {}", self.port);
    }

    /// SIGSTOPs the server and its backends: connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal_all("-STOP");
    }

    /// SIGCONT after [`Postgres::pause`].
    pub fn resume(&self) {
        self.signal_all("-CONT");
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.resume();
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

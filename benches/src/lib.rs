//! Helpers shared by the benchmark binaries: percentiles, the machine's description, peak RSS, and writing a
//! result block into `benches/RESULTS.md` between markers (replacing the previous run of the same block).

use anyhow::Result;

/// The `p` quantile (0..=1) of `v` (sorted in place); NaN when empty.
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Peak resident memory of this process, in MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// CPU model and core count.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cpu}, {cores} cores")
}

/// A `--device` argument: `cpu`, or `cuda` (needs a `--features cuda` build and a GPU).
pub fn parse_device(s: &str) -> Result<nimmer_config::Device> {
    match s {
        "cpu" => Ok(nimmer_config::Device::Cpu),
        "cuda" => Ok(nimmer_config::Device::Cuda),
        other => anyhow::bail!("unknown device `{other}` (cpu, cuda)"),
    }
}

/// What a benchmark's figures say about where they ran: the CPU, and the GPU when on CUDA.
pub fn machine_on(device: nimmer_config::Device) -> String {
    match device {
        nimmer_config::Device::Cuda => format!("{} + GPU {}", machine(), gpu_name()),
        nimmer_config::Device::Cpu => machine(),
    }
}

/// The GPU's name as `nvidia-smi` reports it (best effort: the figures say which card they came from).
fn gpu_name() -> String {
    std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,driver_version",
            "--format=csv,noheader",
            "-i",
            "0",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .replace(", ", ", driver ")
        })
        .unwrap_or_else(|| "(nvidia-smi not found)".into())
}

/// Writes `table` into `path` between `<!-- {name}:begin -->` and `<!-- {name}:end -->`.
pub fn write_block(path: &std::path::Path, name: &str, table: &str) -> Result<()> {
    let (begin, end) = (
        format!("<!-- {name}:begin -->"),
        format!("<!-- {name}:end -->"),
    );
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmark results\n".into());
    let block = format!("{begin}\n{table}{end}");
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(a), Some(b)) if b > a => format!("{}{}{}", &old[..a], block, &old[b + end.len()..]),
        _ => format!("{}\n\n{}\n", old.trim_end(), block),
    };
    std::fs::write(path, new)?;
    Ok(())
}

/// This run's id (random hex), part of every dialog UID a bench sends: a repeated UID is a repeat of one line
/// and gets the first answer from the gateway, so runs and rounds must not reuse one.
pub fn run_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| format!("{:08x}", rand::random::<u32>()))
}

/// A fresh number per call (with [`run_id`], a UID no other request of any run has).
pub fn next_slot() -> usize {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Logs to stderr at `RUST_LOG` (default: warnings), as every bench binary does.
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
}

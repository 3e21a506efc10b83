//! Which configuration a command reads: `--config DIR`, else `./config` when it holds the three files, else
//! the configuration embedded in the binary. The canon commands read only `transport.toml`, so a broken
//! `budgets.toml` never stops a compositor or a player.

use std::path::PathBuf;

use anyhow::Result;
use nimmer_config::Config;

/// The config directory in effect: `--config`, else `./config` when it holds the three files.
pub fn config_dir(given: Option<PathBuf>) -> Option<PathBuf> {
    given.or_else(|| {
        let d = PathBuf::from("config");
        ["tiers.toml", "classifiers.toml", "budgets.toml"]
            .iter()
            .all(|f| d.join(f).is_file())
            .then_some(d)
    })
}

pub fn load_config(dir: &Option<PathBuf>) -> Result<Config> {
    Ok(match dir {
        Some(d) => Config::load(d)?,
        None => Config::embedded(),
    })
}

/// transport.toml from the config directory, else the embedded default.
pub fn transport_config(dir: &Option<PathBuf>) -> Result<nimmer_config::TransportFile> {
    Ok(match dir {
        Some(d) if d.join("transport.toml").is_file() => nimmer_config::TransportFile::load(d)?,
        _ => nimmer_config::TransportFile::embedded(),
    })
}

/// The event templates: `events/` of the config directory when it has one, else the embedded ones.
pub fn event_catalog(
    dir: &Option<PathBuf>,
    config: &Config,
) -> Result<nimmer_config::EventCatalog> {
    Ok(match dir {
        Some(d) if d.join("events").is_dir() => {
            nimmer_config::EventCatalog::load(&d.join("events"), config)?
        }
        _ => nimmer_config::EventCatalog::embedded(config)?,
    })
}

/// gm.toml (the shard map, leases, directors) from the config directory, else the embedded default.
pub fn gm_config(dir: &Option<PathBuf>) -> Result<nimmer_config::GmFile> {
    Ok(match dir {
        Some(d) if d.join("gm.toml").is_file() => nimmer_config::GmFile::load(d)?,
        _ => nimmer_config::GmFile::embedded(),
    })
}

//! `nimmer models fetch|list`: download, verify (pinned sha256) and cache the configured models; show where
//! each lives.

use anyhow::{Result, bail};
use clap::Subcommand;
use nimmer_config::Config;
use nimmer_tiers::fetch::{Verify, ensure_model, model_dir};

#[derive(Subcommand)]
pub enum ModelsCmd {
    /// Download, verify and cache models (all configured models by default); re-hashes present files.
    Fetch {
        /// Only these models.
        names: Vec<String>,
    },
    /// List configured models, where they live and whether they are present.
    List,
}

pub fn run(cfg: &Config, cmd: ModelsCmd) -> Result<()> {
    match cmd {
        ModelsCmd::Fetch { names } => {
            let names: Vec<String> = if names.is_empty() {
                cfg.tiers.models.keys().cloned().collect()
            } else {
                names
            };
            for n in names {
                if !cfg.tiers.models.contains_key(&n) {
                    bail!(
                        "no model `{n}` in {} (known: {})",
                        cfg.origin,
                        cfg.tiers
                            .models
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                let dir = ensure_model(&cfg.tiers, &n, Verify::Full)?;
                println!("{n}: ok ({})", dir.display());
            }
            Ok(())
        }
        ModelsCmd::List => {
            for (name, spec) in &cfg.tiers.models {
                let dir = model_dir(&cfg.tiers, name, spec);
                let present = spec.files.iter().all(|f| dir.join(&f.name).exists());
                println!(
                    "{name}\t{:?}\t{}\t{}\n  {}",
                    spec.format,
                    if present { "present" } else { "missing" },
                    dir.display(),
                    spec.about
                );
            }
            Ok(())
        }
    }
}

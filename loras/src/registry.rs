//! The adapter registry: name → versioned adapter. Adapters come from folders of the adapters directory (a
//! rescan adds, replaces or removes them) or by API (load or replace from a path, delete). Running sequences
//! hold an `Arc` of the version they started with (their lease), so replacing or deleting an adapter never
//! breaks them. Resident adapters stay within a memory budget: loading one evicts the least recently used
//! adapters that nobody leases; an evicted adapter is loaded again (cold) on its next use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{Adapter, BaseShape, LoraError, load_peft};

struct Entry {
    path: PathBuf,
    /// Newest modification time of its files when loaded (a rescan reloads when they change).
    stamp: Option<u128>,
    version: u64,
    rank: usize,
    size_bytes: usize,
    resident: Option<Arc<Adapter>>,
    last_used: u64,
}

/// What `GET /v1/adapters` shows of one adapter.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AdapterInfo {
    pub name: String,
    pub version: u64,
    pub rank: usize,
    pub size_bytes: usize,
    pub resident: bool,
    /// Sequences running with it now.
    pub leases: usize,
    pub path: String,
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RegistryStats {
    pub loads: u64,
    pub evictions: u64,
    pub resident: usize,
    pub resident_bytes: usize,
}

struct Inner {
    entries: BTreeMap<String, Entry>,
    clock: u64,
    stats: RegistryStats,
}

pub struct Registry {
    base: BaseShape,
    budget_bytes: std::sync::atomic::AtomicUsize,
    inner: Mutex<Inner>,
}

/// What a load did, and how long it took.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub info: AdapterInfo,
    pub took: Duration,
}

impl Registry {
    pub fn new(base: BaseShape, budget_bytes: usize) -> Self {
        Self {
            base,
            budget_bytes: budget_bytes.into(),
            inner: Mutex::new(Inner {
                entries: BTreeMap::new(),
                clock: 0,
                stats: RegistryStats::default(),
            }),
        }
    }

    fn budget(&self) -> usize {
        self.budget_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A new memory budget (a config reload); evicts unleased adapters now if they no longer fit.
    pub fn set_budget(&self, bytes: usize) {
        self.budget_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
        let mut g = self.lock();
        Self::evict(&mut g, bytes, None);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("registry lock")
    }

    /// Loads (or replaces, as a new version) adapter `name` from `path`. On error the registry is unchanged.
    pub fn load(&self, name: &str, path: &Path) -> Result<Loaded, LoraError> {
        let t = Instant::now();
        let stamp = newest_mtime(path);
        let adapter = Arc::new(load_peft(path, name, &self.base)?);
        let took = t.elapsed();
        let mut g = self.lock();
        g.clock += 1;
        let clock = g.clock;
        let version = g.entries.get(name).map_or(1, |e| e.version + 1);
        g.entries.insert(
            name.to_string(),
            Entry {
                path: path.to_path_buf(),
                stamp,
                version,
                rank: adapter.rank,
                size_bytes: adapter.size_bytes,
                resident: Some(adapter),
                last_used: clock,
            },
        );
        g.stats.loads += 1;
        Self::evict(&mut g, self.budget(), Some(name));
        let info = Self::info_of(name, &g.entries[name]);
        Ok(Loaded { info, took })
    }

    /// Forgets `name`; sequences running with it keep their version. Whether it existed.
    pub fn remove(&self, name: &str) -> bool {
        self.lock().entries.remove(name).is_some()
    }

    /// The current version of `name`, loading it again if it was evicted (a lease for the caller).
    pub fn get(&self, name: &str) -> Result<Option<Arc<Adapter>>, LoraError> {
        Ok(self.get_versioned(name)?.map(|(a, _)| a))
    }

    /// The current version of `name` if it is resident (never reads files: safe on an async runtime).
    pub fn get_resident(&self, name: &str) -> Option<(Arc<Adapter>, u64)> {
        let mut g = self.lock();
        g.clock += 1;
        let clock = g.clock;
        let e = g.entries.get_mut(name)?;
        let a = e.resident.clone()?;
        e.last_used = clock;
        Some((a, e.version))
    }

    /// [`Registry::get`] with the version number of the adapter returned.
    pub fn get_versioned(&self, name: &str) -> Result<Option<(Arc<Adapter>, u64)>, LoraError> {
        let (path, version) = {
            let mut g = self.lock();
            g.clock += 1;
            let clock = g.clock;
            let Some(e) = g.entries.get_mut(name) else {
                return Ok(None);
            };
            e.last_used = clock;
            if let Some(a) = &e.resident {
                return Ok(Some((a.clone(), e.version)));
            }
            (e.path.clone(), e.version)
        };
        // Cold load outside the lock.
        let adapter = Arc::new(load_peft(&path, name, &self.base)?);
        let mut g = self.lock();
        g.stats.loads += 1;
        match g.entries.get_mut(name) {
            // Still the same entry (not replaced or removed meanwhile): make it resident.
            Some(e) if e.version == version && e.path == path && e.resident.is_none() => {
                e.resident = Some(adapter.clone());
                Self::evict(&mut g, self.budget(), Some(name));
                Ok(Some((adapter, version)))
            }
            Some(e) => Ok(Some(match &e.resident {
                Some(a) => (a.clone(), e.version),
                None => (adapter, version),
            })),
            None => Ok(Some((adapter, version))),
        }
    }

    /// Drops least recently used, unleased adapters until resident bytes fit the budget (`keep` stays).
    fn evict(g: &mut Inner, budget: usize, keep: Option<&str>) {
        loop {
            let resident: usize = g
                .entries
                .values()
                .filter(|e| e.resident.is_some())
                .map(|e| e.size_bytes)
                .sum();
            if resident <= budget {
                break;
            }
            let victim = g
                .entries
                .iter()
                .filter(|(n, e)| {
                    Some(n.as_str()) != keep
                        && e.resident
                            .as_ref()
                            .is_some_and(|a| Arc::strong_count(a) == 1)
                })
                .min_by_key(|(_, e)| e.last_used)
                .map(|(n, _)| n.clone());
            let Some(v) = victim else { break };
            g.entries.get_mut(&v).expect("victim exists").resident = None;
            g.stats.evictions += 1;
        }
        g.stats.resident = g.entries.values().filter(|e| e.resident.is_some()).count();
        g.stats.resident_bytes = g
            .entries
            .values()
            .filter(|e| e.resident.is_some())
            .map(|e| e.size_bytes)
            .sum();
    }

    /// Makes the directory's folders the registry's adapters: new folders load, changed folders (by
    /// modification time) are replaced, folders that are gone are removed. Returns errors per folder (the rest
    /// still apply; a broken folder keeps its previous version).
    pub fn scan(&self, dir: &Path) -> Vec<(String, LoraError)> {
        let mut errors = Vec::new();
        let Ok(read) = std::fs::read_dir(dir) else {
            return errors;
        };
        let mut seen = Vec::new();
        for entry in read.flatten() {
            let path = entry.path();
            if !path.join(crate::peft::CONFIG_FILE).is_file() {
                continue;
            }
            let Some(name) = path.file_name().and_then(|n| n.to_str()).map(String::from) else {
                continue;
            };
            seen.push(name.clone());
            let changed = {
                let g = self.lock();
                g.entries
                    .get(&name)
                    .is_none_or(|e| e.path != path || e.stamp != newest_mtime(&path))
            };
            if changed && let Err(e) = self.load(&name, &path) {
                errors.push((name, e));
            }
        }
        let gone: Vec<String> = {
            let g = self.lock();
            g.entries
                .iter()
                .filter(|(n, e)| e.path.starts_with(dir) && !seen.contains(n))
                .map(|(n, _)| n.clone())
                .collect()
        };
        for n in gone {
            self.remove(&n);
        }
        errors
    }

    pub fn list(&self) -> Vec<AdapterInfo> {
        let g = self.lock();
        g.entries.iter().map(|(n, e)| Self::info_of(n, e)).collect()
    }

    /// The resident adapters with their content digests (does not count as a use: eviction order stays).
    pub fn resident_digests(&self) -> Vec<(String, [u8; 16])> {
        let resident: Vec<(String, Arc<Adapter>)> = {
            let g = self.lock();
            g.entries
                .iter()
                .filter_map(|(n, e)| Some((n.clone(), e.resident.clone()?)))
                .collect()
        };
        // Digests are computed (once per adapter) outside the lock.
        resident
            .into_iter()
            .map(|(n, a)| (n, a.content_hash()))
            .collect()
    }

    pub fn stats(&self) -> RegistryStats {
        self.lock().stats
    }

    fn info_of(name: &str, e: &Entry) -> AdapterInfo {
        AdapterInfo {
            name: name.to_string(),
            version: e.version,
            rank: e.rank,
            size_bytes: e.size_bytes,
            resident: e.resident.is_some(),
            leases: e.resident.as_ref().map_or(0, |a| Arc::strong_count(a) - 1),
            path: e.path.display().to_string(),
        }
    }
}

/// Newest modification time (ns since the epoch) of the adapter files in `dir`.
fn newest_mtime(dir: &Path) -> Option<u128> {
    [crate::peft::CONFIG_FILE, crate::peft::WEIGHTS_FILE]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok()?.modified().ok())
        .filter_map(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peft::save_peft;
    use crate::{LoraPair, Module};

    const BASE: BaseShape = BaseShape {
        n_layer: 2,
        dim: 8,
        n_head: 2,
        n_kv_head: 1,
        head_dim: 4,
        ffn: 12,
        rope_interleaved: true,
    };

    fn write(dir: &Path, fill: f32) {
        let layers = (0..BASE.n_layer)
            .map(|_| {
                let (i, o) = Module::V.dims(&BASE);
                vec![Some(LoraPair {
                    a: vec![fill; 4 * i],
                    b: vec![fill; o * 4],
                })]
            })
            .collect();
        let a = Adapter {
            name: "x".into(),
            rank: 4,
            alpha: 8.0,
            scale: 2.0,
            modules: vec![Module::V],
            layers,
            size_bytes: 0,
            digest: Default::default(),
        };
        save_peft(&a, &BASE, dir).unwrap();
    }

    #[test]
    fn replacing_keeps_leases_on_the_old_version_and_removing_keeps_them_alive() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("gruff"), 0.1);
        let r = Registry::new(BASE, 1 << 20);
        assert!(r.scan(dir.path()).is_empty());
        let old = r.get("gruff").unwrap().unwrap();
        assert_eq!(r.list()[0].leases, 1);
        // Replace the files: a rescan loads version 2; the lease still reads version 1's weights.
        std::thread::sleep(Duration::from_millis(20));
        write(&dir.path().join("gruff"), 0.2);
        assert!(r.scan(dir.path()).is_empty());
        assert_eq!(r.list()[0].version, 2);
        let new = r.get("gruff").unwrap().unwrap();
        assert_eq!(old.layers[0][0].as_ref().unwrap().a[0], 0.1);
        assert_eq!(new.layers[0][0].as_ref().unwrap().a[0], 0.2);
        // Remove the folder: gone from the registry, the leases still work.
        std::fs::remove_dir_all(dir.path().join("gruff")).unwrap();
        r.scan(dir.path());
        assert!(r.get("gruff").unwrap().is_none());
        assert_eq!(new.layers[1][0].as_ref().unwrap().b[0], 0.2);
    }

    #[test]
    fn a_broken_replacement_keeps_the_previous_version() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("terse"), 0.1);
        let r = Registry::new(BASE, 1 << 20);
        r.scan(dir.path());
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(
            dir.path().join("terse").join(crate::peft::WEIGHTS_FILE),
            b"junk",
        )
        .unwrap();
        let errors = r.scan(dir.path());
        assert_eq!(errors.len(), 1);
        assert!(errors[0].1.to_string().contains("not a valid adapter file"));
        assert_eq!(r.list()[0].version, 1);
        assert!(r.get("terse").unwrap().is_some());
    }

    #[test]
    fn unleased_adapters_are_evicted_lru_and_reload_cold() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["a", "b", "c"] {
            write(&dir.path().join(n), 0.1);
        }
        // Each adapter: 2 layers × (4·8 + 4·4) floats × 4 bytes = 384 bytes; room for two.
        let r = Registry::new(BASE, 800);
        r.scan(dir.path());
        let resident: Vec<bool> = r.list().iter().map(|i| i.resident).collect();
        assert_eq!(resident.iter().filter(|&&x| x).count(), 2);
        let leased = r.get("a").unwrap().unwrap();
        r.get("b").unwrap();
        r.get("c").unwrap();
        // `a` is leased: never evicted.
        assert!(r.list().iter().find(|i| i.name == "a").unwrap().resident);
        assert!(r.stats().evictions >= 2);
        assert!(r.stats().loads >= 4, "{:?}", r.stats());
        drop(leased);
    }
}

//! Saturn: small classifiers over MiniLM sentence embeddings.
//!
//! One engine thread owns the BERT encoder and micro-batches embedding requests: it takes what is queued, waits
//! at most `max_delay_ms` for more, and embeds up to `max_batch` texts in one padded forward pass (mean pooling
//! over the attention mask, L2-normalized, as sentence-transformers does). Classifiers are defined in
//! `classifiers.toml`: a label's centroid is the normalized mean of its exemplars' embeddings and scores are
//! `softmax(cos / temperature)`; a classifier may instead carry a trained linear head in safetensors.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use nimmer_config::{ClassifiersFile, SaturnTierSpec};
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};
use tokio::sync::oneshot;

use crate::error::{Result, TierError};

pub use nimmer_wire::{Classification, Embedding};

struct Job {
    texts: Vec<String>,
    respond_to: oneshot::Sender<Result<Vec<Embedding>>>,
}

enum Scorer {
    /// Normalized centroids `[labels][dim]`.
    Centroids(Vec<Vec<f32>>),
    /// Linear head: `weight` `[labels][dim]`, `bias` `[labels]`.
    Head {
        weight: Vec<Vec<f32>>,
        bias: Vec<f32>,
    },
}

struct Classifier {
    labels: Vec<String>,
    temperature: f32,
    scorer: Scorer,
}

/// Clears its flag when dropped: the engine thread holds one, so the flag says whether it still runs.
struct Alive(Arc<AtomicBool>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Handle to the Saturn engine; cheap to clone.
#[derive(Clone)]
pub struct SaturnHandle {
    tx: mpsc::SyncSender<Job>,
    /// Cleared when the engine thread ends, however it ends.
    alive: Arc<AtomicBool>,
    classifiers: Arc<BTreeMap<String, Classifier>>,
    queue: usize,
}

impl SaturnHandle {
    /// Loads the encoder from `model_dir` on a new engine thread, then builds the classifiers from their
    /// exemplars (or heads, resolved relative to `config_dir`).
    pub fn start(
        spec: &SaturnTierSpec,
        model_dir: &Path,
        classifiers: &ClassifiersFile,
        config_dir: Option<&Path>,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::sync_channel(spec.queue);
        let alive = Arc::new(AtomicBool::new(true));
        let guard = Alive(alive.clone());
        let (ready_tx, ready_rx) = oneshot::channel();
        let spec2 = spec.clone();
        let dir = model_dir.to_path_buf();
        std::thread::Builder::new()
            .name("nimmer-saturn".into())
            .spawn(move || {
                let _guard = guard;
                match Encoder::load(&dir, &spec2) {
                    Ok(enc) => {
                        let _ = ready_tx.send(Ok(()));
                        enc.run(rx, &spec2);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| TierError::Spawn {
                what: "the saturn engine thread".into(),
                message: e.to_string(),
            })?;
        ready_rx
            .blocking_recv()
            .map_err(|_| TierError::EngineDown {
                tier: "saturn".into(),
            })??;
        let mut handle = Self {
            tx,
            alive,
            classifiers: Arc::new(BTreeMap::new()),
            queue: spec.queue,
        };
        let mut built = BTreeMap::new();
        for (name, c) in &classifiers.classifiers {
            let labels: Vec<String> = c.labels.iter().map(|l| l.name.clone()).collect();
            let scorer = match &c.head {
                Some(head) => load_head(&resolve(head, config_dir), labels.len())?,
                None => {
                    let mut centroids = Vec::new();
                    for l in &c.labels {
                        let embs = handle.embed_blocking(l.exemplars.clone())?;
                        let dim = embs[0].vector.len();
                        let mut mean = vec![0f32; dim];
                        for e in &embs {
                            for (m, v) in mean.iter_mut().zip(&e.vector) {
                                *m += v;
                            }
                        }
                        normalize(&mut mean);
                        centroids.push(mean);
                    }
                    Scorer::Centroids(centroids)
                }
            };
            built.insert(
                name.clone(),
                Classifier {
                    labels,
                    temperature: c.temperature,
                    scorer,
                },
            );
        }
        handle.classifiers = Arc::new(built);
        tracing::info!(classifiers = handle.classifiers.len(), "saturn ready");
        Ok(handle)
    }

    /// Whether the engine thread still runs.
    pub fn is_running(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// Names of the configured classifiers.
    pub fn classifier_names(&self) -> Vec<String> {
        self.classifiers.keys().cloned().collect()
    }

    fn submit(&self, texts: Vec<String>) -> Result<oneshot::Receiver<Result<Vec<Embedding>>>> {
        if texts.is_empty() {
            return Err(TierError::InvalidRequest {
                field: "inputs",
                message: "must not be empty".into(),
            });
        }
        if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
            return Err(TierError::InvalidRequest {
                field: "inputs",
                message: format!("input {i} is empty"),
            });
        }
        let (respond_to, rx) = oneshot::channel();
        self.tx
            .try_send(Job { texts, respond_to })
            .map_err(|e| match e {
                mpsc::TrySendError::Full(_) => TierError::QueueFull {
                    tier: "saturn".into(),
                    capacity: self.queue,
                },
                mpsc::TrySendError::Disconnected(_) => TierError::EngineDown {
                    tier: "saturn".into(),
                },
            })?;
        Ok(rx)
    }

    /// Normalized sentence embeddings with their token counts (async).
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Embedding>> {
        self.submit(texts)?
            .await
            .map_err(|_| TierError::EngineDown {
                tier: "saturn".into(),
            })?
    }

    /// Normalized sentence embeddings with their token counts (from a non-async thread).
    pub fn embed_blocking(&self, texts: Vec<String>) -> Result<Vec<Embedding>> {
        self.submit(texts)?
            .blocking_recv()
            .map_err(|_| TierError::EngineDown {
                tier: "saturn".into(),
            })?
    }

    fn classifier(&self, name: &str) -> Result<&Classifier> {
        self.classifiers
            .get(name)
            .ok_or_else(|| TierError::UnknownClassifier {
                name: name.into(),
                known: self.classifier_names().join(", "),
            })
    }

    fn score(c: &Classifier, e: &[f32], latency_ms: f64) -> Classification {
        let logits: Vec<f32> = match &c.scorer {
            Scorer::Centroids(cs) => cs
                .iter()
                .map(|cv| cv.iter().zip(e).map(|(a, b)| a * b).sum::<f32>() / c.temperature)
                .collect(),
            Scorer::Head { weight, bias } => weight
                .iter()
                .zip(bias)
                .map(|(w, b)| {
                    (w.iter().zip(e).map(|(a, b)| a * b).sum::<f32>() + b) / c.temperature
                })
                .collect(),
        };
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        let best = crate::sampling::argmax(&logits) as usize;
        Classification {
            label: c.labels[best].clone(),
            scores: c
                .labels
                .iter()
                .cloned()
                .zip(exps.iter().map(|p| p / sum))
                .collect(),
            latency_ms,
        }
    }

    fn score_all(c: &Classifier, embs: Vec<Embedding>, started: Instant) -> Vec<Classification> {
        let ms = started.elapsed().as_secs_f64() * 1e3;
        embs.iter().map(|e| Self::score(c, &e.vector, ms)).collect()
    }

    /// Classifies each input with the named classifier.
    pub async fn classify(
        &self,
        classifier: &str,
        inputs: Vec<String>,
    ) -> Result<Vec<Classification>> {
        let (c, t) = (self.classifier(classifier)?, Instant::now());
        Ok(Self::score_all(c, self.embed(inputs).await?, t))
    }

    /// As [`Self::classify`], from a non-async thread.
    pub fn classify_blocking(
        &self,
        classifier: &str,
        inputs: Vec<String>,
    ) -> Result<Vec<Classification>> {
        let (c, t) = (self.classifier(classifier)?, Instant::now());
        Ok(Self::score_all(c, self.embed_blocking(inputs)?, t))
    }
}

fn resolve(p: &str, base: Option<&Path>) -> std::path::PathBuf {
    let path = Path::new(p);
    match base {
        Some(b) if path.is_relative() => b.join(path),
        _ => path.to_path_buf(),
    }
}

fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    for x in v {
        *x /= n;
    }
}

fn load_head(path: &Path, labels: usize) -> Result<Scorer> {
    let bad = |m: String| TierError::model_file(path, m);
    let tensors =
        candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| bad(e.to_string()))?;
    let get = |n: &str| {
        tensors
            .get(n)
            .ok_or_else(|| bad(format!("missing tensor `{n}`")))
    };
    let w = get("weight")?.to_dtype(DType::F32)?;
    let b = get("bias")?.to_dtype(DType::F32)?;
    let (rows, _dim) = w.dims2().map_err(|e| bad(format!("`weight`: {e}")))?;
    if rows != labels || b.dims1().map_err(|e| bad(format!("`bias`: {e}")))? != labels {
        return Err(bad(format!(
            "head has {rows} rows; the classifier has {labels} labels"
        )));
    }
    Ok(Scorer::Head {
        weight: w.to_vec2()?,
        bias: b.to_vec1()?,
    })
}

struct Encoder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
}

impl Encoder {
    fn load(dir: &Path, spec: &SaturnTierSpec) -> Result<Self> {
        let device = crate::device(spec.device)?;
        let cfg_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&cfg_path).map_err(|e| TierError::model_file(&cfg_path, e))?;
        let cfg: BertConfig = serde_json::from_str(&text)
            .map_err(|e| TierError::model_file(&cfg_path, format!("not a BERT config: {e}")))?;
        let weights = dir.join("model.safetensors");
        // SAFETY: the file is verified against its pinned sha256 and not modified while mapped.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(std::slice::from_ref(&weights), DType::F32, &device)
        }
        .map_err(|e| TierError::model_file(&weights, e))?;
        let model = BertModel::load(vb, &cfg).map_err(|e| TierError::model_file(&weights, e))?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer =
            Tokenizer::from_file(&tok_path).map_err(|e| TierError::model_file(&tok_path, e))?;
        tokenizer.with_padding(Some(PaddingParams::default()));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: spec.max_tokens,
                ..Default::default()
            }))
            .map_err(|e| TierError::model_file(&tok_path, e))?;
        Ok(Self {
            model,
            tokenizer,
            device,
        })
    }

    fn run(self, rx: mpsc::Receiver<Job>, spec: &SaturnTierSpec) {
        let delay = Duration::from_millis(spec.max_delay_ms);
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            let mut n = jobs[0].texts.len();
            let deadline = Instant::now() + delay;
            // Fill the batch: sleep on the channel until a job arrives or the delay is spent.
            while n < spec.max_batch {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(j) => {
                        n += j.texts.len();
                        jobs.push(j);
                    }
                    Err(_) => break,
                }
            }
            jobs.retain(|j| !j.respond_to.is_closed());
            let texts: Vec<&str> = jobs
                .iter()
                .flat_map(|j| j.texts.iter().map(String::as_str))
                .collect();
            let mut all = Vec::with_capacity(texts.len());
            let mut failed = None;
            for chunk in texts.chunks(spec.max_batch.max(1)) {
                match self.embed(chunk) {
                    Ok(e) => all.extend(e),
                    Err(e) => {
                        tracing::error!(error = %e, "saturn forward failed");
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            let mut it = all.into_iter();
            for j in jobs {
                let reply = match &failed {
                    Some(e) => Err(TierError::Forward {
                        tier: "saturn".into(),
                        message: e.clone(),
                    }),
                    None => Ok(it.by_ref().take(j.texts.len()).collect()),
                };
                let _ = j.respond_to.send(reply);
            }
        }
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Embedding>> {
        let enc = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| TierError::Tokenizer(e.to_string()))?;
        let len = enc[0].get_ids().len();
        let ids: Vec<u32> = enc.iter().flat_map(|e| e.get_ids().to_vec()).collect();
        let mask: Vec<u32> = enc
            .iter()
            .flat_map(|e| e.get_attention_mask().to_vec())
            .collect();
        let b = texts.len();
        let tokens: Vec<usize> = enc
            .iter()
            .map(|e| e.get_attention_mask().iter().filter(|&&m| m != 0).count())
            .collect();
        let ids = Tensor::from_vec(ids, (b, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (b, len), &self.device)?;
        let types = ids.zeros_like()?;
        let out = self.model.forward(&ids, &types, Some(&mask))?;
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = out.broadcast_mul(&m)?.sum(1)?;
        let counts = m.sum(1)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
        let normed = mean.broadcast_div(&norm)?;
        let vectors = normed.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
        Ok(vectors
            .into_iter()
            .zip(tokens)
            .map(|(vector, tokens)| Embedding { vector, tokens })
            .collect())
    }
}

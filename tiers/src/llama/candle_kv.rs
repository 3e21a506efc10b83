//! The candle decoder's KV memory: one pool of rows per layer on the device ([`KvPool`]), each sequence's rows
//! in position order ([`CandleKv`]), and prefix-cache blocks ([`CandleBlock`]): pool rows shared by the cache
//! and every sequence that reuses them, returned to the pool when the last of them lets go.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use super::LlamaConfig;
use crate::error::{Result, TierError};

/// Keys and values of every sequence: per layer `[rows, kv_dim]` tensors on the device, grown on demand
/// (doubling); row 0 is never handed out and stays zero (the padding row of batched attention).
#[derive(Default)]
pub(super) struct KvPool {
    pub(super) k: Vec<Tensor>,
    pub(super) v: Vec<Tensor>,
    rows: usize,
    pub(super) free: Vec<u32>,
}

impl KvPool {
    /// Makes at least `n` rows free, growing the tensors if needed.
    pub(super) fn reserve(&mut self, n: usize, cfg: &LlamaConfig, device: &Device) -> Result<()> {
        if self.free.len() >= n {
            return Ok(());
        }
        let old = self.rows;
        // Row 0 is never free: the new rows start at `old.max(1)`.
        let rows = (old * 2).max(old.max(1) + n - self.free.len()).max(1024);
        let extra = rows - old;
        if self.k.is_empty() {
            self.k = (0..cfg.n_layer)
                .map(|_| Tensor::zeros((rows, cfg.kv_dim()), DType::F32, device))
                .collect::<candle_core::Result<_>>()?;
            self.v = self
                .k
                .iter()
                .map(Tensor::zeros_like)
                .collect::<candle_core::Result<_>>()?;
        } else {
            for t in self.k.iter_mut().chain(self.v.iter_mut()) {
                let z = Tensor::zeros((extra, cfg.kv_dim()), DType::F32, device)?;
                *t = Tensor::cat(&[&*t, &z], 0)?;
            }
        }
        // Highest rows first out, so low rows (and row 0, never free) fill first.
        self.free.extend((old.max(1)..rows).rev().map(|r| r as u32));
        self.rows = rows;
        Ok(())
    }
}

/// One sequence's cache: the pool rows holding its keys and values, in position order. The first `shared`
/// rows belong to prefix-cache blocks (`held`, in order), the rest to the sequence (returned on drop).
pub struct CandleKv {
    pub(super) rows: Vec<u32>,
    pub(super) len: usize,
    pool: Arc<Mutex<KvPool>>,
    held: Vec<Arc<CandleBlock>>,
    shared: usize,
}

impl Drop for CandleKv {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pool.lock() {
            p.free
                .extend(self.rows.drain(self.shared.min(self.rows.len())..));
        }
    }
}

/// A prefix-cache block: pool rows no sequence owns alone; they return to the pool when the cache and
/// every sequence that reuses them have let go.
pub struct CandleBlock {
    rows: Vec<u32>,
    pool: Arc<Mutex<KvPool>>,
}

impl Drop for CandleBlock {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pool.lock() {
            p.free.append(&mut self.rows);
        }
    }
}

impl CandleKv {
    pub(super) fn new(pool: Arc<Mutex<KvPool>>, capacity: usize) -> Self {
        Self {
            rows: Vec::with_capacity(capacity),
            len: 0,
            pool,
            held: Vec::new(),
            shared: 0,
        }
    }

    /// Positions `start..start + n` as a block, zero-copy: the rows move from the sequence into the block
    /// (the sequence keeps reading them). A span the sequence already took from a block is that block again;
    /// any other span (not next in line, not computed yet) is `None`.
    pub(super) fn share(&mut self, start: usize, n: usize) -> Option<Arc<CandleBlock>> {
        if n == 0 || start + n > self.len {
            return None;
        }
        if start + n <= self.shared {
            let mut at = 0;
            for b in &self.held {
                if at == start && b.rows.len() == n {
                    return Some(b.clone());
                }
                at += b.rows.len();
            }
            return None;
        }
        if start != self.shared {
            return None;
        }
        let block = Arc::new(CandleBlock {
            rows: self.rows[start..start + n].to_vec(),
            pool: self.pool.clone(),
        });
        self.held.push(block.clone());
        self.shared += n;
        Some(block)
    }

    /// Fills this empty cache with the first `tokens` positions of `blocks`, zero-copy.
    pub(super) fn reuse(&mut self, blocks: &[Arc<CandleBlock>], tokens: usize) -> Result<()> {
        if self.len != 0 || !self.rows.is_empty() {
            return Err(TierError::Device(
                "prefix blocks go into an empty cache only".into(),
            ));
        }
        let mut left = tokens;
        for b in blocks {
            let n = left.min(b.rows.len());
            if n == 0 {
                break;
            }
            self.rows.extend_from_slice(&b.rows[..n]);
            self.held.push(b.clone());
            left -= n;
        }
        self.len = tokens - left;
        self.shared = self.len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LlamaConfig {
        LlamaConfig {
            n_layer: 2,
            dim: 8,
            n_head: 2,
            n_kv_head: 1,
            head_dim: 4,
            ffn: 16,
            vocab: 10,
            eps: 1e-5,
            rope_base: 10000.0,
            train_context: 4096,
            rope_neox: false,
            kv_f16: false,
        }
    }

    #[test]
    fn shared_rows_return_to_the_pool_only_when_the_block_and_every_reuser_let_go() {
        let (cfg, dev) = (cfg(), Device::Cpu);
        let pool = Arc::new(Mutex::new(KvPool::default()));
        pool.lock().unwrap().reserve(16, &cfg, &dev).unwrap();
        let free = || pool.lock().unwrap().free.len();
        let start = free();
        let mut a = CandleKv::new(pool.clone(), 8);
        for _ in 0..6 {
            let r = pool.lock().unwrap().free.pop().unwrap();
            a.rows.push(r);
        }
        a.len = 6;
        let b0 = a.share(0, 4).expect("first block");
        assert!(a.share(4, 4).is_none(), "not computed yet");
        assert!(
            Arc::ptr_eq(&a.share(0, 4).unwrap(), &b0),
            "the same block again"
        );
        let mut b = CandleKv::new(pool.clone(), 8);
        b.reuse(std::slice::from_ref(&b0), 4).unwrap();
        assert_eq!(b.rows, a.rows[..4]);
        drop(a);
        assert_eq!(
            free(),
            start - 4,
            "a's own rows are back, the block's are not"
        );
        drop(b0);
        assert_eq!(free(), start - 4, "b still reads the block");
        drop(b);
        assert_eq!(free(), start);
    }

    #[test]
    fn the_kv_pool_reserves_what_it_is_asked_for_and_never_hands_out_row_0() {
        let (cfg, dev) = (cfg(), Device::Cpu);
        let mut pool = KvPool::default();
        // A first step larger than the minimum growth.
        pool.reserve(1024, &cfg, &dev).unwrap();
        assert!(pool.free.len() >= 1024);
        assert!(!pool.free.contains(&0));
        assert_eq!(pool.k[0].dims(), &[pool.rows, cfg.kv_dim()]);
        let taken: Vec<u32> = (0..1024).map(|_| pool.free.pop().unwrap()).collect();
        pool.reserve(3000, &cfg, &dev).unwrap();
        assert!(pool.free.len() >= 3000);
        assert!(!pool.free.contains(&0));
        assert!(taken.iter().all(|r| !pool.free.contains(r)));
        assert_eq!(pool.v[1].dims(), &[pool.rows, cfg.kv_dim()]);
    }
}

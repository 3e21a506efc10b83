//! Trait-LoRA blends for the candle decoder (the CUDA path), in the way of Punica's gathered BGMV: every
//! distinct blend in flight owns a slot of per-(layer, module) tables on the model's device, `Aᵀ`
//! `[slots, in, R]` and `s·w·Bᵀ` `[slots, R, out]` (the ranks of a blend's parts laid side by side, zero-padded
//! to `R`). A step gathers each row's slot and adds `(x·Aᵀ)·Bᵀ` with two batched matmuls, so a batch costs the
//! same few kernels per projection however many distinct adapters it holds. Slot 0 stays zero: rows without
//! a LoRA. Slots are filled when a blend first appears (reused least-recently-used) and hold only weak
//! references, so the registry's leases and evictions see no extra owner.

use std::sync::{Arc, Weak};

use candle_core::{DType, Device, Tensor};
use nimmer_loras::{Adapter, BaseShape, Blend, Module};

use super::Chunk;
use crate::error::Result;

/// One blend's identity: its adapters (by allocation) and weights.
struct SlotKey {
    parts: Vec<(Weak<Adapter>, u32)>,
    last_used: u64,
}

impl SlotKey {
    fn matches(&self, blend: &Blend) -> bool {
        self.parts.len() == blend.parts.len()
            && self
                .parts
                .iter()
                .zip(&blend.parts)
                .all(|((w, bits), (a, wt))| w.as_ptr() == Arc::as_ptr(a) && *bits == wt.to_bits())
    }
}

/// The device tables and their slots; the candle decoder's per-engine workspace.
#[derive(Default)]
pub struct LoraTables {
    /// Padded combined rank `R` of every slot.
    rank: usize,
    /// Slots allocated in every table (slot 0 included).
    cap: usize,
    /// Per layer, per module (`Module::ALL` order): `(Aᵀ, s·w·Bᵀ)` once any blend targets that module.
    tables: Vec<[Option<(Tensor, Tensor)>; 7]>,
    /// `slots[i]` is the blend in slot `i` (`slots[0]` stays `None`).
    slots: Vec<Option<SlotKey>>,
    step: u64,
    /// This step's slot per row (`[rows]` u32), when any row has a blend.
    ids: Option<Tensor>,
}

fn module_index(m: Module) -> usize {
    Module::ALL.iter().position(|x| *x == m).unwrap_or(0)
}

impl LoraTables {
    /// Assigns a slot to every blend in `chunks` (uploading new ones) and records each row's slot for
    /// [`Self::apply`]. Without any blend this step costs nothing.
    pub fn prepare<C>(
        &mut self,
        chunks: &[Chunk<'_, C>],
        base: &BaseShape,
        device: &Device,
    ) -> Result<()> {
        self.ids = None;
        let blends: Vec<Option<&Blend>> = chunks
            .iter()
            .map(|c| c.lora.filter(|b| !b.is_empty()))
            .collect();
        if blends.iter().all(Option::is_none) {
            return Ok(());
        }
        self.step += 1;
        let need_rank = blends
            .iter()
            .flatten()
            .map(|b| b.parts.iter().map(|(a, _)| a.rank).sum::<usize>())
            .max()
            .unwrap_or(0);
        if need_rank > self.rank {
            // Wider blends than the tables hold: start over at the new width (rare; slots refill on demand).
            *self = Self {
                rank: need_rank.next_multiple_of(8),
                step: self.step,
                ..Self::default()
            };
        }
        // Forget blends whose adapters are gone (their device memory is reused first).
        for s in self.slots.iter_mut() {
            if s.as_ref()
                .is_some_and(|k| k.parts.iter().any(|(w, _)| w.strong_count() == 0))
            {
                *s = None;
            }
        }
        let mut row_ids: Vec<u32> = Vec::new();
        for (c, blend) in chunks.iter().zip(&blends) {
            let slot = match blend {
                None => 0,
                Some(b) => self.slot_for(b, base, device)?,
            };
            row_ids.extend(std::iter::repeat_n(slot as u32, c.tokens.len()));
        }
        self.ids = Some(Tensor::from_vec(row_ids.clone(), row_ids.len(), device)?);
        Ok(())
    }

    /// The slot holding `blend`, filling a free or least-recently-used one (or growing the tables).
    fn slot_for(&mut self, blend: &Blend, base: &BaseShape, device: &Device) -> Result<usize> {
        if let Some(i) = self
            .slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|k| k.matches(blend)))
        {
            if let Some(k) = self.slots[i].as_mut() {
                k.last_used = self.step;
            }
            return Ok(i);
        }
        let step = self.step;
        let free = (1..self.cap).find(|&i| self.slots.get(i).is_none_or(|s| s.is_none()));
        let lru = (1..self.slots.len())
            .filter(|&i| self.slots[i].as_ref().is_some_and(|k| k.last_used < step))
            .min_by_key(|&i| self.slots[i].as_ref().map_or(0, |k| k.last_used));
        let slot = match free.or(lru) {
            Some(i) => i,
            None => self.cap.max(1),
        };
        if self.slots.len() <= slot {
            self.slots.resize_with(slot + 1, || None);
        }
        self.upload(slot, blend, base, device)?;
        self.slots[slot] = Some(SlotKey {
            parts: blend
                .parts
                .iter()
                .map(|(a, w)| (Arc::downgrade(a), w.to_bits()))
                .collect(),
            last_used: step,
        });
        Ok(slot)
    }

    /// Makes room for at least `slots` slots (doubling), keeping what the tables hold.
    fn grow(&mut self, slots: usize, base: &BaseShape, device: &Device) -> Result<()> {
        if slots <= self.cap {
            return Ok(());
        }
        let cap = slots.max(self.cap * 2).max(4);
        if self.tables.is_empty() {
            self.tables = (0..base.n_layer).map(|_| Default::default()).collect();
        }
        let r = self.rank;
        for layer in self.tables.iter_mut() {
            for (mi, t) in layer.iter_mut().enumerate() {
                if let Some((a, b)) = t.take() {
                    let (inp, out) = Module::ALL[mi].dims(base);
                    let extra = cap - self.cap;
                    *t = Some((
                        Tensor::cat(
                            &[&a, &Tensor::zeros((extra, inp, r), DType::F32, device)?],
                            0,
                        )?,
                        Tensor::cat(
                            &[&b, &Tensor::zeros((extra, r, out), DType::F32, device)?],
                            0,
                        )?,
                    ));
                }
            }
        }
        self.cap = cap;
        Ok(())
    }

    /// Writes `blend` into `slot` of every table (zeros where it has no pair), allocating tables for
    /// modules it is the first to target.
    fn upload(
        &mut self,
        slot: usize,
        blend: &Blend,
        base: &BaseShape,
        device: &Device,
    ) -> Result<()> {
        self.grow(slot + 1, base, device)?;
        let r = self.rank;
        for (li, layer) in self.tables.iter_mut().enumerate() {
            for (mi, &m) in Module::ALL.iter().enumerate() {
                let pairs: Vec<_> = blend
                    .parts
                    .iter()
                    .map(|(a, w)| (a, w, a.pair(li, m)))
                    .collect();
                let targeted = pairs.iter().any(|(_, _, p)| p.is_some());
                let (inp, out) = m.dims(base);
                if layer[mi].is_none() {
                    if !targeted {
                        continue;
                    }
                    layer[mi] = Some((
                        Tensor::zeros((self.cap, inp, r), DType::F32, device)?,
                        Tensor::zeros((self.cap, r, out), DType::F32, device)?,
                    ));
                }
                let mut at = vec![0f32; inp * r];
                let mut bt = vec![0f32; r * out];
                let mut off = 0;
                for (adapter, w, pair) in pairs {
                    let ar = adapter.rank;
                    if let Some(p) = pair {
                        let s = adapter.scale * *w;
                        for k in 0..ar {
                            for i in 0..inp {
                                at[i * r + off + k] = p.a[k * inp + i];
                            }
                            for o in 0..out {
                                bt[(off + k) * out + o] = s * p.b[o * ar + k];
                            }
                        }
                    }
                    off += ar;
                }
                let (ta, tb) = layer[mi].as_ref().expect("table allocated above");
                ta.slice_set(&Tensor::from_vec(at, (1, inp, r), device)?, 0, slot)?;
                tb.slice_set(&Tensor::from_vec(bt, (1, r, out), device)?, 0, slot)?;
            }
        }
        Ok(())
    }

    /// `y + (x·Aᵀ)·(s·w·Bᵀ)` for every row with its own blend (`x` `[rows, in]`, `y` `[rows, out]`); `y`
    /// unchanged when no row of this step has a blend or none targets this projection.
    pub fn apply(&self, layer: usize, m: Module, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let (Some(ids), Some(Some((at, bt)))) = (
            &self.ids,
            self.tables.get(layer).map(|l| &l[module_index(m)]),
        ) else {
            return Ok(y);
        };
        let a = at.index_select(ids, 0)?; // [rows, in, R]
        let b = bt.index_select(ids, 0)?; // [rows, R, out]
        let d = x
            .contiguous()?
            .unsqueeze(1)?
            .matmul(&a)?
            .matmul(&b)?
            .squeeze(1)?;
        Ok((y + d)?)
    }
}

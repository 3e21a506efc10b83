//! Trait-LoRA blends for the candle decoder (the CUDA path). Every distinct blend in flight owns a slot of
//! dense per-layer tables on the model's device, one table pair per group of projections that share an input
//! (`q/k/v`, `o`, `gate/up`, `down`): `A` `[in, modules·slots·R]` holds each slot's `Aᵀ` (the ranks of a
//! blend's parts side by side, zero-padded to `R`), `B` `[modules·slots·R, out]` its `s·w·Bᵀ` in the rows of
//! its module's output columns. A step computes `((x·A) ⊙ mask)·B` for a whole group, where the mask keeps each
//! row's own slot: three dense matmul-class kernels per group and one add per projection, however many
//! distinct adapters the batch holds (the cost of the unused slots' columns is a few small GEMM columns; a GPU
//! step is bound by kernel launches, not by them). Slots are filled when a blend first appears (reused
//! least-recently-used); they hold only weak references, so the registry's leases and evictions see no extra
//! owner.

use std::sync::{Arc, Weak};

use candle_core::{DType, Device, Tensor};
use nimmer_loras::{Adapter, BaseShape, Blend, Module};

use super::Chunk;
use crate::error::Result;

/// Projections that share an input, in the order the decoder computes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Qkv,
    O,
    GateUp,
    Down,
}

impl Group {
    const ALL: [Group; 4] = [Group::Qkv, Group::O, Group::GateUp, Group::Down];

    /// The group's projections, in the order the decoder passes their outputs.
    pub fn modules(self) -> &'static [Module] {
        match self {
            Group::Qkv => &[Module::Q, Module::K, Module::V],
            Group::O => &[Module::O],
            Group::GateUp => &[Module::Gate, Module::Up],
            Group::Down => &[Module::Down],
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The group a projection belongs to.
    fn of(m: Module) -> Group {
        match m {
            Module::Q | Module::K | Module::V => Group::Qkv,
            Module::O => Group::O,
            Module::Gate | Module::Up => Group::GateUp,
            Module::Down => Group::Down,
        }
    }
}

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
    /// Slots in every table.
    cap: usize,
    /// Per group: the projections some blend targets (the tables' module blocks, in group order).
    mods: [Vec<Module>; 4],
    /// Per layer, per group: `(A, B)`.
    tables: Vec<[Option<(Tensor, Tensor)>; 4]>,
    slots: Vec<Option<SlotKey>>,
    step: u64,
    /// This step's row → slot one-hot mask `[rows, 1, cap, 1]`, when any row has a blend.
    mask: Option<Tensor>,
}

fn blend_modules(b: &Blend) -> impl Iterator<Item = Module> + '_ {
    b.parts.iter().flat_map(|(a, _)| a.modules.iter().copied())
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
        self.mask = None;
        let blends: Vec<Option<&Blend>> = chunks
            .iter()
            .map(|c| c.lora.filter(|b| !b.is_empty()))
            .collect();
        if blends.iter().all(Option::is_none) {
            return Ok(());
        }
        self.step += 1;
        // Forget blends whose adapters are gone.
        for s in self.slots.iter_mut() {
            if s.as_ref()
                .is_some_and(|k| k.parts.iter().any(|(w, _)| w.strong_count() == 0))
            {
                *s = None;
            }
        }
        // A layout that cannot hold this step's blends is rebuilt (rare: a wider blend, a newly targeted
        // projection, more distinct blends than slots); slots refill on demand.
        let mut distinct: Vec<&Blend> = Vec::new();
        for b in blends.iter().flatten() {
            if !distinct.iter().any(|d| same_blend(d, b)) {
                distinct.push(b);
            }
        }
        let rank = distinct
            .iter()
            .map(|b| b.parts.iter().map(|(a, _)| a.rank).sum::<usize>())
            .max()
            .unwrap_or(0);
        let new_mods = distinct
            .iter()
            .flat_map(|b| blend_modules(b))
            .any(|m| !self.mods[Group::of(m).index()].contains(&m));
        if rank > self.rank || new_mods || distinct.len() > self.cap {
            let mut mods = std::mem::take(&mut self.mods);
            for m in distinct.iter().flat_map(|b| blend_modules(b)) {
                let g = Group::of(m).index();
                if !mods[g].contains(&m) {
                    mods[g].push(m);
                    mods[g].sort_by_key(|x| Module::ALL.iter().position(|y| y == x));
                }
            }
            let cap = self.cap.max(distinct.len()).next_power_of_two().max(4);
            *self = Self {
                rank: self.rank.max(rank).next_multiple_of(8),
                cap,
                mods,
                step: self.step,
                ..Self::default()
            };
            self.allocate(base, device)?;
        }
        let mut onehot = Vec::new();
        for (c, blend) in chunks.iter().zip(&blends) {
            let mut row = vec![0f32; self.cap];
            if let Some(b) = blend {
                row[self.slot_for(b, base, device)?] = 1.0;
            }
            for _ in 0..c.tokens.len() {
                onehot.extend_from_slice(&row);
            }
        }
        let rows = onehot.len() / self.cap;
        self.mask = Some(Tensor::from_vec(onehot, (rows, 1, self.cap, 1), device)?);
        Ok(())
    }

    /// Zeroed tables for the current layout.
    fn allocate(&mut self, base: &BaseShape, device: &Device) -> Result<()> {
        let cols = self.cap * self.rank;
        self.tables = (0..base.n_layer)
            .map(|_| {
                let mut layer: [Option<(Tensor, Tensor)>; 4] = Default::default();
                for g in Group::ALL {
                    let mods = &self.mods[g.index()];
                    if mods.is_empty() {
                        continue;
                    }
                    let inp = g.modules()[0].dims(base).0;
                    let out: usize = mods.iter().map(|m| m.dims(base).1).sum();
                    layer[g.index()] = Some((
                        Tensor::zeros((inp, mods.len() * cols), DType::F32, device)?,
                        Tensor::zeros((mods.len() * cols, out), DType::F32, device)?,
                    ));
                }
                Ok(layer)
            })
            .collect::<Result<_>>()?;
        self.slots = (0..self.cap).map(|_| None).collect();
        Ok(())
    }

    /// The slot holding `blend`, filling a free or least-recently-used one.
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
        let slot = (0..self.cap)
            .find(|&i| self.slots[i].is_none())
            .or_else(|| {
                (0..self.cap)
                    .filter(|&i| self.slots[i].as_ref().is_some_and(|k| k.last_used < step))
                    .min_by_key(|&i| self.slots[i].as_ref().map_or(0, |k| k.last_used))
            })
            .expect("prepare sized the tables for this step's distinct blends");
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

    /// Writes `blend` into `slot` of every table (zeros where it has no pair).
    fn upload(&self, slot: usize, blend: &Blend, base: &BaseShape, device: &Device) -> Result<()> {
        let (r, cols) = (self.rank, self.cap * self.rank);
        for (li, layer) in self.tables.iter().enumerate() {
            for g in Group::ALL {
                let Some((ta, tb)) = &layer[g.index()] else {
                    continue;
                };
                let mods = &self.mods[g.index()];
                let out: usize = mods.iter().map(|m| m.dims(base).1).sum();
                let mut out_off = 0;
                for (mi, &m) in mods.iter().enumerate() {
                    let (inp, mout) = m.dims(base);
                    let mut at = vec![0f32; inp * r];
                    let mut bt = vec![0f32; r * out];
                    let mut off = 0;
                    for (adapter, w) in &blend.parts {
                        let ar = adapter.rank;
                        if let Some(p) = adapter.pair(li, m) {
                            let s = adapter.scale * *w;
                            for k in 0..ar {
                                for i in 0..inp {
                                    at[i * r + off + k] = p.a[k * inp + i];
                                }
                                let row = &mut bt[(off + k) * out + out_off..][..mout];
                                for (o, dst) in row.iter_mut().enumerate() {
                                    *dst = s * p.b[o * ar + k];
                                }
                            }
                        }
                        off += ar;
                    }
                    let col = mi * cols + slot * r;
                    ta.slice_set(&Tensor::from_vec(at, (inp, r), device)?, 1, col)?;
                    tb.slice_set(&Tensor::from_vec(bt, (r, out), device)?, 0, col)?;
                    out_off += mout;
                }
            }
        }
        Ok(())
    }

    /// Adds each row's blend to the outputs of `group` in `layer` (`x` the group's input `[rows, in]`, `outs`
    /// its projections' outputs in `Group::modules` order); outputs come back unchanged when no row of this
    /// step has a blend or none targets them.
    pub fn apply(
        &self,
        layer: usize,
        group: Group,
        x: &Tensor,
        mut outs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>> {
        let (Some(mask), Some(Some((a, b)))) = (
            &self.mask,
            self.tables.get(layer).map(|l| &l[group.index()]),
        ) else {
            return Ok(outs);
        };
        let mods = &self.mods[group.index()];
        let rows = x.dim(0)?;
        let t = x
            .contiguous()?
            .matmul(a)?
            .reshape((rows, mods.len(), self.cap, self.rank))?
            .broadcast_mul(mask)?
            .reshape((rows, mods.len() * self.cap * self.rank))?;
        let d = t.matmul(b)?;
        let mut off = 0;
        for &m in mods {
            let i = group
                .modules()
                .iter()
                .position(|gm| *gm == m)
                .expect("the group's tables hold its own modules");
            let width = outs[i].dim(1)?;
            outs[i] = (&outs[i] + d.narrow(1, off, width)?)?;
            off += width;
        }
        Ok(outs)
    }
}

fn same_blend(a: &Blend, b: &Blend) -> bool {
    a.parts.len() == b.parts.len()
        && a.parts
            .iter()
            .zip(&b.parts)
            .all(|((x, wx), (y, wy))| Arc::ptr_eq(x, y) && wx.to_bits() == wy.to_bits())
}

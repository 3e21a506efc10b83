//! Batched quantized matmul on the CPU: `out[r][n] = Σ_k x[r][k] · W[n][k]` for every activation row `r`.
//!
//! Weights are stored as blocks of 32 along `k` with `w = d·q + m` (unsigned `q`, per-block f16 `d` and `m`):
//! Q4_1 keeps its 4-bit `q` (nibble-packed), Q8_0 becomes `q + 128` with `m = -128·d`, anything else is
//! requantized to 8 bits. Rows are tiled 16 at a time so that one 512-bit `vpdpbusd` multiplies four
//! activation bytes (broadcast) with four bytes of each of 16 weight rows: every weight byte is read once per
//! step however many activation rows there are, which is why a batch of 16 costs little more than one.
//!
//! Activations are quantized per row and per block to int8 exactly as ggml's Q8_1 (`d = amax/127`, stored f16),
//! so the results match candle's `QMatMul` on the same file up to float summation order.
//!
//! Every output element is computed by the same sequence of operations whatever the number of rows, so a
//! sequence gets bit-identical logits alone or in a batch (batch invariance).
//!
//! Prefill chunks are matrix-matrix products: quantization also lays the rows out in panels of [`PANEL`]
//! (their quants interleaved dword by dword, written while the rows are in cache), and a panel kernel
//! multiplies eight rows per pass over a Q4 weight tile with every row's quants and scales behind one pointer
//! (`avx2::q4_panel`, `x86::q4_panel`: on AVX-512 each activation dword is an embedded broadcast).
//!
//! [`level`] picks the kernel at run time: AVX-512 VNNI, else AVX2, else portable code; all three give
//! bit-identical results.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::transpose8;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use half::f16;
use rayon::prelude::*;

/// Elements per quantization block along `k`.
pub const QK: usize = 32;
/// Weight rows per tile.
pub const TILE: usize = 16;

/// Storage format of a tiled weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    /// 4-bit unsigned `q`, two per byte.
    Q4,
    /// 8-bit unsigned `q`.
    U8,
}

impl QFormat {
    /// Bytes of `q` per (tile, block).
    const fn qs_bytes(self) -> usize {
        match self {
            QFormat::Q4 => TILE * QK / 2,
            QFormat::U8 => TILE * QK,
        }
    }
    /// Bytes per (tile, block): 16 f16 `d`, 16 f16 `m`, then `q`.
    const fn block_bytes(self) -> usize {
        TILE * 4 + self.qs_bytes()
    }
}

/// A weight matrix `[n, k]` in the tiled layout.
///
/// Per (tile, block): `d[16]` f16, `m[16]` f16, then the quants.
/// Q4: 4 groups of 8 `k` values; per group and row 4 bytes, byte `j` = `q[8g+j] | q[8g+j+4] << 4`.
/// U8: 8 groups of 4 `k` values; per group and row 4 bytes `q[4g..4g+4]`.
pub struct TiledWeight {
    format: QFormat,
    /// Real output rows.
    n: usize,
    k: usize,
    data: Vec<u8>,
}

impl TiledWeight {
    pub fn n(&self) -> usize {
        self.n
    }
    pub fn k(&self) -> usize {
        self.k
    }
    pub fn format(&self) -> QFormat {
        self.format
    }
    pub fn size_bytes(&self) -> usize {
        self.data.len()
    }
    fn tiles(&self) -> usize {
        self.n.div_ceil(TILE)
    }
    fn blocks(&self) -> usize {
        self.k / QK
    }
    fn block_ptr(&self, tile: usize, block: usize) -> &[u8] {
        let bb = self.format.block_bytes();
        let off = (tile * self.blocks() + block) * bb;
        &self.data[off..off + bb]
    }

    /// Builds a tiled weight from per-row blocks given by `row_block(n, b) -> (d, m, q[32])`.
    fn build(
        format: QFormat,
        n: usize,
        k: usize,
        mut row_block: impl FnMut(usize, usize) -> (f16, f16, [u8; QK]),
    ) -> Self {
        assert!(k.is_multiple_of(QK), "k = {k} is not a multiple of {QK}");
        let blocks = k / QK;
        let tiles = n.div_ceil(TILE);
        let bb = format.block_bytes();
        let mut data = vec![0u8; tiles * blocks * bb];
        for t in 0..tiles {
            for b in 0..blocks {
                let off = (t * blocks + b) * bb;
                let blk = &mut data[off..off + bb];
                for lane in 0..TILE {
                    let row = t * TILE + lane;
                    let (d, m, q) = if row < n {
                        row_block(row, b)
                    } else {
                        (f16::ZERO, f16::ZERO, [0u8; QK])
                    };
                    blk[lane * 2..lane * 2 + 2].copy_from_slice(&d.to_le_bytes());
                    blk[TILE * 2 + lane * 2..TILE * 2 + lane * 2 + 2]
                        .copy_from_slice(&m.to_le_bytes());
                    let qs = &mut blk[TILE * 4..];
                    match format {
                        QFormat::Q4 => {
                            for g in 0..QK / 8 {
                                for j in 0..4 {
                                    let lo = q[8 * g + j];
                                    let hi = q[8 * g + j + 4];
                                    debug_assert!(lo < 16 && hi < 16);
                                    qs[(g * TILE + lane) * 4 + j] = lo | (hi << 4);
                                }
                            }
                        }
                        QFormat::U8 => {
                            for g in 0..QK / 4 {
                                for j in 0..4 {
                                    qs[(g * TILE + lane) * 4 + j] = q[4 * g + j];
                                }
                            }
                        }
                    }
                }
            }
        }
        Self { format, n, k, data }
    }

    /// From raw GGUF Q4_1 blocks (`d: f16, m: f16, qs[16]`, low nibbles = first 16 values), row-major `[n, k]`.
    pub fn from_q4_1(raw: &[u8], n: usize, k: usize) -> Self {
        const BS: usize = 20;
        let blocks = k / QK;
        assert_eq!(raw.len(), n * blocks * BS, "Q4_1 data size");
        Self::build(QFormat::Q4, n, k, |row, b| {
            let blk = &raw[(row * blocks + b) * BS..][..BS];
            let d = f16::from_le_bytes([blk[0], blk[1]]);
            let m = f16::from_le_bytes([blk[2], blk[3]]);
            let mut q = [0u8; QK];
            for j in 0..16 {
                q[j] = blk[4 + j] & 0x0F;
                q[j + 16] = blk[4 + j] >> 4;
            }
            (d, m, q)
        })
    }

    /// From raw GGUF Q8_0 blocks (`d: f16, qs[32]: i8`): exact, as `q + 128` with `m = -128·d`.
    pub fn from_q8_0(raw: &[u8], n: usize, k: usize) -> Self {
        const BS: usize = 34;
        let blocks = k / QK;
        assert_eq!(raw.len(), n * blocks * BS, "Q8_0 data size");
        Self::build(QFormat::U8, n, k, |row, b| {
            let blk = &raw[(row * blocks + b) * BS..][..BS];
            let d = f16::from_le_bytes([blk[0], blk[1]]);
            let mut q = [0u8; QK];
            for j in 0..QK {
                q[j] = (blk[2 + j] as i8 as i16 + 128) as u8;
            }
            (d, f16::from_f32(-128.0 * d.to_f32()), q)
        })
    }

    /// Requantizes f32 weights `[n, k]` to 8-bit asymmetric blocks (`d = (max-min)/255`, `m = min`).
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k);
        Self::build(QFormat::U8, n, k, |row, b| {
            let x = &w[row * k + b * QK..][..QK];
            let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
            for &v in x {
                lo = lo.min(v);
                hi = hi.max(v);
            }
            let d = f16::from_f32((hi - lo) / 255.0);
            let m = f16::from_f32(lo);
            let (df, mf) = (d.to_f32(), m.to_f32());
            let mut q = [0u8; QK];
            if df > 0.0 {
                for (qj, &v) in q.iter_mut().zip(x) {
                    *qj = ((v - mf) / df).round().clamp(0.0, 255.0) as u8;
                }
            }
            (d, m, q)
        })
    }

    /// Dequantizes one row (embedding lookup from a tied output matrix).
    pub fn row(&self, n: usize, out: &mut [f32]) {
        assert!(n < self.n && out.len() == self.k);
        let (t, lane) = (n / TILE, n % TILE);
        for b in 0..self.blocks() {
            let blk = self.block_ptr(t, b);
            let d = f16::from_le_bytes([blk[lane * 2], blk[lane * 2 + 1]]).to_f32();
            let m = f16::from_le_bytes([blk[TILE * 2 + lane * 2], blk[TILE * 2 + lane * 2 + 1]])
                .to_f32();
            let qs = &blk[TILE * 4..];
            for i in 0..QK {
                let q = match self.format {
                    QFormat::Q4 => {
                        let (g, r) = (i / 8, i % 8);
                        let byte = qs[(g * TILE + lane) * 4 + r % 4];
                        if r < 4 { byte & 0x0F } else { byte >> 4 }
                    }
                    QFormat::U8 => qs[((i / 4) * TILE + lane) * 4 + i % 4],
                };
                out[b * QK + i] = d * q as f32 + m;
            }
        }
    }
}

/// Activation rows quantized per block of 32 (ggml Q8_1 semantics).
#[derive(Default)]
pub struct QuantActs {
    rows: usize,
    k: usize,
    /// `[rows, k]` int8 quants.
    q: Vec<i8>,
    /// `[rows, k/32]` scale `d` (f16-rounded, as f32).
    d: Vec<f32>,
    /// `[rows, k/32]` Q8_1's `s = d·Σq` in f16 arithmetic: the min term of Q4_1 weights.
    s: Vec<f32>,
    /// `[rows, k/32]` exact `d·Σq`: the offset term of U8 weights.
    s_exact: Vec<f32>,
    /// The first `rows / PANEL` groups of [`PANEL`] rows again, interleaved for the prefill kernel: per
    /// (panel, block) the rows' quants dword by dword (`[8 dwords][PANEL rows][4 bytes]`).
    panel_q: Vec<i8>,
    /// Per (panel, block): the rows' `d`, then their `s` (`[2][PANEL]`).
    panel_ds: Vec<f32>,
    /// Panels built by the last quantization (0 where no kernel of this CPU reads them).
    panels: usize,
}

/// Activation rows interleaved per panel (and per pass of the prefill kernel).
pub const PANEL: usize = 8;

impl QuantActs {
    /// Quantizes `x` (`[rows, k]`, row-major) into `self`, reusing its buffers.
    pub fn quantize(&mut self, x: &[f32], rows: usize, k: usize) {
        assert!(k.is_multiple_of(QK) && x.len() == rows * k);
        let nb = rows * (k / QK);
        self.rows = rows;
        self.k = k;
        self.q.resize(rows * k, 0);
        self.d.resize(nb, 0.0);
        self.s.resize(nb, 0.0);
        self.s_exact.resize(nb, 0.0);
        // Only the SIMD prefill kernels read panels: the portable level skips them.
        let panels = if level() >= KernelLevel::Avx2 {
            rows / PANEL
        } else {
            0
        };
        self.size_panels(panels);
        let simd = level() >= KernelLevel::Avx2;
        let (kb, pk) = (k / QK, PANEL * k);
        // Rows `PANEL` at a time (the last group may be shorter and has no panel); a full group also fills its
        // panel while its quants are in cache.
        let group = move |g: RowGroup<'_>| {
            for ((((xb, qb), d), s), se) in
                g.x.chunks_exact(QK)
                    .zip(g.q.chunks_exact_mut(QK))
                    .zip(g.d.iter_mut())
                    .zip(g.s.iter_mut())
                    .zip(g.s_exact.iter_mut())
            {
                let (dd, sum) = match simd {
                    // SAFETY: AVX2 is present (the kernel level checks it); blocks are 32 values.
                    #[cfg(target_arch = "x86_64")]
                    true => unsafe { avx2::quantize_block(xb, qb) },
                    _ => scalar::quantize_block(xb, qb),
                };
                let d16 = f16::from_f32(dd);
                *d = d16.to_f32();
                *s = (f16::from_f32(sum as f32) * d16).to_f32();
                *se = d16.to_f32() * sum as f32;
            }
            if let Some((pq, pds)) = g.panel {
                fill_panel(g.q, g.d, g.s, kb, pq, pds);
            }
        };
        let mut panel_parts = self
            .panel_q
            .chunks_mut(pk)
            .zip(self.panel_ds.chunks_mut(kb * 2 * PANEL));
        let groups = x
            .chunks(pk)
            .zip(self.q.chunks_mut(pk))
            .zip(self.d.chunks_mut(PANEL * kb))
            .zip(self.s.chunks_mut(PANEL * kb))
            .zip(self.s_exact.chunks_mut(PANEL * kb))
            .map(|((((x, q), d), s), s_exact)| RowGroup {
                x,
                q,
                d,
                s,
                s_exact,
                panel: panel_parts.next(),
            });
        // Small inputs are not worth waking another thread for.
        if rows > PANEL && rows * k >= 4 * 1024 {
            groups.par_bridge().for_each(group);
        } else {
            groups.for_each(group);
        }
    }

    /// Sizes the panel buffers for `panels` panels.
    fn size_panels(&mut self, panels: usize) {
        self.panels = panels;
        self.panel_q.resize(panels * PANEL * self.k, 0);
        self.panel_ds
            .resize(panels * (self.k / QK) * 2 * PANEL, 0.0);
    }

    /// Fills the panels from the row-major quants and scales whatever the kernel level (tests).
    #[cfg(test)]
    fn interleave(&mut self) {
        self.size_panels(self.rows / PANEL);
        let (kb, pk) = (self.k / QK, PANEL * self.k);
        for (p, (pq, pds)) in self
            .panel_q
            .chunks_mut(pk)
            .zip(self.panel_ds.chunks_mut(kb * 2 * PANEL))
            .enumerate()
        {
            let sc = p * PANEL * kb..(p + 1) * PANEL * kb;
            fill_panel(
                &self.q[p * pk..(p + 1) * pk],
                &self.d[sc.clone()],
                &self.s[sc],
                kb,
                pq,
                pds,
            );
        }
    }

    fn row_q(&self, r: usize) -> &[i8] {
        &self.q[r * self.k..(r + 1) * self.k]
    }
    fn row_scales(&self, r: usize) -> (&[f32], &[f32]) {
        let nb = self.k / QK;
        (&self.d[r * nb..(r + 1) * nb], &self.s[r * nb..(r + 1) * nb])
    }
    fn row_scales_exact(&self, r: usize) -> (&[f32], &[f32]) {
        let nb = self.k / QK;
        (
            &self.d[r * nb..(r + 1) * nb],
            &self.s_exact[r * nb..(r + 1) * nb],
        )
    }
}

/// Up to [`PANEL`] rows of a quantization: their input, quants and scales, and their panel if the group is full
/// and panels are wanted.
struct RowGroup<'a> {
    x: &'a [f32],
    q: &'a mut [i8],
    d: &'a mut [f32],
    s: &'a mut [f32],
    s_exact: &'a mut [f32],
    panel: Option<(&'a mut [i8], &'a mut [f32])>,
}

/// One panel from its [`PANEL`] rows' row-major quants `q` and scales `d`, `s` (`kb` blocks a row): per block,
/// the rows' quants dword by dword (`pq`) and their `d`, then their `s` (`pds`).
fn fill_panel(q: &[i8], d: &[f32], s: &[f32], kb: usize, pq: &mut [i8], pds: &mut [f32]) {
    let k = kb * QK;
    assert!(q.len() == PANEL * k && d.len() == PANEL * kb && s.len() == PANEL * kb);
    assert!(pq.len() == PANEL * k && pds.len() == 2 * PANEL * kb);
    for b in 0..kb {
        let dst = &mut pq[b * QK * PANEL..(b + 1) * QK * PANEL];
        #[cfg(target_arch = "x86_64")]
        if level() >= KernelLevel::Avx2 {
            // SAFETY: AVX2 is present; 8 rows of 32 bytes at stride `k` are read from `q` and 256 bytes
            // written to `dst` (lengths asserted above).
            unsafe { avx2::transpose_dwords(q.as_ptr().add(b * QK), k, dst.as_mut_ptr()) };
        } else {
            transpose_dwords(&q[b * QK..], k, dst);
        }
        #[cfg(not(target_arch = "x86_64"))]
        transpose_dwords(&q[b * QK..], k, dst);
        for r in 0..PANEL {
            pds[b * 2 * PANEL + r] = d[r * kb + b];
            pds[b * 2 * PANEL + PANEL + r] = s[r * kb + b];
        }
    }
}

/// `dst[(dw · PANEL + r) · 4 ..][..4] = src[r · stride + dw · 4 ..][..4]` for 8 dwords of [`PANEL`] rows.
fn transpose_dwords(src: &[i8], stride: usize, dst: &mut [i8]) {
    for r in 0..PANEL {
        for dw in 0..QK / 4 {
            dst[(dw * PANEL + r) * 4..(dw * PANEL + r) * 4 + 4]
                .copy_from_slice(&src[r * stride + dw * 4..r * stride + dw * 4 + 4]);
        }
    }
}

/// Which kernel family runs on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KernelLevel {
    Portable,
    Avx2,
    Avx512Vnni,
}

/// Every level this CPU can run, best last.
pub fn available_levels() -> Vec<KernelLevel> {
    let mut v = vec![KernelLevel::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::available() {
            v.push(KernelLevel::Avx2);
        }
        if x86::available() {
            v.push(KernelLevel::Avx512Vnni);
        }
    }
    v
}

/// The best level, detected once. `NIMMER_KERNEL=portable|avx2` caps it (to measure or test the fallbacks).
pub fn level() -> KernelLevel {
    static LEVEL: std::sync::OnceLock<KernelLevel> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("NIMMER_KERNEL").as_deref() {
            Ok("portable") => KernelLevel::Portable,
            Ok("avx2") => KernelLevel::Avx2,
            _ => KernelLevel::Avx512Vnni,
        };
        available_levels()
            .into_iter()
            .filter(|l| *l <= cap)
            .max()
            .unwrap_or(KernelLevel::Portable)
    })
}

/// A raw pointer that may cross threads: each task writes a disjoint set of output columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `out[r * w.n() + n] = Σ_k x[r][k] · w[n][k]` for all rows of `x`.
pub fn matmul(x: &QuantActs, w: &TiledWeight, out: &mut [f32]) {
    matmul_with(level(), x, w, out)
}

/// As [`matmul`] with an explicit kernel level.
pub fn matmul_with(level: KernelLevel, x: &QuantActs, w: &TiledWeight, out: &mut [f32]) {
    assert_eq!(x.k, w.k, "activation k {} != weight k {}", x.k, w.k);
    assert!(out.len() >= x.rows * w.n);
    if x.rows == 0 {
        return;
    }
    let tiles = w.tiles();
    // Enough tasks to balance across threads, few enough that each is a solid chunk of work.
    let threads = rayon::current_num_threads().max(1);
    let per_task = tiles.div_ceil(threads * 4).max(1);
    let out_ptr = OutPtr(out.as_mut_ptr());
    // Activation rows per pass over a weight tile: AVX-512 has the registers for 8 accumulators, AVX2 for 4.
    let pass = match level {
        KernelLevel::Avx512Vnni => MAX_ROWS_PER_PASS,
        _ => 4,
    };
    let run = move |t0: usize| {
        let t1 = (t0 + per_task).min(tiles);
        let out_ptr = out_ptr;
        for t in t0..t1 {
            let mut tile_out = [[0f32; TILE]; MAX_ROWS_PER_PASS];
            let mut r0 = 0;
            while r0 < x.rows {
                let mut nr = (x.rows - r0).min(pass);
                // A whole panel against Q4 weights takes the prefill kernel of its level.
                let panel = w.format == QFormat::Q4 && r0 % PANEL == 0 && r0 / PANEL < x.panels;
                if panel && level >= KernelLevel::Avx2 {
                    nr = PANEL;
                }
                match level {
                    #[cfg(target_arch = "x86_64")]
                    KernelLevel::Avx2 if panel => unsafe {
                        avx2::q4_panel(w, t, x, r0 / PANEL, &mut tile_out)
                    },
                    #[cfg(target_arch = "x86_64")]
                    KernelLevel::Avx512Vnni if panel => unsafe {
                        x86::q4_panel(w, t, x, r0 / PANEL, &mut tile_out)
                    },
                    #[cfg(target_arch = "x86_64")]
                    KernelLevel::Avx512Vnni => unsafe {
                        x86::tile_rows(w, t, x, r0, nr, &mut tile_out)
                    },
                    #[cfg(target_arch = "x86_64")]
                    KernelLevel::Avx2 => unsafe { avx2::tile_rows(w, t, x, r0, nr, &mut tile_out) },
                    _ => scalar::tile_rows(w, t, x, r0, nr, &mut tile_out),
                }
                for (i, row_out) in tile_out.iter().enumerate().take(nr) {
                    let r = r0 + i;
                    let n0 = t * TILE;
                    let cnt = TILE.min(w.n - n0);
                    // SAFETY: tile `t` owns columns n0..n0+cnt of every row; no other task writes them.
                    unsafe {
                        let dst = out_ptr.0.add(r * w.n + n0);
                        if cnt == TILE {
                            std::ptr::write_unaligned(dst as *mut [f32; TILE], *row_out);
                        } else {
                            std::ptr::copy_nonoverlapping(row_out.as_ptr(), dst, cnt);
                        }
                    }
                }
                r0 += nr;
            }
        }
    };
    if tiles <= per_task {
        run(0);
    } else {
        (0..tiles).into_par_iter().step_by(per_task).for_each(run);
    }
}

/// Most activation rows a kernel pass keeps in registers at once.
pub const MAX_ROWS_PER_PASS: usize = 8;

#[cfg(test)]
mod tests;

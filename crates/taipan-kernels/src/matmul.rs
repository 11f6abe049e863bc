//! Matrix products `Y[T, N] = X[T, K] · Wᵀ` for weights `W[N, K]`, split over the thread pool.
//!
//! A decode step is `T = 1` (mat-vec); prefill is `T > 1` (mat-mat). Both use the same tiles:
//! 4 weight rows against one activation row, or 2 rows against 4, so each weight load serves
//! several products. Work is split by weight rows; within a task, activation rows go in blocks
//! small enough to stay in cache while the task's rows pass over them.

use crate::dispatch::{Kernels, TileKernels};
use crate::formats::{dequantize, DType, SizeMismatch};
use crate::huge::WeightArena;
use crate::packed::{ActRow, PackedMatrix, GROUP};
use crate::pool::ThreadPool;
use crate::quant::QuantizedActs;
use crate::tiles;
use std::cell::RefCell;

/// How weights are kept in memory and multiplied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MatmulMode {
    /// Repacked integer levels against 8-bit activations (fast; the production path).
    #[default]
    Fast,
    /// Weights dequantized to f32, f32 activations: the exact maths of the stored weights.
    Exact,
}

/// A dense f32 matrix `[rows, cols]`.
#[derive(Debug, Clone)]
pub struct DenseMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
    /// Whether the file stored these weights in half precision (f16/bf16): only those take
    /// prompt rows through bf16 tiles. Weights a file keeps in f32 (converters keep Mamba's
    /// small projections so on purpose) stay f32.
    pub half_precision: bool,
}

/// A weight matrix in the form its kernels want.
#[derive(Debug, Clone)]
pub enum Matrix {
    Packed(PackedMatrix),
    Dense(DenseMatrix),
    /// Matrices of one input size but different formats stacked by rows (a fused projection
    /// whose parts a file stores in different formats), each kept in its own form.
    Stacked(StackedMatrix),
}

/// Parts stacked by rows; see [`Matrix::Stacked`].
#[derive(Debug, Clone)]
pub struct StackedMatrix {
    pub parts: Vec<Matrix>,
    pub rows: usize,
    pub cols: usize,
}

impl Matrix {
    /// Builds a matrix from `rows` rows of `cols` elements stored as `dtype`; a packed one takes
    /// its bytes from `arena` (a model's matrices share one, end to end on huge pages).
    pub fn from_stored(
        arena: &WeightArena,
        dtype: DType,
        data: &[u8],
        rows: usize,
        cols: usize,
        mode: MatmulMode,
    ) -> Result<Matrix, SizeMismatch> {
        if mode == MatmulMode::Fast {
            if let Some(packed) = PackedMatrix::from_blocks(arena, dtype, data, rows, cols) {
                return packed.map(Matrix::Packed);
            }
        }
        let mut out = vec![0f32; rows * cols];
        dequantize(dtype, data, &mut out)?;
        let half_precision = matches!(dtype, DType::F16 | DType::BF16);
        Ok(Matrix::Dense(DenseMatrix { rows, cols, data: out, half_precision }))
    }

    /// Stacks matrices of one input size by rows. Dense parts are joined into one dense matrix;
    /// anything else keeps each part in its own form.
    pub fn stack(mut parts: Vec<Matrix>) -> Matrix {
        assert!(!parts.is_empty(), "stacking no matrices");
        let cols = parts[0].cols();
        assert!(parts.iter().all(|p| p.cols() == cols), "stacked matrices differ in input size");
        if parts.len() == 1 {
            return parts.remove(0);
        }
        let rows = parts.iter().map(Matrix::rows).sum();
        if parts.iter().all(|p| matches!(p, Matrix::Dense(_))) {
            let mut data = Vec::with_capacity(rows * cols);
            let mut half_precision = true;
            for p in parts {
                if let Matrix::Dense(d) = p {
                    data.extend(d.data);
                    half_precision &= d.half_precision;
                }
            }
            return Matrix::Dense(DenseMatrix { rows, cols, data, half_precision });
        }
        Matrix::Stacked(StackedMatrix { parts, rows, cols })
    }

    /// A dense matrix from f32 values.
    pub fn from_f32(data: Vec<f32>, rows: usize, cols: usize) -> Matrix {
        assert_eq!(data.len(), rows * cols);
        Matrix::Dense(DenseMatrix { rows, cols, data, half_precision: false })
    }

    pub fn rows(&self) -> usize {
        match self {
            Matrix::Packed(m) => m.rows,
            Matrix::Dense(m) => m.rows,
            Matrix::Stacked(m) => m.rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Matrix::Packed(m) => m.cols,
            Matrix::Dense(m) => m.cols,
            Matrix::Stacked(m) => m.cols,
        }
    }

    /// Row `r` as f32 values (`cols` of them): what an embedding lookup needs from a model
    /// that ties its output matrix to the embedding.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows() && out.len() == self.cols(), "row_f32 shape");
        match self {
            Matrix::Packed(m) => m.dequantize_row(r, out),
            Matrix::Dense(m) => out.copy_from_slice(&m.data[r * m.cols..(r + 1) * m.cols]),
            Matrix::Stacked(st) => {
                let mut first = 0;
                for p in &st.parts {
                    if r < first + p.rows() {
                        return p.row_f32(r - first, out);
                    }
                    first += p.rows();
                }
            }
        }
    }

    /// Bytes held in memory.
    pub fn memory_bytes(&self) -> usize {
        match self {
            Matrix::Packed(m) => m.memory_bytes(),
            Matrix::Dense(m) => m.data.len() * 4,
            Matrix::Stacked(m) => m.parts.iter().map(Matrix::memory_bytes).sum(),
        }
    }
}

/// Scratch kept by the caller between products so that none allocates.
#[derive(Default, Debug)]
pub struct MatmulScratch {
    acts: QuantizedActs,
    /// One part's output, for stacked matrices whose parts are not all packed.
    part_out: Vec<f32>,
    /// Activations rounded to bf16 for tile products.
    acts_bf16: tiles::TileBuf<u16>,
    /// Which activation rows of the next products are prompt rows (`true`), which go through
    /// tile kernels where the CPU has them (see [`TileKernels`]). Models set it for their token
    /// rows and clear it for products over other rows; empty means no prompt rows.
    pub prompt_rows: Vec<bool>,
    /// A mixed-role product's rows of one role, gathered, and their outputs (kept: a prompt
    /// chunk's are megabytes, which a fresh allocation would fault in page by page every time).
    role_in: Vec<f32>,
    role_out: Vec<f32>,
}

thread_local! {
    /// A pool thread's bf16 panels and tile staging buffer, kept between products.
    static TILE_SCRATCH: RefCell<(tiles::TileBuf<u16>, tiles::TileBuf<f32>)> =
        const { RefCell::new((tiles::TileBuf::new(), tiles::TileBuf::new())) };
}

/// Shared context of the compute kernels: which table, which pool.
pub struct Compute {
    pub kernels: Kernels,
    pub pool: ThreadPool,
}

impl Compute {
    pub fn new(threads: usize) -> Self {
        Compute { kernels: Kernels::best(), pool: ThreadPool::new(threads) }
    }

    pub fn with_kernels(threads: usize, kernels: Kernels) -> Self {
        Compute { kernels, pool: ThreadPool::new(threads) }
    }

    /// `out[t, n] = Σ_k x[t, k] · w[n, k]` for `t < tokens`.
    pub fn matmul(&self, out: &mut [f32], x: &[f32], tokens: usize, w: &Matrix, scratch: &mut MatmulScratch) {
        let (n, k) = (w.rows(), w.cols());
        assert_eq!(x.len(), tokens * k, "matmul input shape");
        assert_eq!(out.len(), tokens * n, "matmul output shape");
        if let Some(t) = self.kernels.tiles {
            if scratch.prompt_rows.iter().take(tokens).any(|&p| p) {
                let tiled = match w {
                    Matrix::Dense(m) => Some(m).filter(|m| m.half_precision).map(Tiled::Dense),
                    _ => packed_parts(w).map(Tiled::Packed),
                };
                if let Some(w) = tiled {
                    return self.matmul_by_role(out, x, tokens, &w, scratch, t);
                }
            }
        }
        let sink = OutPtr(out.as_mut_ptr());
        match w {
            Matrix::Packed(m) => self.matmul_packed(&sink, n, x, tokens, &[(0, m)], scratch),
            Matrix::Stacked(st) => {
                let packed: Option<Vec<(usize, &PackedMatrix)>> = st
                    .parts
                    .iter()
                    .scan(0, |first, p| {
                        let at = *first;
                        *first += p.rows();
                        Some(match p {
                            Matrix::Packed(m) => Some((at, m)),
                            _ => None,
                        })
                    })
                    .collect();
                match packed {
                    Some(parts) => self.matmul_packed(&sink, n, x, tokens, &parts, scratch),
                    None => {
                        // Some part is dense: each part on its own, scattered into its columns.
                        let mut first = 0;
                        let mut part_out = std::mem::take(&mut scratch.part_out);
                        for p in &st.parts {
                            let pn = p.rows();
                            part_out.resize(tokens * pn, 0.0);
                            self.matmul(&mut part_out, x, tokens, p, scratch);
                            for t in 0..tokens {
                                out[t * n + first..t * n + first + pn].copy_from_slice(&part_out[t * pn..(t + 1) * pn]);
                            }
                            first += pn;
                        }
                        scratch.part_out = part_out;
                    }
                }
            }
            Matrix::Dense(m) => self.matmul_dense(&sink, x, tokens, m),
        }
    }
}

/// The weights of a product that tiles can take.
enum Tiled<'a> {
    /// Packed parts stacked by rows: `(first output row, part)`.
    Packed(Vec<(usize, &'a PackedMatrix)>),
    /// Rows a file stored as f16 or bf16, held as f32, rounded to bf16 for the tiles.
    Dense(&'a DenseMatrix),
}

/// Index of each part's first row group in the stack of `parts`, then the total.
fn group_starts(parts: &[(usize, &PackedMatrix)]) -> Vec<usize> {
    let mut starts = Vec::with_capacity(parts.len() + 1);
    starts.push(0);
    for (_, m) in parts {
        starts.push(starts.last().copied().unwrap_or(0) + m.groups());
    }
    starts
}

/// A matrix's packed parts as `(first output row, part)`, if every part is packed.
fn packed_parts(w: &Matrix) -> Option<Vec<(usize, &PackedMatrix)>> {
    match w {
        Matrix::Packed(m) => Some(vec![(0, m)]),
        Matrix::Stacked(st) => {
            let mut first = 0;
            st.parts
                .iter()
                .map(|p| {
                    let at = first;
                    first += p.rows();
                    match p {
                        Matrix::Packed(m) => Some((at, m)),
                        _ => None,
                    }
                })
                .collect()
        }
        Matrix::Dense(_) => None,
    }
}

impl Compute {
    /// A product whose rows include prompt rows: those through tiles, the others through the
    /// integer (packed) or f32 (dense) kernels. When both kinds share a step, each kind's rows
    /// are gathered, multiplied and scattered back.
    fn matmul_by_role(
        &self,
        out: &mut [f32],
        x: &[f32],
        tokens: usize,
        w: &Tiled<'_>,
        scratch: &mut MatmulScratch,
        t: TileKernels,
    ) {
        let (n, k) = (out.len() / tokens, x.len() / tokens);
        let roles = std::mem::take(&mut scratch.prompt_rows);
        let prompt = |r: usize| roles.get(r).copied().unwrap_or(false);
        let run = |sink: &OutPtr, xs: &[f32], rows: usize, tiled: bool, scratch: &mut MatmulScratch| match (w, tiled) {
            (Tiled::Packed(parts), true) => self.matmul_packed_tiles(sink, n, xs, rows, parts, scratch, t),
            (Tiled::Packed(parts), false) => self.matmul_packed(sink, n, xs, rows, parts, scratch),
            (Tiled::Dense(m), true) => self.matmul_dense_tiles(sink, xs, rows, m, scratch, t),
            (Tiled::Dense(m), false) => self.matmul_dense(sink, xs, rows, m),
        };
        if (0..tokens).all(prompt) {
            run(&OutPtr(out.as_mut_ptr()), x, tokens, true, scratch);
        } else {
            let (given, sampled): (Vec<usize>, Vec<usize>) = (0..tokens).partition(|&r| prompt(r));
            let (mut xs, mut ys) = (std::mem::take(&mut scratch.role_in), std::mem::take(&mut scratch.role_out));
            for (rows, tiled) in [(given, true), (sampled, false)] {
                xs.clear();
                for &r in &rows {
                    xs.extend_from_slice(&x[r * k..(r + 1) * k]);
                }
                ys.resize(rows.len() * n, 0.0);
                run(&OutPtr(ys.as_mut_ptr()), &xs, rows.len(), tiled, scratch);
                for (i, &r) in rows.iter().enumerate() {
                    out[r * n..(r + 1) * n].copy_from_slice(&ys[i * n..(i + 1) * n]);
                }
            }
            (scratch.role_in, scratch.role_out) = (xs, ys);
        }
        scratch.prompt_rows = roles;
    }

    /// [`Compute::matmul_packed`] through bf16 tiles: each task dequantizes two row groups into
    /// panels, then one tile call multiplies them with every activation row.
    #[allow(clippy::too_many_arguments)]
    fn matmul_packed_tiles(
        &self,
        sink: &OutPtr,
        n: usize,
        x: &[f32],
        tokens: usize,
        parts: &[(usize, &PackedMatrix)],
        scratch: &mut MatmulScratch,
        t: TileKernels,
    ) {
        let (k, kp) = (parts[0].1.cols, parts[0].1.stride);
        debug_assert!(parts.iter().all(|(_, m)| m.stride == kp));
        let padded = tiles::acts_to_bf16(&self.pool, x, tokens, k, kp, &mut scratch.acts_bf16);
        let acts = &scratch.acts_bf16[..padded * kp];
        let starts = group_starts(parts);
        let total = starts[parts.len()];
        let per_task = tile_block_groups(total, self.pool.threads());
        self.pool.for_chunks(total.div_ceil(per_task), 1, &|blocks| {
            for b in blocks {
                let block: Vec<_> = (b * per_task..((b + 1) * per_task).min(total))
                    .map(|gg| {
                        let p = starts.partition_point(|&s| s <= gg) - 1;
                        let (first, m) = parts[p];
                        let g = gg - starts[p];
                        (m.group(g), (first + g * GROUP, (m.rows - g * GROUP).min(GROUP)))
                    })
                    .collect();
                let cols: Vec<_> = block.iter().map(|b| b.1).collect();
                let panel = |i: usize, dst: &mut [u16]| (t.panel_from_group)(&block[i].0, dst);
                // SAFETY: the block's output columns belong to it alone and tok < tokens, so
                // the cells are in bounds and ours.
                unsafe { tile_block(t, acts, kp, tokens, &cols, &panel, sink, &|tok| tok * n) };
            }
        });
    }

    /// A dense matrix's product through bf16 tiles: each task rounds up to eight groups of 16
    /// rows into panels, then multiplies them with every activation row.
    fn matmul_dense_tiles(
        &self,
        sink: &OutPtr,
        x: &[f32],
        tokens: usize,
        m: &DenseMatrix,
        scratch: &mut MatmulScratch,
        t: TileKernels,
    ) {
        let (n, k) = (m.rows, m.cols);
        let kp = tiles::padded_k(k);
        let padded = tiles::acts_to_bf16(&self.pool, x, tokens, k, kp, &mut scratch.acts_bf16);
        let acts = &scratch.acts_bf16[..padded * kp];
        let groups = n.div_ceil(GROUP);
        let per_task = tile_block_groups(groups, self.pool.threads());
        self.pool.for_chunks(groups.div_ceil(per_task), 1, &|blocks| {
            for b in blocks {
                let block = b * per_task..((b + 1) * per_task).min(groups);
                let cols: Vec<_> = block.clone().map(|g| (g * GROUP, (n - g * GROUP).min(GROUP))).collect();
                let panel = |i: usize, dst: &mut [u16]| {
                    let (first, live) = cols[i];
                    let rows: Vec<&[f32]> = (first..first + live).map(|r| &m.data[r * k..(r + 1) * k]).collect();
                    tiles::panel_from_rows(&rows, kp, dst);
                };
                // SAFETY: the block's output columns belong to it alone and tok < tokens.
                unsafe { tile_block(t, acts, kp, tokens, &cols, &panel, sink, &|tok| tok * n) };
            }
        });
    }

    /// A dense matrix's product in f32.
    fn matmul_dense(&self, sink: &OutPtr, x: &[f32], tokens: usize, m: &DenseMatrix) {
        let (n, k) = (m.rows, m.cols);
        if let (Some(rows16), true) = (self.kernels.f32_rows16, k <= SHORT_ROW) {
            // Sixteen rows at a time against each token; rows past the last whole sixteen take
            // the tile below. Either way a row's sums do not depend on the token count.
            let whole = n / 16;
            if whole == 0 {
                return self.matmul_dense_tiles_f32(sink, x, tokens, m, 0..n);
            }
            self.pool.for_chunks(whole, 1, &|blocks| {
                let mut buf = [0f32; 16];
                for blk in blocks {
                    let ws = &m.data[blk * 16 * k..(blk + 1) * 16 * k];
                    for t in 0..tokens {
                        rows16(ws, &x[t * k..(t + 1) * k], &mut buf);
                        // SAFETY: rows blk·16..+16 of token t belong to this task alone.
                        unsafe { sink.write(t * n + blk * 16, &buf) };
                    }
                }
            });
            if whole * 16 < n {
                self.matmul_dense_tiles_f32(sink, x, tokens, m, whole * 16..n);
            }
            return;
        }
        self.matmul_dense_tiles_f32(sink, x, tokens, m, 0..n);
    }

    /// Rows `rows` of a dense matrix's product through the f32 tiles.
    fn matmul_dense_tiles_f32(
        &self,
        sink: &OutPtr,
        x: &[f32],
        tokens: usize,
        m: &DenseMatrix,
        rows: std::ops::Range<usize>,
    ) {
        let (n, k) = (m.rows, m.cols);
        let tile = self.kernels.f32_tile;
        let first = rows.start;
        self.pool.for_chunks(rows.len(), 16, &|part| {
            let rows = first + part.start..first + part.end;
            run_tiles(rows, tokens, n, sink, |r0, r1, t0, t1, buf| {
                let ws: [&[f32]; 4] = std::array::from_fn(|i| {
                    let r = (r0 + i).min(r1 - 1);
                    &m.data[r * k..(r + 1) * k]
                });
                let xs: [&[f32]; 4] = std::array::from_fn(|i| {
                    let t = (t0 + i).min(t1 - 1);
                    &x[t * k..(t + 1) * k]
                });
                tile(&ws[..r1 - r0], &xs[..t1 - t0], buf);
            })
        });
    }

    /// Packed matrices stacked by rows (`(first output row, matrix)`), all of input size `k`, in
    /// one parallel region over every row group of every part.
    fn matmul_packed(
        &self,
        sink: &OutPtr,
        n: usize,
        x: &[f32],
        tokens: usize,
        parts: &[(usize, &PackedMatrix)],
        scratch: &mut MatmulScratch,
    ) {
        let k = parts[0].1.cols;
        scratch.acts.quantize(x, tokens, k);
        if parts.iter().any(|(_, m)| m.needs_half_sums()) {
            scratch.acts.compute_half_sums();
        }
        let acts = &scratch.acts;
        let (tile, tile_groups) = (self.kernels.packed_tile, self.kernels.packed_groups);
        // Group g of the whole stack: part `p` where `starts[p] <= g < starts[p + 1]`.
        let starts = group_starts(parts);
        let total = starts[parts.len()];
        // Decoding one sequence, tasks of at least four groups each where the product has that
        // many per thread, so the kernel's widest form gets whole runs (a 192-row projection:
        // two tasks of six).
        let min_chunk = if tokens == 1 {
            let per_thread = (total / (self.pool.threads() * 4)).clamp(1, 4);
            total.div_ceil(self.pool.threads() * per_thread)
        } else {
            1
        };
        self.pool.for_chunks(total, min_chunk, &|groups| {
            if tokens == 1 {
                // Runs of consecutive groups of one part (see `PackedGroupsFn`).
                let mut gg = groups.start;
                while gg < groups.end {
                    let p = starts.partition_point(|&s| s <= gg) - 1;
                    let ((first, m), g) = (parts[p], gg - starts[p]);
                    let part_groups = g..groups.end.min(starts[p + 1]) - starts[p];
                    // SAFETY: these output columns belong to this task's groups alone, in bounds.
                    gg += unsafe { row_times_groups(tile_groups, acts, 0, m, part_groups, first + g * GROUP, sink) };
                }
                return;
            }
            // One kernel call per group and block of activation rows: the kernel walks the
            // rows four at a time itself, so the call costs little beside the products.
            let mut buf = [0f32; GROUP * TOKEN_BLOCK];
            let mut xs: Vec<ActRow<'_>> = Vec::with_capacity(TOKEN_BLOCK);
            for tb in (0..tokens).step_by(TOKEN_BLOCK) {
                let tb_end = (tb + TOKEN_BLOCK).min(tokens);
                let nt = tb_end - tb;
                xs.clear();
                xs.extend((tb..tb_end).map(|t| ActRow::of(acts, t)));
                for gg in groups.clone() {
                    let p = starts.partition_point(|&s| s <= gg) - 1;
                    let ((first, m), g) = (parts[p], gg - starts[p]);
                    tile(&m.group(g), &xs, &mut buf[..GROUP * nt]);
                    let rows = (m.rows - g * GROUP).min(GROUP);
                    for j in 0..nt {
                        // SAFETY: output columns first+g·GROUP..+rows belong to this group alone
                        // and tb+j < tokens, so the cells are in bounds and ours.
                        unsafe { sink.write((tb + j) * n + first + g * GROUP, &buf[j * GROUP..j * GROUP + rows]) };
                    }
                }
            }
        });
    }
}

/// One of several products that share a parallel region ([`Compute::matmul_rows`]): `w` applied
/// to the activation rows `rows`, written to output rows `out_first..out_first + rows.len()`.
pub struct RowsProduct<'a> {
    pub w: &'a Matrix,
    pub rows: &'a [usize],
    pub out_first: usize,
}

impl Compute {
    /// Several products over one input in one parallel region (the experts of a MoE layer):
    /// `out[p.out_first + i, n] = x[p.rows[i], k] · p.wᵀ` for every product `p`. All matrices
    /// are `[n, k]`. Each weight group is read once for all the rows routed to its matrix, and
    /// the input is quantized once for every product.
    pub fn matmul_rows(
        &self,
        out: &mut [f32],
        x: &[f32],
        x_rows: usize,
        products: &[RowsProduct<'_>],
        scratch: &mut MatmulScratch,
    ) {
        let Some(first) = products.first() else { return };
        let (n, k) = (first.w.rows(), first.w.cols());
        assert_eq!(x.len(), x_rows * k, "matmul_rows input shape");
        for p in products {
            assert!(p.w.rows() == n && p.w.cols() == k, "matmul_rows: matrices of different shapes");
            assert!(p.rows.iter().all(|&r| r < x_rows), "matmul_rows: activation row out of range");
            assert!((p.out_first + p.rows.len()) * n <= out.len(), "matmul_rows output shape");
        }
        let packed: Option<Vec<&PackedMatrix>> = products
            .iter()
            .map(|p| match p.w {
                Matrix::Packed(m) => Some(m),
                _ => None,
            })
            .collect();
        let Some(packed) = packed else {
            // Dense or stacked matrices: products one after another, each over its gathered
            // rows with those rows' roles.
            let roles = std::mem::take(&mut scratch.prompt_rows);
            let mut rows_in = Vec::new();
            for p in products {
                rows_in.clear();
                scratch.prompt_rows.clear();
                for &r in p.rows {
                    rows_in.extend_from_slice(&x[r * k..(r + 1) * k]);
                    scratch.prompt_rows.push(roles.get(r).copied().unwrap_or(false));
                }
                let span = p.out_first * n..(p.out_first + p.rows.len()) * n;
                self.matmul(&mut out[span], &rows_in, p.rows.len(), p.w, scratch);
            }
            scratch.prompt_rows = roles;
            return;
        };
        // Output rows of different products must not overlap: tasks write them unsynchronised.
        let mut spans: Vec<(usize, usize)> = products.iter().map(|p| (p.out_first, p.rows.len())).collect();
        spans.sort_unstable();
        assert!(spans.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0), "matmul_rows: output rows overlap");
        // Each product's rows as (activation row, output row), prompt rows apart where tiles
        // take them.
        let tiled = self.kernels.tiles.filter(|_| scratch.prompt_rows.iter().any(|&p| p));
        let mut given: Vec<Vec<(usize, usize)>> = vec![Vec::new(); products.len()];
        let mut sampled: Vec<Vec<(usize, usize)>> = vec![Vec::new(); products.len()];
        for (pi, p) in products.iter().enumerate() {
            for (i, &r) in p.rows.iter().enumerate() {
                let prompt = tiled.is_some() && scratch.prompt_rows.get(r) == Some(&true);
                if prompt { &mut given[pi] } else { &mut sampled[pi] }.push((r, p.out_first + i));
            }
        }
        let any_sampled = sampled.iter().any(|s| !s.is_empty());
        if any_sampled {
            scratch.acts.quantize(x, x_rows, k);
            if packed.iter().any(|m| m.needs_half_sums()) {
                scratch.acts.compute_half_sums();
            }
        }
        if let Some(t) = tiled {
            if given.iter().any(|g| !g.is_empty()) {
                // Sampled rows too, group by group behind the tiles, while the groups are in cache.
                return self.matmul_rows_tiles(out, x, k, &packed, &given, &sampled, scratch, t);
            }
        }
        if !any_sampled {
            return;
        }
        let acts = &scratch.acts;
        let (tile, tile_groups) = (self.kernels.packed_tile, self.kernels.packed_groups);
        let groups = packed[0].groups();
        // Work units are (product, group) pairs; units of one product cost the same.
        let units = products.len() * groups;
        let chunk = units.div_ceil(self.pool.threads() * 8).max(1);
        let sink = OutPtr(out.as_mut_ptr());
        self.pool.run(units.div_ceil(chunk), &|task| {
            let end = ((task + 1) * chunk).min(units);
            let mut u = task * chunk;
            while u < end {
                let (p, g) = (u / groups, u % groups);
                // This task's groups of product `p` from `g` on.
                let task_groups = g..end.min((p + 1) * groups) - p * groups;
                // SAFETY: the product's output rows are its alone (spans checked disjoint and in
                // bounds) and the groups' columns this unit's.
                u += unsafe {
                    match sampled[p][..] {
                        // A product with one row (an expert one sequence chose): a run of
                        // groups per kernel call, as a lone sequence's dense products take them.
                        [(act_row, out_row)] => {
                            let out_at = out_row * n + g * GROUP;
                            row_times_groups(tile_groups, acts, act_row, packed[p], task_groups, out_at, &sink)
                        }
                        _ => {
                            sampled_rows_of_group(tile, acts, packed[p], g, &sampled[p], &sink);
                            1
                        }
                    }
                };
            }
        });
    }

    /// The prompt rows of [`Compute::matmul_rows`] through bf16 tiles, and its sampled rows
    /// through the integer kernels right behind them, group by group: a step that mixes both
    /// reads each weight from memory once. Each product's prompt rows are gathered (padded to
    /// whole tiles), and a task takes a block of one product's row groups against all of them.
    /// `given[p]` and `sampled[p]` list product `p`'s (activation row, output row) pairs; the
    /// sampled rows' quantized activations are in `scratch.acts`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_rows_tiles(
        &self,
        out: &mut [f32],
        x: &[f32],
        k: usize,
        packed: &[&PackedMatrix],
        given: &[Vec<(usize, usize)>],
        sampled: &[Vec<(usize, usize)>],
        scratch: &mut MatmulScratch,
        t: TileKernels,
    ) {
        let (n, kp) = (packed[0].rows, packed[0].stride);
        let padded_of = |len: usize| len.div_ceil(tiles::TILE_TOKENS) * tiles::TILE_TOKENS;
        let chosen: Vec<usize> = (0..given.len()).filter(|&p| !given[p].is_empty() || !sampled[p].is_empty()).collect();
        // Each product's rows start at a whole tile, so its bf16 rows are one aligned run.
        let mut first_row = vec![0; given.len()];
        let mut gathered = std::mem::take(&mut scratch.part_out);
        gathered.clear();
        for &p in &chosen {
            first_row[p] = gathered.len() / k;
            for &(r, _) in &given[p] {
                gathered.extend_from_slice(&x[r * k..(r + 1) * k]);
            }
            gathered.resize(gathered.len() + (padded_of(given[p].len()) - given[p].len()) * k, 0.0);
        }
        let total_rows = gathered.len() / k;
        tiles::acts_to_bf16(&self.pool, &gathered, total_rows, k, kp, &mut scratch.acts_bf16);
        scratch.part_out = gathered;
        let (acts, acts_q) = (&scratch.acts_bf16, &scratch.acts);
        let tile = self.kernels.packed_tile;
        let groups = packed[0].groups();
        let per_task = tile_block_groups(groups * chosen.len(), self.pool.threads());
        let blocks = groups.div_ceil(per_task);
        let sink = OutPtr(out.as_mut_ptr());
        self.pool.for_chunks(chosen.len() * blocks, 1, &|units| {
            for u in units {
                let (p, b) = (chosen[u / blocks], u % blocks);
                let (m, list) = (packed[p], &given[p]);
                let block = b * per_task..((b + 1) * per_task).min(groups);
                if !list.is_empty() {
                    let cols: Vec<_> = block.clone().map(|g| (g * GROUP, (n - g * GROUP).min(GROUP))).collect();
                    let panel = |i: usize, dst: &mut [u16]| (t.panel_from_group)(&m.group(block.start + i), dst);
                    let span = &acts[first_row[p] * kp..(first_row[p] + padded_of(list.len())) * kp];
                    // SAFETY: the output row belongs to this product alone (spans checked
                    // disjoint and in bounds), the block's columns to this unit.
                    unsafe { tile_block(t, span, kp, list.len(), &cols, &panel, &sink, &|j| list[j].1 * n) };
                }
                for g in block {
                    // SAFETY: as above.
                    unsafe { sampled_rows_of_group(tile, acts_q, m, g, &sampled[p], &sink) };
                }
            }
        });
    }
}

/// Sampled rows `rows` ((activation row, output row) pairs, quantized in `acts`) times row group
/// `g` of `m`, four rows to a kernel call, written to the group's columns of the output rows.
///
/// # Safety
/// Those output cells must be in bounds and written by this call alone.
unsafe fn sampled_rows_of_group(
    tile: crate::dispatch::PackedTileFn,
    acts: &QuantizedActs,
    m: &PackedMatrix,
    g: usize,
    rows: &[(usize, usize)],
    sink: &OutPtr,
) {
    if rows.is_empty() {
        return;
    }
    let n = m.rows;
    let group = m.group(g);
    let live = (n - g * GROUP).min(GROUP);
    let mut buf = [0f32; GROUP * 4];
    for run in rows.chunks(4) {
        let nt = run.len();
        let xs: [ActRow<'_>; 4] = std::array::from_fn(|i| ActRow::of(acts, run[i.min(nt - 1)].0));
        tile(&group, &xs[..nt], &mut buf[..GROUP * nt]);
        for (j, &(_, out_row)) in run.iter().enumerate() {
            // SAFETY: forwarded to the caller.
            unsafe { sink.write(out_row * n + g * GROUP, &buf[j * GROUP..j * GROUP + live]) };
        }
    }
}

/// Activation row `act_row` times the row groups `groups` of `m`, up to [`TOKEN_BLOCK`] of them
/// in one kernel call ([`crate::dispatch::PackedGroupsFn`]), their results written from output
/// cell `out_at` on (the run's columns lie side by side); returns how many groups it took (at
/// least one, at most that many).
///
/// # Safety
/// Those output cells must be in bounds and written by this call alone.
unsafe fn row_times_groups(
    tile_groups: crate::dispatch::PackedGroupsFn,
    acts: &QuantizedActs,
    act_row: usize,
    m: &PackedMatrix,
    groups: std::ops::Range<usize>,
    out_at: usize,
    sink: &OutPtr,
) -> usize {
    let run = groups.len().clamp(1, TOKEN_BLOCK);
    let first = groups.start;
    let ws: [crate::packed::PackedGroup<'_>; TOKEN_BLOCK] = std::array::from_fn(|i| m.group(first + i.min(run - 1)));
    let mut buf = [0f32; GROUP * TOKEN_BLOCK];
    tile_groups(&ws[..run], &ActRow::of(acts, act_row), &mut buf[..run * GROUP]);
    let live = m.rows - first * GROUP;
    // SAFETY: forwarded to the caller; the run's columns end at the matrix's last row.
    unsafe { sink.write(out_at, &buf[..(run * GROUP).min(live)]) };
    run
}

/// Most row groups one task of a tile product takes: 128 output columns, whose panels stay in
/// L2 while the activation tiles are reused from L1 across them.
const TILE_BLOCK_MAX: usize = 8;

/// Groups per task of a tile product over `total` groups: as many as [`TILE_BLOCK_MAX`], an even
/// number, but few enough that each thread still gets about four tasks.
fn tile_block_groups(total: usize, threads: usize) -> usize {
    (total / (threads * 4)).clamp(2, TILE_BLOCK_MAX) & !1
}

/// Tile product of a few row groups against the bf16 activation rows `acts` (padded to whole
/// tiles; the first `rows` real), 32 rows at a time through a small staging buffer. Group `i`
/// of the block has its panel built by `panel(i, ..)` and its results go to output columns
/// `cols[i].0..+cols[i].1`; real row `j`'s to `sink` at `row_at(j)` plus the column, copied out
/// while still in L1. (Storing tiles straight into the output measured no faster, nor did
/// prefetching its lines.)
///
/// # Safety
/// Those output cells must be in bounds and written by this task alone.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_block(
    t: TileKernels,
    acts: &[u16],
    kp: usize,
    rows: usize,
    cols: &[(usize, usize)],
    panel: &dyn Fn(usize, &mut [u16]),
    sink: &OutPtr,
    row_at: &dyn Fn(usize) -> usize,
) {
    let np = cols.len();
    let width = np * GROUP;
    let panel_len = tiles::panel_len(kp);
    // Staging offset, output column and length of each run of adjacent columns: a group
    // continues the run before it when that run ends at its column on a whole group.
    let mut runs: Vec<(usize, usize, usize)> = Vec::with_capacity(np);
    for (i, &(col, live)) in cols.iter().enumerate() {
        match runs.last_mut() {
            Some((_, c, len)) if *c + *len == col && len.is_multiple_of(GROUP) => *len += live,
            _ => runs.push((i * GROUP, col, live)),
        }
    }
    TILE_SCRATCH.with_borrow_mut(|(panels, staging)| {
        panels.resize(np * panel_len);
        staging.resize(2 * tiles::TILE_TOKENS * width);
        for (i, dst) in panels.chunks_exact_mut(panel_len).enumerate() {
            panel(i, dst);
        }
        let refs: Vec<&[u16]> = panels.chunks_exact(panel_len).collect();
        let padded = acts.len() / kp;
        for first in (0..padded).step_by(2 * tiles::TILE_TOKENS) {
            let nt = (padded - first).min(2 * tiles::TILE_TOKENS);
            let real = nt.min(rows.saturating_sub(first));
            (t.gemm)(&acts[first * kp..(first + nt) * kp], kp, nt, &refs, &mut staging[..nt * width]);
            for j in 0..real {
                for &(at, col, len) in &runs {
                    // SAFETY: forwarded to the caller.
                    unsafe { sink.write(row_at(first + j) + col, &staging[j * width + at..][..len]) };
                }
            }
        }
    });
}

/// A raw output pointer shared by tasks that write disjoint elements.
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint (row, token) cells; the caller waits for all of them.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `offset` must be in bounds and written by one task only.
    unsafe fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: forwarded to the caller.
        unsafe { self.0.add(offset) }
    }

    /// Copies `values` to `offset..offset + values.len()`.
    ///
    /// # Safety
    /// The range must be in bounds and written by one task only.
    unsafe fn write(&self, offset: usize, values: &[f32]) {
        // SAFETY: forwarded to the caller; `values` cannot overlap cells only this task writes.
        // A whole group's run is copied at a fixed size, inline rather than through `memcpy`.
        unsafe {
            match <&[f32; GROUP]>::try_from(values) {
                Ok(run) => (self.0.add(offset) as *mut [f32; GROUP]).write_unaligned(*run),
                Err(_) => std::ptr::copy_nonoverlapping(values.as_ptr(), self.0.add(offset), values.len()),
            }
        }
    }
}

/// Activation rows per cache block inside one task.
const TOKEN_BLOCK: usize = 32;

/// Dense rows up to this length take the 16-row f32 kernel where the ISA has one.
const SHORT_ROW: usize = 256;

/// Walks the `(rows × tokens)` region in tiles and scatters each tile into `out[t * n + r]`.
fn run_tiles(
    rows: std::ops::Range<usize>,
    tokens: usize,
    n: usize,
    out: &OutPtr,
    mut tile: impl FnMut(usize, usize, usize, usize, &mut [f32]),
) {
    let (row_step, tok_step) = if tokens == 1 { (4, 1) } else { (2, 4) };
    let mut buf = [0f32; 16];
    for tb in (0..tokens).step_by(TOKEN_BLOCK) {
        let tb_end = (tb + TOKEN_BLOCK).min(tokens);
        let mut r0 = rows.start;
        while r0 < rows.end {
            let r1 = (r0 + row_step).min(rows.end);
            let mut t0 = tb;
            while t0 < tb_end {
                let t1 = (t0 + tok_step).min(tb_end);
                let (nr, nt) = (r1 - r0, t1 - t0);
                tile(r0, r1, t0, t1, &mut buf[..nr * nt]);
                for i in 0..nr {
                    for j in 0..nt {
                        // SAFETY: (t0 + j, r0 + i) is inside this task's rows and the token range,
                        // so no other task writes it, and it is in bounds of `out` (checked shape).
                        unsafe { *out.at((t0 + j) * n + r0 + i) = buf[i * nt + j] };
                    }
                }
                t0 = t1;
            }
            r0 = r1;
        }
    }
}

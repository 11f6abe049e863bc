//! Matrix products `Y[T, N] = X[T, K] · Wᵀ` for weights `W[N, K]`, split over the thread pool.
//!
//! A decode step is `T = 1` (mat-vec); prefill is `T > 1` (mat-mat). Both use the same tiles:
//! 4 weight rows against one activation row, or 2 rows against 4, so each weight load serves
//! several products. Work is split by weight rows; within a task, activation rows go in blocks
//! small enough to stay in cache while the task's rows pass over them.

use crate::dispatch::{Isa, Kernels};
use crate::formats::{dequantize, DType, SizeMismatch};
use crate::packed::{ActRow, PackedMatrix, GROUP};
use crate::pool::ThreadPool;
use crate::quant::QuantizedActs;

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
    /// Builds a matrix from `rows` rows of `cols` elements stored as `dtype`.
    pub fn from_stored(
        dtype: DType,
        data: &[u8],
        rows: usize,
        cols: usize,
        mode: MatmulMode,
    ) -> Result<Matrix, SizeMismatch> {
        if mode == MatmulMode::Fast {
            if let Some(packed) = PackedMatrix::from_blocks(dtype, data, rows, cols) {
                return packed.map(Matrix::Packed);
            }
        }
        let mut out = vec![0f32; rows * cols];
        dequantize(dtype, data, &mut out)?;
        Ok(Matrix::Dense(DenseMatrix { rows, cols, data: out }))
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
            for p in parts {
                if let Matrix::Dense(d) = p {
                    data.extend(d.data);
                }
            }
            return Matrix::from_f32(data, rows, cols);
        }
        Matrix::Stacked(StackedMatrix { parts, rows, cols })
    }

    /// A dense matrix from f32 values.
    pub fn from_f32(data: Vec<f32>, rows: usize, cols: usize) -> Matrix {
        assert_eq!(data.len(), rows * cols);
        Matrix::Dense(DenseMatrix { rows, cols, data })
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
            Matrix::Dense(m) => {
                let tile = self.kernels.f32_tile;
                self.pool.for_chunks(n, 16, &|rows| {
                    run_tiles(rows, tokens, n, &sink, |r0, r1, t0, t1, buf| {
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
        }
    }
}

impl Compute {
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
        let tile = self.kernels.packed_tile;
        // Group g of the whole stack: part `p` where `starts[p] <= g < starts[p + 1]`.
        let mut starts = Vec::with_capacity(parts.len() + 1);
        starts.push(0);
        for (_, m) in parts {
            starts.push(starts.last().copied().unwrap_or(0) + m.groups());
        }
        let total = starts[parts.len()];
        // AMX tiles take longer runs of rows: each call unpacks its group's levels once.
        let token_block = if self.kernels.isa == Isa::Amx { AMX_TOKEN_BLOCK } else { TOKEN_BLOCK };
        self.pool.for_chunks(total, 1, &|groups| {
            // One kernel call per group and block of activation rows: the kernel walks the
            // rows four at a time itself, so the call costs little beside the products.
            let mut buf = vec![0f32; GROUP * token_block.min(tokens)];
            let mut xs: Vec<ActRow<'_>> = Vec::with_capacity(token_block);
            for tb in (0..tokens).step_by(token_block) {
                let tb_end = (tb + token_block).min(tokens);
                let nt = tb_end - tb;
                xs.clear();
                xs.extend((tb..tb_end).map(|t| ActRow::of(acts, t)));
                for gg in groups.clone() {
                    let p = starts.partition_point(|&s| s <= gg) - 1;
                    let (first, m) = parts[p];
                    let g = gg - starts[p];
                    let group = m.group(g);
                    let rows = (m.rows - g * GROUP).min(GROUP);
                    tile(&group, &xs, &mut buf[..GROUP * nt]);
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
            // Exact mode or stacked parts: products one after another.
            let mut rows_in = Vec::new();
            for p in products {
                rows_in.clear();
                for &r in p.rows {
                    rows_in.extend_from_slice(&x[r * k..(r + 1) * k]);
                }
                let span = p.out_first * n..(p.out_first + p.rows.len()) * n;
                self.matmul(&mut out[span], &rows_in, p.rows.len(), p.w, scratch);
            }
            return;
        };
        // Output rows of different products must not overlap: tasks write them unsynchronised.
        let mut spans: Vec<(usize, usize)> = products.iter().map(|p| (p.out_first, p.rows.len())).collect();
        spans.sort_unstable();
        assert!(spans.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0), "matmul_rows: output rows overlap");
        scratch.acts.quantize(x, x_rows, k);
        if packed.iter().any(|m| m.needs_half_sums()) {
            scratch.acts.compute_half_sums();
        }
        let acts = &scratch.acts;
        let tile = self.kernels.packed_tile;
        let groups = packed[0].groups();
        // Work units are (product, group) pairs; units of one product cost the same.
        let units = products.len() * groups;
        let chunk = units.div_ceil(self.pool.threads() * 8).max(1);
        let sink = OutPtr(out.as_mut_ptr());
        self.pool.run(units.div_ceil(chunk), &|task| {
            let mut buf = [0f32; GROUP * 4];
            for u in task * chunk..((task + 1) * chunk).min(units) {
                let (p, g) = (&products[u / groups], u % groups);
                let group = packed[u / groups].group(g);
                let live = (n - g * GROUP).min(GROUP);
                for t0 in (0..p.rows.len()).step_by(4) {
                    let nt = (p.rows.len() - t0).min(4);
                    let xs: [ActRow<'_>; 4] = std::array::from_fn(|i| ActRow::of(acts, p.rows[t0 + i.min(nt - 1)]));
                    tile(&group, &xs[..nt], &mut buf[..GROUP * nt]);
                    for j in 0..nt {
                        // SAFETY: output row out_first+t0+j belongs to this product alone
                        // (spans checked disjoint and in bounds) and columns g·GROUP..+live to
                        // this unit alone.
                        unsafe {
                            sink.write((p.out_first + t0 + j) * n + g * GROUP, &buf[j * GROUP..j * GROUP + live])
                        };
                    }
                }
            }
        });
    }
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
/// The same for AMX tiles.
const AMX_TOKEN_BLOCK: usize = 256;

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

//! Matrix products `Y[T, N] = X[T, K] · Wᵀ` for weights `W[N, K]`, split over the thread pool.
//!
//! A decode step is `T = 1` (mat-vec); prefill is `T > 1` (mat-mat). Both use the same tiles:
//! 4 weight rows against one activation row, or 2 rows against 4, so each weight load serves
//! several products. Work is split by weight rows; within a task, activation rows go in blocks
//! small enough to stay in cache while the task's rows pass over them.

use crate::dispatch::Kernels;
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

    /// A dense matrix from f32 values.
    pub fn from_f32(data: Vec<f32>, rows: usize, cols: usize) -> Matrix {
        assert_eq!(data.len(), rows * cols);
        Matrix::Dense(DenseMatrix { rows, cols, data })
    }

    pub fn rows(&self) -> usize {
        match self {
            Matrix::Packed(m) => m.rows,
            Matrix::Dense(m) => m.rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Matrix::Packed(m) => m.cols,
            Matrix::Dense(m) => m.cols,
        }
    }

    /// Bytes held in memory.
    pub fn memory_bytes(&self) -> usize {
        match self {
            Matrix::Packed(m) => m.memory_bytes(),
            Matrix::Dense(m) => m.data.len() * 4,
        }
    }
}

/// Scratch kept by the caller between products so that none allocates.
#[derive(Default, Debug)]
pub struct MatmulScratch {
    acts: QuantizedActs,
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
            Matrix::Packed(m) => {
                scratch.acts.quantize(x, tokens, k);
                if m.needs_half_sums() {
                    scratch.acts.compute_half_sums();
                }
                let acts = &scratch.acts;
                let tile = self.kernels.packed_tile;
                self.pool.for_chunks(m.groups(), 1, &|groups| {
                    let mut buf = [0f32; GROUP * 4];
                    for tb in (0..tokens).step_by(TOKEN_BLOCK) {
                        let tb_end = (tb + TOKEN_BLOCK).min(tokens);
                        for g in groups.clone() {
                            let group = m.group(g);
                            let rows = (n - g * GROUP).min(GROUP);
                            for t0 in (tb..tb_end).step_by(4) {
                                let nt = (tb_end - t0).min(4);
                                let xs: [ActRow<'_>; 4] = std::array::from_fn(|i| ActRow::of(acts, t0 + i.min(nt - 1)));
                                tile(&group, &xs[..nt], &mut buf[..GROUP * nt]);
                                for r in 0..rows {
                                    for j in 0..nt {
                                        // SAFETY: row g·4+r belongs to this task's groups and
                                        // t0+j < tokens, so the cell is in bounds and ours alone.
                                        unsafe { *sink.at((t0 + j) * n + g * GROUP + r) = buf[r * nt + j] };
                                    }
                                }
                            }
                        }
                    }
                });
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
                Matrix::Dense(_) => None,
            })
            .collect();
        let Some(packed) = packed else {
            // Exact mode: dense products one after another.
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
                    for r in 0..live {
                        for j in 0..nt {
                            // SAFETY: output row out_first+t0+j belongs to this product alone
                            // (spans checked disjoint and in bounds) and column g·GROUP+r to this
                            // unit alone.
                            unsafe { *sink.at((p.out_first + t0 + j) * n + g * GROUP + r) = buf[r * nt + j] };
                        }
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
}

/// Activation rows per cache block inside one task.
const TOKEN_BLOCK: usize = 32;

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

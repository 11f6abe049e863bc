//! Activations quantized to 8 bits in blocks of 32, the left operand of the packed integer kernels.
//!
//! Each row is padded with zeros to a multiple of 64 so that kernels always work on block pairs.

/// Elements per activation block.
pub const QBLOCK: usize = 32;
/// Rows are padded to this many elements: the packed kernels consume two blocks per step.
pub const QPAIR: usize = 64;

/// Pads a row length to whole block pairs.
pub fn padded_len(k: usize) -> usize {
    k.div_ceil(QPAIR) * QPAIR
}

/// `rows` activation vectors of `cols` values each, quantized to i8 with one f32 scale per block.
///
/// Buffers are kept between calls and only grow, so a decode step allocates nothing.
#[derive(Default, Debug, Clone)]
pub struct QuantizedActs {
    pub rows: usize,
    pub cols: usize,
    /// Padded row length (multiple of 64).
    pub stride: usize,
    /// `[rows, stride]` quantized values.
    pub qs: Vec<i8>,
    /// `[rows, stride/32]` block scales.
    pub d: Vec<f32>,
    /// `[rows, stride/32]` block sums `d · Σq`, for formats with an offset term.
    pub s: Vec<f32>,
}

impl QuantizedActs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Blocks per row.
    pub fn blocks(&self) -> usize {
        self.stride / QBLOCK
    }

    /// Quantizes `rows` consecutive rows of `cols` values from `x` (row-major).
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        assert_eq!(x.len(), rows * cols, "activation shape");
        let stride = padded_len(cols);
        let nb = stride / QBLOCK;
        self.rows = rows;
        self.cols = cols;
        self.stride = stride;
        self.qs.resize(rows * stride, 0);
        self.d.resize(rows * nb, 0.0);
        self.s.resize(rows * nb, 0.0);
        for r in 0..rows {
            let src = &x[r * cols..(r + 1) * cols];
            let qs = &mut self.qs[r * stride..(r + 1) * stride];
            let d = &mut self.d[r * nb..(r + 1) * nb];
            let s = &mut self.s[r * nb..(r + 1) * nb];
            for b in 0..nb {
                let lo = (b * QBLOCK).min(cols);
                let hi = ((b + 1) * QBLOCK).min(cols);
                let block = &src[lo..hi];
                let out = &mut qs[b * QBLOCK..(b + 1) * QBLOCK];
                let (scale, sum) = quantize_block(block, out);
                d[b] = scale;
                s[b] = scale * sum as f32;
            }
        }
    }

    pub fn row_qs(&self, r: usize) -> &[i8] {
        &self.qs[r * self.stride..(r + 1) * self.stride]
    }
    pub fn row_d(&self, r: usize) -> &[f32] {
        let nb = self.blocks();
        &self.d[r * nb..(r + 1) * nb]
    }
    pub fn row_s(&self, r: usize) -> &[f32] {
        let nb = self.blocks();
        &self.s[r * nb..(r + 1) * nb]
    }
}

/// Quantizes up to 32 values into `out` (zero-filled past `x.len()`); returns the scale and Σq.
fn quantize_block(x: &[f32], out: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (j, o) in out.iter_mut().enumerate() {
        let q = match x.get(j) {
            Some(v) => {
                // Round half away from zero (as roundf) without a libm call.
                let s = (v * id).clamp(-127.0, 127.0);
                (s + 0.5f32.copysign(s)) as i8
            }
            None => 0,
        };
        sum += q as i32;
        *o = q;
    }
    (d, sum)
}

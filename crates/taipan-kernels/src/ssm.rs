//! Mamba-1 kernels: the causal depthwise convolution and the selective scan, both carrying
//! per-sequence state so that one-shot prefill, chunked prefill of any split and single-token
//! decode compute exactly the same values (the same per-step order of operations).
//!
//! Reference: Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
//! eq. (2a)-(2b) with zero-order hold on A and Euler on B; Jamba (Lieber et al. 2024) adds RMSNorms
//! on dt, B and C before this kernel.

/// `out[t, c] = bias[c] + Σ_j w[j, c] · window_t[c, j]` where `window_t` holds the `K-1` previous
/// raw inputs of channel `c` (from `state` at the start) and `x[t, c]`, oldest first.
///
/// `x`, `out`: `[tokens, channels]`; `w`: `[K, channels]`, tap-major (see [`taps_major`]) so
/// that every tap is one pass over contiguous channels; `state`: `[K-1, channels]` (oldest row
/// first), updated to the last `K-1` inputs.
pub fn causal_conv1d(out: &mut [f32], x: &[f32], w: &[f32], bias: Option<&[f32]>, state: &mut [f32], channels: usize) {
    assert!(channels > 0 && w.len().is_multiple_of(channels));
    let k = w.len() / channels;
    assert!(k >= 1 && state.len() == (k - 1) * channels);
    assert_eq!(x.len(), out.len());
    assert!(x.len().is_multiple_of(channels));
    assert!(bias.is_none_or(|b| b.len() == channels));
    crate::ops::wide(
        #[inline(always)]
        || {
            for (xt, ot) in x.chunks_exact(channels).zip(out.chunks_exact_mut(channels)) {
                // Per channel the sum runs oldest tap first, then the bias, whatever the split.
                ot.fill(0.0);
                for (j, past) in state.chunks_exact(channels).enumerate() {
                    let wj = &w[j * channels..(j + 1) * channels];
                    for ((o, &wv), &sv) in ot.iter_mut().zip(wj).zip(past) {
                        *o += wv * sv;
                    }
                }
                let newest = &w[(k - 1) * channels..];
                for ((o, &wv), &xv) in ot.iter_mut().zip(newest).zip(xt) {
                    *o += wv * xv;
                }
                if let Some(b) = bias {
                    for (o, &bv) in ot.iter_mut().zip(b) {
                        *o += bv;
                    }
                }
                if k > 1 {
                    state.copy_within(channels.., 0);
                    state[(k - 2) * channels..].copy_from_slice(xt);
                }
            }
        },
    )
}

/// A conv weight stored `[channels, K]` (as checkpoints hold it) in the tap-major form
/// [`causal_conv1d`] takes.
pub fn taps_major(w: &[f32], channels: usize) -> Vec<f32> {
    assert!(channels > 0 && w.len().is_multiple_of(channels));
    let k = w.len() / channels;
    let mut out = vec![0f32; w.len()];
    for c in 0..channels {
        for j in 0..k {
            out[j * channels + c] = w[c * k + j];
        }
    }
    out
}

/// `softplus(x) = ln(1 + e^x)`, passing `x` through above 20 as PyTorch does.
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// `x = softplus(x + bias)` over rows of `bias.len()` channels: the vectorisable form of
/// [`softplus`]. `ln(1 + e)` is taken as `ln(u)·e/(u − 1)` with `u = 1 + e`, which keeps full
/// relative precision where `e` is far below 1 (and is `e` itself where `u` rounds to 1).
pub fn softplus_bias_in_place(x: &mut [f32], bias: &[f32]) {
    assert!(!bias.is_empty() && x.len().is_multiple_of(bias.len()));
    crate::ops::wide(
        #[inline(always)]
        || {
            for row in x.chunks_exact_mut(bias.len()) {
                for (v, &b) in row.iter_mut().zip(bias) {
                    let s = *v + b;
                    let e = crate::ops::fast_exp(s);
                    let u = 1.0 + e;
                    let ln1p = if u == 1.0 { e } else { crate::ops::fast_ln(u) * (e / (u - 1.0)) };
                    *v = if s > 20.0 { s } else { ln1p };
                }
            }
        },
    )
}

/// Shapes of one selective scan, over channels `first..first + count` of its inputs.
#[derive(Clone, Copy, Debug)]
pub struct ScanShape {
    pub tokens: usize,
    /// Channels of the inputs (`d_inner`).
    pub channels: usize,
    /// State size per channel (`d_state`).
    pub state: usize,
    /// The channels this scan computes (channels are independent: a sequence's scan can be split
    /// across threads by channel, and every channel's values are the same whatever the split).
    pub first: usize,
    pub count: usize,
}

impl ScanShape {
    /// All `channels` channels.
    pub fn whole(tokens: usize, channels: usize, state: usize) -> Self {
        ScanShape { tokens, channels, state, first: 0, count: channels }
    }

    /// Channels `first..first + count` only.
    pub fn part(self, first: usize, count: usize) -> Self {
        ScanShape { first, count, ..self }
    }
}

/// The per-token inputs and parameters of one selective scan.
///
/// `x`, `dt`, `z`: `[tokens, channels]`; `b`, `c`: `[tokens, state]`; `a`: `[channels, state]`
/// (already `−exp(A_log)`); `d`: `[channels]`.
#[derive(Clone, Copy, Debug)]
pub struct ScanInputs<'a> {
    pub x: &'a [f32],
    pub dt: &'a [f32],
    pub z: &'a [f32],
    pub b: &'a [f32],
    pub c: &'a [f32],
    pub a: &'a [f32],
    pub d: &'a [f32],
}

impl ScanInputs<'_> {
    /// Panics unless every input has the shape `s` asks for, and `y` (`[tokens, count]`) and
    /// `h` (`[count, state]`) too.
    pub fn check(&self, y: &[f32], h: &[f32], s: ScanShape) {
        let (t, ch, n, m) = (s.tokens, s.channels, s.state, s.count);
        assert!(s.first + m <= ch, "scan channels {}..{} of {ch}", s.first, s.first + m);
        assert!(self.x.len() == t * ch && self.dt.len() == t * ch && self.z.len() == t * ch && y.len() == t * m);
        assert!(self.b.len() == t * n && self.c.len() == t * n && self.a.len() == ch * n);
        assert!(self.d.len() == ch && h.len() == m * n);
    }
}

/// The selective scan, gated: for each token `t` and channel `c`,
/// `h[c, n] = exp(dt[t,c]·A[c,n])·h[c,n] + (dt[t,c]·B[t,n])·x[t,c]`,
/// `y[t,c] = (Σ_n h[c,n]·C[t,n] + D[c]·x[t,c]) · silu(z[t,c])`,
/// for the channels `s` names: `y` is `[tokens, count]`; `h` (`[count, state]`, those channels'
/// states) is carried across calls.
pub fn selective_scan_ref(y: &mut [f32], i: &ScanInputs<'_>, h: &mut [f32], s: ScanShape) {
    i.check(y, h, s);
    let (t_n, ch, n, m) = (s.tokens, s.channels, s.state, s.count);
    for t in 0..t_n {
        let (bt, ct) = (&i.b[t * n..(t + 1) * n], &i.c[t * n..(t + 1) * n]);
        for j in 0..m {
            let k = s.first + j;
            let (dtv, xv) = (i.dt[t * ch + k], i.x[t * ch + k]);
            let hk = &mut h[j * n..(j + 1) * n];
            let ak = &i.a[k * n..(k + 1) * n];
            let mut acc = 0f32;
            for q in 0..n {
                let da = (dtv * ak[q]).exp();
                hk[q] = da * hk[q] + (dtv * bt[q]) * xv;
                acc += hk[q] * ct[q];
            }
            let out = acc + i.d[k] * xv;
            let zv = i.z[t * ch + k];
            y[t * m + j] = out * (zv / (1.0 + (-zv).exp()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_in_chunks_equals_one_shot() {
        let ch = 3;
        let w_rows: Vec<f32> = (0..ch * 4).map(|i| (i as f32 * 0.37).sin()).collect();
        let w = taps_major(&w_rows, ch);
        let bias = [0.1, -0.2, 0.3];
        let x: Vec<f32> = (0..7 * ch).map(|i| (i as f32 * 0.71).cos()).collect();
        let mut one = vec![0f32; x.len()];
        let mut st = vec![0f32; 3 * ch];
        causal_conv1d(&mut one, &x, &w, Some(&bias), &mut st, ch);
        // Channel 0 at t=0 sees only x[0] with the newest tap.
        assert!((one[0] - (w_rows[3] * x[0] + 0.1)).abs() < 1e-6);
        // Channel 1 at t=1 sees x[0] and x[1] with its two newest taps.
        assert!((one[ch + 1] - (w_rows[4 + 2] * x[1] + w_rows[4 + 3] * x[ch + 1] - 0.2)).abs() < 1e-6);
        let mut parts = vec![0f32; x.len()];
        let mut st2 = vec![0f32; 3 * ch];
        for (lo, hi) in [(0, 2), (2, 3), (3, 7)] {
            causal_conv1d(&mut parts[lo * ch..hi * ch], &x[lo * ch..hi * ch], &w, Some(&bias), &mut st2, ch);
        }
        assert_eq!(one, parts);
        assert_eq!(st, st2);
        assert_eq!(&st[2 * ch..], &x[6 * ch..]);
    }

    #[test]
    fn scan_in_chunks_equals_one_shot_and_matches_the_recurrence() {
        let (t_n, ch, n) = (5, 2, 3);
        let f = |k: usize, s: f32| -> Vec<f32> { (0..k).map(|i| ((i as f32 + 1.0) * s).sin()).collect() };
        let (x, dt, z) =
            (f(t_n * ch, 0.3), f(t_n * ch, 0.7).iter().map(|v| v.abs()).collect::<Vec<_>>(), f(t_n * ch, 1.1));
        let (b, c) = (f(t_n * n, 0.5), f(t_n * n, 0.9));
        let a: Vec<f32> = f(ch * n, 1.3).iter().map(|v| -v.abs()).collect();
        let d = f(ch, 2.0);
        let shape = |t| ScanShape::whole(t, ch, n);
        let mut y = vec![0f32; t_n * ch];
        let mut h = vec![0f32; ch * n];
        let all = ScanInputs { x: &x, dt: &dt, z: &z, b: &b, c: &c, a: &a, d: &d };
        selective_scan_ref(&mut y, &all, &mut h, shape(t_n));
        let mut y2 = vec![0f32; t_n * ch];
        let mut h2 = vec![0f32; ch * n];
        for (lo, hi) in [(0, 1), (1, 4), (4, 5)] {
            let r = lo * ch..hi * ch;
            let rn = lo * n..hi * n;
            let part = ScanInputs {
                x: &x[r.clone()],
                dt: &dt[r.clone()],
                z: &z[r.clone()],
                b: &b[rn.clone()],
                c: &c[rn],
                a: &a,
                d: &d,
            };
            selective_scan_ref(&mut y2[r], &part, &mut h2, shape(hi - lo));
        }
        assert_eq!(y, y2);
        assert_eq!(h, h2);
        // First token from a zero state: h = dt·B·x.
        let want: f32 = (0..n).map(|i| dt[0] * b[i] * x[0] * c[i]).sum::<f32>() + d[0] * x[0];
        assert!((y[0] - want * z[0] / (1.0 + (-z[0]).exp())).abs() < 1e-6);
    }

    #[test]
    fn simd_scans_match_the_reference() {
        // Channels below, at and past the kernels' blocks of 8 and 16, with a remainder.
        for (t_n, ch, n) in [(3, 5, 32), (3, 37, 16), (2, 48, 32)] {
            let f = |k: usize, s: f32| -> Vec<f32> { (0..k).map(|i| ((i as f32 + 1.0) * s).sin()).collect() };
            let (x, z) = (f(t_n * ch, 0.3), f(t_n * ch, 1.1));
            let dt: Vec<f32> = f(t_n * ch, 0.7).iter().map(|v| v.abs()).collect();
            let (b, c) = (f(t_n * n, 0.5), f(t_n * n, 0.9));
            let a: Vec<f32> = f(ch * n, 1.3).iter().map(|v| -v.abs() * 3.0).collect();
            let d = f(ch, 2.0);
            let shape = ScanShape::whole(t_n, ch, n);
            let mut want = vec![0f32; t_n * ch];
            let mut h0 = vec![0.1f32; ch * n];
            let inputs = ScanInputs { x: &x, dt: &dt, z: &z, b: &b, c: &c, a: &a, d: &d };
            selective_scan_ref(&mut want, &inputs, &mut h0, shape);
            for k in crate::Kernels::available() {
                let mut y = vec![0f32; t_n * ch];
                let mut h = vec![0.1f32; ch * n];
                (k.selective_scan)(&mut y, &inputs, &mut h, shape);
                for (g, w) in y.iter().zip(&want).chain(h.iter().zip(&h0)) {
                    assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{:?} {ch}x{n}: {g} vs {w}", k.isa);
                }
                // Split by channels (at and off the kernels' blocks), the same bits.
                for cut in [1, 16, ch / 2].into_iter().filter(|&c| c < ch) {
                    let mut h_parts = vec![0.1f32; ch * n];
                    let (h_lo, h_hi) = h_parts.split_at_mut(cut * n);
                    let mut y_lo = vec![0f32; t_n * cut];
                    let mut y_hi = vec![0f32; t_n * (ch - cut)];
                    (k.selective_scan)(&mut y_lo, &inputs, h_lo, shape.part(0, cut));
                    (k.selective_scan)(&mut y_hi, &inputs, h_hi, shape.part(cut, ch - cut));
                    assert_eq!(h_parts, h, "{:?} {ch}x{n} cut at {cut}", k.isa);
                    for t in 0..t_n {
                        let joined: Vec<f32> = y_lo[t * cut..(t + 1) * cut]
                            .iter()
                            .chain(&y_hi[t * (ch - cut)..(t + 1) * (ch - cut)])
                            .copied()
                            .collect();
                        assert_eq!(joined, y[t * ch..(t + 1) * ch], "{:?} {ch}x{n} cut at {cut}", k.isa);
                    }
                }
            }
        }
    }

    #[test]
    fn vectorised_softplus_matches_libm() {
        let xs: Vec<f32> = (0..40_000).map(|i| -60.0 + i as f32 * 0.002).collect();
        let bias: Vec<f32> = (0..8).map(|i| i as f32 * 0.125 - 0.5).collect();
        let mut got = xs.clone();
        softplus_bias_in_place(&mut got, &bias);
        for (i, (&x, &g)) in xs.iter().zip(&got).enumerate() {
            let s = x + bias[i % 8];
            let want = if s > 20.0 { s as f64 } else { (s as f64).exp().ln_1p() };
            assert!((g as f64 - want).abs() <= 6e-7 * want.abs(), "softplus({s}) = {g}, want {want}");
        }
    }

    #[test]
    fn softplus_threshold() {
        assert_eq!(softplus(25.0), 25.0);
        assert!((softplus(0.0) - 2f32.ln()).abs() < 1e-7);
    }
}

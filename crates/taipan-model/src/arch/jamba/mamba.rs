//! Jamba's Mamba-1 mixer: `in_proj → causal conv → SiLU → x_proj → RMSNorm'd dt/B/C →
//! selective scan → gate → out_proj` (Gu & Dao 2023; Jamba adds the three RMSNorms).
//!
//! The projections run over the rows of the whole batch; the conv and the scan run per sequence
//! on its own state slot, the sequences' scans in parallel.

use super::{resize, JambaConfig};
use crate::cache::SlotMut;
use std::sync::Mutex;
use taipan_kernels::matmul::MatmulScratch;
use taipan_kernels::ops::{self, AttnSeq};
use taipan_kernels::ssm::{self, ScanShape};
use taipan_kernels::{Compute, Matrix};

#[derive(Debug)]
pub(super) struct Mamba {
    /// `[2·Di, H]`: x rows, then gate z rows.
    pub in_proj: Matrix,
    pub in_bias: Option<Vec<f32>>,
    /// `[K, Di]`, tap-major.
    pub conv_w: Vec<f32>,
    /// `[Di]`
    pub conv_b: Option<Vec<f32>>,
    /// `[R + 2N, Di]`: dt, B, C rows.
    pub x_proj: Matrix,
    pub dt_norm: Vec<f32>,
    pub b_norm: Vec<f32>,
    pub c_norm: Vec<f32>,
    /// `[Di, R]`
    pub dt_proj: Matrix,
    /// `[Di]`
    pub dt_bias: Vec<f32>,
    /// `[Di, N]`, `−exp(A_log)`.
    pub a: Vec<f32>,
    /// `[Di]`
    pub d: Vec<f32>,
    /// `[H, Di]`
    pub out_proj: Matrix,
    pub out_bias: Option<Vec<f32>>,
    /// This layer's index among the Mamba layers (its layer in a state slot).
    pub state_layer: usize,
}

#[derive(Debug, Default)]
pub(super) struct MambaScratch {
    /// `[rows, 2·Di]`
    xz: Vec<f32>,
    /// `[rows, Di]` each: the conv input, the gate, the conv output after SiLU, dt, the scan output.
    x: Vec<f32>,
    z: Vec<f32>,
    xc: Vec<f32>,
    dt: Vec<f32>,
    y: Vec<f32>,
    /// `[rows, R + 2N]`
    dbc: Vec<f32>,
    /// `[rows, R]`, `[rows, N]`, `[rows, N]`
    dt_low: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
}

impl Mamba {
    pub fn weight_bytes(&self) -> usize {
        self.in_proj.memory_bytes()
            + self.x_proj.memory_bytes()
            + self.dt_proj.memory_bytes()
            + self.out_proj.memory_bytes()
            + 4 * (self.conv_w.len() + self.a.len())
    }

    /// `out[rows, H] = mamba(normed[rows, H])`; `slots[i]` is the state of `seqs[i]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        compute: &Compute,
        c: &JambaConfig,
        seqs: &[AttnSeq<'_>],
        normed: &[f32],
        out: &mut [f32],
        slots: &mut [SlotMut<'_>],
        s: &mut MambaScratch,
        mm: &mut MatmulScratch,
    ) {
        let rows = normed.len() / c.hidden;
        let (di, r, n) = (c.d_inner, c.dt_rank, c.d_state);
        // 1. x and the gate z from one product.
        let xz = resize(&mut s.xz, rows * 2 * di);
        compute.matmul(xz, normed, rows, &self.in_proj, mm);
        if let Some(b) = &self.in_bias {
            for row in xz.chunks_exact_mut(2 * di) {
                ops::add_in_place(row, b);
            }
        }
        let (x, z) = (resize(&mut s.x, rows * di), resize(&mut s.z, rows * di));
        for ((xr, zr), both) in x.chunks_exact_mut(di).zip(z.chunks_exact_mut(di)).zip(xz.chunks_exact(2 * di)) {
            xr.copy_from_slice(&both[..di]);
            zr.copy_from_slice(&both[di..]);
        }
        // 2. Causal conv per sequence, continuing from its saved inputs; then SiLU.
        let xc = resize(&mut s.xc, rows * di);
        for (seq, slot) in seqs.iter().zip(slots.iter_mut()) {
            let span = seq.first_row * di..(seq.first_row + seq.tokens) * di;
            let (conv_state, _) = slot.layer(self.state_layer);
            ssm::causal_conv1d(&mut xc[span.clone()], &x[span], &self.conv_w, self.conv_b.as_deref(), conv_state, di);
        }
        ops::silu_in_place(xc);
        // 3. dt, B and C from one product, each RMSNorm'd; dt through its own projection.
        let p_w = r + 2 * n;
        let dbc = resize(&mut s.dbc, rows * p_w);
        compute.matmul(dbc, xc, rows, &self.x_proj, mm);
        let (dt_low, b, cm) = (resize(&mut s.dt_low, rows * r), resize(&mut s.b, rows * n), resize(&mut s.c, rows * n));
        for (t, row) in dbc.chunks_exact(p_w).enumerate() {
            dt_low[t * r..(t + 1) * r].copy_from_slice(&row[..r]);
            b[t * n..(t + 1) * n].copy_from_slice(&row[r..r + n]);
            cm[t * n..(t + 1) * n].copy_from_slice(&row[r + n..]);
        }
        ops::rms_norm(dt_low, &self.dt_norm, c.rms_eps);
        ops::rms_norm(b, &self.b_norm, c.rms_eps);
        ops::rms_norm(cm, &self.c_norm, c.rms_eps);
        let dt = resize(&mut s.dt, rows * di);
        compute.matmul(dt, dt_low, rows, &self.dt_proj, mm);
        ssm::softplus_bias_in_place(dt, &self.dt_bias);
        // 4. The selective scan per sequence on its own state, sequences in parallel.
        let y = resize(&mut s.y, rows * di);
        let (x, z, dt, b, cm) = (&*xc, &*z, &*dt, &*b, &*cm);
        let mut jobs = Vec::with_capacity(seqs.len());
        let mut y_rest = &mut y[..];
        for (seq, slot) in seqs.iter().zip(slots.iter_mut()) {
            let (y_seq, tail) = std::mem::take(&mut y_rest).split_at_mut(seq.tokens * di);
            y_rest = tail;
            let (_, h) = slot.layer(self.state_layer);
            jobs.push(Mutex::new((seq, y_seq, h)));
        }
        let scan = compute.kernels.selective_scan;
        let run = |i: usize| {
            let mut job = jobs[i].lock().unwrap_or_else(|p| p.into_inner());
            let (seq, y_seq, h) = &mut *job;
            let (rows_c, rows_n) = (
                seq.first_row * di..(seq.first_row + seq.tokens) * di,
                seq.first_row * n..(seq.first_row + seq.tokens) * n,
            );
            let inputs = ssm::ScanInputs {
                x: &x[rows_c.clone()],
                dt: &dt[rows_c.clone()],
                z: &z[rows_c],
                b: &b[rows_n.clone()],
                c: &cm[rows_n],
                a: &self.a,
                d: &self.d,
            };
            scan(y_seq, &inputs, h, ScanShape { tokens: seq.tokens, channels: di, state: n });
        };
        if jobs.len() > 1 {
            compute.pool.run(jobs.len(), &run);
        } else if !jobs.is_empty() {
            run(0);
        }
        drop(jobs);
        // 5. Back to the model width.
        compute.matmul(out, y, rows, &self.out_proj, mm);
        if let Some(bias) = &self.out_bias {
            for row in out.chunks_exact_mut(c.hidden) {
                ops::add_in_place(row, bias);
            }
        }
    }
}

//! Jamba's feed-forward blocks: a dense SwiGLU MLP, or a mixture of such MLPs behind a softmax
//! router whose top-k weights are NOT renormalised. Rows of the whole batch are routed together
//! and grouped per expert, so each expert's matrices are read once per step.

use super::resize;
use taipan_kernels::matmul::MatmulScratch;
use taipan_kernels::{ops, Compute, Matrix, RowsProduct};

/// A SwiGLU MLP: `down · (silu(gate · x) ⊙ up · x)`.
#[derive(Debug)]
pub(super) struct Mlp {
    /// `[2F, H]`: gate rows, then up rows.
    pub gate_up: Matrix,
    /// `[H, F]`
    pub down: Matrix,
}

#[derive(Debug)]
pub(super) enum Ffn {
    Dense(Mlp),
    Moe { router: Matrix, experts: Vec<Mlp>, top_k: usize },
}

#[derive(Debug, Default)]
pub(super) struct FfnScratch {
    /// `[rows, 2F]`
    gate_up: Vec<f32>,
    /// `[rows, F]`
    act: Vec<f32>,
    /// `[rows, E]` router probabilities.
    router: Vec<f32>,
    /// Per expert: (row, weight) of the rows routed to it.
    routes: Vec<Vec<(usize, f32)>>,
    /// Per expert, the batch rows routed to it; and `0..routed` (the down products' inputs).
    route_rows: Vec<Vec<usize>>,
    own_rows: Vec<usize>,
    /// The experts' outputs, one row per routed (row, expert) pair `[routed, H]`.
    rows_out: Vec<f32>,
}

/// `act[r] = silu(gate[r]) ⊙ up[r]` for every row of `gate_up` (`[rows, 2F]`, gate then up),
/// rows over the pool: at 16 sequences a MoE layer's 32 routed rows took ~60 µs alone.
fn swiglu_rows(compute: &Compute, act: &mut [f32], gate_up: &[f32], f: usize) {
    compute.pool.for_rows_mut(act, f, &|r, a| {
        let (g, u) = gate_up[r * 2 * f..(r + 1) * 2 * f].split_at(f);
        ops::swiglu_into(a, g, u);
    });
}

impl Mlp {
    fn weight_bytes(&self) -> usize {
        self.gate_up.memory_bytes() + self.down.memory_bytes()
    }

    fn forward(
        &self,
        compute: &Compute,
        x: &[f32],
        rows: usize,
        out: &mut [f32],
        s: &mut FfnScratch,
        mm: &mut MatmulScratch,
    ) {
        let f = self.down.cols();
        let gu = resize(&mut s.gate_up, rows * 2 * f);
        compute.matmul(gu, x, rows, &self.gate_up, mm);
        let act = resize(&mut s.act, rows * f);
        swiglu_rows(compute, act, gu, f);
        compute.matmul(out, act, rows, &self.down, mm);
    }
}

impl Ffn {
    pub fn weight_bytes(&self) -> usize {
        match self {
            Ffn::Dense(m) => m.weight_bytes(),
            Ffn::Moe { router, experts, .. } => {
                router.memory_bytes() + experts.iter().map(Mlp::weight_bytes).sum::<usize>()
            }
        }
    }

    /// `out[rows, H] = ffn(x[rows, H])`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        compute: &Compute,
        h: usize,
        x: &[f32],
        rows: usize,
        out: &mut [f32],
        s: &mut FfnScratch,
        mm: &mut MatmulScratch,
    ) {
        let (router, experts, top_k) = match self {
            Ffn::Dense(mlp) => return mlp.forward(compute, x, rows, out, s, mm),
            Ffn::Moe { router, experts, top_k } => (router, experts, *top_k),
        };
        let e_n = experts.len();
        let probs = resize(&mut s.router, rows * e_n);
        compute.matmul(probs, x, rows, router, mm);
        let mut routes = std::mem::take(&mut s.routes);
        routes.resize_with(e_n, Vec::new);
        routes.iter_mut().for_each(Vec::clear);
        let mut order: Vec<usize> = Vec::with_capacity(e_n);
        for (t, p) in probs.chunks_exact_mut(e_n).enumerate() {
            ops::softmax(p);
            order.clear();
            order.extend(0..e_n);
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            for &e in &order[..top_k] {
                routes[e].push((t, p[e]));
            }
        }
        // Every routed (row, expert) pair gets one row of the experts' outputs, grouped by
        // expert; all experts' gate/up products run in one parallel region, then all down ones.
        let mut offsets = Vec::with_capacity(e_n);
        let mut total = 0;
        for route in &routes {
            offsets.push(total);
            total += route.len();
        }
        let (mut ids, mut own) = (std::mem::take(&mut s.route_rows), std::mem::take(&mut s.own_rows));
        ids.clear();
        ids.extend(routes.iter().map(|route| route.iter().map(|&(t, _)| t).collect::<Vec<_>>()));
        own.clear();
        own.extend(0..total);
        let f = experts[0].down.cols();
        let used = || experts.iter().zip(&routes).enumerate().filter(|(_, (_, route))| !route.is_empty());
        let gate_up: Vec<RowsProduct<'_>> = used()
            .map(|(e, (expert, _))| RowsProduct { w: &expert.gate_up, rows: &ids[e], out_first: offsets[e] })
            .collect();
        let gu = resize(&mut s.gate_up, total * 2 * f);
        compute.matmul_rows(gu, x, rows, &gate_up, mm);
        let act = resize(&mut s.act, total * f);
        swiglu_rows(compute, act, gu, f);
        let down: Vec<RowsProduct<'_>> = used()
            .map(|(e, (expert, route))| RowsProduct {
                w: &expert.down,
                rows: &own[offsets[e]..offsets[e] + route.len()],
                out_first: offsets[e],
            })
            .collect();
        let y = resize(&mut s.rows_out, total * h);
        // The down products' activation rows are the routed rows: each takes its token's role.
        let token_roles = std::mem::take(&mut mm.prompt_rows);
        if !token_roles.is_empty() {
            mm.prompt_rows.extend(ids.iter().flatten().map(|&t| token_roles.get(t).copied().unwrap_or(false)));
        }
        compute.matmul_rows(y, act, total, &down, mm);
        mm.prompt_rows = token_roles;
        out.fill(0.0);
        for (route, &first) in routes.iter().zip(&offsets) {
            for (i, &(t, w)) in route.iter().enumerate() {
                let yr = &y[(first + i) * h..(first + i + 1) * h];
                for (o, &v) in out[t * h..(t + 1) * h].iter_mut().zip(yr) {
                    *o += w * v;
                }
            }
        }
        (s.routes, s.route_rows, s.own_rows) = (routes, ids, own);
    }
}

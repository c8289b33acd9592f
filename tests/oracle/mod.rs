//! Float64 host computations of every backend operation, written for the tests and
//! independent of any backend's code: where a backend uses a compact closed form, the oracle
//! sums an explicit Jacobian or recomputes from scratch. The oracles' own gradients are
//! checked against central finite differences in `backend_conformance.rs`.

use pipit_engine::backend::{Attention, Matmul};

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// `op(a)·op(b) (+ bias) (+ init)`, with `op` as [`Matmul`] describes.
pub fn matmul(
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    init: Option<&[f32]>,
    s: Matmul,
) -> Vec<f64> {
    let (m, n, k) = (s.m, s.n, s.k);
    let at = |i: usize, p: usize| if s.trans_a { a[p * m + i] } else { a[i * k + p] } as f64;
    let bt = |p: usize, j: usize| if s.trans_b { b[j * k + p] } else { b[p * n + j] } as f64;
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut sum = (0..k).map(|p| at(i, p) * bt(p, j)).sum::<f64>();
            sum += bias.map_or(0.0, |x| x[j] as f64);
            sum += init.map_or(0.0, |x| x[i * n + j] as f64);
            out[i * n + j] = sum;
        }
    }
    out
}

/// One row `i` of `op(a)·op(b)`, for spot checks of products too large to compute whole.
pub fn matmul_row(a: &[f32], b: &[f32], s: Matmul, i: usize) -> Vec<f64> {
    let (m, n, k) = (s.m, s.n, s.k);
    (0..n)
        .map(|j| {
            (0..k)
                .map(|p| {
                    let x = if s.trans_a {
                        a[p * m + i]
                    } else {
                        a[i * k + p]
                    } as f64;
                    let y = if s.trans_b {
                        b[j * k + p]
                    } else {
                        b[p * n + j]
                    } as f64;
                    x * y
                })
                .sum()
        })
        .collect()
}

/// `init[j] + Σ_rows dout[row, j]`.
pub fn bias_backward(init: &[f32], dout: &[f32], cols: usize) -> Vec<f64> {
    let mut out = f64s(init);
    for (i, &g) in dout.iter().enumerate() {
        out[i % cols] += g as f64;
    }
    out
}

/// Token + position embedding.
pub fn embedding(tokens: &[u32], wte: &[f32], wpe: &[f32], seq: usize, c: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(tokens.len() * c);
    for (r, &tok) in tokens.iter().enumerate() {
        let t = r % seq;
        for i in 0..c {
            out.push(wte[tok as usize * c + i] as f64 + wpe[t * c + i] as f64);
        }
    }
    out
}

/// Embedding gradients added to their initial values: `(dwte, dwpe)`.
pub fn embedding_backward(
    dwte: &[f32],
    dwpe: &[f32],
    dout: &[f32],
    tokens: &[u32],
    seq: usize,
    c: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (mut w, mut p) = (f64s(dwte), f64s(dwpe));
    for (r, &tok) in tokens.iter().enumerate() {
        for i in 0..c {
            w[tok as usize * c + i] += dout[r * c + i] as f64;
            p[(r % seq) * c + i] += dout[r * c + i] as f64;
        }
    }
    (w, p)
}

const LN_EPS: f64 = 1e-5;

/// Layernorm rows: `(out, mean, rstd)`.
pub fn layernorm(inp: &[f64], w: &[f64], b: &[f64], c: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut out, mut means, mut rstds) = (Vec::new(), Vec::new(), Vec::new());
    for x in inp.chunks(c) {
        let mean = x.iter().sum::<f64>() / c as f64;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (var + LN_EPS).sqrt();
        out.extend(
            x.iter()
                .enumerate()
                .map(|(i, v)| (v - mean) * rstd * w[i] + b[i]),
        );
        means.push(mean);
        rstds.push(rstd);
    }
    (out, means, rstds)
}

/// Layernorm gradients through the explicit Jacobian
/// `∂x̂_j/∂x_i = rstd·(δ_ij − 1/C) − rstd·x̂_i·x̂_j/C`: `(dinp, dweight, dbias)` for `dout`.
pub fn layernorm_backward(
    dout: &[f64],
    inp: &[f64],
    w: &[f64],
    c: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut dinp = vec![0.0; inp.len()];
    let (mut dw, mut db) = (vec![0.0; c], vec![0.0; c]);
    for (row, x) in inp.chunks(c).enumerate() {
        let mean = x.iter().sum::<f64>() / c as f64;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (var + LN_EPS).sqrt();
        let xhat: Vec<f64> = x.iter().map(|v| (v - mean) * rstd).collect();
        let dy = &dout[row * c..][..c];
        for i in 0..c {
            dw[i] += dy[i] * xhat[i];
            db[i] += dy[i];
            let mut g = 0.0;
            for j in 0..c {
                let delta = if i == j { 1.0 } else { 0.0 };
                let jac = rstd * (delta - 1.0 / c as f64) - rstd * xhat[i] * xhat[j] / c as f64;
                g += dy[j] * w[j] * jac;
            }
            dinp[row * c + i] = g;
        }
    }
    (dinp, dw, db)
}

const GELU_K: f64 = 0.797_884_560_802_865_4;

/// GELU, tanh approximation.
pub fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + (GELU_K * (x + 0.044715 * x.powi(3))).tanh())
}

/// Derivative of [`gelu`], written via `sech²`.
pub fn gelu_grad(x: f64) -> f64 {
    let u = GELU_K * (x + 0.044715 * x.powi(3));
    let sech2 = 1.0 / u.cosh().powi(2);
    0.5 * (1.0 + u.tanh()) + 0.5 * x * sech2 * GELU_K * (1.0 + 3.0 * 0.044715 * x * x)
}

/// Causal multi-head attention: `(out, att)`, `att` zero above the diagonal.
pub fn attention(qkv: &[f64], s: Attention) -> (Vec<f64>, Vec<f64>) {
    let (t_len, c, nh) = (s.seq, s.channels, s.heads);
    let hs = c / nh;
    let idx = |b: usize, t: usize, part: usize, h: usize, i: usize| {
        (b * t_len + t) * 3 * c + part * c + h * hs + i
    };
    let mut out = vec![0.0; s.batch * t_len * c];
    let mut att = vec![0.0; s.batch * nh * t_len * t_len];
    for b in 0..s.batch {
        for h in 0..nh {
            for t in 0..t_len {
                let scores: Vec<f64> = (0..=t)
                    .map(|u| {
                        (0..hs)
                            .map(|i| qkv[idx(b, t, 0, h, i)] * qkv[idx(b, u, 1, h, i)])
                            .sum::<f64>()
                            / (hs as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|x| (x - max).exp()).sum();
                for (u, sc) in scores.iter().enumerate() {
                    let p = (sc - max).exp() / z;
                    att[((b * nh + h) * t_len + t) * t_len + u] = p;
                    for i in 0..hs {
                        out[(b * t_len + t) * c + h * hs + i] += p * qkv[idx(b, u, 2, h, i)];
                    }
                }
            }
        }
    }
    (out, att)
}

/// Gradient of `Σ dout·attention(qkv)` with respect to `qkv`, recomputing the probabilities.
pub fn attention_backward(dout: &[f64], qkv: &[f64], s: Attention) -> Vec<f64> {
    let (t_len, c, nh) = (s.seq, s.channels, s.heads);
    let hs = c / nh;
    let (_, att) = attention(qkv, s);
    let idx = |b: usize, t: usize, part: usize, h: usize, i: usize| {
        (b * t_len + t) * 3 * c + part * c + h * hs + i
    };
    let mut dqkv = vec![0.0; qkv.len()];
    for b in 0..s.batch {
        for h in 0..nh {
            for t in 0..t_len {
                let p = |u: usize| att[((b * nh + h) * t_len + t) * t_len + u];
                let dy = |i: usize| dout[(b * t_len + t) * c + h * hs + i];
                // dP[u] = dy · v_u; softmax Jacobian dS[u] = Σ_w dP[w]·p_w·(δ_uw − p_u).
                let dp: Vec<f64> = (0..=t)
                    .map(|u| (0..hs).map(|i| dy(i) * qkv[idx(b, u, 2, h, i)]).sum())
                    .collect();
                for u in 0..=t {
                    for i in 0..hs {
                        dqkv[idx(b, u, 2, h, i)] += p(u) * dy(i);
                    }
                    let ds: f64 = (0..=t)
                        .map(|w| dp[w] * p(w) * (if w == u { 1.0 } else { 0.0 } - p(u)))
                        .sum::<f64>()
                        / (hs as f64).sqrt();
                    for i in 0..hs {
                        dqkv[idx(b, t, 0, h, i)] += ds * qkv[idx(b, u, 1, h, i)];
                        dqkv[idx(b, u, 1, h, i)] += ds * qkv[idx(b, t, 0, h, i)];
                    }
                }
            }
        }
    }
    dqkv
}

/// Per-row cross-entropy `log Σ exp(x) − x[target]`, via a shifted sum.
pub fn cross_entropy_row(row: &[f32], target: u32) -> f64 {
    let max = row.iter().fold(f64::MIN, |m, &x| m.max(x as f64));
    let lse = max
        + row
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    lse - row[target as usize] as f64
}

/// `scale · (softmax(row) − onehot(target))`.
pub fn cross_entropy_grad_row(row: &[f32], target: u32, scale: f64) -> Vec<f64> {
    let max = row.iter().fold(f64::MIN, |m, &x| m.max(x as f64));
    let z: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row.iter()
        .enumerate()
        .map(|(i, &x)| {
            scale * ((x as f64 - max).exp() / z - if i == target as usize { 1.0 } else { 0.0 })
        })
        .collect()
}

/// One AdamW step as PyTorch writes it (decay first, then the Adam update): `(param, m, v)`.
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    p: &[f32],
    g: &[f32],
    m: &[f32],
    v: &[f32],
    lr: f64,
    (beta1, beta2): (f64, f64),
    eps: f64,
    wd: f64,
    step: i32,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..p.len() {
        let g = g[i] as f64;
        let m1 = beta1 * m[i] as f64 + (1.0 - beta1) * g;
        let v1 = beta2 * v[i] as f64 + (1.0 - beta2) * g * g;
        let decayed = p[i] as f64 * (1.0 - lr * wd);
        let denom = (v1.sqrt() / (1.0 - beta2.powi(step)).sqrt()) + eps;
        let step_size = lr / (1.0 - beta1.powi(step));
        out.0.push(decayed - step_size * m1 / denom);
        out.1.push(m1);
        out.2.push(v1);
    }
    out
}

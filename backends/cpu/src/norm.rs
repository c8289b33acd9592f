//! LayerNorm (GPT-2: with bias, ε 1e-5), forward and backward, a row at a time in f32.

use crate::math::{dot, sum, wide};
use crate::threads::rows;

/// The epsilon added to the variance, as GPT-2 and PyTorch's default.
const EPS: f32 = 1e-5;

/// Normalise each row of `inp`, scale by `weight` and shift by `bias`; save each row's mean
/// and reciprocal standard deviation (population variance).
pub(crate) fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    c: usize,
) {
    // The statistics first (cheap), then the rows on threads.
    wide(|| {
        for ((x, m), s) in inp
            .chunks_exact(c)
            .zip(mean.iter_mut())
            .zip(rstd.iter_mut())
        {
            let mu = sum(x) / c as f32;
            let mut lanes = [0f32; 8];
            let mut chunks = x.chunks_exact(8);
            for ch in &mut chunks {
                for l in 0..8 {
                    let d = ch[l] - mu;
                    lanes[l] += d * d;
                }
            }
            let tail: f32 = chunks
                .remainder()
                .iter()
                .map(|&v| (v - mu) * (v - mu))
                .sum();
            let var = (lanes.iter().sum::<f32>() + tail) / c as f32;
            *m = mu;
            *s = 1.0 / (var + EPS).sqrt();
        }
    });
    let (mean, rstd) = (&*mean, &*rstd);
    rows(out, c, c * 4, |first, block| {
        wide(|| {
            for (r, o) in block.chunks_exact_mut(c).enumerate() {
                let row = first + r;
                let (mu, s) = (mean[row], rstd[row]);
                let x = &inp[row * c..][..c];
                for (((o, &x), &w), &b) in o.iter_mut().zip(x).zip(weight).zip(bias) {
                    *o = (x - mu) * s * w + b;
                }
            }
        })
    });
}

/// Overwrite `dinp`; accumulate `dweight` and `dbias`. With `n = (x − mean)·rstd` and
/// `g = dout·weight`, a row's input gradient is `rstd·(g − mean(g) − n·mean(g·n))`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layernorm_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
) {
    rows(dinp, c, c * 8, |first, block| {
        let mut g = vec![0f32; c];
        let mut n = vec![0f32; c];
        wide(|| {
            for (r, di) in block.chunks_exact_mut(c).enumerate() {
                let row = first + r;
                let (mu, s) = (mean[row], rstd[row]);
                let (x, dy) = (&inp[row * c..][..c], &dout[row * c..][..c]);
                for i in 0..c {
                    g[i] = dy[i] * weight[i];
                    n[i] = (x[i] - mu) * s;
                }
                let g_mean = sum(&g) / c as f32;
                let gn_mean = dot(&g, &n) / c as f32;
                for i in 0..c {
                    di[i] = s * (g[i] - g_mean - n[i] * gn_mean);
                }
            }
        })
    });
    // Parameter gradients: [dweight | dbias] per block of rows, the blocks added in order.
    let partials = crate::matmul::column_sums(dout.len() / c, 2 * c, |acc, r| {
        let (x, dy) = (&inp[r * c..][..c], &dout[r * c..][..c]);
        let (mu, s) = (mean[r], rstd[r]);
        let (dw, db) = acc.split_at_mut(c);
        for i in 0..c {
            dw[i] += dy[i] * ((x[i] - mu) * s);
            db[i] += dy[i];
        }
    });
    for part in partials.chunks_exact(2 * c) {
        dweight
            .iter_mut()
            .zip(&part[..c])
            .for_each(|(d, &p)| *d += p);
        dbias.iter_mut().zip(&part[c..]).for_each(|(d, &p)| *d += p);
    }
}

/// RMSNorm (Llama): `out = weight · (x · rstd)` with `rstd = 1/√(mean(x²) + eps)`, saved per
/// row; the normalised value is rounded to f32 before the weight scales it, as transformers
/// does.
pub(crate) fn rmsnorm_forward(
    out: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    c: usize,
    eps: f32,
) {
    rows(rstd, 1, c, |first, block| {
        wide(|| {
            for (r, s) in block.iter_mut().enumerate() {
                let x = &inp[(first + r) * c..][..c];
                *s = 1.0 / (dot(x, x) / c as f32 + eps).sqrt();
            }
        })
    });
    let rstd = &*rstd;
    rows(out, c, c * 2, |first, block| {
        wide(|| {
            for (r, o) in block.chunks_exact_mut(c).enumerate() {
                let row = first + r;
                let (x, s) = (&inp[row * c..][..c], rstd[row]);
                for ((o, &x), &w) in o.iter_mut().zip(x).zip(weight) {
                    *o = w * (x * s);
                }
            }
        })
    });
}

/// RMSNorm backward: overwrite `dinp`, accumulate `dweight`. With `x̂ = x·rstd` and
/// `g = dout·weight`, a row's input gradient is `rstd·(g − x̂·mean(g·x̂))`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rmsnorm_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    rstd: &[f32],
    c: usize,
) {
    rows(dinp, c, c * 6, |first, block| {
        let mut g = vec![0f32; c];
        let mut n = vec![0f32; c];
        wide(|| {
            for (r, di) in block.chunks_exact_mut(c).enumerate() {
                let row = first + r;
                let s = rstd[row];
                let (x, dy) = (&inp[row * c..][..c], &dout[row * c..][..c]);
                for i in 0..c {
                    g[i] = dy[i] * weight[i];
                    n[i] = x[i] * s;
                }
                let gn_mean = dot(&g, &n) / c as f32;
                for i in 0..c {
                    di[i] = s * (g[i] - n[i] * gn_mean);
                }
            }
        })
    });
    let partials = crate::matmul::column_sums(dout.len() / c, c, |acc, r| {
        let (x, dy, s) = (&inp[r * c..][..c], &dout[r * c..][..c], rstd[r]);
        for i in 0..c {
            acc[i] += dy[i] * (x[i] * s);
        }
    });
    for part in partials.chunks_exact(c) {
        dweight.iter_mut().zip(part).for_each(|(d, &p)| *d += p);
    }
}

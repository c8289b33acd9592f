//! Layernorm over the last dimension, forward and backward (epsilon 1e-5, as GPT-2).

/// The epsilon added to the variance, as in GPT-2 and PyTorch's default.
const EPS: f64 = 1e-5;

/// Normalise each row of `inp`, then scale by `weight` and shift by `bias`; save each row's
/// mean and reciprocal standard deviation (population variance, as PyTorch).
pub(crate) fn forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    channels: usize,
) {
    let rows = out
        .chunks_exact_mut(channels)
        .zip(inp.chunks_exact(channels));
    for ((o, x), (mean, rstd)) in rows.zip(mean.iter_mut().zip(rstd.iter_mut())) {
        let m = x.iter().map(|&v| v as f64).sum::<f64>() / channels as f64;
        let var = x.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / channels as f64;
        let s = 1.0 / (var + EPS).sqrt();
        for (((o, &x), &w), &b) in o.iter_mut().zip(x).zip(weight).zip(bias) {
            *o = ((x as f64 - m) * s * w as f64 + b as f64) as f32;
        }
        *mean = m as f32;
        *rstd = s as f32;
    }
}

/// Overwrite `dinp`; accumulate `dweight` and `dbias` (summed over rows in f64).
///
/// With `n = (x − mean)·rstd` and `g = dout·weight`, the input gradient of a row is
/// `rstd · (g − mean(g) − n · mean(g·n))`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    channels: usize,
) {
    let mut dw = vec![0f64; channels];
    let mut db = vec![0f64; channels];
    let rows = dinp
        .chunks_exact_mut(channels)
        .zip(dout.chunks_exact(channels))
        .zip(inp.chunks_exact(channels));
    for (((di, dy), x), (&m, &s)) in rows.zip(mean.iter().zip(rstd)) {
        let (m, s) = (m as f64, s as f64);
        let norm = |i: usize| (x[i] as f64 - m) * s;
        let g = |i: usize| dy[i] as f64 * weight[i] as f64;
        let g_mean = (0..channels).map(g).sum::<f64>() / channels as f64;
        let gn_mean = (0..channels).map(|i| g(i) * norm(i)).sum::<f64>() / channels as f64;
        for i in 0..channels {
            di[i] = (s * (g(i) - g_mean - norm(i) * gn_mean)) as f32;
            dw[i] += dy[i] as f64 * norm(i);
            db[i] += dy[i] as f64;
        }
    }
    for (w, d) in dweight.iter_mut().zip(dw) {
        *w = (*w as f64 + d) as f32;
    }
    for (b, d) in dbias.iter_mut().zip(db) {
        *b = (*b as f64 + d) as f32;
    }
}

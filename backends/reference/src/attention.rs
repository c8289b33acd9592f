//! Causal multi-head self-attention, forward and backward.
//!
//! `qkv` is `[batch, seq, 3·C]`: the query, key and value of a token side by side, each split
//! into `heads` contiguous slices of `hs = C / heads` channels (Hugging Face's `c_attn`
//! output, viewed as heads). Scores are scaled by `1/√hs`; token `t` attends to `0..=t`.

#[cfg(target_arch = "x86_64")]
use crate::dot::dot4_avx2;
use crate::dot::{dot_lanes, four_at_once};
use crate::simd::wide;
use anyhow::{bail, Result};
use pipit_engine::backend::Attention;

use crate::buffer::elems;

/// Buffer lengths implied by an [`Attention`] shape.
pub(crate) struct Sizes {
    pub(crate) qkv_len: usize,
    pub(crate) out_len: usize,
    pub(crate) att_len: usize,
}

impl Sizes {
    /// Check the shape and compute its buffer lengths.
    pub(crate) fn check(s: Attention) -> Result<Self> {
        if s.heads == 0 || s.channels == 0 || s.channels % s.heads != 0 {
            bail!(
                "attention: {} channels cannot be split into {} heads of equal width",
                s.channels,
                s.heads
            );
        }
        Ok(Self {
            qkv_len: elems(&[s.batch, s.seq, 3, s.channels])?,
            out_len: elems(&[s.batch, s.seq, s.channels])?,
            att_len: elems(&[s.batch, s.heads, s.seq, s.seq])?,
        })
    }
}

/// Index helpers for one shape.
struct Layout {
    seq: usize,
    c: usize,
    heads: usize,
    hs: usize,
}

impl Layout {
    fn new(s: Attention) -> Self {
        Self {
            seq: s.seq,
            c: s.channels,
            heads: s.heads,
            hs: s.channels / s.heads,
        }
    }
    /// Start of part `part` (0 = q, 1 = k, 2 = v) of head `h` at token `(b, t)` in `qkv`.
    fn qkv(&self, b: usize, t: usize, part: usize, h: usize) -> usize {
        (b * self.seq + t) * 3 * self.c + part * self.c + h * self.hs
    }
    /// Start of head `h` at token `(b, t)` in `out`.
    fn out(&self, b: usize, t: usize, h: usize) -> usize {
        (b * self.seq + t) * self.c + h * self.hs
    }
    /// Start of the probability row of query `t` in head `h` in `att`.
    fn att(&self, b: usize, h: usize, t: usize) -> usize {
        ((b * self.heads + h) * self.seq + t) * self.seq
    }
}

/// Softmax of the scaled causal scores into `att` (zeros above the diagonal), then the
/// probability-weighted sum of values into `out`.
pub(crate) fn forward(out: &mut [f32], att: &mut [f32], qkv: &[f32], s: Attention) {
    let l = Layout::new(s);
    let scale = 1.0 / (l.hs as f64).sqrt();
    let mut scores = vec![0f64; l.seq];
    let mut acc = vec![0f64; l.hs];
    wide(|| {
        for b in 0..s.batch {
            for h in 0..l.heads {
                for t in 0..l.seq {
                    let q = &qkv[l.qkv(b, t, 0, h)..][..l.hs];
                    let key = |t2: usize| &qkv[l.qkv(b, t2, 1, h)..][..l.hs];
                    let scores = &mut scores[..=t];
                    let quads = four_at_once(scores.len());
                    #[cfg(target_arch = "x86_64")]
                    for t2 in (0..quads).step_by(4) {
                        // SAFETY: `four_at_once` is nonzero only where the CPU has AVX2.
                        let dots = unsafe {
                            dot4_avx2(q, [key(t2), key(t2 + 1), key(t2 + 2), key(t2 + 3)])
                        };
                        for (score, d) in scores[t2..t2 + 4].iter_mut().zip(dots) {
                            *score = d * scale;
                        }
                    }
                    for (t2, score) in scores.iter_mut().enumerate().skip(quads) {
                        *score = dot_lanes(q, key(t2)) * scale;
                    }
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    // Each exponential once, kept in place of its score.
                    for x in scores.iter_mut() {
                        *x = (*x - max).exp();
                    }
                    let sum: f64 = scores.iter().sum();
                    let row = &mut att[l.att(b, h, t)..][..l.seq];
                    for (t2, p) in row.iter_mut().enumerate() {
                        *p = if t2 <= t {
                            (scores[t2] / sum) as f32
                        } else {
                            0.0
                        };
                    }
                    // Σ over t2 of p·v for every channel at once, each channel's terms added
                    // in t2 order from -0.0, as `Iterator::sum` adds them (Rust 1.82 on).
                    acc.fill(-0.0);
                    for (t2, &p) in row[..=t].iter().enumerate() {
                        let v = &qkv[l.qkv(b, t2, 2, h)..][..l.hs];
                        for (a, &x) in acc.iter_mut().zip(v) {
                            *a += p as f64 * x as f64;
                        }
                    }
                    let o = &mut out[l.out(b, t, h)..][..l.hs];
                    for (o, &a) in o.iter_mut().zip(&acc) {
                        *o = a as f32;
                    }
                }
            }
        }
    })
}

/// Overwrite `dqkv` with the gradient of `out` through values, softmax and scores.
pub(crate) fn backward(dqkv: &mut [f32], dout: &[f32], qkv: &[f32], att: &[f32], s: Attention) {
    let l = Layout::new(s);
    let scale = 1.0 / (l.hs as f64).sqrt();
    // Keys and values collect a contribution from every later query: sum in f64.
    let mut acc = vec![0f64; dqkv.len()];
    let mut datt = vec![0f64; l.seq];
    wide(|| {
        for b in 0..s.batch {
            for h in 0..l.heads {
                for t in 0..l.seq {
                    let row = &att[l.att(b, h, t)..][..l.seq];
                    let dy = &dout[l.out(b, t, h)..][..l.hs];
                    // Through the weighted sum of values.
                    let value = |t2: usize| &qkv[l.qkv(b, t2, 2, h)..][..l.hs];
                    let quads = four_at_once(t + 1);
                    #[cfg(target_arch = "x86_64")]
                    for t2 in (0..quads).step_by(4) {
                        // SAFETY: `four_at_once` is nonzero only where the CPU has AVX2.
                        let dots = unsafe {
                            dot4_avx2(dy, [value(t2), value(t2 + 1), value(t2 + 2), value(t2 + 3)])
                        };
                        datt[t2..t2 + 4].copy_from_slice(&dots);
                    }
                    for (t2, d) in datt[..=t].iter_mut().enumerate().skip(quads) {
                        *d = dot_lanes(dy, value(t2));
                    }
                    for (t2, &p) in row[..=t].iter().enumerate() {
                        let v = l.qkv(b, t2, 2, h);
                        for (i, &g) in dy.iter().enumerate() {
                            acc[v + i] += p as f64 * g as f64;
                        }
                    }
                    // Through the softmax: dscore = p · (datt − Σ p·datt).
                    let pd: f64 = (0..=t).map(|t2| row[t2] as f64 * datt[t2]).sum();
                    let q = l.qkv(b, t, 0, h);
                    for t2 in 0..=t {
                        let dscore = row[t2] as f64 * (datt[t2] - pd) * scale;
                        let k = l.qkv(b, t2, 1, h);
                        for i in 0..l.hs {
                            acc[q + i] += dscore * qkv[k + i] as f64;
                            acc[k + i] += dscore * qkv[q + i] as f64;
                        }
                    }
                }
            }
        }
    });
    for (d, a) in dqkv.iter_mut().zip(acc) {
        *d = a as f32;
    }
}

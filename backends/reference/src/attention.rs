//! Causal multi-head self-attention, forward and backward.
//!
//! `qkv` is `[batch, seq, 3·C]`: the query, key and value of a token side by side, each split
//! into `heads` contiguous slices of `hs = C / heads` channels (Hugging Face's `c_attn`
//! output, viewed as heads). Scores are scaled by `1/√hs`; token `t` attends to `0..=t`.

#[cfg(target_arch = "x86_64")]
use crate::dot::dot4_avx2;
use crate::dot::{dot_lanes, four_at_once};
use crate::simd::wide;
use crate::threads::{for_row_block_pairs, for_row_blocks};
use anyhow::{bail, Result};
use pipit_engine::backend::{Attention, CachedAttention};

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
/// probability-weighted sum of values into `out`. Batches go to threads in blocks; each is
/// computed the same way whichever block it is in.
pub(crate) fn forward(out: &mut [f32], att: &mut [f32], qkv: &[f32], s: Attention) {
    let l = Layout::new(s);
    let (out_per, att_per) = (l.seq * l.c, l.heads * l.seq * l.seq);
    if s.batch == 0 || out_per == 0 {
        return;
    }
    let work = att_per * l.hs * 2;
    for_row_block_pairs(out, out_per, att, att_per, work, |first, out, att| {
        let batches = out
            .chunks_exact_mut(out_per)
            .zip(att.chunks_exact_mut(att_per));
        let mut scores = vec![0f64; l.seq];
        let mut acc = vec![0f64; l.hs];
        wide(|| {
            for (i, (out, att)) in batches.enumerate() {
                forward_batch(&l, first + i, out, att, qkv, &mut scores, &mut acc);
            }
        })
    });
}

/// [`forward`] for batch `b`, whose output and probabilities are `out` and `att`.
#[inline(always)]
fn forward_batch(
    l: &Layout,
    b: usize,
    out: &mut [f32],
    att: &mut [f32],
    qkv: &[f32],
    scores: &mut [f64],
    acc: &mut [f64],
) {
    let scale = 1.0 / (l.hs as f64).sqrt();
    for h in 0..l.heads {
        for t in 0..l.seq {
            let (probs, zeros) = att[l.att(0, h, t)..][..l.seq].split_at_mut(t + 1);
            zeros.fill(0.0);
            attend(
                &qkv[l.qkv(b, t, 0, h)..][..l.hs],
                |t2| &qkv[l.qkv(b, t2, 1, h)..][..l.hs],
                |t2| &qkv[l.qkv(b, t2, 2, h)..][..l.hs],
                scale,
                &mut scores[..=t],
                acc,
                probs,
                &mut out[l.out(0, t, h)..][..l.hs],
            );
        }
    }
}

/// One query row: the softmax of `q`'s scaled dot products with the keys `0..probs.len()`
/// into `probs`, then their probability-weighted sum of values into `out`. `scores` (as long
/// as `probs`) and `acc` (one per channel of a head) are scratch.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend<'a>(
    q: &[f32],
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    scale: f64,
    scores: &mut [f64],
    acc: &mut [f64],
    probs: &mut [f32],
    out: &mut [f32],
) {
    let quads = four_at_once(scores.len());
    #[cfg(target_arch = "x86_64")]
    for t2 in (0..quads).step_by(4) {
        // SAFETY: `four_at_once` is nonzero only where the CPU has AVX2.
        let dots = unsafe { dot4_avx2(q, [key(t2), key(t2 + 1), key(t2 + 2), key(t2 + 3)]) };
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
    for (p, &e) in probs.iter_mut().zip(scores.iter()) {
        *p = (e / sum) as f32;
    }
    // Σ over t2 of p·v for every channel at once, each channel's terms added in t2 order from
    // -0.0, as `Iterator::sum` adds them (Rust 1.82 on).
    acc.fill(-0.0);
    for (t2, &p) in probs.iter().enumerate() {
        for (a, &x) in acc.iter_mut().zip(value(t2)) {
            *a += p as f64 * x as f64;
        }
    }
    for (o, &a) in out.iter_mut().zip(acc.iter()) {
        *o = a as f32;
    }
}

/// Write the new tokens' keys and values into `cache`, then attend from each new token over
/// every cached position up to its own, row by row as [`forward`] computes it.
pub(crate) fn decode(out: &mut [f32], cache: &mut [f32], qkv: &[f32], s: CachedAttention) {
    let l = Layout::new(s.of_new());
    let c = s.channels;
    let slot = |b: usize, t: usize| (b * s.capacity + t) * 2 * c;
    for b in 0..s.batch {
        for t in 0..s.new {
            let from = l.qkv(b, t, 1, 0);
            cache[slot(b, s.past + t)..][..2 * c].copy_from_slice(&qkv[from..][..2 * c]);
        }
    }
    let cache = &*cache;
    let scale = 1.0 / (l.hs as f64).sqrt();
    let mut scores = vec![0f64; s.past + s.new];
    let mut probs = vec![0f32; s.past + s.new];
    let mut acc = vec![0f64; l.hs];
    wide(|| {
        for b in 0..s.batch {
            for h in 0..l.heads {
                for t in 0..s.new {
                    let n = s.past + t + 1;
                    attend(
                        &qkv[l.qkv(b, t, 0, h)..][..l.hs],
                        |t2| &cache[slot(b, t2) + h * l.hs..][..l.hs],
                        |t2| &cache[slot(b, t2) + c + h * l.hs..][..l.hs],
                        scale,
                        &mut scores[..n],
                        &mut acc,
                        &mut probs[..n],
                        &mut out[l.out(b, t, h)..][..l.hs],
                    );
                }
            }
        }
    })
}

/// Overwrite `dqkv` with the gradient of `out` through values, softmax and scores. Batches go
/// to threads in blocks, as in [`forward`].
pub(crate) fn backward(dqkv: &mut [f32], dout: &[f32], qkv: &[f32], att: &[f32], s: Attention) {
    let l = Layout::new(s);
    let per = l.seq * 3 * l.c;
    let work = l.heads * l.seq * l.seq * l.hs * 4;
    for_row_blocks(dqkv, per, work, |first, block| {
        // Keys and values collect a contribution from every later query: sum in f64.
        let mut acc = vec![0f64; block.len()];
        let mut datt = vec![0f64; l.seq];
        wide(|| {
            for i in 0..block.len() / per.max(1) {
                backward_batch(&l, first + i, i, &mut acc, &mut datt, dout, qkv, att);
            }
        });
        for (d, a) in block.iter_mut().zip(acc) {
            *d = a as f32;
        }
    });
}

/// [`backward`] for batch `b`, summed into `acc` (the block's f64 gradient, in which the
/// batch is the `local`-th).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_batch(
    l: &Layout,
    b: usize,
    local: usize,
    acc: &mut [f64],
    datt: &mut [f64],
    dout: &[f32],
    qkv: &[f32],
    att: &[f32],
) {
    let scale = 1.0 / (l.hs as f64).sqrt();
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
                let v = l.qkv(local, t2, 2, h);
                for (i, &g) in dy.iter().enumerate() {
                    acc[v + i] += p as f64 * g as f64;
                }
            }
            // Through the softmax: dscore = p · (datt − Σ p·datt).
            let pd: f64 = (0..=t).map(|t2| row[t2] as f64 * datt[t2]).sum();
            let (q, q_acc) = (l.qkv(b, t, 0, h), l.qkv(local, t, 0, h));
            for t2 in 0..=t {
                let dscore = row[t2] as f64 * (datt[t2] - pd) * scale;
                let (k, k_acc) = (l.qkv(b, t2, 1, h), l.qkv(local, t2, 1, h));
                for i in 0..l.hs {
                    acc[q_acc + i] += dscore * qkv[k + i] as f64;
                    acc[k_acc + i] += dscore * qkv[q + i] as f64;
                }
            }
        }
    }
}

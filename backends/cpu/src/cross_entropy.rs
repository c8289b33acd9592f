//! Softmax cross-entropy over the vocabulary and its logits gradient, a row at a time.

use crate::math::{exp, max, wide};
use crate::threads::rows;

/// The maximum and `Σ exp(x − max)` of one row, in `scratch` the exponentials.
#[inline(always)]
fn softmax_parts(row: &[f32], scratch: &mut [f32]) -> (f32, f32) {
    let m = max(row);
    for (e, &x) in scratch.iter_mut().zip(row) {
        *e = exp(x - m);
    }
    (m, crate::math::sum(scratch))
}

/// `losses[r] = logsumexp(logits[r,:]) − logits[r, targets[r]]`.
pub(crate) fn forward(losses: &mut [f32], logits: &[f32], targets: &[u32], vocab: usize) {
    rows(losses, 1, vocab * 4, |first, block| {
        let mut scratch = vec![0f32; vocab];
        wide(|| {
            for (i, loss) in block.iter_mut().enumerate() {
                let r = first + i;
                let row = &logits[r * vocab..][..vocab];
                let (m, s) = softmax_parts(row, &mut scratch);
                *loss = m + s.ln() - row[targets[r] as usize];
            }
        })
    });
}

/// `dlogits = scale · (softmax(logits) − onehot(targets))`.
pub(crate) fn backward(
    dlogits: &mut [f32],
    logits: &[f32],
    targets: &[u32],
    scale: f32,
    vocab: usize,
) {
    rows(dlogits, vocab, vocab * 6, |first, block| {
        wide(|| {
            for (i, d) in block.chunks_exact_mut(vocab).enumerate() {
                let r = first + i;
                let row = &logits[r * vocab..][..vocab];
                let (_, s) = softmax_parts(row, d);
                let k = scale / s;
                for e in d.iter_mut() {
                    *e *= k;
                }
                d[targets[r] as usize] -= scale;
            }
        })
    });
}

//! Softmax cross-entropy over the vocabulary and its logits gradient.

use anyhow::{bail, Result};

use crate::buffer::{elems, expect_len};

/// Check `logits[rows, vocab]` and the targets against the sizes.
pub fn check(logits_len: usize, targets: &[u32], rows: usize, vocab: usize) -> Result<()> {
    if vocab == 0 {
        bail!("cross-entropy needs a vocabulary of at least one token");
    }
    expect_len("logits", logits_len, elems(&[rows, vocab])?)?;
    expect_len("targets", targets.len(), rows)?;
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("target id {bad} is outside the vocabulary of {vocab}");
    }
    Ok(())
}

/// The maximum and the sum of `exp(x − max)` of one row: a stable log-sum-exp.
fn max_and_sum(row: &[f32]) -> (f64, f64) {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let sum = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    (max, sum)
}

/// `losses[r] = logsumexp(logits[r,:]) − logits[r, targets[r]]`.
pub(crate) fn forward(losses: &mut [f32], logits: &[f32], targets: &[u32], vocab: usize) {
    for ((loss, row), &t) in losses
        .iter_mut()
        .zip(logits.chunks_exact(vocab))
        .zip(targets)
    {
        let (max, sum) = max_and_sum(row);
        *loss = (max + sum.ln() - row[t as usize] as f64) as f32;
    }
}

/// `dlogits = scale · (softmax(logits) − onehot(targets))`.
pub(crate) fn backward(
    dlogits: &mut [f32],
    logits: &[f32],
    targets: &[u32],
    scale: f32,
    vocab: usize,
) {
    let rows = dlogits
        .chunks_exact_mut(vocab)
        .zip(logits.chunks_exact(vocab));
    for ((d, row), &t) in rows.zip(targets) {
        let (max, sum) = max_and_sum(row);
        for (i, (d, &x)) in d.iter_mut().zip(row).enumerate() {
            let p = (x as f64 - max).exp() / sum;
            let onehot = if i == t as usize { 1.0 } else { 0.0 };
            *d = (scale as f64 * (p - onehot)) as f32;
        }
    }
}

//! The head: final layernorm, logits through the tied `wte`, and the cross-entropy loss.

use anyhow::Result;

use super::params::Params;
use super::stage::Dims;
use crate::backend::{Backend, DType, Matmul};

/// What the head's backward needs from its forward (its input is kept by the stage).
pub(super) struct HeadActs<B: Backend> {
    lnf: B::Buffer,
    mean: B::Buffer,
    rstd: B::Buffer,
    /// `[rows, vocab]`; handed out as the stage output when there are no targets.
    pub(super) logits: B::Buffer,
}

impl<B: Backend> HeadActs<B> {
    /// Bytes held, for memory accounting.
    pub(super) fn bytes(&self, b: &B) -> u64 {
        [&self.lnf, &self.mean, &self.rstd, &self.logits]
            .iter()
            .map(|buf| b.bytes(buf))
            .sum()
    }
}

/// Logits `[rows, vocab]` of `x[rows, C]`, with the activations backward needs.
pub(super) fn forward<B: Backend>(
    b: &B,
    p: &Params<B>,
    x: &B::Buffer,
    d: Dims,
) -> Result<HeadActs<B>> {
    let (rows, c, v) = (d.rows(), d.channels, d.vocab);
    let mut lnf = b.alloc_output(rows * c, d.act)?;
    let mut mean = b.alloc_output(rows, DType::F32)?;
    let mut rstd = b.alloc_output(rows, DType::F32)?;
    b.layernorm_forward(
        &mut lnf,
        &mut mean,
        &mut rstd,
        x,
        p.value("ln_f.weight")?,
        p.value("ln_f.bias")?,
        rows,
        c,
    )?;
    let mut logits = b.alloc_output(rows * v, d.act)?;
    // wte is [vocab, C]: the LM head multiplies by its transpose.
    b.matmul(
        &mut logits,
        &lnf,
        p.operand("wte")?,
        None,
        Matmul::new(rows, v, c).trans_b(),
    )?;
    Ok(HeadActs {
        lnf,
        mean,
        rstd,
        logits,
    })
}

/// Per-token losses of saved logits against `targets`.
pub(super) fn losses<B: Backend>(
    b: &B,
    a: &HeadActs<B>,
    targets: &B::Buffer,
    d: Dims,
) -> Result<B::Buffer> {
    let mut losses = b.alloc_output(d.rows(), DType::F32)?;
    b.cross_entropy_forward(&mut losses, &a.logits, targets, d.rows(), d.vocab)?;
    Ok(losses)
}

/// Backward from the loss `loss_scale · Σ losses`: accumulates the `wte` and `ln_f` gradients
/// and returns the gradient of the head's input `x`.
pub(super) fn backward<B: Backend>(
    b: &B,
    p: &mut Params<B>,
    a: HeadActs<B>,
    x: &B::Buffer,
    targets: &B::Buffer,
    loss_scale: f32,
    d: Dims,
) -> Result<B::Buffer> {
    let (rows, c, v) = (d.rows(), d.channels, d.vocab);
    let mut dlogits = b.alloc_output(rows * v, d.act)?;
    b.cross_entropy_backward(&mut dlogits, &a.logits, targets, loss_scale, rows, v)?;
    drop(a.logits);
    b.matmul(
        p.grad_mut("wte")?,
        &dlogits,
        &a.lnf,
        None,
        Matmul::new(v, c, rows).trans_a().accumulate(),
    )?;
    let mut dlnf = b.alloc_output(rows * c, d.act)?;
    b.matmul(
        &mut dlnf,
        &dlogits,
        p.operand("wte")?,
        None,
        Matmul::new(rows, c, v),
    )?;
    drop(dlogits);
    let mut dx = b.alloc_output(rows * c, DType::F32)?;
    let (w, dw, db) = p.layernorm("ln_f.weight", "ln_f.bias")?;
    b.layernorm_backward(&mut dx, dw, db, &dlnf, x, w, &a.mean, &a.rstd, rows, c)?;
    Ok(dx)
}

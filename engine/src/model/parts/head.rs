//! The head: final norm, logits through the LM head, and the cross-entropy loss.

use anyhow::Result;

use super::norm::NormStats;
use super::{Linear, Norm, ParamSpec};
use crate::backend::{Backend, DType};
use crate::model::params::Params;

/// The final `norm`, then `lm` (`[vocab, C]`, the token embedding itself when tied).
#[derive(Clone, Debug)]
pub(crate) struct Head {
    pub(crate) norm: Norm,
    pub(crate) lm: Linear,
}

/// What the head's backward needs from its forward (its input is kept by the stage).
pub(crate) struct HeadActs<B: Backend> {
    normed: B::Buffer,
    stats: NormStats<B>,
    /// `[rows, vocab]`; handed out as the stage output when there are no targets.
    pub(crate) logits: B::Buffer,
}

impl<B: Backend> HeadActs<B> {
    /// Bytes held, for memory accounting.
    pub(crate) fn bytes(&self, b: &B) -> u64 {
        b.bytes(&self.normed) + self.stats.bytes(b) + b.bytes(&self.logits)
    }
}

impl Head {
    pub(crate) fn params(&self) -> Vec<ParamSpec> {
        let mut out = self.norm.params();
        out.extend(self.lm.params());
        out
    }

    /// FLOPs per token: the LM head's matmul and the softmax over the vocabulary.
    pub(crate) fn flops(&self) -> f64 {
        2.0 * self.lm.macs() + 10.0 * self.lm.fan_out as f64
    }

    /// Logits `[rows, vocab]` of `x[rows, C]`, with the activations backward needs.
    pub(crate) fn forward<B: Backend>(
        &self,
        b: &B,
        p: &Params<B>,
        x: &B::Buffer,
        rows: usize,
        dtype: DType,
    ) -> Result<HeadActs<B>> {
        let (normed, stats) = self.norm.forward(b, p, x, rows, dtype)?;
        let logits = self.lm.forward(b, p, &normed, rows, dtype)?;
        Ok(HeadActs {
            normed,
            stats,
            logits,
        })
    }

    /// Per-token losses of saved logits against `targets`.
    pub(crate) fn losses<B: Backend>(
        &self,
        b: &B,
        a: &HeadActs<B>,
        targets: &B::Buffer,
        rows: usize,
    ) -> Result<B::Buffer> {
        let mut losses = b.alloc_output(rows, DType::F32)?;
        b.cross_entropy_forward(&mut losses, &a.logits, targets, rows, self.lm.fan_out)?;
        Ok(losses)
    }

    /// Backward from the loss `loss_scale · Σ losses`: accumulates the LM head's and the
    /// norm's gradients and returns the gradient of the head's input `x`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward<B: Backend>(
        &self,
        b: &B,
        p: &mut Params<B>,
        a: HeadActs<B>,
        x: &B::Buffer,
        targets: &B::Buffer,
        loss_scale: f32,
        rows: usize,
        dtype: DType,
    ) -> Result<B::Buffer> {
        let v = self.lm.fan_out;
        let mut dlogits = b.alloc_output(rows * v, dtype)?;
        b.cross_entropy_backward(&mut dlogits, &a.logits, targets, loss_scale, rows, v)?;
        drop(a.logits);
        self.lm.weight_grad_now(b, p, &a.normed, &dlogits, rows)?;
        let dnormed = self.lm.input_grad(b, p, &dlogits, rows, dtype)?;
        drop(dlogits);
        self.norm.backward(b, p, a.stats, dnormed, x, rows)
    }
}

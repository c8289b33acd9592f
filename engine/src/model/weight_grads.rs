//! Weight gradients a backward may leave for later: the `W` half of a split backward.
//!
//! A linear layer's backward has two products: the input gradient `dx = dy · Wᵀ`, which the
//! previous stage waits for, and the weight gradient `dW += xᵀ · dy`, which nobody waits for.
//! Zero-bubble schedules run the first in an `I` action and keep the second, with the two
//! operands it reads, for a `W` action that fills a bubble. A full backward runs each product
//! the moment it is pushed, so both paths do the same arithmetic in the same order per tensor.

use anyhow::Result;

use super::params::Params;
use crate::backend::{Backend, Matmul};

/// One weight-gradient product: `grad(weight) += inputᵀ · dy`.
pub(super) struct WeightJob<B: Backend> {
    /// Name of the weight whose gradient accumulates.
    pub(super) weight: String,
    /// The layer's input `[rows, in]`, as its forward read it.
    pub(super) input: B::Buffer,
    /// The gradient of the layer's output `[rows, out]`, in the compute dtype.
    pub(super) dy: B::Buffer,
    /// `in × out` over `rows`: `Matmul::new(in, out, rows).trans_a().accumulate()`.
    pub(super) shape: Matmul,
}

/// Where a backward puts its weight-gradient products: run at once, or kept for a `W` action.
/// Dropping a kept set frees its buffers without touching the gradients.
pub struct WeightGrads<B: Backend> {
    defer: bool,
    jobs: Vec<WeightJob<B>>,
    bytes: u64,
}

impl<B: Backend> WeightGrads<B> {
    /// Run every product as it is pushed (a full backward).
    pub(super) fn now() -> Self {
        Self {
            defer: false,
            jobs: Vec::new(),
            bytes: 0,
        }
    }

    /// Keep every product for [`WeightGrads::run`] (the `I` half of a split backward).
    pub(super) fn later() -> Self {
        Self {
            defer: true,
            ..Self::now()
        }
    }

    /// Run `job` now, or keep it.
    pub(super) fn push(&mut self, b: &B, p: &mut Params<B>, job: WeightJob<B>) -> Result<()> {
        if self.defer {
            self.bytes += b.bytes(&job.input) + b.bytes(&job.dy);
            self.jobs.push(job);
            Ok(())
        } else {
            run(b, p, job)
        }
    }

    /// Run the kept products in the order they were pushed, freeing each job's buffers.
    pub(super) fn run(self, b: &B, p: &mut Params<B>) -> Result<()> {
        self.jobs.into_iter().try_for_each(|job| run(b, p, job))
    }

    /// Bytes of device memory the kept operands hold.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

fn run<B: Backend>(b: &B, p: &mut Params<B>, job: WeightJob<B>) -> Result<()> {
    b.matmul(
        p.grad_mut(&job.weight)?,
        &job.input,
        &job.dy,
        None,
        job.shape,
    )
}

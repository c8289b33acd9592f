//! Weight gradients a backward may leave for later: the `W` half of a split backward.
//!
//! A linear layer's backward has two products: the input gradient `dx = dy · Wᵀ`, which the
//! previous stage waits for, and the weight gradient `dW += xᵀ · dy`, which nobody waits for.
//! Zero-bubble schedules run the first in an `I` action and keep the second, with the
//! operands it reads, for a `W` action that fills a bubble. A full backward runs each product
//! the moment it is pushed, so both paths do the same arithmetic in the same order per tensor.

use anyhow::Result;

use super::params::Params;
use crate::backend::{Backend, Matmul};

/// One weight-gradient product `grad(weight) += inputᵀ · dy` of a linear layer.
pub(crate) struct Product {
    /// Name of the weight whose gradient accumulates.
    pub(crate) weight: String,
    /// The product's shape, transposed and accumulating.
    pub(crate) shape: Matmul,
    /// The weight is stored `[out, in]`: the product is `dyᵀ · input`.
    pub(crate) dy_first: bool,
}

impl Product {
    /// Accumulate the product of the layer's `input` and its output gradient `dy`.
    pub(crate) fn run<B: Backend>(
        &self,
        b: &B,
        p: &mut Params<B>,
        input: &B::Buffer,
        dy: &B::Buffer,
    ) -> Result<()> {
        let (lhs, rhs) = if self.dy_first {
            (dy, input)
        } else {
            (input, dy)
        };
        b.matmul(p.grad_mut(&self.weight)?, lhs, rhs, None, self.shape)
    }
}

/// The weight-gradient products of the linear layers that read one input `[rows, in]`, as
/// their forward read it (q, k and v read the same normed input).
pub(crate) struct WeightJob<B: Backend> {
    pub(crate) input: B::Buffer,
    /// Each product with the gradient of its layer's output `[rows, out]`, in the compute dtype.
    pub(crate) products: Vec<(Product, B::Buffer)>,
}

impl<B: Backend> WeightJob<B> {
    /// The products of `input` with each `(product, dy)`.
    pub(crate) fn new(input: B::Buffer, products: Vec<(Product, B::Buffer)>) -> Self {
        Self { input, products }
    }
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
    pub(crate) fn push(&mut self, b: &B, p: &mut Params<B>, job: WeightJob<B>) -> Result<()> {
        if self.defer {
            self.bytes +=
                b.bytes(&job.input) + job.products.iter().map(|(_, dy)| b.bytes(dy)).sum::<u64>();
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
    for (product, dy) in &job.products {
        product.run(b, p, &job.input, dy)?;
    }
    Ok(())
}

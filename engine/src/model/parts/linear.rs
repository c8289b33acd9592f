//! A linear layer `y = x·W (+ b)`: forward, input gradient, weight gradient.

use anyhow::Result;

use super::{Init, ParamSpec};
use crate::backend::{Backend, DType, Matmul};
use crate::model::params::Params;
use crate::model::weight_grads::{Product, WeightJob};

/// How the weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// `[in, out]`: GPT-2's Conv1D (`y = x·W`).
    InOut,
    /// `[out, in]`: `torch.nn.Linear` (`y = x·Wᵀ`), and every LM head.
    OutIn,
}

/// A linear layer from `fan_in` to `fan_out` features.
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    pub(crate) weight: String,
    pub(crate) bias: Option<String>,
    pub(crate) fan_in: usize,
    pub(crate) fan_out: usize,
    pub(crate) layout: Layout,
    /// Standard deviation of the initial weight.
    pub(crate) std: f64,
}

impl Linear {
    /// A layer with weight `weight`, and `bias` when given, initialised normal(0, `std`).
    pub(crate) fn new(
        weight: String,
        bias: Option<String>,
        (fan_in, fan_out): (usize, usize),
        layout: Layout,
        std: f64,
    ) -> Self {
        Self {
            weight,
            bias,
            fan_in,
            fan_out,
            layout,
            std,
        }
    }

    pub(crate) fn params(&self) -> Vec<ParamSpec> {
        let shape = match self.layout {
            Layout::InOut => vec![self.fan_in, self.fan_out],
            Layout::OutIn => vec![self.fan_out, self.fan_in],
        };
        let mut out = vec![ParamSpec::new(
            &self.weight,
            shape,
            Init::Normal(self.std),
            true,
        )];
        if let Some(bias) = &self.bias {
            out.push(ParamSpec::new(bias, vec![self.fan_out], Init::Zeros, false));
        }
        out
    }

    /// Multiply-adds per token.
    pub(crate) fn macs(&self) -> f64 {
        self.fan_in as f64 * self.fan_out as f64
    }

    /// `y[rows, out] = x[rows, in]·W (+ b)`, in `dtype`.
    pub(crate) fn forward<B: Backend>(
        &self,
        b: &B,
        p: &Params<B>,
        x: &B::Buffer,
        rows: usize,
        dtype: DType,
    ) -> Result<B::Buffer> {
        let mut y = b.alloc_output(rows * self.fan_out, dtype)?;
        let bias = self.bias.as_deref().map(|n| p.value(n)).transpose()?;
        let shape = Matmul::new(rows, self.fan_out, self.fan_in);
        let shape = match self.layout {
            Layout::InOut => shape,
            Layout::OutIn => shape.trans_b(),
        };
        b.matmul(&mut y, x, p.operand(&self.weight)?, bias, shape)?;
        Ok(y)
    }

    /// `dbias += Σ_rows dy` (nothing without a bias).
    pub(crate) fn bias_grad<B: Backend>(
        &self,
        b: &B,
        p: &mut Params<B>,
        dy: &B::Buffer,
        rows: usize,
    ) -> Result<()> {
        match &self.bias {
            Some(bias) => b.bias_backward(p.grad_mut(bias)?, dy, rows, self.fan_out),
            None => Ok(()),
        }
    }

    /// `dx[rows, in] = dy·Wᵀ` into `dx`, added to it with `accumulate`.
    pub(crate) fn input_grad_into<B: Backend>(
        &self,
        b: &B,
        p: &Params<B>,
        dx: &mut B::Buffer,
        dy: &B::Buffer,
        rows: usize,
        accumulate: bool,
    ) -> Result<()> {
        let shape = Matmul::new(rows, self.fan_in, self.fan_out);
        let shape = match self.layout {
            Layout::InOut => shape.trans_b(),
            Layout::OutIn => shape,
        };
        let shape = if accumulate {
            shape.accumulate()
        } else {
            shape
        };
        b.matmul(dx, dy, p.operand(&self.weight)?, None, shape)
    }

    /// `dx[rows, in] = dy·Wᵀ`, a new buffer of `dtype`.
    pub(crate) fn input_grad<B: Backend>(
        &self,
        b: &B,
        p: &Params<B>,
        dy: &B::Buffer,
        rows: usize,
        dtype: DType,
    ) -> Result<B::Buffer> {
        let mut dx = b.alloc_output(rows * self.fan_in, dtype)?;
        self.input_grad_into(b, p, &mut dx, dy, rows, false)?;
        Ok(dx)
    }

    /// The weight-gradient product `grad(W) += xᵀ·dy` over `rows` tokens.
    pub(crate) fn product(&self, rows: usize) -> Product {
        let (shape, dy_first) = match self.layout {
            Layout::InOut => (Matmul::new(self.fan_in, self.fan_out, rows), false),
            Layout::OutIn => (Matmul::new(self.fan_out, self.fan_in, rows), true),
        };
        Product {
            weight: self.weight.clone(),
            shape: shape.trans_a().accumulate(),
            dy_first,
        }
    }

    /// The weight-gradient job of this layer alone, on its `input` and output gradient `dy`.
    pub(crate) fn job<B: Backend>(
        &self,
        input: B::Buffer,
        dy: B::Buffer,
        rows: usize,
    ) -> WeightJob<B> {
        WeightJob::new(input, vec![(self.product(rows), dy)])
    }

    /// `grad(W) += xᵀ·dy` at once, reading `x` and `dy` in place (the head, whose gradient
    /// product is never deferred).
    pub(crate) fn weight_grad_now<B: Backend>(
        &self,
        b: &B,
        p: &mut Params<B>,
        x: &B::Buffer,
        dy: &B::Buffer,
        rows: usize,
    ) -> Result<()> {
        self.product(rows).run(b, p, x, dy)
    }
}

//! The feed-forward inner part: tanh-GELU (GPT-2) or SwiGLU (Llama). The down projection is
//! the block's.

use anyhow::Result;

use super::{Linear, ParamSpec};
use crate::backend::{Backend, DType};
use crate::model::params::Params;
use crate::model::weight_grads::{WeightGrads, WeightJob};

/// The MLP up to its down projection.
#[derive(Clone, Debug)]
pub(crate) enum Mlp {
    /// `gelu(fc(x))`.
    Gelu { fc: Linear },
    /// `silu(gate(x)) · up(x)`.
    SwiGlu { gate: Linear, up: Linear },
}

/// What the MLP keeps for backward.
pub(crate) enum MlpActs<B: Backend> {
    Gelu { pre: B::Buffer },
    SwiGlu { gate: B::Buffer, up: B::Buffer },
}

impl<B: Backend> MlpActs<B> {
    pub(crate) fn bytes(&self, b: &B) -> u64 {
        match self {
            MlpActs::Gelu { pre } => b.bytes(pre),
            MlpActs::SwiGlu { gate, up } => b.bytes(gate) + b.bytes(up),
        }
    }
}

impl Mlp {
    pub(crate) fn params(&self) -> Vec<ParamSpec> {
        match self {
            Mlp::Gelu { fc } => fc.params(),
            Mlp::SwiGlu { gate, up } => [gate, up].into_iter().flat_map(Linear::params).collect(),
        }
    }

    /// Multiply-adds per token.
    pub(crate) fn macs(&self) -> f64 {
        match self {
            Mlp::Gelu { fc } => fc.macs(),
            Mlp::SwiGlu { gate, up } => gate.macs() + up.macs(),
        }
    }

    /// The hidden activations `[rows, ffn]` of the normed input `x`.
    pub(crate) fn forward<B: Backend>(
        &self,
        b: &B,
        p: &Params<B>,
        x: &B::Buffer,
        rows: usize,
        act: DType,
    ) -> Result<(B::Buffer, MlpActs<B>)> {
        match self {
            Mlp::Gelu { fc } => {
                let pre = fc.forward(b, p, x, rows, act)?;
                let mut h = b.alloc_output(b.len(&pre), act)?;
                b.gelu_forward(&mut h, &pre)?;
                Ok((h, MlpActs::Gelu { pre }))
            }
            Mlp::SwiGlu { gate, up } => {
                let g = gate.forward(b, p, x, rows, act)?;
                let u = up.forward(b, p, x, rows, act)?;
                let mut h = b.alloc_output(b.len(&g), act)?;
                b.swiglu_forward(&mut h, &g, &u)?;
                Ok((h, MlpActs::SwiGlu { gate: g, up: u }))
            }
        }
    }

    /// The gradient of the normed input (`x`, which the weight gradients take over) from the
    /// hidden activations' gradient `dh`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward<B: Backend>(
        &self,
        b: &B,
        p: &mut Params<B>,
        a: MlpActs<B>,
        dh: B::Buffer,
        x: B::Buffer,
        rows: usize,
        act: DType,
        wg: &mut WeightGrads<B>,
    ) -> Result<B::Buffer> {
        match (self, a) {
            (Mlp::Gelu { fc }, MlpActs::Gelu { pre }) => {
                let mut dpre = b.alloc_output(b.len(&pre), act)?;
                b.gelu_backward(&mut dpre, &pre, &dh)?;
                drop((dh, pre));
                fc.bias_grad(b, p, &dpre, rows)?;
                let dx = fc.input_grad(b, p, &dpre, rows, act)?;
                wg.push(b, p, fc.job(x, dpre, rows))?;
                Ok(dx)
            }
            (Mlp::SwiGlu { gate, up }, MlpActs::SwiGlu { gate: g, up: u }) => {
                let mut dg = b.alloc_output(b.len(&g), act)?;
                let mut du = b.alloc_output(b.len(&u), act)?;
                b.swiglu_backward(&mut dg, &mut du, &g, &u, &dh)?;
                drop((dh, g, u));
                // Two products into one gradient: summed in f32.
                let mut dx = b.alloc_output(rows * gate.fan_in, DType::F32)?;
                gate.bias_grad(b, p, &dg, rows)?;
                gate.input_grad_into(b, p, &mut dx, &dg, rows, false)?;
                up.bias_grad(b, p, &du, rows)?;
                up.input_grad_into(b, p, &mut dx, &du, rows, true)?;
                let products = vec![(gate.product(rows), dg), (up.product(rows), du)];
                wg.push(b, p, WeightJob::new(x, products))?;
                Ok(dx)
            }
            _ => anyhow::bail!("MLP activations of another kind"),
        }
    }
}

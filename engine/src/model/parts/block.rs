//! A pre-norm transformer block: `x + out(attention(norm1(x)))`, then `+ down(mlp(norm2(·)))`.

use anyhow::Result;

use super::attention::{AttnActs, Past, Tokens};
use super::mlp::MlpActs;
use super::norm::NormStats;
use super::{Linear, Mlp, Norm, ParamSpec, SelfAttention};
use crate::backend::{Backend, DType};
use crate::model::params::Params;
use crate::model::stage::converted;
use crate::model::weight_grads::WeightGrads;

/// One block's parts, in forward order.
#[derive(Clone, Debug)]
pub(crate) struct Block {
    pub(crate) norm1: Norm,
    pub(crate) attn: SelfAttention,
    pub(crate) attn_out: Linear,
    pub(crate) norm2: Norm,
    pub(crate) mlp: Mlp,
    pub(crate) mlp_out: Linear,
}

/// What a block's backward needs from its forward (its input is kept by the stage).
pub(crate) struct BlockActs<B: Backend> {
    n1: B::Buffer,
    n1_stats: NormStats<B>,
    attn: AttnActs<B>,
    /// Attention's output, the input of its projection.
    atty: B::Buffer,
    res1: B::Buffer,
    n2: B::Buffer,
    n2_stats: NormStats<B>,
    mlp: MlpActs<B>,
    /// The MLP's hidden activations, the input of its down projection.
    h: B::Buffer,
}

impl<B: Backend> BlockActs<B> {
    /// Bytes held, for memory accounting.
    pub(crate) fn bytes(&self, b: &B) -> u64 {
        [&self.n1, &self.atty, &self.res1, &self.n2, &self.h]
            .iter()
            .map(|buf| b.bytes(buf))
            .sum::<u64>()
            + self.n1_stats.bytes(b)
            + self.n2_stats.bytes(b)
            + self.attn.bytes(b)
            + self.mlp.bytes(b)
    }
}

impl Block {
    pub(crate) fn params(&self) -> Vec<ParamSpec> {
        let mut out = self.norm1.params();
        out.extend(self.attn.params());
        out.extend(self.attn_out.params());
        out.extend(self.norm2.params());
        out.extend(self.mlp.params());
        out.extend(self.mlp_out.params());
        out
    }

    /// Multiply-adds per token of the weight matmuls.
    fn weight_macs(&self) -> f64 {
        self.attn.macs() + self.attn_out.macs() + self.mlp.macs() + self.mlp_out.macs()
    }

    /// Forward FLOPs per token over sequences of `seq`.
    pub(crate) fn flops(&self, seq: usize) -> f64 {
        2.0 * (self.weight_macs() + self.attn.mixing_macs(seq))
    }

    /// Forward FLOPs per token of the weight matmuls.
    pub(crate) fn weight_flops(&self) -> f64 {
        2.0 * self.weight_macs()
    }

    /// The block on `x[rows, C]`: the output and the activations backward needs.
    pub(crate) fn forward<B: Backend>(
        &self,
        b: &B,
        p: &Params<B>,
        x: &B::Buffer,
        t: Tokens,
        past: Past<'_, B>,
    ) -> Result<(B::Buffer, BlockActs<B>)> {
        let rows = t.rows();
        let (n1, n1_stats) = self.norm1.forward(b, p, x, rows, t.act)?;
        let (atty, attn) = self.attn.forward(b, p, &n1, t, past)?;
        let attproj = self.attn_out.forward(b, p, &atty, rows, t.act)?;
        let mut res1 = b.alloc_output(rows * self.norm1.channels, DType::F32)?;
        b.add(&mut res1, x, &attproj)?;
        drop(attproj);

        let (n2, n2_stats) = self.norm2.forward(b, p, &res1, rows, t.act)?;
        let (h, mlp) = self.mlp.forward(b, p, &n2, rows, t.act)?;
        let down = self.mlp_out.forward(b, p, &h, rows, t.act)?;
        let mut out = b.alloc_output(rows * self.norm1.channels, DType::F32)?;
        b.add(&mut out, &res1, &down)?;
        let acts = BlockActs {
            n1,
            n1_stats,
            attn,
            atty,
            res1,
            n2,
            n2_stats,
            mlp,
            h,
        };
        Ok((out, acts))
    }

    /// Backward through the block: returns the gradient of its input `x`, accumulates its
    /// norm and bias gradients, and hands its weight-gradient products to `wg` (run at once
    /// for a full backward, kept for a split one). `a` and `dout` are freed as soon as
    /// neither the input gradient nor a kept product needs them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward<B: Backend>(
        &self,
        b: &B,
        p: &mut Params<B>,
        a: BlockActs<B>,
        x: &B::Buffer,
        dout: B::Buffer,
        t: Tokens,
        wg: &mut WeightGrads<B>,
    ) -> Result<B::Buffer> {
        let rows = t.rows();
        let BlockActs {
            n1,
            n1_stats,
            attn,
            atty,
            res1,
            n2,
            n2_stats,
            mlp,
            h,
        } = a;

        // MLP: out = res1 + down(h), h = mlp(norm2(res1)). The matmuls read the f32 residual
        // gradient in the compute dtype, as their other operand.
        let dout_act = converted(b, &dout, t.act)?;
        let dout_mm = dout_act.as_ref().unwrap_or(&dout);
        self.mlp_out.bias_grad(b, p, &dout, rows)?;
        let dh = self.mlp_out.input_grad(b, p, dout_mm, rows, t.act)?;
        let dn2 = self.mlp.backward(b, p, mlp, dh, n2, rows, t.act, wg)?;
        let mut dres1 = self.norm2.backward(b, p, n2_stats, dn2, &res1, rows)?;
        drop(res1);
        // The residual path carries dout straight through to res1.
        b.add_assign(&mut dres1, &dout)?;
        let dout_mm = dout_act.unwrap_or(dout);
        wg.push(b, p, self.mlp_out.job(h, dout_mm, rows))?;

        // Attention: res1 = x + attn_out(atty), atty = attention(norm1(x)).
        let dres1_act = converted(b, &dres1, t.act)?;
        let dres1_mm = dres1_act.as_ref().unwrap_or(&dres1);
        self.attn_out.bias_grad(b, p, &dres1, rows)?;
        let datty = self.attn_out.input_grad(b, p, dres1_mm, rows, t.act)?;
        let dn1 = self.attn.backward(b, p, attn, &atty, datty, n1, t, wg)?;
        let mut dx = self.norm1.backward(b, p, n1_stats, dn1, x, rows)?;
        b.add_assign(&mut dx, &dres1)?;
        let dres1_mm = dres1_act.unwrap_or(dres1);
        wg.push(b, p, self.attn_out.job(atty, dres1_mm, rows))?;
        Ok(dx)
    }
}

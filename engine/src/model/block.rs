//! One transformer block (pre-norm, as GPT-2): `x + attn(ln_1(x))`, then `+ mlp(ln_2(·))`.

use anyhow::{Context, Result};

use super::params::Params;
use super::stage::{converted, Dims};
use super::weight_grads::{WeightGrads, WeightJob};
use crate::backend::{Attention, Backend, CachedAttention, DType, Matmul};

/// What a block's backward needs from its forward (its input is kept by the stage).
pub(super) struct BlockActs<B: Backend> {
    ln1: B::Buffer,
    ln1_mean: B::Buffer,
    ln1_rstd: B::Buffer,
    qkv: B::Buffer,
    /// What attention keeps for backward; `None` after attention against a cache.
    att: Option<B::Buffer>,
    atty: B::Buffer,
    res1: B::Buffer,
    ln2: B::Buffer,
    ln2_mean: B::Buffer,
    ln2_rstd: B::Buffer,
    fch: B::Buffer,
    fch_gelu: B::Buffer,
}

impl<B: Backend> BlockActs<B> {
    /// Bytes held, for memory accounting.
    pub(super) fn bytes(&self, b: &B) -> u64 {
        let att = self.att.as_ref().map_or(0, |a| b.bytes(a));
        att + [
            &self.ln1,
            &self.ln1_mean,
            &self.ln1_rstd,
            &self.qkv,
            &self.atty,
            &self.res1,
            &self.ln2,
            &self.ln2_mean,
            &self.ln2_rstd,
            &self.fch,
            &self.fch_gelu,
        ]
        .iter()
        .map(|buf| b.bytes(buf))
        .sum::<u64>()
    }
}

/// An f32 op output: the residual stream, its gradient, layernorm statistics.
fn zeros<B: Backend>(b: &B, len: usize) -> Result<B::Buffer> {
    b.alloc_output(len, DType::F32)
}

/// An op output of the compute dtype: activations inside the block and their gradients.
fn acts<B: Backend>(b: &B, len: usize, d: Dims) -> Result<B::Buffer> {
    b.alloc_output(len, d.act)
}

fn attention_shape(d: Dims) -> Attention {
    Attention {
        batch: d.batch,
        seq: d.seq,
        channels: d.channels,
        heads: d.heads,
    }
}

/// What a block's attention sees besides the tokens it is given.
pub(super) enum Past<'a, B: Backend> {
    /// Nothing: the tokens are whole sequences.
    Nothing,
    /// The keys and values of the tokens before them, in this block's cache (decoding).
    Cached(&'a mut B::Buffer, CachedAttention),
}

/// Block `i` on `x[rows, C]`: the output and the activations backward needs.
pub(super) fn forward<B: Backend>(
    b: &B,
    p: &Params<B>,
    i: usize,
    x: &B::Buffer,
    d: Dims,
    past: Past<'_, B>,
) -> Result<(B::Buffer, BlockActs<B>)> {
    let (rows, c) = (d.rows(), d.channels);
    let w = |s: &str| p.value(&format!("h.{i}.{s}"));

    let (mut ln1, mut ln1_mean, mut ln1_rstd) =
        (acts(b, rows * c, d)?, zeros(b, rows)?, zeros(b, rows)?);
    b.layernorm_forward(
        &mut ln1,
        &mut ln1_mean,
        &mut ln1_rstd,
        x,
        w("ln_1.weight")?,
        w("ln_1.bias")?,
        rows,
        c,
    )?;
    let mut qkv = acts(b, rows * 3 * c, d)?;
    b.matmul(
        &mut qkv,
        &ln1,
        p.operand(&format!("h.{i}.attn.c_attn.weight"))?,
        Some(w("attn.c_attn.bias")?),
        Matmul::new(rows, 3 * c, c),
    )?;
    let mut atty = acts(b, rows * c, d)?;
    let att = match past {
        Past::Nothing => {
            let mut att = b.attention_state(attention_shape(d), d.act)?;
            b.attention_forward(&mut atty, &mut att, &qkv, attention_shape(d))?;
            Some(att)
        }
        Past::Cached(cache, shape) => {
            b.attention_decode(&mut atty, cache, &qkv, shape)?;
            None
        }
    };
    let mut attproj = acts(b, rows * c, d)?;
    b.matmul(
        &mut attproj,
        &atty,
        p.operand(&format!("h.{i}.attn.c_proj.weight"))?,
        Some(w("attn.c_proj.bias")?),
        Matmul::new(rows, c, c),
    )?;
    let mut res1 = zeros(b, rows * c)?;
    b.add(&mut res1, x, &attproj)?;
    drop(attproj);

    let (mut ln2, mut ln2_mean, mut ln2_rstd) =
        (acts(b, rows * c, d)?, zeros(b, rows)?, zeros(b, rows)?);
    b.layernorm_forward(
        &mut ln2,
        &mut ln2_mean,
        &mut ln2_rstd,
        &res1,
        w("ln_2.weight")?,
        w("ln_2.bias")?,
        rows,
        c,
    )?;
    let mut fch = acts(b, rows * 4 * c, d)?;
    b.matmul(
        &mut fch,
        &ln2,
        p.operand(&format!("h.{i}.mlp.c_fc.weight"))?,
        Some(w("mlp.c_fc.bias")?),
        Matmul::new(rows, 4 * c, c),
    )?;
    let mut fch_gelu = acts(b, rows * 4 * c, d)?;
    b.gelu_forward(&mut fch_gelu, &fch)?;
    let mut fcproj = acts(b, rows * c, d)?;
    b.matmul(
        &mut fcproj,
        &fch_gelu,
        p.operand(&format!("h.{i}.mlp.c_proj.weight"))?,
        Some(w("mlp.c_proj.bias")?),
        Matmul::new(rows, c, 4 * c),
    )?;
    let mut out = zeros(b, rows * c)?;
    b.add(&mut out, &res1, &fcproj)?;

    let acts = BlockActs {
        ln1,
        ln1_mean,
        ln1_rstd,
        qkv,
        att,
        atty,
        res1,
        ln2,
        ln2_mean,
        ln2_rstd,
        fch,
        fch_gelu,
    };
    Ok((out, acts))
}

/// Backward through block `i`: returns the gradient of its input `x`, accumulates its
/// layernorm and bias gradients, and hands its four weight-gradient products to `wg` (run at
/// once for a full backward, kept for a split one). `acts` and `dout` are freed as soon as
/// neither the input gradient nor a kept product needs them.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<B: Backend>(
    b: &B,
    p: &mut Params<B>,
    i: usize,
    a: BlockActs<B>,
    x: &B::Buffer,
    dout: B::Buffer,
    d: Dims,
    wg: &mut WeightGrads<B>,
) -> Result<B::Buffer> {
    let (rows, c) = (d.rows(), d.channels);
    let n = |s: &str| format!("h.{i}.{s}");
    // grad(weight) += inputᵀ · dy, for a weight stored [fan_in, fan_out].
    let weight = |name: &str, input, dy, fan_in, fan_out| WeightJob {
        weight: n(name),
        input,
        dy,
        shape: Matmul::new(fan_in, fan_out, rows).trans_a().accumulate(),
    };
    let BlockActs {
        ln1,
        ln1_mean,
        ln1_rstd,
        qkv,
        att,
        atty,
        res1,
        ln2,
        ln2_mean,
        ln2_rstd,
        fch,
        fch_gelu,
    } = a;

    // MLP: out = res1 + fch_gelu·W_proj + b_proj, fch = ln2·W_fc + b_fc.
    // The matmuls read the f32 residual gradient in the compute dtype, as their other operand.
    let dout_act = converted(b, &dout, d.act)?;
    let dout_mm = dout_act.as_ref().unwrap_or(&dout);
    b.bias_backward(p.grad_mut(&n("mlp.c_proj.bias"))?, &dout, rows, c)?;
    let mut dfch_gelu = acts(b, rows * 4 * c, d)?;
    b.matmul(
        &mut dfch_gelu,
        dout_mm,
        p.operand(&n("mlp.c_proj.weight"))?,
        None,
        Matmul::new(rows, 4 * c, c).trans_b(),
    )?;
    let mut dfch = acts(b, rows * 4 * c, d)?;
    b.gelu_backward(&mut dfch, &fch, &dfch_gelu)?;
    drop(dfch_gelu);
    drop(fch);
    b.bias_backward(p.grad_mut(&n("mlp.c_fc.bias"))?, &dfch, rows, 4 * c)?;
    let mut dln2 = acts(b, rows * c, d)?;
    b.matmul(
        &mut dln2,
        &dfch,
        p.operand(&n("mlp.c_fc.weight"))?,
        None,
        Matmul::new(rows, c, 4 * c).trans_b(),
    )?;
    wg.push(b, p, weight("mlp.c_fc.weight", ln2, dfch, c, 4 * c))?;
    let mut dres1 = zeros(b, rows * c)?;
    let (w, dw, db) = p.layernorm(&n("ln_2.weight"), &n("ln_2.bias"))?;
    b.layernorm_backward(
        &mut dres1, dw, db, &dln2, &res1, w, &ln2_mean, &ln2_rstd, rows, c,
    )?;
    drop((dln2, res1, ln2_mean, ln2_rstd));
    // The residual path carries dout straight through to res1.
    b.add_assign(&mut dres1, &dout)?;
    let dout_mm = dout_act.unwrap_or(dout);
    wg.push(
        b,
        p,
        weight("mlp.c_proj.weight", fch_gelu, dout_mm, 4 * c, c),
    )?;
    let dres1_act = converted(b, &dres1, d.act)?;
    let dres1_mm = dres1_act.as_ref().unwrap_or(&dres1);

    // Attention: res1 = x + atty·W_proj + b_proj, qkv = ln1·W_attn + b_attn.
    b.bias_backward(p.grad_mut(&n("attn.c_proj.bias"))?, &dres1, rows, c)?;
    let mut datty = acts(b, rows * c, d)?;
    b.matmul(
        &mut datty,
        dres1_mm,
        p.operand(&n("attn.c_proj.weight"))?,
        None,
        Matmul::new(rows, c, c).trans_b(),
    )?;
    let mut dqkv = acts(b, rows * 3 * c, d)?;
    let att = att.context("a block run against a cache has no backward")?;
    b.attention_backward(&mut dqkv, &datty, &qkv, &atty, &att, attention_shape(d))?;
    drop((datty, qkv, att));
    b.bias_backward(p.grad_mut(&n("attn.c_attn.bias"))?, &dqkv, rows, 3 * c)?;
    let mut dln1 = acts(b, rows * c, d)?;
    b.matmul(
        &mut dln1,
        &dqkv,
        p.operand(&n("attn.c_attn.weight"))?,
        None,
        Matmul::new(rows, c, 3 * c).trans_b(),
    )?;
    wg.push(b, p, weight("attn.c_attn.weight", ln1, dqkv, c, 3 * c))?;
    let mut dx = zeros(b, rows * c)?;
    let (w, dw, db) = p.layernorm(&n("ln_1.weight"), &n("ln_1.bias"))?;
    b.layernorm_backward(&mut dx, dw, db, &dln1, x, w, &ln1_mean, &ln1_rstd, rows, c)?;
    b.add_assign(&mut dx, &dres1)?;
    let dres1_mm = dres1_act.unwrap_or(dres1);
    wg.push(b, p, weight("attn.c_proj.weight", atty, dres1_mm, c, c))?;
    Ok(dx)
}

//! The size checks of the host backends' primitive ops, written once for the reference and
//! CPU backends: each names the operand whose length does not fit the dimensions.

use anyhow::{bail, Result};
use pipit_engine::backend::{check::elems, Matmul};

use crate::buffer::expect_len;

/// LayerNorm forward or backward: `per_row` operands are `[rows, channels]`, `per_channel`
/// ones `[channels]` and `stats` (mean, rstd) `[rows]`, each given as (name, length).
pub fn layernorm(
    rows: usize,
    channels: usize,
    per_row: &[(&str, usize)],
    per_channel: &[(&str, usize)],
    stats: &[(&str, usize)],
) -> Result<()> {
    if channels == 0 {
        bail!("layernorm needs at least one channel");
    }
    let n = elems(&[rows, channels])?;
    for &(what, len) in per_row {
        expect_len(what, len, n)?;
    }
    for &(what, len) in per_channel {
        expect_len(what, len, channels)?;
    }
    for &(what, len) in stats {
        expect_len(what, len, rows)?;
    }
    Ok(())
}

/// A matrix product's operands: `a` `[m, k]`, `b` `[k, n]`, `out` `[m, n]`, `bias` `[n]`.
pub fn matmul(s: Matmul, a: usize, b: usize, out: usize, bias: Option<usize>) -> Result<()> {
    expect_len("matmul a", a, elems(&[s.m, s.k])?)?;
    expect_len("matmul b", b, elems(&[s.k, s.n])?)?;
    expect_len("matmul out", out, elems(&[s.m, s.n])?)?;
    if let Some(bias) = bias {
        expect_len("matmul bias", bias, s.n)?;
    }
    Ok(())
}

/// One AdamW update: a step number from 1, and the gradient and moments as long as the
/// parameter.
pub fn adamw(step: u32, param: usize, grad: usize, m: usize, v: usize) -> Result<()> {
    if step == 0 {
        bail!("AdamW step numbers start at 1 (bias correction), got 0");
    }
    for (what, len) in [("adamw grad", grad), ("adamw m", m), ("adamw v", v)] {
        expect_len(what, len, param)?;
    }
    Ok(())
}

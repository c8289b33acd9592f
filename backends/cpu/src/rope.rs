//! Rotary position embedding (Llama), and its inverse (its backward), head row by head row.

use pipit_engine::backend::Rope;

use crate::math::wide;
use crate::threads::rows;

/// Rotate each head of `inp` (`[batch, seq, heads, head_dim]`) into `out` by its position's
/// angles: `x·cos + rotate_half(x)·sin`, `rotate_half(x) = (−x₂, x₁)` over the two halves, as
/// transformers does; by minus the angles when `shape.inverse`.
pub(crate) fn rotate(out: &mut [f32], inp: &[f32], shape: Rope) {
    let table = shape.cos_sin();
    let (d, half) = (shape.head_dim, shape.head_dim / 2);
    let sign = if shape.inverse { -1.0f32 } else { 1.0 };
    rows(out, d, d * 3, |first, block| {
        wide(|| {
            for (r, y) in block.chunks_exact_mut(d).enumerate() {
                let i = first + r;
                let t = (i / shape.heads) % shape.seq;
                let x = &inp[i * d..][..d];
                let angles = &table[2 * t * half..][..2 * half];
                for j in 0..half {
                    let (c, s) = (angles[2 * j], sign * angles[2 * j + 1]);
                    y[j] = x[j] * c - x[j + half] * s;
                    y[j + half] = x[j + half] * c + x[j] * s;
                }
            }
        })
    });
}

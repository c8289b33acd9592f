//! SwiGLU's gate (Llama's MLP), forward and backward, elementwise through the polynomial `exp`.

use crate::math::{exp, wide};
use crate::threads::{each, rows, SharedMut};

/// Elements per block handed to a thread.
const CHUNK: usize = 4096;

/// `σ(x) = 1/(1 + e^{−x})`.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `out = silu(gate)·up`, `silu(x) = x·σ(x)`.
pub(crate) fn forward(out: &mut [f32], gate: &[f32], up: &[f32]) {
    let row = CHUNK.min(out.len()).max(1);
    rows(out, row, CHUNK * 12, |first, block| {
        let at = first * row;
        let (g, u) = (&gate[at..][..block.len()], &up[at..][..block.len()]);
        wide(|| {
            for ((o, &g), &u) in block.iter_mut().zip(g).zip(u) {
                *o = g * sigmoid(g) * u;
            }
        })
    });
}

/// Overwrite `dgate = dout·up·silu'(gate)` and `dup = dout·silu(gate)`, where
/// `silu'(x) = σ(x)·(1 + x·(1 − σ(x)))`.
pub(crate) fn backward(dgate: &mut [f32], dup: &mut [f32], gate: &[f32], up: &[f32], dout: &[f32]) {
    let n = gate.len();
    let blocks = n.div_ceil(CHUNK);
    let (dg, du) = (SharedMut(dgate.as_mut_ptr()), SharedMut(dup.as_mut_ptr()));
    each(blocks, n * 16, |b| {
        let (start, end) = (b * CHUNK, ((b + 1) * CHUNK).min(n));
        // SAFETY: block `b` alone writes elements start..end of `dgate` and `dup`, which hold
        // `n` elements as `gate` does (checked by the caller).
        let (dg, du) = unsafe {
            (
                std::slice::from_raw_parts_mut(dg.at(start), end - start),
                std::slice::from_raw_parts_mut(du.at(start), end - start),
            )
        };
        let (g, u, dy) = (&gate[start..end], &up[start..end], &dout[start..end]);
        wide(|| {
            for i in 0..end - start {
                let x = g[i];
                let s = sigmoid(x);
                dg[i] = dy[i] * u[i] * (s * (1.0 + x * (1.0 - s)));
                du[i] = dy[i] * (x * s);
            }
        })
    });
}

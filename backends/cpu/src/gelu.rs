//! GELU with GPT-2's tanh approximation, forward and backward, through the polynomial `tanh`.

use crate::math::{tanh, wide};
use crate::threads::rows;

/// √(2/π).
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic coefficient of the approximation.
const CUBIC: f32 = 0.044_715;

/// Elements per block handed to a thread.
const CHUNK: usize = 4096;

/// `gelu(x) = ½·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
pub(crate) fn forward(out: &mut [f32], inp: &[f32]) {
    let row = CHUNK.min(inp.len()).max(1);
    rows(out, row, CHUNK * 16, |first, block| {
        let x = &inp[first * row..][..block.len()];
        wide(|| {
            for (o, &x) in block.iter_mut().zip(x) {
                let u = SQRT_2_OVER_PI * x * (CUBIC * x * x + 1.0);
                *o = 0.5 * x * (1.0 + tanh(u));
            }
        })
    });
}

/// `dinp = gelu'(x)·dout`, the derivative of the same approximation.
pub(crate) fn backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    let row = CHUNK.min(inp.len()).max(1);
    rows(dinp, row, CHUNK * 24, |first, block| {
        let at = first * row;
        let (x, dy) = (&inp[at..][..block.len()], &dout[at..][..block.len()]);
        wide(|| {
            for ((d, &x), &g) in block.iter_mut().zip(x).zip(dy) {
                let u = SQRT_2_OVER_PI * x * (CUBIC * x * x + 1.0);
                let th = tanh(u);
                let du = SQRT_2_OVER_PI * (3.0 * CUBIC * x * x + 1.0);
                let grad = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du;
                *d = grad * g;
            }
        })
    });
}

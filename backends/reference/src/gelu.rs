//! GELU with GPT-2's tanh approximation, forward and backward.

/// sqrt(2/π).
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient of the tanh approximation.
const CUBIC: f64 = 0.044_715;

/// `gelu(x) = ½·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
pub(crate) fn forward(out: &mut [f32], inp: &[f32]) {
    for (o, &x) in out.iter_mut().zip(inp) {
        let x = x as f64;
        let u = SQRT_2_OVER_PI * (x + CUBIC * x * x * x);
        *o = (0.5 * x * (1.0 + u.tanh())) as f32;
    }
}

/// `dinp = gelu'(x)·dout`, differentiating the same tanh approximation.
pub(crate) fn backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    for ((d, &x), &g) in dinp.iter_mut().zip(inp).zip(dout) {
        let x = x as f64;
        let u = SQRT_2_OVER_PI * (x + CUBIC * x * x * x);
        let th = u.tanh();
        let du = SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * x * x);
        let grad = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du;
        *d = (grad * g as f64) as f32;
    }
}

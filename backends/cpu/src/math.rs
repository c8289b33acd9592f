//! The scalar functions and reductions the row kernels share, written so the compiler turns
//! each loop into vector code: fixed lanes of f32 partial sums (a single running sum would
//! chain every add), and `exp`/`tanh` as branch-free polynomials instead of libm calls.
//! Products and sums are written apart, never as `mul_add`: where a closure is not inlined
//! into the AVX2 function that would be a call to libm's software `fmaf` per element.

/// Lanes of independent f32 partial sums: two 256-bit registers.
const LANES: usize = 16;

/// Run `f` compiled for AVX2 (and FMA) where the CPU has them (checked once, at run time),
/// else as it is. Kernels call it once around a whole loop, so the `#[inline(always)]`
/// helpers below are compiled into the vector version.
#[inline(always)]
pub(crate) fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA, the features `avx2_fma` is compiled for.
        return unsafe { avx2_fma(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_fma<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `Σ x[i]`.
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            lanes[l] += c[l];
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// `Σ x[i]·y[i]` over the shorter of the two.
#[inline(always)]
pub(crate) fn dot(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let mut lanes = [0f32; LANES];
    let mut xs = x.chunks_exact(LANES);
    let mut ys = y.chunks_exact(LANES);
    for (a, b) in (&mut xs).zip(&mut ys) {
        for l in 0..LANES {
            lanes[l] += a[l] * b[l];
        }
    }
    let tail: f32 = xs
        .remainder()
        .iter()
        .zip(ys.remainder())
        .map(|(a, b)| a * b)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

/// `max x[i]` (−∞ for an empty slice).
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            lanes[l] = lanes[l].max(c[l]);
        }
    }
    let m = lanes.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    chunks.remainder().iter().fold(m, |m, &x| m.max(x))
}

/// `eˣ` to about 2 ulp for |x| < 87, 0 below and ∞ above the f32 range; NaN stays NaN.
/// Range reduction `x = n·ln2 + r` with |r| ≤ ln2/2, a degree-6 polynomial for `eʳ`, and
/// `2ⁿ` built in the exponent bits.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.0, 88.0);
    // Rounded to the nearest integer by adding and taking away 1.5·2²³ (exact in f32 for
    // |x·log₂e| < 2²²), which vectorises where `round_ties_even` may be a libm call.
    const ROUND: f32 = 12_582_912.0;
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = r * (1.0 / 720.0) + 1.0 / 120.0;
    let p = r * p + 1.0 / 24.0;
    let p = r * p + 1.0 / 6.0;
    let p = r * p + 0.5;
    let p = r * p + 1.0;
    let p = r * p + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let y = p * scale;
    // Outside the clamped range the true value underflows to 0 or overflows to ∞.
    let y = if x < -87.0 { 0.0 } else { y };
    if x > 88.0 {
        f32::INFINITY
    } else {
        y
    }
}

/// `tanh x = sign(x)·(1 − 2/(e^{2|x|} + 1))`, through [`exp`].
#[inline(always)]
pub(crate) fn tanh(x: f32) -> f32 {
    let e = exp(2.0 * x.abs());
    let t = 1.0 - 2.0 / (e + 1.0);
    t.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.00123;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn tanh_is_close_to_libm() {
        let mut x = -12.0f32;
        while x < 12.0 {
            let (got, want) = (tanh(x) as f64, (x as f64).tanh());
            assert!((got - want).abs() < 2e-7, "tanh({x}) = {got}, want {want}");
            x += 0.000731;
        }
        assert_eq!(tanh(0.0), 0.0);
        assert_eq!(tanh(50.0), 1.0);
        assert_eq!(tanh(-50.0), -1.0);
    }

    #[test]
    fn reductions_match_plain_sums_at_every_length() {
        for n in 0..70 {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let y: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain_dot: f64 = x.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
            let plain_sum: f64 = x.iter().map(|&a| a as f64).sum();
            assert!(
                (dot(&x, &y) as f64 - plain_dot).abs() < 1e-5,
                "dot, n = {n}"
            );
            assert!((sum(&x) as f64 - plain_sum).abs() < 1e-5, "sum, n = {n}");
            let plain_max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&x), plain_max, "max, n = {n}");
        }
    }
}

//! The dot product every long sum of the reference backend goes through.

/// Lanes of independent f64 partial sums. Eight lets the compiler keep them in vector
/// registers (a single running sum would force one add after another); the result is still
/// an f64 accumulation of exact f32 products, only in a fixed, different order.
const LANES: usize = 8;

/// `Σ x[i]·y[i]` over the shorter of the two slices, accumulated in f64, on the CPU's widest
/// useful vectors. Hot loops call [`dot_lanes`] inside [`crate::simd::wide`] instead.
#[cfg(test)]
pub(crate) fn dot(x: &[f32], y: &[f32]) -> f64 {
    crate::simd::wide(|| dot_lanes(x, y))
}

/// The dot product, to inline into a loop that [`crate::simd::wide`] runs: the same
/// operations in the same order whatever the vector width, so the same result.
#[inline(always)]
pub(crate) fn dot_lanes(x: &[f32], y: &[f32]) -> f64 {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let mut lanes = [0f64; LANES];
    let mut xs = x.chunks_exact(LANES);
    let mut ys = y.chunks_exact(LANES);
    for (a, b) in (&mut xs).zip(&mut ys) {
        for l in 0..LANES {
            lanes[l] += a[l] as f64 * b[l] as f64;
        }
    }
    let tail: f64 = xs
        .remainder()
        .iter()
        .zip(ys.remainder())
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum();
    lanes.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::dot;

    #[test]
    fn matches_a_plain_sum_at_every_length() {
        for n in 0..40 {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let y: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain: f64 = x.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
            assert!(
                (dot(&x, &y) - plain).abs() <= 1e-12 * (1.0 + plain.abs()),
                "n = {n}"
            );
        }
    }
}

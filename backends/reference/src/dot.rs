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

/// How many of `n` dot products to take four at a time with `dot4_avx2`: `n` rounded down to
/// a multiple of four where the CPU has AVX2, else none.
#[inline(always)]
pub(crate) fn four_at_once(n: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        return n - n % 4;
    }
    let _ = n;
    0
}

/// Four [`dot_lanes`] of `x`, one with each of `ys`, to the bit: every lane takes the same
/// products and sums in the same order (multiply, then add: no fused multiply-add), and the
/// lanes and the tail are summed by the same expressions. Computing four at once gives the
/// CPU eight independent chains of additions where one dot product has two, and loads and
/// widens `x` once.
///
/// All five slices must have one length (a debug assertion checks it): the products are cut
/// to the shortest, where four separate calls would each cut to their own pair.
///
/// # Safety
/// The CPU must support AVX2 (check with `is_x86_feature_detected!("avx2")`, as
/// [`four_at_once`] does).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn dot4_avx2(x: &[f32], ys: [&[f32]; 4]) -> [f64; 4] {
    use std::arch::x86_64::{
        __m256d, _mm256_add_pd, _mm256_castps256_ps128, _mm256_cvtps_pd, _mm256_extractf128_ps,
        _mm256_loadu_ps, _mm256_mul_pd, _mm256_setzero_pd, _mm256_storeu_pd,
    };
    const _: () = assert!(LANES == 8, "two vectors of four f64 lanes");
    debug_assert!(std::is_x86_feature_detected!("avx2"));
    debug_assert!(
        ys.iter().all(|y| y.len() == x.len()),
        "dot4 of unequal lengths"
    );
    let n = ys.iter().fold(x.len(), |n, y| n.min(y.len()));
    let full = n - n % LANES;
    let mut low: [__m256d; 4] = [_mm256_setzero_pd(); 4];
    let mut high: [__m256d; 4] = [_mm256_setzero_pd(); 4];
    let mut i = 0;
    while i < full {
        // SAFETY: i + 8 <= full <= the length of x and of every y.
        let (xl, xh) = unsafe {
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            (
                _mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)),
            )
        };
        for q in 0..4 {
            // SAFETY: as above.
            let v = unsafe { _mm256_loadu_ps(ys[q].as_ptr().add(i)) };
            let yl = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
            let yh = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v));
            low[q] = _mm256_add_pd(low[q], _mm256_mul_pd(xl, yl));
            high[q] = _mm256_add_pd(high[q], _mm256_mul_pd(xh, yh));
        }
        i += LANES;
    }
    let mut out = [0f64; 4];
    for q in 0..4 {
        let mut lanes = [0f64; LANES];
        // SAFETY: `lanes` holds eight f64, four per store.
        unsafe {
            _mm256_storeu_pd(lanes.as_mut_ptr(), low[q]);
            _mm256_storeu_pd(lanes.as_mut_ptr().add(4), high[q]);
        }
        let tail: f64 = x[full..n]
            .iter()
            .zip(&ys[q][full..n])
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum();
        out[q] = lanes.iter().sum::<f64>() + tail;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::dot;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn four_at_once_are_four_single_dots_to_the_bit() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        for n in 0..70 {
            let v = |f: f32| (0..n).map(|i| (i as f32 * f).sin()).collect::<Vec<f32>>();
            let (x, ys) = (v(0.37), [v(0.11), v(0.5), v(0.71), v(1.3)]);
            // SAFETY: AVX2 was checked above.
            let four = unsafe { super::dot4_avx2(&x, [&ys[0], &ys[1], &ys[2], &ys[3]]) };
            for q in 0..4 {
                assert_eq!(four[q].to_bits(), dot(&x, &ys[q]).to_bits(), "n = {n}");
            }
        }
    }

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

//! A small deterministic random number generator (SplitMix64 with Box–Muller normals).
//!
//! pipit needs reproducible streams, not cryptographic ones: parameter initialisation must
//! depend only on a seed and a tensor's name, identically on every machine and in every
//! partition of the model, and tests need random inputs they can regenerate.

/// SplitMix64: a 64-bit state advanced by a fixed odd constant and mixed on output.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
    /// The second normal of the last Box–Muller pair, returned by the next call.
    spare_normal: Option<f64>,
}

/// FNV-1a over bytes: a stable (toolchain-independent) hash for deriving named streams.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed,
            spare_normal: None,
        }
    }

    /// A generator whose stream depends only on `seed` and `name` (e.g. a tensor name).
    pub fn for_name(seed: u64, name: &str) -> Self {
        let mut mixer = Rng::new(seed ^ fnv1a(name.as_bytes()));
        Self::new(mixer.next_u64())
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform_in(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in `0..n` (`n > 0`; the tiny modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below needs a non-empty range");
        self.next_u64() % n
    }

    /// A standard normal sample (Box–Muller; pairs are used in full).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        // 1 - uniform() lies in (0, 1], so the logarithm is finite.
        let r = (-2.0 * (1.0 - self.uniform()).ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * self.uniform();
        self.spare_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `len` samples of normal(0, std) as f32.
    pub fn normal_vec(&mut self, len: usize, std: f64) -> Vec<f32> {
        (0..len).map(|_| (self.normal() * std) as f32).collect()
    }

    /// `len` samples uniform in `[lo, hi)` as f32.
    pub fn uniform_vec(&mut self, len: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..len).map(|_| self.uniform_in(lo, hi) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_named_streams_differ() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = Rng::new(7);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..4)
            .map({
                let mut r = Rng::new(7);
                move |_| r.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        let x = Rng::for_name(1, "wte").next_u64();
        assert_eq!(x, Rng::for_name(1, "wte").next_u64());
        assert_ne!(x, Rng::for_name(1, "wpe").next_u64());
        assert_ne!(x, Rng::for_name(2, "wte").next_u64());
    }

    #[test]
    fn normal_samples_have_unit_moments() {
        let mut r = Rng::new(3);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
    }

    #[test]
    fn uniform_stays_in_range() {
        let mut r = Rng::new(11);
        for _ in 0..10_000 {
            let u = r.uniform_in(-2.0, 3.0);
            assert!((-2.0..3.0).contains(&u));
            assert!(r.below(5) < 5);
        }
    }
}

//! Picking the next token from a model's logits: greedy, or drawn at a temperature from the
//! top-k most likely tokens and, of those, the nucleus (top-p). `pipit generate` and
//! `pipit serve` sample with it, so the same settings and seed give the same tokens in both.

use anyhow::Result;

use crate::invalid_input;
use crate::rng::Rng;

/// How the next token is picked.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; 0 picks the most likely token every time (greedy).
    pub temperature: f32,
    /// Draw only among the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Of those, only the most likely whose probabilities first add up to at least `top_p`
    /// (1: all of them).
    pub top_p: f64,
}

impl Sampling {
    /// Greedy decoding.
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };

    /// Errors unless the temperature is finite and not negative and `top_p` is in (0, 1];
    /// the messages name the settings as `names` gives them (`("--temperature", "--top-p")`).
    pub fn check(&self, names: (&str, &str)) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(invalid_input!(
                "{} must be 0 or more, got {}",
                names.0,
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(invalid_input!(
                "{} must be in (0, 1], got {}",
                names.1,
                self.top_p
            ));
        }
        Ok(())
    }

    /// The token to follow `logits`: the arg-max when the temperature is 0, otherwise a draw
    /// from the softmax of `logits / temperature` restricted to the `top_k` largest, and of
    /// those to the fewest most likely whose probabilities add up to `top_p`.
    pub fn pick(&self, logits: &[f32], rng: &mut Rng) -> usize {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if self.temperature == 0.0 {
            return order[0];
        }
        if self.top_k > 0 {
            order.truncate(self.top_k);
        }
        let top = logits[order[0]] as f64;
        let mut weights: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] as f64 - top) / self.temperature as f64).exp())
            .collect();
        if self.top_p < 1.0 {
            let total: f64 = weights.iter().sum();
            let mut sum = 0.0;
            let keep = weights
                .iter()
                .position(|w| {
                    sum += w;
                    sum >= self.top_p * total
                })
                .map_or(weights.len(), |i| i + 1);
            weights.truncate(keep);
            order.truncate(keep);
        }
        let mut draw = rng.uniform() * weights.iter().sum::<f64>();
        for (&i, w) in order.iter().zip(&weights) {
            draw -= w;
            if draw <= 0.0 {
                return i;
            }
        }
        order[order.len() - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(temperature: f32, top_k: usize, top_p: f64) -> Sampling {
        Sampling {
            temperature,
            top_k,
            top_p,
        }
    }

    #[test]
    fn greedy_takes_the_largest_and_top_k_excludes_the_rest() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        let mut rng = Rng::new(1);
        assert_eq!(Sampling::GREEDY.pick(&logits, &mut rng), 1);
        for _ in 0..200 {
            let t = at(1.0, 2, 1.0).pick(&logits, &mut rng);
            assert!(t == 1 || t == 2);
        }
    }

    #[test]
    fn top_p_keeps_the_fewest_likely_tokens_that_reach_it() {
        // Probabilities 0.5, 0.3, 0.2 at temperature 1.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut rng = Rng::new(2);
        let drawn = |p: f64, rng: &mut Rng| -> std::collections::BTreeSet<usize> {
            (0..400).map(|_| at(1.0, 0, p).pick(&logits, rng)).collect()
        };
        assert_eq!(drawn(0.45, &mut rng), [0].into());
        assert_eq!(drawn(0.7, &mut rng), [0, 1].into());
        assert_eq!(drawn(0.81, &mut rng), [0, 1, 2].into());
        assert_eq!(drawn(1.0, &mut rng), [0, 1, 2].into());
    }

    #[test]
    fn bad_settings_are_named() {
        let e = at(-1.0, 0, 1.0)
            .check(("temperature", "top_p"))
            .unwrap_err();
        assert_eq!(e.to_string(), "temperature must be 0 or more, got -1");
        let e = at(1.0, 0, 0.0).check(("temperature", "top_p")).unwrap_err();
        assert_eq!(e.to_string(), "top_p must be in (0, 1], got 0");
    }
}

//! Host-side tensors (for initialisation and checkpoints) and the initial parameters.

use std::collections::BTreeMap;

use anyhow::Result;

use super::config::ModelConfig;
use super::parts::Init;
use crate::invalid;
use crate::rng::Rng;

/// One named tensor on the host: its shape and its row-major f32 elements.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Row-major elements; `data.len()` is the product of `shape`.
    pub data: Vec<f32>,
}

/// Named host tensors, ordered by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostTensors {
    tensors: BTreeMap<String, HostTensor>,
}

impl HostTensors {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add or replace `name`; fails when `data` does not have the shape's element count.
    pub fn insert(
        &mut self,
        name: impl Into<String>,
        shape: Vec<usize>,
        data: Vec<f32>,
    ) -> Result<()> {
        let name = name.into();
        let expected: usize = shape.iter().product();
        if data.len() != expected {
            invalid!(
                "tensor {name}: shape {shape:?} needs {expected} elements, got {}",
                data.len()
            );
        }
        self.tensors.insert(name, HostTensor { shape, data });
        Ok(())
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    /// The tensor called `name`, mutably (its shape must be kept consistent with its data).
    pub fn get_mut(&mut self, name: &str) -> Option<&mut HostTensor> {
        self.tensors.get_mut(name)
    }

    /// Remove and return the tensor called `name`.
    pub fn remove(&mut self, name: &str) -> Option<HostTensor> {
        self.tensors.remove(name)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when there is no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Tensor names in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// `(name, tensor)` pairs in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &HostTensor)> {
        self.tensors.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Move every tensor of `other` in, replacing same-named ones (e.g. joining the
    /// parameters downloaded from each stage into one model).
    pub fn extend(&mut self, other: HostTensors) {
        self.tensors.extend(other.tensors);
    }
}

/// The initial value of one tensor, as its part declares it: norm weights one, biases zero,
/// weights and embeddings normal with the family's deviation (GPT-2's residual projections
/// 0.02/√(2·n_layer), everything else 0.02). The random stream depends only on `seed` and
/// `name`, so a tensor starts the same whichever stage holds it.
pub fn init_tensor(cfg: &ModelConfig, seed: u64, name: &str, shape: &[usize]) -> Vec<f32> {
    let len = shape.iter().product();
    let init = cfg
        .specs_of(&cfg.layers())
        .into_iter()
        .find(|s| s.name == name)
        .map_or(Init::Zeros, |s| s.init);
    initial(init, seed, name, len)
}

/// `len` values of `init` for the tensor `name`.
fn initial(init: Init, seed: u64, name: &str, len: usize) -> Vec<f32> {
    match init {
        Init::Ones => vec![1.0; len],
        Init::Zeros => vec![0.0; len],
        Init::Normal(std) => Rng::for_name(seed, name).normal_vec(len, std),
    }
}

/// Every parameter of the model, initialised by [`init_tensor`] from `seed`.
pub fn init_parameters(cfg: &ModelConfig, seed: u64) -> Result<HostTensors> {
    cfg.validate()?;
    let mut out = HostTensors::new();
    for spec in cfg.specs_of(&cfg.layers()) {
        let data = initial(spec.init, seed, &spec.name, spec.shape.iter().product());
        out.insert(spec.name, spec.shape, data)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initialisation_follows_gpt2() {
        let cfg = ModelConfig {
            n_layer: 8,
            n_embd: 32,
            ..ModelConfig::default()
        };
        let host = init_parameters(&cfg, 5).unwrap();
        assert_eq!(host.len(), cfg.all_params().len());
        let std = |name: &str| {
            let d = &host.get(name).unwrap().data;
            let mean = d.iter().map(|&x| x as f64).sum::<f64>() / d.len() as f64;
            (d.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / d.len() as f64).sqrt()
        };
        assert!((std("wte") - 0.02).abs() < 0.001, "wte std {}", std("wte"));
        assert!((std("h.3.mlp.c_fc.weight") - 0.02).abs() < 0.001);
        let proj = 0.02 / 4.0;
        assert!((std("h.1.mlp.c_proj.weight") - proj).abs() < 0.0005);
        assert!((std("h.1.attn.c_proj.weight") - proj).abs() < 0.0005);
        assert!(host
            .get("h.2.ln_1.weight")
            .unwrap()
            .data
            .iter()
            .all(|&x| x == 1.0));
        assert!(host
            .get("ln_f.bias")
            .unwrap()
            .data
            .iter()
            .all(|&x| x == 0.0));
        assert!(host
            .get("h.0.attn.c_attn.bias")
            .unwrap()
            .data
            .iter()
            .all(|&x| x == 0.0));
        assert_eq!(
            host.get("h.0.attn.c_attn.weight").unwrap().shape,
            vec![32, 96]
        );
    }

    #[test]
    fn a_tensor_depends_only_on_seed_and_name() {
        let small = ModelConfig::default();
        let deeper = ModelConfig {
            n_layer: 6,
            ..small.clone()
        };
        let a = init_parameters(&small, 9).unwrap();
        let b = init_parameters(&deeper, 9).unwrap();
        assert_eq!(a.get("h.2.mlp.c_fc.weight"), b.get("h.2.mlp.c_fc.weight"));
        assert_eq!(a.get("wte"), b.get("wte"));
        let c = init_parameters(&small, 10).unwrap();
        assert_ne!(a.get("wte"), c.get("wte"));
    }

    #[test]
    fn insert_checks_the_element_count() {
        let mut t = HostTensors::new();
        assert!(t.insert("x", vec![2, 3], vec![0.0; 5]).is_err());
        t.insert("x", vec![2, 3], vec![0.0; 6]).unwrap();
        assert_eq!(t.names().collect::<Vec<_>>(), vec!["x"]);
    }
}

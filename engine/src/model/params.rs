//! A stage's parameters on the device: values, gradients and AdamW moments, by name.

use std::collections::HashMap;

use anyhow::{Context, Result};

use super::parts::ParamSpec;
use crate::backend::{Backend, DType};

/// Parameters in a fixed order, with their gradients and optimizer moments in parallel
/// vectors, so one op can read a value while it writes a gradient.
///
/// Values, gradients and moments are f32 (the master copy). Under mixed precision each matrix
/// a matmul reads also has a low-precision compute copy, refreshed from the master after
/// every change to it.
pub(crate) struct Params<B: Backend> {
    pub(super) names: Vec<String>,
    pub(super) shapes: Vec<Vec<usize>>,
    /// Which parameters a matmul reads (they get compute copies under mixed precision).
    operands: Vec<bool>,
    index: HashMap<String, usize>,
    pub(super) values: Vec<B::Buffer>,
    pub(super) grads: Vec<B::Buffer>,
    pub(super) m: Vec<B::Buffer>,
    pub(super) v: Vec<B::Buffer>,
    /// Compute copies of the matmul operands, when the compute dtype is not f32.
    compute: Vec<Option<B::Buffer>>,
}

impl<B: Backend> Params<B> {
    /// Upload `values` (in the order of `specs`) and, to train, allocate zeroed gradients and
    /// moments; for inference there are none (a gradient asked for is an error).
    pub(super) fn new(
        b: &B,
        specs: Vec<ParamSpec>,
        values: Vec<&[f32]>,
        train: bool,
    ) -> Result<Self> {
        let mut p = Self {
            names: Vec::new(),
            shapes: Vec::new(),
            operands: Vec::new(),
            index: HashMap::new(),
            values: Vec::new(),
            grads: Vec::new(),
            m: Vec::new(),
            v: Vec::new(),
            compute: Vec::new(),
        };
        for (spec, data) in specs.into_iter().zip(values) {
            let (name, shape) = (spec.name, spec.shape);
            let len = data.len();
            let ctx = || format!("allocating parameter {name}");
            p.values.push(b.upload(data).with_context(ctx)?);
            if train {
                p.grads.push(b.alloc(len, DType::F32).with_context(ctx)?);
                p.m.push(b.alloc(len, DType::F32).with_context(ctx)?);
                p.v.push(b.alloc(len, DType::F32).with_context(ctx)?);
            }
            p.compute.push(None);
            p.operands.push(spec.operand);
            p.index.insert(name.clone(), p.names.len());
            p.names.push(name);
            p.shapes.push(shape);
        }
        Ok(p)
    }

    /// Position of `name`, if this stage holds it.
    pub(super) fn find(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Position of `name`; an error names the missing tensor (a broken stage invariant).
    pub(super) fn at(&self, name: &str) -> Result<usize> {
        self.find(name)
            .with_context(|| format!("this stage holds no parameter {name}"))
    }

    /// The value of `name`.
    pub(super) fn value(&self, name: &str) -> Result<&B::Buffer> {
        Ok(&self.values[self.at(name)?])
    }

    /// What a matmul reads for `name`: its compute copy under mixed precision, else its value.
    pub(super) fn operand(&self, name: &str) -> Result<&B::Buffer> {
        let i = self.at(name)?;
        Ok(self.compute[i].as_ref().unwrap_or(&self.values[i]))
    }

    /// Give every matmul operand (the linear layers' weights and the LM head; not the
    /// embedding tables, which only the embedding reads) a compute copy of `dtype`, or drop
    /// the copies for f32.
    pub(super) fn set_compute_dtype(&mut self, b: &B, dtype: DType) -> Result<()> {
        for i in 0..self.names.len() {
            self.compute[i] = if dtype != DType::F32 && self.operands[i] {
                let len = b.len(&self.values[i]);
                Some(b.alloc_output(len, dtype).with_context(|| {
                    format!("allocating the {} copy of {}", dtype.name(), self.names[i])
                })?)
            } else {
                None
            };
        }
        self.refresh_compute(b)
    }

    /// Bring every compute copy up to date with its master value.
    pub(super) fn refresh_compute(&mut self, b: &B) -> Result<()> {
        for (copy, value) in self.compute.iter_mut().zip(&self.values) {
            if let Some(copy) = copy {
                b.copy(copy, value)?;
            }
        }
        Ok(())
    }

    /// Whether the parameters have gradients and moments (a stage built to train).
    pub(super) fn trains(&self) -> bool {
        self.grads.len() == self.values.len()
    }

    /// Position of `name`, whose gradient is wanted: an error on a stage built for inference.
    fn trained(&self, name: &str) -> Result<usize> {
        if !self.trains() {
            anyhow::bail!("the gradient of {name}: this stage was built for inference");
        }
        self.at(name)
    }

    /// The gradient of `name`, to accumulate into.
    pub(super) fn grad_mut(&mut self, name: &str) -> Result<&mut B::Buffer> {
        let i = self.trained(name)?;
        Ok(&mut self.grads[i])
    }

    /// The value of a norm's weight and the gradients of its weight and (LayerNorm) bias.
    pub(super) fn norm_grads(
        &mut self,
        weight: &str,
        bias: Option<&str>,
    ) -> Result<NormGrads<'_, B>> {
        let w = self.trained(weight)?;
        match bias {
            Some(bias) => {
                let b = self.trained(bias)?;
                let (dw, db) = two_mut(&mut self.grads, w, b);
                Ok((&self.values[w], dw, Some(db)))
            }
            None => Ok((&self.values[w], &mut self.grads[w], None)),
        }
    }

    /// The gradients of two different parameters, at once.
    pub(super) fn grads_pair_mut(
        &mut self,
        a: &str,
        b: &str,
    ) -> Result<(&mut B::Buffer, &mut B::Buffer)> {
        let (i, j) = (self.trained(a)?, self.trained(b)?);
        Ok(two_mut(&mut self.grads, i, j))
    }
}

/// A norm's weight, its gradient, and its bias's gradient (LayerNorm).
pub(super) type NormGrads<'a, B> = (
    &'a <B as Backend>::Buffer,
    &'a mut <B as Backend>::Buffer,
    Option<&'a mut <B as Backend>::Buffer>,
);

/// Mutable references to two different elements of a slice.
fn two_mut<T>(v: &mut [T], i: usize, j: usize) -> (&mut T, &mut T) {
    assert_ne!(i, j, "two_mut needs two different positions");
    if i < j {
        let (lo, hi) = v.split_at_mut(j);
        (&mut lo[i], &mut hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(i);
        (&mut hi[0], &mut lo[j])
    }
}

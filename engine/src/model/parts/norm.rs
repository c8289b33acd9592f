//! Normalisation over the channels: LayerNorm (with bias, GPT-2) or RMSNorm (Llama).

use anyhow::Result;

use super::{Init, ParamSpec};
use crate::backend::{Backend, DType};
use crate::model::params::Params;

/// Which normalisation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum NormKind {
    /// `(x − mean)/std · w + b`; epsilon 1e-5, the backends' only one.
    Layer,
    /// `x/rms · w`, with its epsilon.
    Rms(f32),
}

/// A norm over `channels`, weight `weight` and (LayerNorm) bias `bias`.
#[derive(Clone, Debug)]
pub(crate) struct Norm {
    pub(crate) kind: NormKind,
    pub(crate) weight: String,
    pub(crate) bias: Option<String>,
    pub(crate) channels: usize,
}

/// What a norm's backward needs besides its input: per-row statistics.
pub(crate) struct NormStats<B: Backend> {
    mean: Option<B::Buffer>,
    rstd: B::Buffer,
}

impl<B: Backend> NormStats<B> {
    pub(crate) fn bytes(&self, b: &B) -> u64 {
        self.mean.as_ref().map_or(0, |m| b.bytes(m)) + b.bytes(&self.rstd)
    }
}

impl Norm {
    /// LayerNorm with `{prefix}.weight` and `{prefix}.bias`.
    pub(crate) fn layer(prefix: &str, channels: usize) -> Self {
        Self {
            kind: NormKind::Layer,
            weight: format!("{prefix}.weight"),
            bias: Some(format!("{prefix}.bias")),
            channels,
        }
    }

    /// RMSNorm with `{prefix}.weight`.
    pub(crate) fn rms(prefix: &str, channels: usize, eps: f32) -> Self {
        Self {
            kind: NormKind::Rms(eps),
            weight: format!("{prefix}.weight"),
            bias: None,
            channels,
        }
    }

    pub(crate) fn params(&self) -> Vec<ParamSpec> {
        let mut out = vec![ParamSpec::new(
            &self.weight,
            vec![self.channels],
            Init::Ones,
            false,
        )];
        if let Some(bias) = &self.bias {
            out.push(ParamSpec::new(
                bias,
                vec![self.channels],
                Init::Zeros,
                false,
            ));
        }
        out
    }

    /// The normed `x[rows, C]` in `dtype`, and the statistics backward needs.
    pub(crate) fn forward<B: Backend>(
        &self,
        b: &B,
        p: &Params<B>,
        x: &B::Buffer,
        rows: usize,
        dtype: DType,
    ) -> Result<(B::Buffer, NormStats<B>)> {
        let c = self.channels;
        let mut out = b.alloc_output(rows * c, dtype)?;
        let weight = p.value(&self.weight)?;
        match (self.kind, &self.bias) {
            (NormKind::Layer, Some(bias)) => {
                let (mut mean, mut rstd) = (
                    b.alloc_output(rows, DType::F32)?,
                    b.alloc_output(rows, DType::F32)?,
                );
                let bias = p.value(bias)?;
                b.layernorm_forward(&mut out, &mut mean, &mut rstd, x, weight, bias, rows, c)?;
                let mean = Some(mean);
                Ok((out, NormStats { mean, rstd }))
            }
            (NormKind::Layer, None) => anyhow::bail!("layernorm {} has no bias", self.weight),
            (NormKind::Rms(eps), _) => {
                let mut rstd = b.alloc_output(rows, DType::F32)?;
                b.rmsnorm_forward(&mut out, &mut rstd, x, weight, rows, c, eps)?;
                Ok((out, NormStats { mean: None, rstd }))
            }
        }
    }

    /// The gradient of the input `x` (f32) from `dout`; accumulates the weight's (and bias's)
    /// gradient. `dout` and the statistics are freed on return.
    pub(crate) fn backward<B: Backend>(
        &self,
        b: &B,
        p: &mut Params<B>,
        stats: NormStats<B>,
        dout: B::Buffer,
        x: &B::Buffer,
        rows: usize,
    ) -> Result<B::Buffer> {
        let c = self.channels;
        let mut dx = b.alloc_output(rows * c, DType::F32)?;
        let (w, dw, db) = p.norm_grads(&self.weight, self.bias.as_deref())?;
        match (stats.mean.as_ref(), db) {
            (Some(mean), Some(db)) => {
                b.layernorm_backward(&mut dx, dw, db, &dout, x, w, mean, &stats.rstd, rows, c)?
            }
            _ => b.rmsnorm_backward(&mut dx, dw, &dout, x, w, &stats.rstd, rows, c)?,
        }
        Ok(dx)
    }
}

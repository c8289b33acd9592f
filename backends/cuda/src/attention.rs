//! Causal multi-head attention on the CUDA backend, two ways.
//!
//! - **Tensor cores** (`cuda/flash_attention.cu`), for bf16 activations and head sizes 16, 32,
//!   64 or 128: scores and probabilities stay on chip; forward keeps one f32 log-sum-exp per
//!   query row and backward recomputes the probabilities from it.
//! - **Materialised** (`cuda/attention.cu` around cuBLAS), for f32 and every other shape:
//!   heads are copied out head-major, the products are strided batched GEMMs, and the
//!   `[B·NH, T, T]` probabilities are kept for backward, as the reference backend keeps them.
//!
//! `PIPIT_CUDA_ATTENTION=materialized` turns the first off (to compare the two, or to rule it
//! out); the backend reads it once, when it opens.

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};
use pipit_engine::backend::check::elems;
use pipit_engine::backend::{Attention, DType, Matmul};

use crate::buffer::CudaBuffer;
use crate::context::{elementwise, per_row, u32_of, CudaBackend};
use crate::kernels::{Kernels, ROW_BLOCK};
use crate::ops::{need, need_float};

/// Rows of queries (or keys) per block of the tensor-core kernels (`FLASH_TILE`).
const FLASH_TILE: usize = 64;
/// Threads per block of the tensor-core kernels (`FLASH_THREADS`: four warps).
const FLASH_THREADS: u32 = 128;

/// Which attention a backend runs where both could: `PIPIT_CUDA_ATTENTION`, `flash` (the
/// default) or `materialized`.
pub fn flash_enabled() -> Result<bool> {
    match std::env::var("PIPIT_CUDA_ATTENTION").as_deref() {
        Err(_) | Ok("flash") => Ok(true),
        Ok("materialized") => Ok(false),
        Ok(other) => bail!("PIPIT_CUDA_ATTENTION must be flash or materialized, got {other:?}"),
    }
}

/// Which way [`CudaBackend::move_heads`] moves heads: out of a token-major layout into a
/// head-major copy, or back.
#[derive(Clone, Copy)]
enum HeadMove {
    Split,
    Merge,
}

impl CudaBackend {
    /// Shapes of an attention call: (head size, query rows = batch·heads·seq).
    pub(crate) fn attention_sizes(&self, s: Attention) -> Result<(usize, usize)> {
        if s.heads == 0 || s.channels == 0 || s.channels % s.heads != 0 {
            bail!(
                "attention: {} channels cannot be split into {} heads of equal width",
                s.channels,
                s.heads
            );
        }
        u32_of(s.seq, "attention sequence length")?;
        u32_of(3 * s.channels, "attention channels")?;
        // cuBLAS's sizes are 32-bit too: a head's T × T scores.
        i32::try_from(elems(&[s.seq, s.seq])?).map_err(|_| {
            anyhow!(
                "attention: {0} × {0} scores per head exceed cuBLAS's 32-bit sizes",
                s.seq
            )
        })?;
        Ok((s.channels / s.heads, elems(&[s.batch, s.heads, s.seq])?))
    }

    /// The head size when the tensor-core kernels take this call: bf16 activations, a head
    /// size they were built for, and a grid they fit in.
    pub(crate) fn flash_head_size(&self, dtype: DType, s: Attention) -> Option<usize> {
        self.flash_attention
            .then(|| flash_head_size(dtype, s))
            .flatten()
    }

    /// Tensor-core forward: `out` from `qkv`, and each query row's log-sum-exp into `lse`.
    pub(crate) fn flash_forward(
        &self,
        out: &mut CudaBuffer,
        lse: &mut CudaBuffer,
        qkv: &CudaBuffer,
        shape: Attention,
        hs: usize,
    ) -> Result<()> {
        let (_, rows) = self.attention_sizes(shape)?;
        let Attention {
            batch,
            seq,
            channels: c,
            ..
        } = shape;
        need(
            out,
            elems(&[batch, seq, c])?,
            DType::BF16,
            "attention output",
        )?;
        need(lse, rows, DType::F32, "attention log-sum-exp")?;
        need(qkv, elems(&[batch, seq, 3 * c])?, DType::BF16, "qkv")?;
        if rows == 0 {
            return Ok(());
        }
        let (cfg, seq32, heads32, scale) = flash_launch(shape, hs)?;
        let [(func, name), ..] = flash_kernels(&self.kernels, hs);
        launch!(
            @go self,
            func,
            name,
            cfg,
            out.floats_mut("attention output")?,
            lse.f32_mut("attention log-sum-exp")?,
            qkv.floats("qkv")?,
            &seq32,
            &heads32,
            &scale
        )
    }

    /// Tensor-core backward: `dqkv` from `dout`, the forward's `qkv`, `out` and `lse`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn flash_backward(
        &self,
        dqkv: &mut CudaBuffer,
        dout: &CudaBuffer,
        qkv: &CudaBuffer,
        out: &CudaBuffer,
        lse: &CudaBuffer,
        shape: Attention,
        hs: usize,
    ) -> Result<()> {
        let (_, rows) = self.attention_sizes(shape)?;
        let Attention {
            batch,
            seq,
            channels: c,
            ..
        } = shape;
        let (qkv_len, out_len) = (elems(&[batch, seq, 3 * c])?, elems(&[batch, seq, c])?);
        need(dqkv, qkv_len, DType::BF16, "qkv gradient")?;
        need(dout, out_len, DType::BF16, "attention output gradient")?;
        need(qkv, qkv_len, DType::BF16, "qkv")?;
        need(out, out_len, DType::BF16, "attention output")?;
        need(lse, rows, DType::F32, "attention log-sum-exp")?;
        if rows == 0 {
            return Ok(());
        }
        let mut delta = self.scratch(rows, DType::F32)?;
        let (hs32, rows64) = (hs as u32, rows as u64);
        let (cfg, seq32, heads32, scale) = flash_launch(shape, hs)?;
        launch!(
            self,
            flash_delta,
            per_row(rows.div_ceil(ROW_BLOCK as usize / 32), 0)?,
            delta.f32_mut("attention delta")?,
            out.floats("attention output")?,
            dout.floats("attention output gradient")?,
            &seq32,
            &heads32,
            &hs32,
            &rows64
        )?;
        let [_, dq, dkdv] = flash_kernels(&self.kernels, hs);
        // dQ, then dK and dV: each pass writes its own columns of dqkv.
        for (func, name) in [dq, dkdv] {
            launch!(
                @go self,
                func,
                name,
                cfg,
                dqkv.floats_mut("qkv gradient")?,
                qkv.floats("qkv")?,
                dout.floats("attention output gradient")?,
                lse.f32("attention log-sum-exp")?,
                delta.f32("attention delta")?,
                &seq32,
                &heads32,
                &scale
            )?;
        }
        Ok(())
    }

    /// Attention through cuBLAS: scores, probabilities and their gradients materialised
    /// (f32 scores, probabilities in the activations' dtype).
    pub(crate) fn materialized_forward(
        &self,
        out: &mut CudaBuffer,
        att: &mut CudaBuffer,
        qkv: &CudaBuffer,
        shape: Attention,
    ) -> Result<()> {
        let (hs, rows) = self.attention_sizes(shape)?;
        let Attention {
            batch,
            seq,
            channels: c,
            heads,
        } = shape;
        let t = need_float(out, elems(&[batch, seq, c])?, "attention output")?;
        need(att, elems(&[rows, seq])?, t, "attention probabilities")?;
        need(qkv, elems(&[batch, seq, 3, c])?, t, "qkv")?;
        if rows == 0 {
            return Ok(());
        }
        let bh = batch * heads;
        let q = self.split_heads(qkv, shape, 3 * c, 0)?;
        let k = self.split_heads(qkv, shape, 3 * c, c)?;
        let mut scores = self.scratch(elems(&[rows, seq])?, DType::F32)?;
        self.product(
            &Matmul::new(seq, seq, hs).trans_b(),
            bh,
            0.0,
            &q,
            &k,
            &mut scores,
        )?;
        drop((q, k));
        let (seq32, scale, rows64) = (seq as u32, (1.0 / (hs as f64).sqrt()) as f32, rows as u64);
        launch!(
            self,
            t => causal_softmax | causal_softmax_bf16,
            per_row(rows, 0)?,
            att.floats_mut("attention probabilities")?,
            scores.f32("attention scores")?,
            &seq32,
            &scale,
            &rows64,
        )?;
        drop(scores);
        let v = self.split_heads(qkv, shape, 3 * c, 2 * c)?;
        let mut y = self.scratch(v.len(), t)?;
        self.product(&Matmul::new(seq, hs, seq), bh, 0.0, att, &v, &mut y)?;
        self.merge_heads(out, &y, shape, c, 0)
    }

    /// Backward of [`Self::materialized_forward`] from its saved probabilities.
    pub(crate) fn materialized_backward(
        &self,
        dqkv: &mut CudaBuffer,
        dout: &CudaBuffer,
        qkv: &CudaBuffer,
        att: &CudaBuffer,
        shape: Attention,
    ) -> Result<()> {
        let (hs, rows) = self.attention_sizes(shape)?;
        let Attention {
            batch,
            seq,
            channels: c,
            heads,
        } = shape;
        let qkv_len = elems(&[batch, seq, 3, c])?;
        let t = need_float(dqkv, qkv_len, "qkv gradient")?;
        need(
            dout,
            elems(&[batch, seq, c])?,
            t,
            "attention output gradient",
        )?;
        need(qkv, qkv_len, t, "qkv")?;
        need(att, elems(&[rows, seq])?, t, "attention probabilities")?;
        if rows == 0 {
            return Ok(());
        }
        let bh = batch * heads;
        let dy = self.split_heads(dout, shape, c, 0)?;
        let v = self.split_heads(qkv, shape, 3 * c, 2 * c)?;
        // dV = Pᵀ·dY, dP = dY·Vᵀ.
        let mut dv = self.scratch(v.len(), t)?;
        self.product(
            &Matmul::new(seq, hs, seq).trans_a(),
            bh,
            0.0,
            att,
            &dy,
            &mut dv,
        )?;
        self.merge_heads(dqkv, &dv, shape, 3 * c, 2 * c)?;
        drop(dv);
        let mut datt = self.scratch(elems(&[rows, seq])?, DType::F32)?;
        self.product(
            &Matmul::new(seq, seq, hs).trans_b(),
            bh,
            0.0,
            &dy,
            &v,
            &mut datt,
        )?;
        drop((dy, v));
        let mut dscores = self.scratch(elems(&[rows, seq])?, t)?;
        let (seq32, scale, rows64) = (seq as u32, (1.0 / (hs as f64).sqrt()) as f32, rows as u64);
        launch!(
            self,
            t => causal_softmax_backward | causal_softmax_backward_bf16,
            per_row(rows, 0)?,
            dscores.floats_mut("attention score gradient")?,
            att.floats("attention probabilities")?,
            datt.f32("attention probability gradient")?,
            &seq32,
            &scale,
            &rows64,
        )?;
        drop(datt);
        // dQ = dS·K, dK = dSᵀ·Q.
        let k = self.split_heads(qkv, shape, 3 * c, c)?;
        let mut dq = self.scratch(k.len(), t)?;
        self.product(&Matmul::new(seq, hs, seq), bh, 0.0, &dscores, &k, &mut dq)?;
        self.merge_heads(dqkv, &dq, shape, 3 * c, 0)?;
        drop((k, dq));
        let q = self.split_heads(qkv, shape, 3 * c, 0)?;
        let mut dk = self.scratch(q.len(), t)?;
        self.product(
            &Matmul::new(seq, hs, seq).trans_a(),
            bh,
            0.0,
            &dscores,
            &q,
            &mut dk,
        )?;
        self.merge_heads(dqkv, &dk, shape, 3 * c, c)
    }

    /// The heads of one part of `src` (`[batch, seq, stride]`, the part starting at column
    /// `offset`) as a new head-major `[batch·heads, seq, head size]` buffer.
    fn split_heads(
        &self,
        src: &CudaBuffer,
        s: Attention,
        stride: usize,
        offset: usize,
    ) -> Result<CudaBuffer> {
        let n = elems(&[s.batch, s.seq, s.channels])?;
        let mut dst = self.scratch(n, src.dtype())?;
        self.move_heads(HeadMove::Split, &mut dst, src, s, stride, offset)?;
        Ok(dst)
    }

    /// The inverse of [`Self::split_heads`]: write head-major `src` into the part of `dst`
    /// (`[batch, seq, stride]`) starting at column `offset`.
    fn merge_heads(
        &self,
        dst: &mut CudaBuffer,
        src: &CudaBuffer,
        s: Attention,
        stride: usize,
        offset: usize,
    ) -> Result<()> {
        self.move_heads(HeadMove::Merge, dst, src, s, stride, offset)
    }

    /// One `heads_split` or `heads_merge` launch over the `batch·seq·channels` elements of
    /// the head-major side.
    fn move_heads(
        &self,
        way: HeadMove,
        dst: &mut CudaBuffer,
        src: &CudaBuffer,
        s: Attention,
        stride: usize,
        offset: usize,
    ) -> Result<()> {
        let n = elems(&[s.batch, s.seq, s.channels])?;
        let (seq32, h32, hs32, stride32, offset32, n64) = (
            s.seq as u32,
            s.heads as u32,
            (s.channels / s.heads) as u32,
            u32_of(stride, "attention stride")?,
            u32_of(offset, "attention offset")?,
            n as u64,
        );
        let (func, name) = match (way, src.dtype()) {
            (HeadMove::Split, DType::BF16) => (&self.kernels.heads_split_bf16, "heads_split_bf16"),
            (HeadMove::Split, _) => (&self.kernels.heads_split, "heads_split"),
            (HeadMove::Merge, DType::BF16) => (&self.kernels.heads_merge_bf16, "heads_merge_bf16"),
            (HeadMove::Merge, _) => (&self.kernels.heads_merge, "heads_merge"),
        };
        launch!(
            @go self,
            func,
            name,
            elementwise(n),
            dst.floats_mut("attention heads")?,
            src.floats("attention heads")?,
            &seq32,
            &h32,
            &hs32,
            &stride32,
            &offset32,
            &n64
        )
    }
}

/// The head size of a call the tensor-core kernels can take: bf16, a head size they were built
/// for, and a grid that fits (B·NH blocks in the grid's second dimension).
fn flash_head_size(dtype: DType, s: Attention) -> Option<usize> {
    let hs = s.channels.checked_div(s.heads)?;
    let fits = s.channels % s.heads == 0
        && matches!(hs, 16 | 32 | 64 | 128)
        && s.batch * s.heads <= u16::MAX as usize
        && u32::try_from(s.seq).is_ok();
    (dtype == DType::BF16 && fits).then_some(hs)
}

/// The tensor-core entry points for head size `hs` (16, 32, 64, else 128), with their names:
/// forward, the dQ pass and the dK/dV pass.
fn flash_kernels(k: &Kernels, hs: usize) -> [(&CudaFunction, &'static str); 3] {
    match hs {
        16 => [
            (&k.flash_forward_hs16, "flash_forward_hs16"),
            (&k.flash_backward_dq_hs16, "flash_backward_dq_hs16"),
            (&k.flash_backward_dkdv_hs16, "flash_backward_dkdv_hs16"),
        ],
        32 => [
            (&k.flash_forward_hs32, "flash_forward_hs32"),
            (&k.flash_backward_dq_hs32, "flash_backward_dq_hs32"),
            (&k.flash_backward_dkdv_hs32, "flash_backward_dkdv_hs32"),
        ],
        64 => [
            (&k.flash_forward_hs64, "flash_forward_hs64"),
            (&k.flash_backward_dq_hs64, "flash_backward_dq_hs64"),
            (&k.flash_backward_dkdv_hs64, "flash_backward_dkdv_hs64"),
        ],
        _ => [
            (&k.flash_forward_hs128, "flash_forward_hs128"),
            (&k.flash_backward_dq_hs128, "flash_backward_dq_hs128"),
            (&k.flash_backward_dkdv_hs128, "flash_backward_dkdv_hs128"),
        ],
    }
}

/// Grid and scalar arguments of the tensor-core kernels: a block per 64 rows of one head, the
/// sequence length, the head count and the score scale 1/√hs.
fn flash_launch(s: Attention, hs: usize) -> Result<(LaunchConfig, u32, u32, f32)> {
    let tiles = u32_of(s.seq.div_ceil(FLASH_TILE), "attention row tiles")?;
    let cfg = LaunchConfig {
        grid_dim: (tiles, u32_of(s.batch * s.heads, "attention heads")?, 1),
        block_dim: (FLASH_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let scale = (1.0 / (hs as f64).sqrt()) as f32;
    Ok((cfg, s.seq as u32, s.heads as u32, scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(batch: usize, seq: usize, channels: usize, heads: usize) -> Attention {
        Attention {
            batch,
            seq,
            channels,
            heads,
        }
    }

    #[test]
    fn tensor_cores_take_bf16_with_the_head_sizes_they_were_built_for() {
        // GPT-2 124M (head size 64) and the default model (16).
        assert_eq!(
            flash_head_size(DType::BF16, shape(16, 1024, 768, 12)),
            Some(64)
        );
        assert_eq!(flash_head_size(DType::BF16, shape(2, 64, 64, 4)), Some(16));
        assert_eq!(flash_head_size(DType::BF16, shape(1, 5, 256, 2)), Some(128));
        // f32, other head sizes, uneven splits and too many heads for the grid go to cuBLAS.
        assert_eq!(flash_head_size(DType::F32, shape(16, 1024, 768, 12)), None);
        assert_eq!(flash_head_size(DType::BF16, shape(2, 5, 12, 3)), None);
        assert_eq!(flash_head_size(DType::BF16, shape(1, 8, 48, 1)), None);
        assert_eq!(flash_head_size(DType::BF16, shape(1, 8, 64, 3)), None);
        assert_eq!(flash_head_size(DType::BF16, shape(1, 8, 64, 0)), None);
        assert_eq!(flash_head_size(DType::BF16, shape(65_536, 8, 64, 1)), None);
    }

    #[test]
    fn launches_cover_every_row_with_a_block_per_64_rows_and_head() {
        for seq in [1usize, 63, 64, 65, 1024] {
            let (cfg, seq32, heads32, scale) = flash_launch(shape(3, seq, 128, 2), 64).unwrap();
            assert_eq!(cfg.grid_dim, (seq.div_ceil(64) as u32, 6, 1));
            assert_eq!(cfg.block_dim, (FLASH_THREADS, 1, 1));
            assert!(cfg.grid_dim.0 as usize * FLASH_TILE >= seq);
            assert_eq!((seq32, heads32), (seq as u32, 2));
            assert_eq!(scale, 0.125);
        }
    }
}

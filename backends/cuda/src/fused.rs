//! The fused ops Llama-style models add, as CUDA kernels: RMSNorm (`cuda/rmsnorm.cu`), rotary
//! positions (`cuda/rope.cu`), SwiGLU (`cuda/swiglu.cu`) and grouped-query key/value sharing
//! (`cuda/grouped_query.cu`). The trait methods in `ops.rs` run the engine's shared checks
//! (`pipit_engine::backend::fused`), then these; the token-only embedding keeps the default.

use anyhow::{bail, Context, Result};
use cudarc::driver::PushKernelArg;
use pipit_engine::backend::{Backend, DType, Heads, Rope};

use crate::buffer::CudaBuffer;
use crate::context::{chunk_rows, column_tiles, elementwise, per_row, u32_of, CudaBackend};

/// Errors unless every buffer holds the floats of `t` (the kernels take one type for all).
fn same_type(t: DType, bufs: &[(&CudaBuffer, &str)]) -> Result<()> {
    for (buf, what) in bufs {
        if buf.dtype() != t {
            bail!(
                "{what} is {:?} but the op's other operands are {t:?}",
                buf.dtype()
            );
        }
    }
    Ok(())
}

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rmsnorm_forward_kernel(
        &self,
        out: &mut CudaBuffer,
        rstd: &mut CudaBuffer,
        inp: &CudaBuffer,
        weight: &CudaBuffer,
        rows: usize,
        channels: usize,
        eps: f32,
    ) -> Result<()> {
        let _span = self.span("rmsnorm_forward");
        if rows == 0 || channels == 0 {
            return Ok(());
        }
        let (r32, c32) = (u32_of(rows, "rows")?, u32_of(channels, "channels")?);
        launch!(
            self,
            out.dtype() => rmsnorm_forward | rmsnorm_forward_bf16,
            per_row(rows, 0)?,
            out.floats_mut("rmsnorm output")?,
            rstd.f32_mut("rmsnorm rstd")?,
            inp.f32("rmsnorm input")?,
            weight.f32("rmsnorm weight")?,
            &r32,
            &c32,
            &eps,
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rmsnorm_backward_kernel(
        &self,
        dinp: &mut CudaBuffer,
        dweight: &mut CudaBuffer,
        dout: &CudaBuffer,
        inp: &CudaBuffer,
        weight: &CudaBuffer,
        rstd: &CudaBuffer,
        rows: usize,
        channels: usize,
    ) -> Result<()> {
        let _span = self.span("rmsnorm_backward");
        if rows == 0 || channels == 0 {
            return Ok(());
        }
        let (r32, c32) = (u32_of(rows, "rows")?, u32_of(channels, "channels")?);
        launch!(
            self,
            dout.dtype() => rmsnorm_backward | rmsnorm_backward_bf16,
            per_row(rows, 0)?,
            dinp.f32_mut("rmsnorm input gradient")?,
            dout.floats("rmsnorm output gradient")?,
            inp.f32("rmsnorm input")?,
            weight.f32("rmsnorm weight")?,
            rstd.f32("rmsnorm rstd")?,
            &r32,
            &c32,
        )?;
        let per = chunk_rows(rows);
        let chunks = rows.div_ceil(per);
        let per32 = u32_of(per, "rows")?;
        let mut partial = self.scratch(chunks * channels, DType::F32)?;
        launch!(
            self,
            dout.dtype() => rmsnorm_weight_partials | rmsnorm_weight_partials_bf16,
            column_tiles(channels, chunks)?,
            partial.f32_mut("rmsnorm weight partial sums")?,
            dout.floats("rmsnorm output gradient")?,
            inp.f32("rmsnorm input")?,
            rstd.f32("rmsnorm rstd")?,
            &r32,
            &c32,
            &per32,
        )?;
        self.finish_column_sums(dweight, &partial, chunks, channels)
    }

    pub(crate) fn rope_kernel(
        &self,
        out: &mut CudaBuffer,
        inp: &CudaBuffer,
        shape: Rope,
    ) -> Result<()> {
        let _span = self.span("rope");
        same_type(inp.dtype(), &[(out, "rotary embedding output")])?;
        let pairs = shape.batch * shape.seq * shape.heads * (shape.head_dim / 2);
        if pairs == 0 {
            return Ok(());
        }
        let table = self.upload(&shape.cos_sin())?;
        let (seq, heads, half) = (
            u32_of(shape.seq, "positions")?,
            u32_of(shape.heads, "heads")?,
            u32_of(shape.head_dim / 2, "head size")?,
        );
        let sign: f32 = if shape.inverse { -1.0 } else { 1.0 };
        let n64 = pairs as u64;
        launch!(
            self,
            inp.dtype() => rope | rope_bf16,
            elementwise(pairs),
            out.floats_mut("rotary embedding output")?,
            inp.floats("rotary embedding input")?,
            table.f32("rotary table")?,
            &seq,
            &heads,
            &half,
            &sign,
            &n64,
        )
    }

    pub(crate) fn swiglu_forward_kernel(
        &self,
        out: &mut CudaBuffer,
        gate: &CudaBuffer,
        up: &CudaBuffer,
    ) -> Result<()> {
        let _span = self.span("swiglu_forward");
        let t = gate.dtype();
        same_type(t, &[(up, "swiglu up"), (out, "swiglu output")])?;
        let n = gate.len();
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        launch!(
            self,
            t => swiglu_forward | swiglu_forward_bf16,
            elementwise(n),
            out.floats_mut("swiglu output")?,
            gate.floats("swiglu gate")?,
            up.floats("swiglu up")?,
            &n64,
        )
    }

    pub(crate) fn swiglu_backward_kernel(
        &self,
        dgate: &mut CudaBuffer,
        dup: &mut CudaBuffer,
        gate: &CudaBuffer,
        up: &CudaBuffer,
        dout: &CudaBuffer,
    ) -> Result<()> {
        let _span = self.span("swiglu_backward");
        let t = gate.dtype();
        same_type(
            t,
            &[
                (up, "swiglu up"),
                (dout, "swiglu output gradient"),
                (dgate, "swiglu gate gradient"),
                (dup, "swiglu up gradient"),
            ],
        )?;
        let n = gate.len();
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        launch!(
            self,
            t => swiglu_backward | swiglu_backward_bf16,
            elementwise(n),
            dgate.floats_mut("swiglu gate gradient")?,
            dup.floats_mut("swiglu up gradient")?,
            gate.floats("swiglu gate")?,
            up.floats("swiglu up")?,
            dout.floats("swiglu output gradient")?,
            &n64,
        )
    }

    pub(crate) fn pack_qkv_kernel(
        &self,
        qkv: &mut CudaBuffer,
        q: &CudaBuffer,
        k: &CudaBuffer,
        v: &CudaBuffer,
        shape: Heads,
    ) -> Result<()> {
        let _span = self.span("pack_qkv");
        let t = qkv.dtype();
        same_type(t, &[(q, "queries"), (k, "keys"), (v, "values")])?;
        let n = qkv.len();
        if n == 0 {
            return Ok(());
        }
        let (heads, kv, d) = heads_args(&shape)?;
        let n64 = n as u64;
        launch!(
            self,
            t => pack_qkv | pack_qkv_bf16,
            elementwise(n),
            qkv.floats_mut("packed qkv")?,
            q.floats("queries")?,
            k.floats("keys")?,
            v.floats("values")?,
            &heads,
            &kv,
            &d,
            &n64,
        )
    }

    pub(crate) fn unpack_qkv_grad_kernel(
        &self,
        dq: &mut CudaBuffer,
        dk: &mut CudaBuffer,
        dv: &mut CudaBuffer,
        dqkv: &CudaBuffer,
        shape: Heads,
    ) -> Result<()> {
        let _span = self.span("unpack_qkv_grad");
        let t = dqkv.dtype();
        same_type(
            t,
            &[
                (dq, "query gradient"),
                (dk, "key gradient"),
                (dv, "value gradient"),
            ],
        )?;
        if dq.is_empty() {
            return Ok(());
        }
        let (heads, kv, d) = heads_args(&shape)?;
        let (rows, n) = (shape.rows as u64, dq.len());
        launch!(
            self,
            t => unpack_qkv_grad | unpack_qkv_grad_bf16,
            elementwise(n),
            dq.floats_mut("query gradient")?,
            dk.floats_mut("key gradient")?,
            dv.floats_mut("value gradient")?,
            dqkv.floats("packed qkv gradient")?,
            &heads,
            &kv,
            &d,
            &rows,
        )
    }
}

/// The heads, key/value heads and head size of `shape` as kernel arguments.
fn heads_args(shape: &Heads) -> Result<(u32, u32, u32)> {
    Ok((
        u32_of(shape.heads, "heads")?,
        u32_of(shape.kv_heads, "key/value heads")?,
        u32_of(shape.head_dim, "head size")?,
    ))
}

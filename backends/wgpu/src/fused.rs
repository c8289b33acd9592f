//! The fused ops Llama-style models add, as WGSL kernels: RMSNorm (`shaders/rmsnorm.wgsl`),
//! rotary positions (`shaders/rope.wgsl`), SwiGLU (`shaders/swiglu.wgsl`) and grouped-query
//! key/value sharing (`shaders/grouped_query.wgsl`). The trait methods in `ops.rs` run the
//! engine's shared checks (`pipit_engine::backend::fused`), then these; the token-only
//! embedding keeps the engine's default.

use anyhow::{bail, Result};
use pipit_engine::backend::{DType, Heads, Rope};

use crate::buffer::WgpuBuffer;
use crate::context::WgpuBackend;
use crate::kernels::Kernel;
use crate::ops::{need, same_len, u, COLUMN_WG, ELEMENTWISE_WG};
use crate::split::{row_chunks, MAX_LOOP_ITERATIONS};

impl WgpuBackend {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rmsnorm_forward_kernel(
        &self,
        out: &WgpuBuffer,
        rstd: &WgpuBuffer,
        inp: &WgpuBuffer,
        weight: &WgpuBuffer,
        rows: usize,
        channels: usize,
        eps: f32,
    ) -> Result<()> {
        let rc = rows * channels;
        need(out, rc, DType::F32, "rmsnorm output")?;
        need(rstd, rows, DType::F32, "rmsnorm rstd")?;
        need(inp, rc, DType::F32, "rmsnorm input")?;
        need(weight, channels, DType::F32, "rmsnorm weight")?;
        if channels == 0 {
            bail!("rmsnorm over zero channels");
        }
        let lanes = self.lanes_for("rmsnorm", |l| 2 * channels.div_ceil(l) + 64)?;
        let vw = self.view(weight, 0..channels);
        for r in row_chunks(rows, &[channels, 1], self.max_binding_elems, usize::MAX)? {
            let cr = r.start * channels..r.end * channels;
            let vo = self.view(out, cr.clone());
            let vi = self.view(inp, cr);
            let vs = self.view(rstd, r.clone());
            let params = [
                u(r.len())?,
                u(channels)?,
                vo.base,
                vs.base,
                vi.base,
                vw.base,
                0,
                eps.to_bits(),
            ];
            self.dispatch_rows(
                Kernel::RmsnormForward,
                lanes,
                &params,
                &[(1, &vo), (2, &vs), (3, &vi), (4, &vw)],
                self.row_grid(r.len(), lanes)?,
            )?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rmsnorm_backward_kernel(
        &self,
        dinp: &WgpuBuffer,
        dweight: &WgpuBuffer,
        dout: &WgpuBuffer,
        inp: &WgpuBuffer,
        weight: &WgpuBuffer,
        rstd: &WgpuBuffer,
        rows: usize,
        channels: usize,
    ) -> Result<()> {
        let rc = rows * channels;
        need(dinp, rc, DType::F32, "rmsnorm input gradient")?;
        need(dweight, channels, DType::F32, "rmsnorm weight gradient")?;
        need(dout, rc, DType::F32, "rmsnorm output gradient")?;
        need(inp, rc, DType::F32, "rmsnorm input")?;
        need(weight, channels, DType::F32, "rmsnorm weight")?;
        need(rstd, rows, DType::F32, "rmsnorm rstd")?;
        if channels == 0 {
            bail!("rmsnorm over zero channels");
        }
        let column_groups = u(channels.div_ceil(COLUMN_WG))?;
        if column_groups > self.max_groups {
            bail!("{channels} channels exceed the device's dispatch limit");
        }
        let lanes = self.lanes_for("rmsnorm backward", |l| 2 * channels.div_ceil(l) + 64)?;
        let vw = self.view(weight, 0..channels);
        let vdw = self.view(dweight, 0..channels);
        // The weight gradient walks a window's rows in one loop.
        for r in row_chunks(
            rows,
            &[channels, 1],
            self.max_binding_elems,
            MAX_LOOP_ITERATIONS,
        )? {
            let cr = r.start * channels..r.end * channels;
            let vdi = self.view(dinp, cr.clone());
            let vd = self.view(dout, cr.clone());
            let vi = self.view(inp, cr);
            let vs = self.view(rstd, r.clone());
            let params = [
                u(r.len())?,
                u(channels)?,
                vdi.base,
                vs.base,
                vi.base,
                vw.base,
                vd.base,
                0,
            ];
            self.dispatch_rows(
                Kernel::RmsnormBackward,
                lanes,
                &params,
                &[(1, &vdi), (2, &vs), (3, &vi), (4, &vw), (5, &vd)],
                self.row_grid(r.len(), lanes)?,
            )?;
            let params = [
                u(r.len())?,
                u(channels)?,
                vdw.base,
                vs.base,
                vi.base,
                0,
                vd.base,
                0,
            ];
            self.dispatch(
                Kernel::RmsnormParamBackward,
                &params,
                &[(1, &vdw), (2, &vs), (3, &vi), (5, &vd)],
                (column_groups, 1),
            )?;
        }
        Ok(())
    }

    pub(crate) fn rope_kernel(
        &self,
        out: &WgpuBuffer,
        inp: &WgpuBuffer,
        shape: Rope,
    ) -> Result<()> {
        let d = shape.head_dim;
        let width = shape.heads * d;
        let tokens = shape.batch * shape.seq;
        need(inp, tokens * width, DType::F32, "rotary embedding input")?;
        need(out, tokens * width, DType::F32, "rotary embedding output")?;
        if tokens == 0 || width == 0 {
            return Ok(());
        }
        // A few kilobytes for the call (beyond what the reference backend allocates).
        let cos_sin = shape.cos_sin();
        let table = self.create(
            cos_sin.len(),
            DType::F32,
            Some(bytemuck::cast_slice(&cos_sin)),
        )?;
        let vt = self.view(&table, 0..table.len);
        let sign: f32 = if shape.inverse { -1.0 } else { 1.0 };
        for r in row_chunks(tokens, &[width], self.max_binding_elems, usize::MAX)? {
            let er = r.start * width..r.end * width;
            let vo = self.view(out, er.clone());
            let vi = self.view(inp, er);
            let params = [
                u(r.len() * width)?,
                vo.base,
                vi.base,
                vt.base,
                u(width)?,
                u(d)?,
                u(shape.seq)?,
                u(r.start)?,
                sign.to_bits(),
            ];
            let grid = self.grid((r.len() * width).div_ceil(ELEMENTWISE_WG))?;
            self.dispatch(Kernel::Rope, &params, &[(1, &vo), (2, &vi), (3, &vt)], grid)?;
        }
        Ok(())
    }

    pub(crate) fn swiglu_forward_kernel(
        &self,
        out: &WgpuBuffer,
        gate: &WgpuBuffer,
        up: &WgpuBuffer,
    ) -> Result<()> {
        same_len(
            out.len,
            &[
                (out, "swiglu output"),
                (gate, "swiglu gate"),
                (up, "swiglu up"),
            ],
        )?;
        self.map_kernel(Kernel::SwigluForward, out, &[gate, up], &[])
    }

    pub(crate) fn swiglu_backward_kernel(
        &self,
        dgate: &WgpuBuffer,
        dup: &WgpuBuffer,
        gate: &WgpuBuffer,
        up: &WgpuBuffer,
        dout: &WgpuBuffer,
    ) -> Result<()> {
        same_len(
            gate.len,
            &[
                (dgate, "swiglu gate gradient"),
                (dup, "swiglu up gradient"),
                (gate, "swiglu gate"),
                (up, "swiglu up"),
                (dout, "swiglu output gradient"),
            ],
        )?;
        self.map_kernel(Kernel::SwigluBackwardGate, dgate, &[gate, up, dout], &[])?;
        self.map_kernel(Kernel::SwigluBackwardUp, dup, &[gate, dout], &[])
    }

    /// Grouped-query packing (`shaders/grouped_query.wgsl`), one window of rows at a time.
    pub(crate) fn pack_qkv_kernel(
        &self,
        qkv: &WgpuBuffer,
        q: &WgpuBuffer,
        k: &WgpuBuffer,
        v: &WgpuBuffer,
        shape: Heads,
    ) -> Result<()> {
        for buf in [qkv, q, k, v] {
            need(buf, buf.len, DType::F32, "grouped-query operand")?;
        }
        let (qw, kw) = (
            shape.heads * shape.head_dim,
            shape.kv_heads * shape.head_dim,
        );
        let group = shape.heads / shape.kv_heads;
        for r in row_chunks(
            shape.rows,
            &[3 * qw, qw, kw],
            self.max_binding_elems,
            usize::MAX,
        )? {
            let vo = self.view(qkv, r.start * 3 * qw..r.end * 3 * qw);
            let vq = self.view(q, r.start * qw..r.end * qw);
            let vk = self.view(k, r.start * kw..r.end * kw);
            let vv = self.view(v, r.start * kw..r.end * kw);
            let n = r.len() * 3 * qw;
            let params = [
                u(n)?,
                vo.base,
                vq.base,
                vk.base,
                vv.base,
                u(qw)?,
                u(kw)?,
                u(shape.head_dim)?,
                u(group)?,
                0,
            ];
            let grid = self.grid(n.div_ceil(ELEMENTWISE_WG))?;
            self.dispatch(
                Kernel::PackQkv,
                &params,
                &[(1, &vo), (2, &vq), (3, &vk), (4, &vv)],
                grid,
            )?;
        }
        Ok(())
    }

    /// [`Self::pack_qkv_kernel`]'s gradient: dq copied, dk and dv summed over each group.
    pub(crate) fn unpack_qkv_grad_kernel(
        &self,
        dq: &WgpuBuffer,
        dk: &WgpuBuffer,
        dv: &WgpuBuffer,
        dqkv: &WgpuBuffer,
        shape: Heads,
    ) -> Result<()> {
        for buf in [dq, dk, dv, dqkv] {
            need(buf, buf.len, DType::F32, "grouped-query operand")?;
        }
        let (qw, kw) = (
            shape.heads * shape.head_dim,
            shape.kv_heads * shape.head_dim,
        );
        let group = shape.heads / shape.kv_heads;
        for r in row_chunks(
            shape.rows,
            &[3 * qw, qw],
            self.max_binding_elems,
            usize::MAX,
        )? {
            let vg = self.view(dqkv, r.start * 3 * qw..r.end * 3 * qw);
            let outputs = [
                (Kernel::UnpackDq, dq, qw, 0),
                (Kernel::UnpackDkv, dk, kw, 1),
                (Kernel::UnpackDkv, dv, kw, 2),
            ];
            for (kernel, out, width, part) in outputs {
                let vo = self.view(out, r.start * width..r.end * width);
                let n = r.len() * width;
                let params = [
                    u(n)?,
                    vo.base,
                    vg.base,
                    0,
                    0,
                    u(qw)?,
                    u(kw)?,
                    u(shape.head_dim)?,
                    u(group)?,
                    part,
                ];
                let grid = self.grid(n.div_ceil(ELEMENTWISE_WG))?;
                self.dispatch(kernel, &params, &[(1, &vo), (2, &vg)], grid)?;
            }
        }
        Ok(())
    }
}

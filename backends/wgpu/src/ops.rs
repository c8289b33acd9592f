//! `Backend` for [`WgpuBackend`]: size checks, cutting into binding windows, and dispatches.

use anyhow::{bail, Result};
use pipit_engine::backend::{check, fused};
use pipit_engine::backend::{
    AdamW, Attention, Backend, CachedAttention, DType, Heads, Matmul, MemoryStats, Rope,
};
use wgpu::util::DeviceExt;

use crate::buffer::WgpuBuffer;
use crate::context::{View, WgpuBackend};
use crate::kernels::Kernel;
use crate::split::{largest_fitting, matmul_pieces, row_chunks, MAX_LOOP_ITERATIONS};
use crate::timing::WgpuMark;

/// Invocations per workgroup of the one-element-per-invocation kernels.
pub(crate) const ELEMENTWISE_WG: usize = 256;
/// Elements one invocation of `chunk_sums` adds up (`CHUNK` in shaders/elementwise.wgsl).
const CHUNK_SUMS: usize = 64;
/// Output tile edge of the matmul kernel.
const MATMUL_TILE: usize = 64;
/// Products of at most this many rows run one invocation per output element
/// (`matmul_rows`) rather than in 64×64 tiles.
const FEW_ROWS: usize = 4;
/// Columns per workgroup of the column-sum kernels (bias and layernorm parameter gradients).
pub(crate) const COLUMN_WG: usize = 64;
/// Invocations per workgroup of the embedding table gradient (one per channel).
const CHANNEL_WG: usize = 64;

/// Errors unless `buf` holds `dtype`.
fn need_dtype(buf: &WgpuBuffer, dtype: DType, what: &str) -> Result<()> {
    check::dtype(what, buf.dtype, dtype)
}

/// Errors unless `buf` holds `dtype` and exactly `elems` elements.
pub(crate) fn need(buf: &WgpuBuffer, elems: usize, dtype: DType, what: &str) -> Result<()> {
    check::buffer(what, buf.len, buf.dtype, elems, dtype)
}

/// Errors unless `table` is an f32 table of whole rows of `channels`, with at least `rows`.
fn need_table(table: &WgpuBuffer, channels: usize, rows: usize, what: &str) -> Result<()> {
    need_dtype(table, DType::F32, what)?;
    if channels == 0 {
        bail!("embedding needs at least one channel");
    }
    if table.len % channels != 0 || table.len / channels < rows {
        bail!(
            "{what} holds {} elements: not at least {rows} whole rows of {channels} channels",
            table.len
        );
    }
    Ok(())
}

/// Errors unless every buffer is f32 with exactly `len` elements.
pub(crate) fn same_len(len: usize, bufs: &[(&WgpuBuffer, &str)]) -> Result<()> {
    for (b, what) in bufs {
        if b.dtype != DType::F32 {
            bail!("{what} must be an F32 buffer, got {:?}", b.dtype);
        }
        if b.len != len {
            bail!(
                "{what} holds {} elements, expected {len} (same length)",
                b.len
            );
        }
    }
    Ok(())
}

/// `x` as a kernel parameter; sizes inside one binding window always fit.
pub(crate) fn u(x: usize) -> Result<u32> {
    u32::try_from(x).map_err(|_| anyhow::anyhow!("size {x} does not fit a 32-bit kernel index"))
}

impl WgpuBackend {
    /// The grid of a row kernel over `rows` rows with `lanes` invocations per row.
    pub(crate) fn row_grid(&self, rows: usize, lanes: u32) -> Result<(u32, u32)> {
        self.grid(rows.div_ceil((64 / lanes) as usize))
    }

    /// Invocations per row for a row kernel: the profile's choice, doubled while one
    /// invocation would run more than [`MAX_LOOP_ITERATIONS`] loop iterations (`iterations`
    /// estimates them for a given number of lanes).
    pub(crate) fn lanes_for(&self, what: &str, iterations: impl Fn(usize) -> usize) -> Result<u32> {
        let mut lanes = self.lanes;
        while iterations(lanes as usize) > MAX_LOOP_ITERATIONS {
            if lanes >= 64 {
                bail!("{what}: a row is too long for one workgroup on this device");
            }
            lanes *= 2;
        }
        Ok(lanes)
    }

    /// One-element-per-invocation kernel over `n` elements: `out` at binding 1, `inputs` at
    /// bindings 2, 3, ...; the parameter block is (n, bases..., extra...).
    pub(crate) fn map_kernel(
        &self,
        kernel: Kernel,
        out: &WgpuBuffer,
        inputs: &[&WgpuBuffer],
        extra: &[u32],
    ) -> Result<()> {
        let n = out.len;
        for r in row_chunks(n, &[1], self.max_binding_elems, usize::MAX)? {
            let vo = self.view(out, r.clone());
            let vins: Vec<View> = inputs.iter().map(|b| self.view(b, r.clone())).collect();
            let mut params = vec![u(r.len())?, vo.base];
            params.extend(vins.iter().map(|v| v.base));
            // Kernels with fewer inputs than parameter slots read zero bases.
            params.resize(4, 0);
            params.extend_from_slice(extra);
            let mut bindings = vec![(1, &vo)];
            bindings.extend(vins.iter().enumerate().map(|(i, v)| (2 + i as u32, v)));
            let grid = self.grid(r.len().div_ceil(ELEMENTWISE_WG))?;
            self.dispatch(kernel, &params, &bindings, grid)?;
        }
        Ok(())
    }
}

impl Backend for WgpuBackend {
    type Buffer = WgpuBuffer;
    type Mark = WgpuMark;

    fn describe(&self) -> String {
        self.description()
    }

    fn alloc(&self, len: usize, dtype: DType) -> Result<WgpuBuffer> {
        if dtype == DType::BF16 {
            bail!(
                "the wgpu backend computes in f32 only; bf16 needs the CUDA or reference backend"
            );
        }
        self.create(len, dtype, None)
    }

    fn upload(&self, data: &[f32]) -> Result<WgpuBuffer> {
        self.create(data.len(), DType::F32, Some(bytemuck::cast_slice(data)))
    }

    fn upload_u32(&self, data: &[u32]) -> Result<WgpuBuffer> {
        self.create(data.len(), DType::U32, Some(bytemuck::cast_slice(data)))
    }

    fn write(&self, buf: &mut WgpuBuffer, data: &[f32]) -> Result<()> {
        same_len(data.len(), &[(buf, "write target")])?;
        if data.is_empty() {
            return Ok(());
        }
        // Staged through a copy in the command stream, so the write lands after the ops
        // already recorded and before the ones that follow.
        let staging = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("upload"),
                contents: bytemuck::cast_slice(data),
                usage: wgpu::BufferUsages::COPY_SRC,
            });
        let size = (data.len() * 4) as u64;
        self.record(|enc| enc.copy_buffer_to_buffer(&staging, 0, &buf.buffer, 0, size))
    }

    fn download(&self, buf: &WgpuBuffer) -> Result<Vec<f32>> {
        need_dtype(buf, DType::F32, "downloaded buffer")?;
        self.read_words(buf)
    }

    fn len(&self, buf: &WgpuBuffer) -> usize {
        buf.len
    }

    fn dtype(&self, buf: &WgpuBuffer) -> DType {
        buf.dtype
    }

    fn fill(&self, buf: &mut WgpuBuffer, value: f32) -> Result<()> {
        need_dtype(buf, DType::F32, "filled buffer")?;
        if buf.len == 0 {
            return Ok(());
        }
        if value.to_bits() == 0 {
            let size = (buf.len * 4) as u64;
            return self.record(|enc| enc.clear_buffer(&buf.buffer, 0, Some(size)));
        }
        self.map_kernel(Kernel::Fill, buf, &[], &[value.to_bits()])
    }

    fn copy(&self, dst: &mut WgpuBuffer, src: &WgpuBuffer) -> Result<()> {
        if dst.dtype != src.dtype || dst.len != src.len {
            bail!(
                "copy needs equal buffers: destination {} × {:?}, source {} × {:?}",
                dst.len,
                dst.dtype,
                src.len,
                src.dtype
            );
        }
        if src.len == 0 {
            return Ok(());
        }
        let size = (src.len * src.dtype.size()) as u64;
        self.record(|enc| enc.copy_buffer_to_buffer(&src.buffer, 0, &dst.buffer, 0, size))
    }

    fn copy_range(
        &self,
        dst: &mut WgpuBuffer,
        dst_start: usize,
        src: &WgpuBuffer,
        src_start: usize,
        len: usize,
    ) -> Result<()> {
        pipit_engine::backend::fused::check_copy_range(self, dst, dst_start, src, src_start, len)?;
        if len == 0 {
            return Ok(());
        }
        // f32 elements: offsets and size are multiples of the 4 bytes copies align to.
        let at = |i: usize| (i * 4) as u64;
        self.record(|enc| {
            enc.copy_buffer_to_buffer(
                &src.buffer,
                at(src_start),
                &dst.buffer,
                at(dst_start),
                at(len),
            )
        })
    }

    fn add(&self, out: &mut WgpuBuffer, a: &WgpuBuffer, b: &WgpuBuffer) -> Result<()> {
        same_len(
            out.len,
            &[(out, "add output"), (a, "add input a"), (b, "add input b")],
        )?;
        self.map_kernel(Kernel::Add, out, &[a, b], &[])
    }

    fn add_assign(&self, acc: &mut WgpuBuffer, x: &WgpuBuffer) -> Result<()> {
        same_len(acc.len, &[(acc, "accumulator"), (x, "added buffer")])?;
        self.map_kernel(Kernel::AddAssign, acc, &[x], &[])
    }

    fn sum_squares(&self, out: &mut WgpuBuffer, slot: usize, x: &WgpuBuffer) -> Result<()> {
        need_dtype(out, DType::F32, "sums of squares")?;
        need_dtype(x, DType::F32, "sum of squares input")?;
        if slot >= out.len {
            bail!("sum of squares into slot {slot} of a buffer of {}", out.len);
        }
        if x.len == 0 {
            let target = self.view(out, slot..slot + 1);
            let params = [1, target.base, 0, 0, 0f32.to_bits()];
            return self.dispatch(Kernel::Fill, &params, &[(1, &target)], (1, 1));
        }
        // Chunks of CHUNK_SUMS elements, squared and summed, then the partial sums summed the
        // same way until one chunk is left, which lands in out[slot].
        let mut partial: Option<WgpuBuffer> = None;
        let (mut n, mut square) = (x.len, true);
        loop {
            let src = partial.as_ref().unwrap_or(x);
            let chunks = n.div_ceil(CHUNK_SUMS);
            let next = (chunks > 1)
                .then(|| self.alloc_output(chunks, DType::F32))
                .transpose()?;
            let windows = row_chunks(chunks, &[CHUNK_SUMS, 1], self.max_binding_elems, usize::MAX)?;
            for r in windows {
                let elems = r.start * CHUNK_SUMS..(r.end * CHUNK_SUMS).min(n);
                let va = self.view(src, elems.clone());
                let vo = match &next {
                    Some(buf) => self.view(buf, r.clone()),
                    None => self.view(out, slot..slot + 1),
                };
                let mode = if square { 1f32 } else { 0f32 };
                let params = [u(elems.len())?, vo.base, va.base, 0, mode.to_bits()];
                let grid = self.grid(r.len().div_ceil(ELEMENTWISE_WG))?;
                self.dispatch(Kernel::ChunkSums, &params, &[(1, &vo), (2, &va)], grid)?;
            }
            match next {
                Some(buf) => (partial, n, square) = (Some(buf), chunks, false),
                None => return Ok(()),
            }
        }
    }

    fn embedding_forward_at(
        &self,
        out: &mut WgpuBuffer,
        tokens: &WgpuBuffer,
        wte: &WgpuBuffer,
        wpe: &WgpuBuffer,
        batch: usize,
        seq: usize,
        start: usize,
        channels: usize,
    ) -> Result<()> {
        let (bt, btc, tc) = (batch * seq, batch * seq * channels, seq * channels);
        need(out, btc, DType::F32, "embedding output")?;
        need(tokens, bt, DType::U32, "tokens")?;
        need_table(wte, channels, 0, "wte")?;
        need_table(wpe, channels, start + seq, "wpe")?;
        if btc == 0 {
            return Ok(());
        }
        let max = self.max_binding_elems;
        let vocab_chunks = embedding_vocab_chunks(wte.len / channels, channels, max)?;
        row_chunks(1, &[tc], max, usize::MAX)?;
        for bc in row_chunks(batch, &[tc, seq], max, usize::MAX)? {
            let positions = bc.len() * seq;
            let vo = self.view(out, bc.start * tc..bc.end * tc);
            let vt = self.view(tokens, bc.start * seq..bc.end * seq);
            // Positions start.. of the table, seen by the kernel as positions 0..
            let vp = self.view(wpe, start * channels..start * channels + tc);
            for (i, vc) in vocab_chunks.iter().enumerate() {
                let vw = self.view(wte, vc.start * channels..vc.end * channels);
                let params = [
                    u(positions)?,
                    u(seq)?,
                    u(channels)?,
                    u(vc.start)?,
                    u(vc.end)?,
                    u32::from(i == 0),
                    vo.base,
                    vt.base,
                    vw.base,
                    vp.base,
                    0,
                ];
                let grid = self.grid((positions * channels).div_ceil(ELEMENTWISE_WG))?;
                self.dispatch(
                    Kernel::EmbeddingForward,
                    &params,
                    &[(1, &vo), (2, &vt), (3, &vw), (4, &vp)],
                    grid,
                )?;
            }
        }
        Ok(())
    }

    fn embedding_backward(
        &self,
        dwte: &mut WgpuBuffer,
        dwpe: &mut WgpuBuffer,
        dout: &WgpuBuffer,
        tokens: &WgpuBuffer,
        batch: usize,
        seq: usize,
        channels: usize,
    ) -> Result<()> {
        let (bt, btc, tc) = (batch * seq, batch * seq * channels, seq * channels);
        need(dout, btc, DType::F32, "embedding output gradient")?;
        need(tokens, bt, DType::U32, "tokens")?;
        need_table(dwte, channels, 0, "dwte")?;
        need_table(dwpe, channels, seq, "dwpe")?;
        if btc == 0 {
            return Ok(());
        }
        let max = self.max_binding_elems;
        let vocab_chunks = embedding_vocab_chunks(dwte.len / channels, channels, max)?;
        row_chunks(1, &[tc], max, usize::MAX)?;
        let channel_groups = u(channels.div_ceil(CHANNEL_WG))?;
        if channel_groups > self.max_groups {
            bail!("{channels} channels exceed the device's dispatch limit");
        }
        // The table gradient walks a window's positions in one loop.
        if seq > MAX_LOOP_ITERATIONS {
            bail!("embedding backward: {seq} tokens per sequence exceed the device's loop limit");
        }
        for bc in row_chunks(batch, &[tc, seq], max, MAX_LOOP_ITERATIONS / seq)? {
            let positions = bc.len() * seq;
            let vd = self.view(dout, bc.start * tc..bc.end * tc);
            let vt = self.view(tokens, bc.start * seq..bc.end * seq);
            for vc in &vocab_chunks {
                let vw = self.view(dwte, vc.start * channels..vc.end * channels);
                let params = [
                    u(positions)?,
                    u(seq)?,
                    u(channels)?,
                    u(vc.start)?,
                    u(vc.end)?,
                    0,
                    vw.base,
                    vt.base,
                    0,
                    0,
                    vd.base,
                ];
                self.dispatch(
                    Kernel::EmbeddingBackwardWte,
                    &params,
                    &[(1, &vw), (2, &vt), (5, &vd)],
                    (channel_groups, 1),
                )?;
            }
            let vp = self.view(dwpe, 0..tc);
            let params = [
                u(positions)?,
                u(seq)?,
                u(channels)?,
                0,
                0,
                0,
                vp.base,
                0,
                0,
                0,
                vd.base,
            ];
            let grid = self.grid(tc.div_ceil(ELEMENTWISE_WG))?;
            self.dispatch(
                Kernel::EmbeddingBackwardWpe,
                &params,
                &[(1, &vp), (5, &vd)],
                grid,
            )?;
        }
        Ok(())
    }

    fn layernorm_forward(
        &self,
        out: &mut WgpuBuffer,
        mean: &mut WgpuBuffer,
        rstd: &mut WgpuBuffer,
        inp: &WgpuBuffer,
        weight: &WgpuBuffer,
        bias: &WgpuBuffer,
        rows: usize,
        channels: usize,
    ) -> Result<()> {
        let rc = rows * channels;
        need(out, rc, DType::F32, "layernorm output")?;
        need(mean, rows, DType::F32, "layernorm mean")?;
        need(rstd, rows, DType::F32, "layernorm rstd")?;
        need(inp, rc, DType::F32, "layernorm input")?;
        need(weight, channels, DType::F32, "layernorm weight")?;
        need(bias, channels, DType::F32, "layernorm bias")?;
        if channels == 0 {
            bail!("layernorm over zero channels");
        }
        let lanes = self.lanes_for("layernorm", |l| 3 * channels.div_ceil(l) + 64)?;
        let vw = self.view(weight, 0..channels);
        let vb = self.view(bias, 0..channels);
        for r in row_chunks(rows, &[channels, 1], self.max_binding_elems, usize::MAX)? {
            let cr = r.start * channels..r.end * channels;
            let vo = self.view(out, cr.clone());
            let vi = self.view(inp, cr);
            let vm = self.view(mean, r.clone());
            let vs = self.view(rstd, r.clone());
            let params = [
                u(r.len())?,
                u(channels)?,
                vo.base,
                vm.base,
                vs.base,
                vi.base,
                vw.base,
                vb.base,
                0,
            ];
            self.dispatch_rows(
                Kernel::LayernormForward,
                lanes,
                &params,
                &[(1, &vo), (3, &vm), (4, &vs), (5, &vi), (6, &vw), (7, &vb)],
                self.row_grid(r.len(), lanes)?,
            )?;
        }
        Ok(())
    }

    fn layernorm_backward(
        &self,
        dinp: &mut WgpuBuffer,
        dweight: &mut WgpuBuffer,
        dbias: &mut WgpuBuffer,
        dout: &WgpuBuffer,
        inp: &WgpuBuffer,
        weight: &WgpuBuffer,
        mean: &WgpuBuffer,
        rstd: &WgpuBuffer,
        rows: usize,
        channels: usize,
    ) -> Result<()> {
        let rc = rows * channels;
        need(dinp, rc, DType::F32, "layernorm input gradient")?;
        need(dweight, channels, DType::F32, "layernorm weight gradient")?;
        need(dbias, channels, DType::F32, "layernorm bias gradient")?;
        need(dout, rc, DType::F32, "layernorm output gradient")?;
        need(inp, rc, DType::F32, "layernorm input")?;
        need(weight, channels, DType::F32, "layernorm weight")?;
        need(mean, rows, DType::F32, "layernorm mean")?;
        need(rstd, rows, DType::F32, "layernorm rstd")?;
        if channels == 0 {
            bail!("layernorm over zero channels");
        }
        let column_groups = u(channels.div_ceil(COLUMN_WG))?;
        if column_groups > self.max_groups {
            bail!("{channels} channels exceed the device's dispatch limit");
        }
        let lanes = self.lanes_for("layernorm backward", |l| 2 * channels.div_ceil(l) + 64)?;
        let vw = self.view(weight, 0..channels);
        let vdw = self.view(dweight, 0..channels);
        let vdb = self.view(dbias, 0..channels);
        // The parameter gradients walk a window's rows in one loop.
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
            let vm = self.view(mean, r.clone());
            let vs = self.view(rstd, r.clone());
            let params = [
                u(r.len())?,
                u(channels)?,
                vdi.base,
                vm.base,
                vs.base,
                vi.base,
                vw.base,
                0,
                vd.base,
            ];
            self.dispatch_rows(
                Kernel::LayernormBackward,
                lanes,
                &params,
                &[(1, &vdi), (3, &vm), (4, &vs), (5, &vi), (6, &vw), (8, &vd)],
                self.row_grid(r.len(), lanes)?,
            )?;
            let params = [
                u(r.len())?,
                u(channels)?,
                vdw.base,
                vm.base,
                vs.base,
                vi.base,
                0,
                vdb.base,
                vd.base,
            ];
            self.dispatch(
                Kernel::LayernormParamBackward,
                &params,
                &[(1, &vdw), (2, &vdb), (3, &vm), (4, &vs), (5, &vi), (8, &vd)],
                (column_groups, 1),
            )?;
        }
        Ok(())
    }

    fn matmul(
        &self,
        out: &mut WgpuBuffer,
        a: &WgpuBuffer,
        b: &WgpuBuffer,
        bias: Option<&WgpuBuffer>,
        shape: Matmul,
    ) -> Result<()> {
        let Matmul { m, n, k, .. } = shape;
        need(out, m * n, DType::F32, "matmul output")?;
        need(a, m * k, DType::F32, "matmul a")?;
        need(b, k * n, DType::F32, "matmul b")?;
        if let Some(bias) = bias {
            need(bias, n, DType::F32, "matmul bias")?;
        }
        let (trans_a, trans_b) = (shape.trans_a, shape.trans_b);
        let few_rows = m <= FEW_ROWS;
        let kernel = if few_rows {
            Kernel::MatmulRows { trans_a, trans_b }
        } else {
            Kernel::Matmul { trans_a, trans_b }
        };
        let lda = if shape.trans_a { m } else { k };
        let ldb = if shape.trans_b { k } else { n };
        // Elements [first, last] of a `rows × cols` block at (r0, c0) with leading dimension ld.
        let block = |r0: usize, rows: usize, c0: usize, cols: usize, ld: usize| {
            if rows == 0 || cols == 0 {
                0..0
            } else {
                r0 * ld + c0..(r0 + rows - 1) * ld + c0 + cols
            }
        };
        // The tiled kernel loops once per 16 contracted indices, `matmul_rows` once per index;
        // its output elements are spread over a two-dimensional grid.
        let (max_dim, max_k) = if few_rows {
            (usize::MAX, MAX_LOOP_ITERATIONS)
        } else {
            (
                self.max_groups as usize * MATMUL_TILE,
                16 * MAX_LOOP_ITERATIONS,
            )
        };
        for piece in matmul_pieces(&shape, self.max_binding_elems, max_dim, max_k) {
            let (m0, mc) = (piece.m.start, piece.m.len());
            let (n0, nc) = (piece.n.start, piece.n.len());
            let (k0, kc) = (piece.k.start, piece.k.len());
            let vo = self.view(out, block(m0, mc, n0, nc, n));
            let va = if shape.trans_a {
                self.view(a, block(k0, kc, m0, mc, lda))
            } else {
                self.view(a, block(m0, mc, k0, kc, lda))
            };
            let vb = if shape.trans_b {
                self.view(b, block(n0, nc, k0, kc, ldb))
            } else {
                self.view(b, block(k0, kc, n0, nc, ldb))
            };
            // Later pieces of the contraction add to what the first one wrote.
            let first = k0 == 0;
            let with_bias = bias.filter(|_| first);
            let vbias = match with_bias {
                Some(bias) => self.view(bias, n0..n0 + nc),
                None => self.view(out, 0..0),
            };
            let params = [
                u(mc)?,
                u(nc)?,
                u(kc)?,
                u(lda)?,
                u(ldb)?,
                u(n)?,
                va.base,
                vb.base,
                vo.base,
                vbias.base,
                u32::from(shape.accumulate || !first),
                u32::from(with_bias.is_some()),
            ];
            let grid = if few_rows {
                self.grid((mc * nc).div_ceil(64))?
            } else {
                (u(nc.div_ceil(MATMUL_TILE))?, u(mc.div_ceil(MATMUL_TILE))?)
            };
            self.dispatch(
                kernel,
                &params,
                &[(1, &vo), (2, &va), (3, &vb), (4, &vbias)],
                grid,
            )?;
        }
        Ok(())
    }

    fn bias_backward(
        &self,
        dbias: &mut WgpuBuffer,
        dout: &WgpuBuffer,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        need(dbias, cols, DType::F32, "bias gradient")?;
        need(dout, rows * cols, DType::F32, "output gradient")?;
        let groups = u(cols.div_ceil(COLUMN_WG))?;
        if groups > self.max_groups {
            bail!("{cols} columns exceed the device's dispatch limit");
        }
        let vdb = self.view(dbias, 0..cols);
        // One invocation walks a window's rows in one loop.
        for r in row_chunks(rows, &[cols], self.max_binding_elems, MAX_LOOP_ITERATIONS)? {
            let vd = self.view(dout, r.start * cols..r.end * cols);
            let params = [
                u(r.len())?,
                u(cols)?,
                0,
                u(cols)?,
                0,
                0,
                vd.base,
                0,
                vdb.base,
                0,
                0,
                0,
            ];
            self.dispatch(
                Kernel::BiasBackward,
                &params,
                &[(1, &vdb), (2, &vd)],
                (groups, 1),
            )?;
        }
        Ok(())
    }

    fn gelu_forward(&self, out: &mut WgpuBuffer, inp: &WgpuBuffer) -> Result<()> {
        same_len(out.len, &[(out, "gelu output"), (inp, "gelu input")])?;
        self.map_kernel(Kernel::GeluForward, out, &[inp], &[])
    }

    fn gelu_backward(
        &self,
        dinp: &mut WgpuBuffer,
        inp: &WgpuBuffer,
        dout: &WgpuBuffer,
    ) -> Result<()> {
        same_len(
            dinp.len,
            &[
                (dinp, "gelu input gradient"),
                (inp, "gelu input"),
                (dout, "gelu output gradient"),
            ],
        )?;
        self.map_kernel(Kernel::GeluBackward, dinp, &[inp, dout], &[])
    }

    fn rmsnorm_forward(
        &self,
        out: &mut WgpuBuffer,
        rstd: &mut WgpuBuffer,
        inp: &WgpuBuffer,
        weight: &WgpuBuffer,
        rows: usize,
        channels: usize,
        eps: f32,
    ) -> Result<()> {
        fused::check_rmsnorm_forward(self, out, rstd, inp, weight, rows, channels)?;
        self.rmsnorm_forward_kernel(out, rstd, inp, weight, rows, channels, eps)
    }

    fn rmsnorm_backward(
        &self,
        dinp: &mut WgpuBuffer,
        dweight: &mut WgpuBuffer,
        dout: &WgpuBuffer,
        inp: &WgpuBuffer,
        weight: &WgpuBuffer,
        rstd: &WgpuBuffer,
        rows: usize,
        channels: usize,
    ) -> Result<()> {
        fused::check_rmsnorm_backward(
            self, dinp, dweight, dout, inp, weight, rstd, rows, channels,
        )?;
        self.rmsnorm_backward_kernel(dinp, dweight, dout, inp, weight, rstd, rows, channels)
    }

    fn rope(&self, out: &mut WgpuBuffer, inp: &WgpuBuffer, shape: Rope) -> Result<()> {
        fused::check_rope(self, out, inp, &shape)?;
        self.rope_kernel(out, inp, shape)
    }

    fn swiglu_forward(
        &self,
        out: &mut WgpuBuffer,
        gate: &WgpuBuffer,
        up: &WgpuBuffer,
    ) -> Result<()> {
        fused::check_swiglu_forward(self, out, gate, up)?;
        self.swiglu_forward_kernel(out, gate, up)
    }

    fn swiglu_backward(
        &self,
        dgate: &mut WgpuBuffer,
        dup: &mut WgpuBuffer,
        gate: &WgpuBuffer,
        up: &WgpuBuffer,
        dout: &WgpuBuffer,
    ) -> Result<()> {
        fused::check_swiglu_backward(self, dgate, dup, gate, up, dout)?;
        self.swiglu_backward_kernel(dgate, dup, gate, up, dout)
    }

    fn pack_qkv(
        &self,
        qkv: &mut WgpuBuffer,
        q: &WgpuBuffer,
        k: &WgpuBuffer,
        v: &WgpuBuffer,
        shape: Heads,
    ) -> Result<()> {
        fused::check_pack_qkv(self, qkv, q, k, v, &shape)?;
        self.pack_qkv_kernel(qkv, q, k, v, shape)
    }

    fn unpack_qkv_grad(
        &self,
        dq: &mut WgpuBuffer,
        dk: &mut WgpuBuffer,
        dv: &mut WgpuBuffer,
        dqkv: &WgpuBuffer,
        shape: Heads,
    ) -> Result<()> {
        fused::check_unpack_qkv_grad(self, dq, dk, dv, dqkv, &shape)?;
        self.unpack_qkv_grad_kernel(dq, dk, dv, dqkv, shape)
    }

    fn attention_forward(
        &self,
        out: &mut WgpuBuffer,
        att: &mut WgpuBuffer,
        qkv: &WgpuBuffer,
        shape: Attention,
    ) -> Result<()> {
        let plan = AttentionPlan::new(self, shape)?;
        need(
            out,
            plan.b * plan.t * plan.c,
            DType::F32,
            "attention output",
        )?;
        need(
            att,
            plan.units * plan.t * plan.t,
            DType::F32,
            "attention probabilities",
        )?;
        need(qkv, plan.b * plan.t * 3 * plan.c, DType::F32, "qkv")?;
        let lanes = self.lanes_for("attention", |l| plan.loop_iterations(l))?;
        for (u0, u1) in plan.windows() {
            let (b0, b1) = plan.batches(u0, u1);
            let vo = self.view(out, plan.tok_range(b0, b1, 1));
            let va = self.view(att, plan.att_range(u0, u1));
            let vq = self.view(qkv, plan.tok_range(b0, b1, 3));
            let params = plan.params(u0, u1, b0, [vo.base, va.base, vq.base, 0, 0])?;
            self.dispatch_rows(
                Kernel::AttentionForward,
                lanes,
                &params,
                &[(1, &vo), (2, &va), (3, &vq)],
                self.row_grid((u1 - u0) * plan.t, lanes)?,
            )?;
        }
        Ok(())
    }

    fn attention_backward(
        &self,
        dqkv: &mut WgpuBuffer,
        dout: &WgpuBuffer,
        qkv: &WgpuBuffer,
        _out: &WgpuBuffer,
        att: &WgpuBuffer,
        shape: Attention,
    ) -> Result<()> {
        let plan = AttentionPlan::new(self, shape)?;
        let qkv_len = plan.b * plan.t * 3 * plan.c;
        need(dqkv, qkv_len, DType::F32, "qkv gradient")?;
        need(
            dout,
            plan.b * plan.t * plan.c,
            DType::F32,
            "attention output gradient",
        )?;
        need(qkv, qkv_len, DType::F32, "qkv")?;
        need(
            att,
            plan.units * plan.t * plan.t,
            DType::F32,
            "attention probabilities",
        )?;
        if plan.units == 0 || plan.t == 0 {
            return Ok(());
        }
        // D[t] = dout[t]·out[t] per (unit, row) of one window.
        let scratch = self.create(plan.per_window * plan.t, DType::F32, None)?;
        let lanes = self.lanes_for("attention backward", |l| plan.loop_iterations(l))?;
        for (u0, u1) in plan.windows() {
            let (b0, b1) = plan.batches(u0, u1);
            let vdq = self.view(dqkv, plan.tok_range(b0, b1, 3));
            let vd = self.view(dout, plan.tok_range(b0, b1, 1));
            let vq = self.view(qkv, plan.tok_range(b0, b1, 3));
            let va = self.view(att, plan.att_range(u0, u1));
            let vs = self.view(&scratch, 0..(u1 - u0) * plan.t);
            let params = plan.params(u0, u1, b0, [vdq.base, va.base, vq.base, vd.base, vs.base])?;
            let grid = self.row_grid((u1 - u0) * plan.t, lanes)?;
            self.dispatch_rows(
                Kernel::AttentionBackwardD,
                lanes,
                &params,
                &[(3, &vq), (4, &vd), (5, &vs), (6, &va)],
                grid,
            )?;
            for kernel in [Kernel::AttentionBackwardDq, Kernel::AttentionBackwardDkv] {
                self.dispatch_rows(
                    kernel,
                    lanes,
                    &params,
                    &[(1, &vdq), (3, &vq), (4, &vd), (5, &vs), (6, &va)],
                    grid,
                )?;
            }
        }
        Ok(())
    }

    fn attention_decode(
        &self,
        out: &mut WgpuBuffer,
        cache: &mut WgpuBuffer,
        qkv: &WgpuBuffer,
        shape: CachedAttention,
    ) -> Result<()> {
        shape.check()?;
        let (b, new, c) = (shape.batch, shape.new, shape.channels);
        need(out, b * new * c, DType::F32, "attention output")?;
        need(qkv, b * new * 3 * c, DType::F32, "qkv")?;
        need(cache, shape.cache_len()?, DType::F32, "key/value cache")?;
        let units = b * shape.heads;
        let scores = units * new * shape.capacity;
        let max = self.max_binding_elems;
        if cache.len > max || qkv.len > max || scores > max {
            bail!(
                "cached attention over {b} sequences of {} positions exceeds one storage \
                 binding of {max} elements; decode fewer sequences at once",
                shape.capacity
            );
        }
        if units == 0 || new == 0 {
            return Ok(());
        }
        let head_size = c / shape.heads;
        let params = |units: usize, bases: [u32; 4]| -> Result<[u32; 16]> {
            let scale = 1.0 / (head_size as f32).sqrt();
            Ok([
                u(units)?,
                u(new)?,
                u(c)?,
                u(shape.heads)?,
                u(head_size)?,
                0,
                0,
                bases[0],
                0,
                bases[1],
                0,
                bases[2],
                scale.to_bits(),
                u(shape.past)?,
                u(shape.capacity)?,
                bases[3],
            ])
        };
        let vq = self.view(qkv, 0..qkv.len);
        let vc = self.view(cache, 0..cache.len);
        let write = params(b, [vc.base, vq.base, 0, 0])?;
        let grid = self.grid((b * new * 2 * c).div_ceil(64))?;
        self.dispatch(Kernel::KvCacheWrite, &write, &[(1, &vc), (3, &vq)], grid)?;
        let scratch = self.create(scores, DType::F32, None)?;
        let vs = self.view(&scratch, 0..scores);
        let vo = self.view(out, 0..out.len);
        let attend = params(units, [vo.base, vq.base, vs.base, vc.base])?;
        let positions = shape.past + new;
        let lanes = self.lanes_for("cached attention", |l| {
            attention_loop_iterations(positions, head_size, l)
        })?;
        self.dispatch_rows(
            Kernel::AttentionDecode,
            lanes,
            &attend,
            &[(1, &vo), (3, &vq), (5, &vs), (6, &vc)],
            self.row_grid(units * new, lanes)?,
        )?;
        Ok(())
    }

    fn cross_entropy_forward(
        &self,
        losses: &mut WgpuBuffer,
        logits: &WgpuBuffer,
        targets: &WgpuBuffer,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        need(losses, rows, DType::F32, "losses")?;
        self.cross_entropy(
            Kernel::CrossEntropyForward,
            losses,
            logits,
            targets,
            0.0,
            rows,
            vocab,
        )
    }

    fn cross_entropy_backward(
        &self,
        dlogits: &mut WgpuBuffer,
        logits: &WgpuBuffer,
        targets: &WgpuBuffer,
        scale: f32,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        need(dlogits, rows * vocab, DType::F32, "logits gradient")?;
        self.cross_entropy(
            Kernel::CrossEntropyBackward,
            dlogits,
            logits,
            targets,
            scale,
            rows,
            vocab,
        )
    }

    fn adamw(
        &self,
        param: &mut WgpuBuffer,
        grad: &WgpuBuffer,
        m: &mut WgpuBuffer,
        v: &mut WgpuBuffer,
        hp: AdamW,
    ) -> Result<()> {
        same_len(
            param.len,
            &[
                (param, "parameter"),
                (grad, "gradient"),
                (m, "first moment"),
                (v, "second moment"),
            ],
        )?;
        if hp.step == 0 {
            bail!("AdamW steps count from 1 (bias correction), got step 0");
        }
        let bc1 = 1.0 - f64::from(hp.beta1).powi(hp.step as i32);
        let bc2 = 1.0 - f64::from(hp.beta2).powi(hp.step as i32);
        let n = param.len;
        for r in row_chunks(n, &[1], self.max_binding_elems, usize::MAX)? {
            let vp = self.view(param, r.clone());
            let vg = self.view(grad, r.clone());
            let vm = self.view(m, r.clone());
            let vv = self.view(v, r.clone());
            let params = [
                u(r.len())?,
                vp.base,
                vg.base,
                vm.base,
                vv.base,
                hp.lr.to_bits(),
                hp.beta1.to_bits(),
                hp.beta2.to_bits(),
                hp.eps.to_bits(),
                hp.weight_decay.to_bits(),
                (bc1 as f32).to_bits(),
                (bc2 as f32).to_bits(),
                hp.grad_scale.to_bits(),
            ];
            self.dispatch(
                Kernel::AdamW,
                &params,
                &[(1, &vp), (2, &vg), (3, &vm), (4, &vv)],
                self.grid(r.len().div_ceil(ELEMENTWISE_WG))?,
            )?;
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        self.wait()
    }

    /// A device timestamp written after the work recorded so far, without waiting; where the
    /// adapter cannot write timestamps inside command encoders (or `PIPIT_WGPU_HOST_TIMING`
    /// is set), the host clock once the queue is idle.
    fn mark(&self) -> Result<WgpuMark> {
        self.timing_mark()
    }

    fn elapsed_ms(&self, start: &WgpuMark, end: &WgpuMark) -> Result<f64> {
        self.timing_elapsed_ms(start, end)
    }

    fn memory(&self) -> MemoryStats {
        self.memory.stats()
    }

    fn reset_peak_memory(&self) {
        self.memory.reset_peak();
    }
}

impl WgpuBackend {
    /// Cross-entropy forward (`out` = losses) or backward (`out` = dlogits), row windows.
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy(
        &self,
        kernel: Kernel,
        out: &WgpuBuffer,
        logits: &WgpuBuffer,
        targets: &WgpuBuffer,
        scale: f32,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        need(logits, rows * vocab, DType::F32, "logits")?;
        need(targets, rows, DType::U32, "targets")?;
        let out_per_row = if kernel == Kernel::CrossEntropyForward {
            1
        } else {
            vocab
        };
        let lanes = self.lanes_for("cross-entropy", |l| 2 * vocab.div_ceil(l) + 64)?;
        for r in row_chunks(rows, &[vocab, 1], self.max_binding_elems, usize::MAX)? {
            let vo = self.view(out, r.start * out_per_row..r.end * out_per_row);
            let vl = self.view(logits, r.start * vocab..r.end * vocab);
            let vt = self.view(targets, r.clone());
            let params = [
                u(r.len())?,
                u(vocab)?,
                vo.base,
                vl.base,
                vt.base,
                scale.to_bits(),
            ];
            self.dispatch_rows(
                kernel,
                lanes,
                &params,
                &[(1, &vo), (2, &vl), (3, &vt)],
                self.row_grid(r.len(), lanes)?,
            )?;
        }
        Ok(())
    }
}

/// Row ranges of the token table per binding window; at least one (possibly empty) window so
/// the forward pass still writes the position embedding.
fn embedding_vocab_chunks(
    vocab: usize,
    channels: usize,
    max: usize,
) -> Result<Vec<std::ops::Range<usize>>> {
    if channels == 0 {
        bail!("embedding with zero channels");
    }
    let mut chunks = row_chunks(vocab, &[channels], max, usize::MAX)?;
    if chunks.is_empty() {
        chunks.push(0..0);
    }
    Ok(chunks)
}

/// A bound on the loop iterations of one attention invocation over rows of `positions` keys
/// with `lanes` per row: the walk over the row's positions, each with dot products and
/// accumulator updates over head dimensions (64 at a time), plus the fixed loops that combine
/// lanes.
fn attention_loop_iterations(positions: usize, head_size: usize, lanes: usize) -> usize {
    let hs = head_size;
    positions.div_ceil(lanes) * (hs + 2 * hs.min(64) + 8) * hs.div_ceil(64) + 256
}

/// How an attention call is cut into windows of (sequence, head) units.
struct AttentionPlan {
    b: usize,
    t: usize,
    c: usize,
    heads: usize,
    head_size: usize,
    units: usize,
    /// Units per window.
    per_window: usize,
}

impl AttentionPlan {
    fn new(backend: &WgpuBackend, s: Attention) -> Result<Self> {
        if s.heads == 0 || s.channels % s.heads != 0 {
            bail!(
                "attention needs channels divisible by heads, got {} channels and {} heads",
                s.channels,
                s.heads
            );
        }
        let units = s.batch * s.heads;
        let (t, c, max) = (s.seq, s.channels, backend.max_binding_elems);
        let heads = s.heads;
        // Exactly the windows `windows()` will produce for `n` units each.
        let per_window = largest_fitting(units, "attention head", |n| {
            let seqs = (0..units)
                .step_by(n)
                .map(|u0| ((u0 + n).min(units) - 1) / heads + 1 - u0 / heads)
                .max()
                .unwrap_or(0);
            n * t * t <= max && seqs * t * 3 * c <= max
        })?;
        Ok(Self {
            b: s.batch,
            t,
            c,
            heads: s.heads,
            head_size: c / s.heads,
            units,
            per_window,
        })
    }

    /// [`attention_loop_iterations`] for this call's rows.
    fn loop_iterations(&self, lanes: usize) -> usize {
        attention_loop_iterations(self.t, self.head_size, lanes)
    }

    fn windows(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.units)
            .step_by(self.per_window)
            .map(|u0| (u0, (u0 + self.per_window).min(self.units)))
    }

    /// Sequences [b0, b1) that units [u0, u1) belong to.
    fn batches(&self, u0: usize, u1: usize) -> (usize, usize) {
        (u0 / self.heads, (u1 - 1) / self.heads + 1)
    }

    /// Elements of sequences [b0, b1) of a `[B, T, width·C]` tensor.
    fn tok_range(&self, b0: usize, b1: usize, width: usize) -> std::ops::Range<usize> {
        let row = self.t * width * self.c;
        b0 * row..b1 * row
    }

    fn att_range(&self, u0: usize, u1: usize) -> std::ops::Range<usize> {
        u0 * self.t * self.t..u1 * self.t * self.t
    }

    /// The kernel parameters; `bases` are (out, att, qkv, dout, scratch).
    fn params(&self, u0: usize, u1: usize, b0: usize, bases: [u32; 5]) -> Result<[u32; 13]> {
        let scale = 1.0 / (self.head_size as f32).sqrt();
        Ok([
            u(u1 - u0)?,
            u(self.t)?,
            u(self.c)?,
            u(self.heads)?,
            u(self.head_size)?,
            u(u0)?,
            u(b0)?,
            bases[0],
            bases[1],
            bases[2],
            bases[3],
            bases[4],
            scale.to_bits(),
        ])
    }
}

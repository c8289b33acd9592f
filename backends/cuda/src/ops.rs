//! `Backend` for [`CudaBackend`]: size checks on the host, then kernel launches and cuBLAS
//! calls on the backend's stream.

use anyhow::{bail, Context, Result};
use cudarc::driver::{CudaEvent, LaunchConfig, PushKernelArg};
use pipit_engine::backend::check::{self, elems};
use pipit_engine::backend::{
    fused, round_bf16, AdamW, Attention, Backend, CachedAttention, DType, Heads, Matmul,
    MemoryStats, Rope,
};

use crate::buffer::{CudaBuffer, Data};
use crate::context::{chunk_rows, column_tiles, elementwise, per_row, u32_of, CudaBackend};
use crate::gemm;
use crate::groups::token_groups;
use crate::kernels::ROW_BLOCK;
use crate::profile::timing_event;

/// The most blocks stage 1 of a sum of squares uses: enough to fill an H200 several times
/// over, few enough for one thread to add their partial sums in stage 2.
const SUM_SQUARES_BLOCKS: usize = 1024;

/// Errors unless `buf` holds `dtype`.
pub(crate) fn need_dtype(buf: &CudaBuffer, dtype: DType, what: &str) -> Result<()> {
    check::dtype(what, buf.dtype(), dtype)
}

/// Errors unless `buf` holds `dtype` and exactly `elems` elements.
pub(crate) fn need(buf: &CudaBuffer, elems: usize, dtype: DType, what: &str) -> Result<()> {
    check::buffer(what, buf.len(), buf.dtype(), elems, dtype)
}

/// Errors unless `buf` holds exactly `elems` floats (f32 or bf16); returns their type.
pub(crate) fn need_float(buf: &CudaBuffer, elems: usize, what: &str) -> Result<DType> {
    check::float(what, buf.dtype())?;
    need(buf, elems, buf.dtype(), what)?;
    Ok(buf.dtype())
}

/// Rows of a table of `channels`-wide rows, or an error when it is not whole rows.
fn table_rows(table: &CudaBuffer, channels: usize, what: &str) -> Result<usize> {
    need_dtype(table, DType::F32, what)?;
    if channels == 0 {
        bail!("embedding needs at least one channel");
    }
    if table.len() % channels != 0 {
        bail!(
            "{what} holds {} elements: not whole rows of {channels} channels",
            table.len()
        );
    }
    Ok(table.len() / channels)
}

/// Errors unless every id is below `limit`, naming the first that is not.
fn check_ids(ids: &[u32], limit: usize, what: &str) -> Result<()> {
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= limit) {
        bail!("{what} id {bad} is outside the vocabulary of {limit}");
    }
    Ok(())
}

impl CudaBackend {
    /// `shape` products over `batch` stacked matrices on this backend's stream.
    pub(crate) fn product(
        &self,
        shape: &Matmul,
        batch: usize,
        beta: f32,
        a: &CudaBuffer,
        b: &CudaBuffer,
        out: &mut CudaBuffer,
    ) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .context("making the CUDA context current")?;
        gemm::product(&self.blas, &self.stream, shape, batch, beta, a, b, out)
    }

    /// `dst[col] += Σ_rows x[row, col]` for `x[rows, cols]` (f32 or bf16), in two
    /// deterministic stages.
    fn column_sums(
        &self,
        dst: &mut CudaBuffer,
        x: &CudaBuffer,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let per = chunk_rows(rows);
        let chunks = rows.div_ceil(per);
        let mut partial = self.scratch(chunks * cols, DType::F32)?;
        let (rows32, cols32, per32) = (
            u32_of(rows, "rows")?,
            u32_of(cols, "columns")?,
            u32_of(per, "rows")?,
        );
        launch!(
            self,
            x.dtype() => column_partial_sums | column_partial_sums_bf16,
            column_tiles(cols, chunks)?,
            partial.f32_mut("column partial sums")?,
            x.floats("column sum input")?,
            &rows32,
            &cols32,
            &per32,
        )?;
        self.finish_column_sums(dst, &partial, chunks, cols)
    }

    /// Stage 2 of the column sums: `dst[col] += Σ_chunk partial[chunk, col]`.
    pub(crate) fn finish_column_sums(
        &self,
        dst: &mut CudaBuffer,
        partial: &CudaBuffer,
        chunks: usize,
        cols: usize,
    ) -> Result<()> {
        let (chunks32, cols32) = (u32_of(chunks, "row chunks")?, u32_of(cols, "columns")?);
        launch!(
            self,
            column_sums_finish,
            elementwise(cols),
            dst.f32_mut("column sums")?,
            partial.f32("column partial sums")?,
            &chunks32,
            &cols32,
        )
    }

    /// Cross-entropy's checks: sizes, and every target inside the vocabulary.
    fn check_cross_entropy(
        &self,
        logits: &CudaBuffer,
        targets: &CudaBuffer,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        if vocab == 0 {
            bail!("cross-entropy needs a vocabulary of at least one token");
        }
        need_float(logits, elems(&[rows, vocab])?, "logits")?;
        need(targets, rows, DType::U32, "targets")?;
        check_ids(targets.u32("targets")?.1, vocab, "target")?;
        u32_of(rows, "cross-entropy rows")?;
        u32_of(vocab, "vocabulary size")?;
        Ok(())
    }
}

impl Backend for CudaBackend {
    type Buffer = CudaBuffer;
    type Mark = CudaEvent;

    fn describe(&self) -> String {
        self.description().to_string()
    }

    fn supports(&self, _dtype: DType) -> bool {
        true
    }

    fn memory_space(&self) -> Option<String> {
        // Backends on one device share its primary context; cudarc orders their streams
        // through the events every slice records.
        Some(format!("cuda:{}", self.ctx.ordinal()))
    }

    fn hand_over(&self, buf: &mut CudaBuffer) {
        buf.claim.release();
    }

    fn take_over(&self, buf: &mut CudaBuffer) {
        buf.claim.count_on(&self.meter);
    }

    fn alloc(&self, len: usize, dtype: DType) -> Result<CudaBuffer> {
        self.zeroed(len, dtype)
    }

    fn alloc_output(&self, len: usize, dtype: DType) -> Result<CudaBuffer> {
        self.scratch(len, dtype)
    }

    fn upload(&self, data: &[f32]) -> Result<CudaBuffer> {
        // Timed as the write it is made of.
        let mut buf = self.scratch(data.len(), DType::F32)?;
        self.write(&mut buf, data)?;
        Ok(buf)
    }

    fn upload_u32(&self, data: &[u32]) -> Result<CudaBuffer> {
        let _span = self.span("upload_u32");
        let mut buf = self.zeroed(data.len(), DType::U32)?;
        if let Data::U32 { device, host } = &mut buf.data {
            if !data.is_empty() {
                self.stream
                    .memcpy_htod(data, device)
                    .context("copying token ids to the GPU")?;
            }
            *host = data.into();
        }
        Ok(buf)
    }

    fn write(&self, buf: &mut CudaBuffer, data: &[f32]) -> Result<()> {
        let _span = self.span("write");
        need_float(buf, data.len(), "write target")?;
        if data.is_empty() {
            return Ok(());
        }
        match &mut buf.data {
            Data::F32(d) => self.stream.memcpy_htod(data, d),
            Data::BF16(d) => {
                let bits: Vec<u16> = data
                    .iter()
                    .map(|&x| (round_bf16(x).to_bits() >> 16) as u16)
                    .collect();
                self.stream.memcpy_htod(&bits, d)
            }
            Data::U32 { .. } => unreachable!("need_float refused u32 above"),
        }
        .context("copying to the GPU")
    }

    fn download(&self, buf: &CudaBuffer) -> Result<Vec<f32>> {
        need_float(buf, buf.len(), "downloaded buffer")?;
        let n = buf.len();
        let host = match &buf.data {
            _ if n == 0 => Vec::new(),
            Data::F32(d) => {
                let mut host = vec![0f32; n];
                self.stream
                    .memcpy_dtoh(d, &mut host)
                    .context("copying from the GPU")?;
                host
            }
            Data::BF16(d) => {
                let mut bits = vec![0u16; n];
                self.stream
                    .memcpy_dtoh(d, &mut bits)
                    .context("copying from the GPU")?;
                bits.iter()
                    .map(|&b| f32::from_bits(u32::from(b) << 16))
                    .collect()
            }
            Data::U32 { .. } => unreachable!("need_float refused u32 above"),
        };
        self.synchronize()?;
        Ok(host)
    }

    fn len(&self, buf: &CudaBuffer) -> usize {
        buf.len()
    }

    fn dtype(&self, buf: &CudaBuffer) -> DType {
        buf.dtype()
    }

    fn fill(&self, buf: &mut CudaBuffer, value: f32) -> Result<()> {
        let _span = self.span("fill");
        let n = buf.len();
        let dtype = need_float(buf, n, "filled buffer")?;
        if n == 0 {
            return Ok(());
        }
        if value.to_bits() == 0 {
            return match &mut buf.data {
                Data::F32(d) => self.stream.memset_zeros(d),
                Data::BF16(d) => self.stream.memset_zeros(d),
                Data::U32 { .. } => unreachable!("need_float refused u32 above"),
            }
            .context("zeroing a GPU buffer");
        }
        let n64 = n as u64;
        launch!(
            self,
            dtype => fill_f32 | fill_bf16,
            elementwise(n),
            buf.floats_mut("filled buffer")?,
            &value,
            &n64
        )
    }

    fn copy_range(
        &self,
        dst: &mut CudaBuffer,
        dst_start: usize,
        src: &CudaBuffer,
        src_start: usize,
        len: usize,
    ) -> Result<()> {
        let _span = self.span("copy_range");
        pipit_engine::backend::fused::check_copy_range(self, dst, dst_start, src, src_start, len)?;
        if len == 0 {
            return Ok(());
        }
        match (&mut dst.data, &src.data) {
            (Data::F32(d), Data::F32(s)) => {
                let from = s.slice(src_start..src_start + len);
                let mut to = d.slice_mut(dst_start..dst_start + len);
                self.stream.memcpy_dtod(&from, &mut to)?;
                Ok(())
            }
            _ => bail!("range copy between f32 buffers only"),
        }
    }

    fn copy(&self, dst: &mut CudaBuffer, src: &CudaBuffer) -> Result<()> {
        let _span = self.span("copy");
        let converts =
            dst.dtype() != src.dtype() && dst.dtype().is_float() && src.dtype().is_float();
        if (dst.dtype() != src.dtype() && !converts) || dst.len() != src.len() {
            bail!(
                "copy needs equal buffers: destination {} × {:?}, source {} × {:?}",
                dst.len(),
                dst.dtype(),
                src.len(),
                src.dtype()
            );
        }
        if src.is_empty() {
            return Ok(());
        }
        let n64 = src.len() as u64;
        match (&mut dst.data, &src.data) {
            (Data::F32(d), Data::F32(s)) => self.stream.memcpy_dtod(s, d),
            (Data::BF16(d), Data::BF16(s)) => self.stream.memcpy_dtod(s, d),
            (Data::BF16(d), Data::F32(s)) => {
                return launch!(
                    self,
                    convert_f32_to_bf16,
                    elementwise(src.len()),
                    d,
                    s,
                    &n64
                )
            }
            (Data::F32(d), Data::BF16(s)) => {
                return launch!(
                    self,
                    convert_bf16_to_f32,
                    elementwise(src.len()),
                    d,
                    s,
                    &n64
                )
            }
            (
                Data::U32 {
                    device: d,
                    host: dh,
                },
                Data::U32 {
                    device: s,
                    host: sh,
                },
            ) => {
                *dh = sh.clone();
                self.stream.memcpy_dtod(s, d)
            }
            _ => unreachable!("dtypes were checked above"),
        }
        .context("copying between GPU buffers")
    }

    fn add(&self, out: &mut CudaBuffer, a: &CudaBuffer, b: &CudaBuffer) -> Result<()> {
        let _span = self.span("add");
        let n = out.len();
        need(out, n, DType::F32, "add output")?;
        need(a, n, DType::F32, "add input a")?;
        let b_type = need_float(b, n, "add input b")?;
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        launch!(
            self,
            b_type => add_f32 | add_f32_bf16,
            elementwise(n),
            out.f32_mut("add output")?,
            a.f32("add input a")?,
            b.floats("add input b")?,
            &n64,
        )
    }

    fn add_assign(&self, acc: &mut CudaBuffer, x: &CudaBuffer) -> Result<()> {
        let _span = self.span("add_assign");
        let n = acc.len();
        need(acc, n, DType::F32, "accumulator")?;
        need(x, n, DType::F32, "added buffer")?;
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        launch!(
            self,
            add_assign_f32,
            elementwise(n),
            acc.f32_mut("accumulator")?,
            x.f32("added buffer")?,
            &n64,
        )
    }

    fn embedding_forward_at(
        &self,
        out: &mut CudaBuffer,
        tokens: &CudaBuffer,
        wte: &CudaBuffer,
        wpe: &CudaBuffer,
        batch: usize,
        seq: usize,
        start: usize,
        channels: usize,
    ) -> Result<()> {
        let _span = self.span("embedding_forward");
        let vocab = table_rows(wte, channels, "wte")?;
        let positions = table_rows(wpe, channels, "wpe")?;
        let n = elems(&[batch, seq, channels])?;
        need(out, n, DType::F32, "embedding output")?;
        need(tokens, elems(&[batch, seq])?, DType::U32, "tokens")?;
        if start + seq > positions {
            bail!(
                "positions {start}..{} exceed the {positions} positions of wpe",
                start + seq
            );
        }
        let (dev_tokens, host_tokens) = tokens.u32("tokens")?;
        check_ids(host_tokens, vocab, "token")?;
        if n == 0 {
            return Ok(());
        }
        let (seq32, start32, c32, v32, n64) = (
            u32_of(seq, "sequence length")?,
            u32_of(start, "first position")?,
            u32_of(channels, "channels")?,
            u32_of(vocab, "vocabulary size")?,
            n as u64,
        );
        launch!(
            self,
            embedding_forward,
            elementwise(n),
            out.f32_mut("embedding output")?,
            dev_tokens,
            wte.f32("wte")?,
            wpe.f32("wpe")?,
            &seq32,
            &start32,
            &c32,
            &v32,
            &n64,
        )
    }

    fn embedding_backward(
        &self,
        dwte: &mut CudaBuffer,
        dwpe: &mut CudaBuffer,
        dout: &CudaBuffer,
        tokens: &CudaBuffer,
        batch: usize,
        seq: usize,
        channels: usize,
    ) -> Result<()> {
        let _span = self.span("embedding_backward");
        let vocab = table_rows(dwte, channels, "dwte")?;
        let positions = table_rows(dwpe, channels, "dwpe")?;
        let n = elems(&[batch, seq, channels])?;
        need(dout, n, DType::F32, "embedding output gradient")?;
        need(tokens, elems(&[batch, seq])?, DType::U32, "tokens")?;
        if seq > positions {
            bail!("sequence length {seq} exceeds the {positions} positions of wpe");
        }
        let host_tokens = tokens.u32("tokens")?.1;
        check_ids(host_tokens, vocab, "token")?;
        if n == 0 {
            return Ok(());
        }
        let (b32, seq32, c32) = (
            u32_of(batch, "batch")?,
            u32_of(seq, "sequence length")?,
            u32_of(channels, "channels")?,
        );
        launch!(
            self,
            embedding_backward_wpe,
            elementwise(seq * channels),
            dwpe.f32_mut("dwpe")?,
            dout.f32("embedding output gradient")?,
            &b32,
            &seq32,
            &c32,
        )?;

        let (groups, table) = token_groups(host_tokens)?;
        let table = self.upload_u32(&table)?;
        let blocks_per_group = channels.div_ceil(ROW_BLOCK as usize);
        let blocks = elems(&[groups as usize, blocks_per_group])?;
        let cfg = LaunchConfig {
            grid_dim: (u32_of(blocks, "embedding gradient blocks")?, 1, 1),
            block_dim: (ROW_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            embedding_backward_wte,
            cfg,
            dwte.f32_mut("dwte")?,
            dout.f32("embedding output gradient")?,
            table.u32("token groups")?.0,
            &groups,
            &c32,
        )
    }

    fn layernorm_forward(
        &self,
        out: &mut CudaBuffer,
        mean: &mut CudaBuffer,
        rstd: &mut CudaBuffer,
        inp: &CudaBuffer,
        weight: &CudaBuffer,
        bias: &CudaBuffer,
        rows: usize,
        channels: usize,
    ) -> Result<()> {
        let _span = self.span("layernorm_forward");
        if channels == 0 {
            bail!("layernorm needs at least one channel");
        }
        let n = elems(&[rows, channels])?;
        let out_type = need_float(out, n, "layernorm output")?;
        need(mean, rows, DType::F32, "layernorm mean")?;
        need(rstd, rows, DType::F32, "layernorm rstd")?;
        need(inp, n, DType::F32, "layernorm input")?;
        need(weight, channels, DType::F32, "layernorm weight")?;
        need(bias, channels, DType::F32, "layernorm bias")?;
        if rows == 0 {
            return Ok(());
        }
        let (r32, c32) = (u32_of(rows, "rows")?, u32_of(channels, "channels")?);
        launch!(
            self,
            out_type => layernorm_forward | layernorm_forward_bf16,
            per_row(rows, 0)?,
            out.floats_mut("layernorm output")?,
            mean.f32_mut("layernorm mean")?,
            rstd.f32_mut("layernorm rstd")?,
            inp.f32("layernorm input")?,
            weight.f32("layernorm weight")?,
            bias.f32("layernorm bias")?,
            &r32,
            &c32,
        )
    }

    fn layernorm_backward(
        &self,
        dinp: &mut CudaBuffer,
        dweight: &mut CudaBuffer,
        dbias: &mut CudaBuffer,
        dout: &CudaBuffer,
        inp: &CudaBuffer,
        weight: &CudaBuffer,
        mean: &CudaBuffer,
        rstd: &CudaBuffer,
        rows: usize,
        channels: usize,
    ) -> Result<()> {
        let _span = self.span("layernorm_backward");
        if channels == 0 {
            bail!("layernorm needs at least one channel");
        }
        let n = elems(&[rows, channels])?;
        need(dinp, n, DType::F32, "layernorm input gradient")?;
        need(dweight, channels, DType::F32, "layernorm weight gradient")?;
        need(dbias, channels, DType::F32, "layernorm bias gradient")?;
        let dout_type = need_float(dout, n, "layernorm output gradient")?;
        need(inp, n, DType::F32, "layernorm input")?;
        need(weight, channels, DType::F32, "layernorm weight")?;
        need(mean, rows, DType::F32, "layernorm mean")?;
        need(rstd, rows, DType::F32, "layernorm rstd")?;
        if rows == 0 {
            return Ok(());
        }
        let (r32, c32) = (u32_of(rows, "rows")?, u32_of(channels, "channels")?);
        launch!(
            self,
            dout_type => layernorm_backward | layernorm_backward_bf16,
            per_row(rows, 0)?,
            dinp.f32_mut("layernorm input gradient")?,
            dout.floats("layernorm output gradient")?,
            inp.f32("layernorm input")?,
            weight.f32("layernorm weight")?,
            mean.f32("layernorm mean")?,
            rstd.f32("layernorm rstd")?,
            &r32,
            &c32,
        )?;

        let per = chunk_rows(rows);
        let chunks = rows.div_ceil(per);
        let per32 = u32_of(per, "rows")?;
        let mut partial_w = self.scratch(chunks * channels, DType::F32)?;
        let mut partial_b = self.scratch(chunks * channels, DType::F32)?;
        launch!(
            self,
            dout_type => layernorm_param_partials | layernorm_param_partials_bf16,
            column_tiles(channels, chunks)?,
            partial_w.f32_mut("layernorm weight partial sums")?,
            partial_b.f32_mut("layernorm bias partial sums")?,
            dout.floats("layernorm output gradient")?,
            inp.f32("layernorm input")?,
            mean.f32("layernorm mean")?,
            rstd.f32("layernorm rstd")?,
            &r32,
            &c32,
            &per32,
        )?;
        self.finish_column_sums(dweight, &partial_w, chunks, channels)?;
        self.finish_column_sums(dbias, &partial_b, chunks, channels)
    }

    fn matmul(
        &self,
        out: &mut CudaBuffer,
        a: &CudaBuffer,
        b: &CudaBuffer,
        bias: Option<&CudaBuffer>,
        shape: Matmul,
    ) -> Result<()> {
        let _span = self.span("matmul");
        let Matmul { m, n, k, .. } = shape;
        let out_type = need_float(out, elems(&[m, n])?, "matmul output")?;
        let in_type = need_float(a, elems(&[m, k])?, "matmul a")?;
        need(b, elems(&[k, n])?, in_type, "matmul b")?;
        if in_type == DType::F32 && out_type != DType::F32 {
            bail!("matmul: f32 operands need an f32 output, got {out_type:?}");
        }
        if let Some(bias) = bias {
            need(bias, n, DType::F32, "matmul bias")?;
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        // The bias goes in first; cuBLAS then adds the product to it (beta = 1).
        if let Some(bias) = bias {
            let (n32, acc32, mn) = (
                u32_of(n, "matmul n")?,
                u32::from(shape.accumulate),
                (m * n) as u64,
            );
            launch!(
                self,
                out_type => bias_rows | bias_rows_bf16,
                elementwise(m * n),
                out.floats_mut("matmul output")?,
                bias.f32("matmul bias")?,
                &n32,
                &acc32,
                &mn,
            )?;
        }
        let keep_out = shape.accumulate || bias.is_some();
        if k == 0 {
            // An empty contraction adds nothing; cuBLAS is not asked about it.
            return if keep_out {
                Ok(())
            } else {
                self.fill(out, 0.0)
            };
        }
        self.product(&shape, 1, if keep_out { 1.0 } else { 0.0 }, a, b, out)
    }

    fn bias_backward(
        &self,
        dbias: &mut CudaBuffer,
        dout: &CudaBuffer,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let _span = self.span("bias_backward");
        need(dbias, cols, DType::F32, "bias gradient")?;
        need_float(dout, elems(&[rows, cols])?, "output gradient")?;
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        self.column_sums(dbias, dout, rows, cols)
    }

    fn gelu_forward(&self, out: &mut CudaBuffer, inp: &CudaBuffer) -> Result<()> {
        let _span = self.span("gelu_forward");
        let n = out.len();
        let t = need_float(out, n, "gelu output")?;
        need(inp, n, t, "gelu input")?;
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        launch!(
            self,
            t => gelu_forward | gelu_forward_bf16,
            elementwise(n),
            out.floats_mut("gelu output")?,
            inp.floats("gelu input")?,
            &n64,
        )
    }

    fn gelu_backward(
        &self,
        dinp: &mut CudaBuffer,
        inp: &CudaBuffer,
        dout: &CudaBuffer,
    ) -> Result<()> {
        let _span = self.span("gelu_backward");
        let n = dinp.len();
        let t = need_float(dinp, n, "gelu input gradient")?;
        need(inp, n, t, "gelu input")?;
        need(dout, n, t, "gelu output gradient")?;
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        launch!(
            self,
            t => gelu_backward | gelu_backward_bf16,
            elementwise(n),
            dinp.floats_mut("gelu input gradient")?,
            inp.floats("gelu input")?,
            dout.floats("gelu output gradient")?,
            &n64,
        )
    }

    fn rmsnorm_forward(
        &self,
        out: &mut CudaBuffer,
        rstd: &mut CudaBuffer,
        inp: &CudaBuffer,
        weight: &CudaBuffer,
        rows: usize,
        channels: usize,
        eps: f32,
    ) -> Result<()> {
        fused::check_rmsnorm_forward(self, out, rstd, inp, weight, rows, channels)?;
        self.rmsnorm_forward_kernel(out, rstd, inp, weight, rows, channels, eps)
    }

    fn rmsnorm_backward(
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
        fused::check_rmsnorm_backward(
            self, dinp, dweight, dout, inp, weight, rstd, rows, channels,
        )?;
        self.rmsnorm_backward_kernel(dinp, dweight, dout, inp, weight, rstd, rows, channels)
    }

    fn rope(&self, out: &mut CudaBuffer, inp: &CudaBuffer, shape: Rope) -> Result<()> {
        fused::check_rope(self, out, inp, &shape)?;
        self.rope_kernel(out, inp, shape)
    }

    fn swiglu_forward(
        &self,
        out: &mut CudaBuffer,
        gate: &CudaBuffer,
        up: &CudaBuffer,
    ) -> Result<()> {
        fused::check_swiglu_forward(self, out, gate, up)?;
        self.swiglu_forward_kernel(out, gate, up)
    }

    fn swiglu_backward(
        &self,
        dgate: &mut CudaBuffer,
        dup: &mut CudaBuffer,
        gate: &CudaBuffer,
        up: &CudaBuffer,
        dout: &CudaBuffer,
    ) -> Result<()> {
        fused::check_swiglu_backward(self, dgate, dup, gate, up, dout)?;
        self.swiglu_backward_kernel(dgate, dup, gate, up, dout)
    }

    fn pack_qkv(
        &self,
        qkv: &mut CudaBuffer,
        q: &CudaBuffer,
        k: &CudaBuffer,
        v: &CudaBuffer,
        shape: Heads,
    ) -> Result<()> {
        fused::check_pack_qkv(self, qkv, q, k, v, &shape)?;
        self.pack_qkv_kernel(qkv, q, k, v, shape)
    }

    fn unpack_qkv_grad(
        &self,
        dq: &mut CudaBuffer,
        dk: &mut CudaBuffer,
        dv: &mut CudaBuffer,
        dqkv: &CudaBuffer,
        shape: Heads,
    ) -> Result<()> {
        fused::check_unpack_qkv_grad(self, dq, dk, dv, dqkv, &shape)?;
        self.unpack_qkv_grad_kernel(dq, dk, dv, dqkv, shape)
    }

    fn attention_state(&self, shape: Attention, dtype: DType) -> Result<CudaBuffer> {
        let (_, rows) = self.attention_sizes(shape)?;
        match self.flash_head_size(dtype, shape) {
            Some(_) => self.alloc_output(rows, DType::F32),
            None => self.alloc_output(elems(&[rows, shape.seq])?, dtype),
        }
    }

    fn attention_forward(
        &self,
        out: &mut CudaBuffer,
        att: &mut CudaBuffer,
        qkv: &CudaBuffer,
        shape: Attention,
    ) -> Result<()> {
        let _span = self.span("attention_forward");
        match self.flash_head_size(out.dtype(), shape) {
            Some(hs) => self.flash_forward(out, att, qkv, shape, hs),
            None => self.materialized_forward(out, att, qkv, shape),
        }
    }

    fn attention_backward(
        &self,
        dqkv: &mut CudaBuffer,
        dout: &CudaBuffer,
        qkv: &CudaBuffer,
        out: &CudaBuffer,
        att: &CudaBuffer,
        shape: Attention,
    ) -> Result<()> {
        let _span = self.span("attention_backward");
        match self.flash_head_size(dqkv.dtype(), shape) {
            Some(hs) => self.flash_backward(dqkv, dout, qkv, out, att, shape, hs),
            None => self.materialized_backward(dqkv, dout, qkv, att, shape),
        }
    }

    fn attention_decode(
        &self,
        out: &mut CudaBuffer,
        cache: &mut CudaBuffer,
        qkv: &CudaBuffer,
        shape: CachedAttention,
    ) -> Result<()> {
        let _span = self.span("attention_decode");
        shape.check()?;
        let (b, new, c) = (shape.batch, shape.new, shape.channels);
        need(out, elems(&[b, new, c])?, DType::F32, "attention output")?;
        need(qkv, elems(&[b, new, 3, c])?, DType::F32, "qkv")?;
        need(cache, shape.cache_len()?, DType::F32, "key/value cache")?;
        let rows = elems(&[b, shape.heads, new])?;
        if rows == 0 {
            return Ok(());
        }
        let written = elems(&[b, new, 2, c])?;
        let (written64, rows64) = (written as u64, rows as u64);
        let (new32, past32, cap32, c32, heads32) = (
            u32_of(new, "new tokens")?,
            u32_of(shape.past, "cached tokens")?,
            u32_of(shape.capacity, "cache positions")?,
            u32_of(c, "channels")?,
            u32_of(shape.heads, "heads")?,
        );
        launch!(
            self,
            kv_cache_write,
            elementwise(written),
            cache.f32_mut("key/value cache")?,
            qkv.f32("qkv")?,
            &new32,
            &past32,
            &cap32,
            &c32,
            &written64,
        )?;
        let mut scores = self.scratch(elems(&[rows, shape.capacity])?, DType::F32)?;
        let scale = (1.0 / ((c / shape.heads) as f64).sqrt()) as f32;
        launch!(
            self,
            attention_decode,
            per_row(rows, 0)?,
            out.f32_mut("attention output")?,
            scores.f32_mut("attention scores")?,
            qkv.f32("qkv")?,
            cache.f32("key/value cache")?,
            &new32,
            &past32,
            &cap32,
            &c32,
            &heads32,
            &scale,
            &rows64,
        )
    }

    fn cross_entropy_forward(
        &self,
        losses: &mut CudaBuffer,
        logits: &CudaBuffer,
        targets: &CudaBuffer,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        let _span = self.span("cross_entropy_forward");
        self.check_cross_entropy(logits, targets, rows, vocab)?;
        need(losses, rows, DType::F32, "losses")?;
        if rows == 0 {
            return Ok(());
        }
        let (r32, v32) = (rows as u32, vocab as u32);
        launch!(
            self,
            logits.dtype() => cross_entropy_forward | cross_entropy_forward_bf16,
            per_row(rows, 0)?,
            losses.f32_mut("losses")?,
            logits.floats("logits")?,
            targets.u32("targets")?.0,
            &r32,
            &v32,
        )
    }

    fn cross_entropy_backward(
        &self,
        dlogits: &mut CudaBuffer,
        logits: &CudaBuffer,
        targets: &CudaBuffer,
        scale: f32,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        let _span = self.span("cross_entropy_backward");
        self.check_cross_entropy(logits, targets, rows, vocab)?;
        need(dlogits, rows * vocab, logits.dtype(), "logits gradient")?;
        if rows == 0 {
            return Ok(());
        }
        let (r32, v32) = (rows as u32, vocab as u32);
        launch!(
            self,
            logits.dtype() => cross_entropy_backward | cross_entropy_backward_bf16,
            per_row(rows, 0)?,
            dlogits.floats_mut("logits gradient")?,
            logits.floats("logits")?,
            targets.u32("targets")?.0,
            &scale,
            &r32,
            &v32,
        )
    }

    fn adamw(
        &self,
        param: &mut CudaBuffer,
        grad: &CudaBuffer,
        m: &mut CudaBuffer,
        v: &mut CudaBuffer,
        hp: AdamW,
    ) -> Result<()> {
        let _span = self.span("adamw");
        if hp.step == 0 {
            bail!("AdamW step numbers start at 1 (bias correction), got 0");
        }
        let n = param.len();
        need(param, n, DType::F32, "parameter")?;
        need(grad, n, DType::F32, "gradient")?;
        need(m, n, DType::F32, "first moment")?;
        need(v, n, DType::F32, "second moment")?;
        if n == 0 {
            return Ok(());
        }
        let bc1 = (1.0 - f64::from(hp.beta1).powf(f64::from(hp.step))) as f32;
        let bc2 = (1.0 - f64::from(hp.beta2).powf(f64::from(hp.step))) as f32;
        let n64 = n as u64;
        launch!(
            self,
            adamw,
            elementwise(n),
            param.f32_mut("parameter")?,
            grad.f32("gradient")?,
            m.f32_mut("first moment")?,
            v.f32_mut("second moment")?,
            &hp.lr,
            &hp.beta1,
            &hp.beta2,
            &hp.eps,
            &hp.weight_decay,
            &bc1,
            &bc2,
            &hp.grad_scale,
            &n64,
        )
    }

    fn sum_squares(&self, out: &mut CudaBuffer, slot: usize, x: &CudaBuffer) -> Result<()> {
        let _span = self.span("sum_squares");
        if slot >= out.len() {
            bail!(
                "sum of squares into slot {slot} of a buffer of {}",
                out.len()
            );
        }
        need_dtype(out, DType::F32, "sums of squares")?;
        let n = x.len();
        need_dtype(x, DType::F32, "sum of squares input")?;
        let blocks = n.div_ceil(ROW_BLOCK as usize).clamp(1, SUM_SQUARES_BLOCKS);
        let mut partial = self.scratch(blocks, DType::F32)?;
        let (n64, slot64, blocks32) = (n as u64, slot as u64, blocks as u32);
        let grid = LaunchConfig {
            grid_dim: (blocks32, 1, 1),
            block_dim: (ROW_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            sum_squares_partial,
            grid,
            partial.f32_mut("partial sums of squares")?,
            x.f32("sum of squares input")?,
            &n64,
        )?;
        launch!(
            self,
            sum_squares_finish,
            elementwise(1),
            out.f32_mut("sums of squares")?,
            partial.f32("partial sums of squares")?,
            &blocks32,
            &slot64,
        )
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().context("waiting for the GPU")?;
        self.check()?;
        self.collect_profile()
    }

    fn mark(&self) -> Result<CudaEvent> {
        timing_event(&self.stream).context("recording a timing event on the CUDA stream")
    }

    fn elapsed_ms(&self, start: &CudaEvent, end: &CudaEvent) -> Result<f64> {
        let ms = start
            .elapsed_ms(end)
            .context("reading the time between two CUDA events")?;
        Ok(ms as f64)
    }

    fn memory(&self) -> MemoryStats {
        self.meter.stats()
    }

    fn reset_peak_memory(&self) {
        self.meter.reset_peak();
    }
}

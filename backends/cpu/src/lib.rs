//! pipit-cpu: the fast CPU backend, what `--backend auto` runs where no GPU is found.
//!
//! It keeps the reference backend's host buffers, memory accounting and the ops that cost
//! little (embeddings, copies, decoding), and replaces the ones a training step spends its
//! time in with f32 kernels:
//! - matrix products on the [`gemm`] crate (packed, cache-blocked, with run-time dispatch to
//!   the CPU's vector unit), transposed operands read through strides;
//! - attention in blocks of query rows on gemm, keeping one log-sum-exp per row rather than
//!   the `seq × seq` probabilities ([`attention`]);
//! - LayerNorm, GELU, cross-entropy and AdamW, and Llama's RMSNorm, rotary embedding, SwiGLU
//!   and grouped-query head layout, as row kernels compiled for AVX2 and FMA where the CPU
//!   has them, with polynomial `exp`/`tanh` ([`math`]).
//!
//! Threads come from one rayon pool sized to the host's cores; each backend uses its share
//! ([`threads`]). Sums are f32 in a fixed order for a given shape, so a run repeats to the bit;
//! the reference backend, summing in f64, stays the oracle the tests compare against.

mod adamw;
mod attention;
mod cross_entropy;
mod gelu;
mod heads;
mod math;
mod matmul;
mod norm;
mod rope;
mod swiglu;
mod threads;

use std::time::Instant;

use anyhow::{bail, Result};
use pipit_engine::backend::{
    check, fused, AdamW, Attention, Backend, CachedAttention, DType, Heads, Matmul, MemoryStats,
    Rope,
};
use pipit_reference::{check_cross_entropy, checks, expect_len, RefBuffer, ReferenceBackend};

/// The fast CPU backend. Cheap to create; each value keeps its own memory accounting.
#[derive(Debug, Default)]
pub struct CpuBackend {
    /// Buffers, accounting and the cheap ops.
    host: ReferenceBackend,
}

impl CpuBackend {
    /// A new backend with its memory counters at zero.
    pub fn new() -> Self {
        keep_freed_memory();
        Self::default()
    }

    /// A backend whose buffers others made with the same `space` may take over
    /// ([`ReferenceBackend::sharing_memory`]).
    pub fn sharing_memory(space: &str) -> Self {
        keep_freed_memory();
        Self {
            host: ReferenceBackend::sharing_memory(space),
        }
    }
}

/// Keep freed buffers in the process for the next ones of their size, the allocator serving
/// as the buffer pool: a step allocates the same buffers every time, and by default glibc
/// maps each one above 128 kB fresh from the kernel and returns it on free (and trims the heap
/// top), so every op's output paid page faults and zero-filling by the kernel. Measured on the
/// 2-core VM, width 64, seq 64: 43,193 → 57,492 tokens/s. Buffers stay in the heap up to 32 MB
/// (glibc's largest mmap threshold), and the heap is not trimmed below 4 GB free. One arena
/// for every thread: a rank's worker thread allocates its step's activations, and a thread's
/// own arena gives its heaps back to the kernel whole once they empty at the end of the step
/// (whatever the trim threshold), so each step faulted them in again — 98,000 page faults a
/// step at width 256, seq 256, 6 layers; with the one arena, none after the first step and
/// 4,400 → 5,400 tokens/s. Once per process.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator thresholds; it is called before this
            // backend allocates, and is safe to call at any time.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
                libc::mallopt(libc::M_ARENA_MAX, 1);
            }
        });
    }
}

/// Errors unless the shape splits into heads of equal width.
fn check_heads(channels: usize, heads: usize) -> Result<()> {
    if heads == 0 || channels == 0 || channels % heads != 0 {
        bail!("attention: {channels} channels cannot be split into {heads} heads of equal width");
    }
    Ok(())
}

/// Rows of log-sum-exps attention keeps for backward: one per query row of each head.
fn lse_len(s: Attention) -> Result<usize> {
    check::elems(&[s.batch, s.heads, s.seq])
}

impl Backend for CpuBackend {
    type Buffer = RefBuffer;
    type Mark = Instant;

    fn describe(&self) -> String {
        format!(
            "cpu: host f32 on {} thread{} (gemm)",
            pipit_reference::core_share(),
            if pipit_reference::core_share() == 1 {
                ""
            } else {
                "s"
            }
        )
    }

    fn memory_space(&self) -> Option<String> {
        self.host.memory_space()
    }
    fn hand_over(&self, buf: &mut RefBuffer) {
        self.host.hand_over(buf)
    }
    fn take_over(&self, buf: &mut RefBuffer) {
        self.host.take_over(buf)
    }
    fn supports(&self, dtype: DType) -> bool {
        self.host.supports(dtype)
    }
    fn alloc(&self, len: usize, dtype: DType) -> Result<RefBuffer> {
        self.host.alloc(len, dtype)
    }
    /// Zero-filled, without the reference backend's NaN poisoning: one pass over the memory
    /// less for every op output.
    fn alloc_output(&self, len: usize, dtype: DType) -> Result<RefBuffer> {
        self.host.alloc(len, dtype)
    }
    fn upload(&self, data: &[f32]) -> Result<RefBuffer> {
        self.host.upload(data)
    }
    fn upload_u32(&self, data: &[u32]) -> Result<RefBuffer> {
        self.host.upload_u32(data)
    }
    fn write(&self, buf: &mut RefBuffer, data: &[f32]) -> Result<()> {
        self.host.write(buf, data)
    }
    fn download(&self, buf: &RefBuffer) -> Result<Vec<f32>> {
        self.host.download(buf)
    }
    fn len(&self, buf: &RefBuffer) -> usize {
        buf.len()
    }
    fn dtype(&self, buf: &RefBuffer) -> DType {
        buf.dtype()
    }
    fn fill(&self, buf: &mut RefBuffer, value: f32) -> Result<()> {
        self.host.fill(buf, value)
    }
    fn copy(&self, dst: &mut RefBuffer, src: &RefBuffer) -> Result<()> {
        self.host.copy(dst, src)
    }
    fn copy_range(
        &self,
        dst: &mut RefBuffer,
        dst_start: usize,
        src: &RefBuffer,
        src_start: usize,
        len: usize,
    ) -> Result<()> {
        self.host.copy_range(dst, dst_start, src, src_start, len)
    }
    fn add(&self, out: &mut RefBuffer, a: &RefBuffer, b: &RefBuffer) -> Result<()> {
        self.host.add(out, a, b)
    }
    fn add_assign(&self, acc: &mut RefBuffer, x: &RefBuffer) -> Result<()> {
        self.host.add_assign(acc, x)
    }

    fn embedding_forward_at(
        &self,
        out: &mut RefBuffer,
        tokens: &RefBuffer,
        wte: &RefBuffer,
        wpe: &RefBuffer,
        batch: usize,
        seq: usize,
        start: usize,
        channels: usize,
    ) -> Result<()> {
        self.host
            .embedding_forward_at(out, tokens, wte, wpe, batch, seq, start, channels)
    }

    fn embedding_backward(
        &self,
        dwte: &mut RefBuffer,
        dwpe: &mut RefBuffer,
        dout: &RefBuffer,
        tokens: &RefBuffer,
        batch: usize,
        seq: usize,
        channels: usize,
    ) -> Result<()> {
        self.host
            .embedding_backward(dwte, dwpe, dout, tokens, batch, seq, channels)
    }

    fn layernorm_forward(
        &self,
        out: &mut RefBuffer,
        mean: &mut RefBuffer,
        rstd: &mut RefBuffer,
        inp: &RefBuffer,
        weight: &RefBuffer,
        bias: &RefBuffer,
        rows: usize,
        channels: usize,
    ) -> Result<()> {
        let (inp, weight, bias) = (
            inp.f32("ln inp")?,
            weight.f32("ln weight")?,
            bias.f32("ln bias")?,
        );
        let (mut out, mut mean, mut rstd) = (
            out.f32_mut("ln out")?,
            mean.f32_mut("ln mean")?,
            rstd.f32_mut("ln rstd")?,
        );
        checks::layernorm(
            rows,
            channels,
            &[("ln inp", inp.len()), ("ln out", out.len())],
            &[("ln weight", weight.len()), ("ln bias", bias.len())],
            &[("ln mean", mean.len()), ("ln rstd", rstd.len())],
        )?;
        norm::layernorm_forward(&mut out, &mut mean, &mut rstd, inp, weight, bias, channels);
        Ok(())
    }

    fn layernorm_backward(
        &self,
        dinp: &mut RefBuffer,
        dweight: &mut RefBuffer,
        dbias: &mut RefBuffer,
        dout: &RefBuffer,
        inp: &RefBuffer,
        weight: &RefBuffer,
        mean: &RefBuffer,
        rstd: &RefBuffer,
        rows: usize,
        channels: usize,
    ) -> Result<()> {
        let (dout, inp, weight) = (
            dout.f32("ln dout")?,
            inp.f32("ln inp")?,
            weight.f32("ln weight")?,
        );
        let (mean, rstd) = (mean.f32("ln mean")?, rstd.f32("ln rstd")?);
        let (mut dinp, mut dweight, mut dbias) = (
            dinp.f32_mut("ln dinp")?,
            dweight.f32_mut("ln dweight")?,
            dbias.f32_mut("ln dbias")?,
        );
        checks::layernorm(
            rows,
            channels,
            &[
                ("ln dinp", dinp.len()),
                ("ln dout", dout.len()),
                ("ln inp", inp.len()),
            ],
            &[
                ("ln weight", weight.len()),
                ("ln dweight", dweight.len()),
                ("ln dbias", dbias.len()),
            ],
            &[("ln mean", mean.len()), ("ln rstd", rstd.len())],
        )?;
        norm::layernorm_backward(
            &mut dinp,
            &mut dweight,
            &mut dbias,
            dout,
            inp,
            weight,
            mean,
            rstd,
            channels,
        );
        Ok(())
    }

    fn matmul(
        &self,
        out: &mut RefBuffer,
        a: &RefBuffer,
        b: &RefBuffer,
        bias: Option<&RefBuffer>,
        shape: Matmul,
    ) -> Result<()> {
        let (a, b) = (a.f32("matmul a")?, b.f32("matmul b")?);
        let bias = bias.map(|x| x.f32("matmul bias")).transpose()?;
        let mut out = out.f32_mut("matmul out")?;
        checks::matmul(shape, a.len(), b.len(), out.len(), bias.map(|b| b.len()))?;
        matmul::forward(&mut out, a, b, bias, shape);
        Ok(())
    }

    fn bias_backward(
        &self,
        dbias: &mut RefBuffer,
        dout: &RefBuffer,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let dout = dout.f32("bias dout")?;
        let mut dbias = dbias.f32_mut("dbias")?;
        expect_len("bias dout", dout.len(), check::elems(&[rows, cols])?)?;
        expect_len("dbias", dbias.len(), cols)?;
        matmul::bias_backward(&mut dbias, dout, cols);
        Ok(())
    }

    fn gelu_forward(&self, out: &mut RefBuffer, inp: &RefBuffer) -> Result<()> {
        let inp = inp.f32("gelu inp")?;
        let mut out = out.f32_mut("gelu out")?;
        expect_len("gelu inp", inp.len(), out.len())?;
        gelu::forward(&mut out, inp);
        Ok(())
    }

    fn gelu_backward(&self, dinp: &mut RefBuffer, inp: &RefBuffer, dout: &RefBuffer) -> Result<()> {
        let (inp, dout) = (inp.f32("gelu inp")?, dout.f32("gelu dout")?);
        let mut dinp = dinp.f32_mut("gelu dinp")?;
        expect_len("gelu inp", inp.len(), dinp.len())?;
        expect_len("gelu dout", dout.len(), dinp.len())?;
        gelu::backward(&mut dinp, inp, dout);
        Ok(())
    }

    fn rmsnorm_forward(
        &self,
        out: &mut RefBuffer,
        rstd: &mut RefBuffer,
        inp: &RefBuffer,
        weight: &RefBuffer,
        rows: usize,
        channels: usize,
        eps: f32,
    ) -> Result<()> {
        fused::check_rmsnorm_forward(self, out, rstd, inp, weight, rows, channels)?;
        let (inp, weight) = (inp.f32("rmsnorm inp")?, weight.f32("rmsnorm weight")?);
        let (mut out, mut rstd) = (out.f32_mut("rmsnorm out")?, rstd.f32_mut("rmsnorm rstd")?);
        norm::rmsnorm_forward(&mut out, &mut rstd, inp, weight, channels, eps);
        Ok(())
    }

    fn rmsnorm_backward(
        &self,
        dinp: &mut RefBuffer,
        dweight: &mut RefBuffer,
        dout: &RefBuffer,
        inp: &RefBuffer,
        weight: &RefBuffer,
        rstd: &RefBuffer,
        rows: usize,
        channels: usize,
    ) -> Result<()> {
        fused::check_rmsnorm_backward(
            self, dinp, dweight, dout, inp, weight, rstd, rows, channels,
        )?;
        let (dout, inp) = (dout.f32("rmsnorm dout")?, inp.f32("rmsnorm inp")?);
        let (weight, rstd) = (weight.f32("rmsnorm weight")?, rstd.f32("rmsnorm rstd")?);
        let (mut dinp, mut dweight) = (
            dinp.f32_mut("rmsnorm dinp")?,
            dweight.f32_mut("rmsnorm dweight")?,
        );
        norm::rmsnorm_backward(&mut dinp, &mut dweight, dout, inp, weight, rstd, channels);
        Ok(())
    }

    fn rope(&self, out: &mut RefBuffer, inp: &RefBuffer, shape: Rope) -> Result<()> {
        fused::check_rope(self, out, inp, &shape)?;
        let inp = inp.f32("rope inp")?;
        let mut out = out.f32_mut("rope out")?;
        rope::rotate(&mut out, inp, shape);
        Ok(())
    }

    fn swiglu_forward(&self, out: &mut RefBuffer, gate: &RefBuffer, up: &RefBuffer) -> Result<()> {
        fused::check_swiglu_forward(self, out, gate, up)?;
        let (gate, up) = (gate.f32("swiglu gate")?, up.f32("swiglu up")?);
        let mut out = out.f32_mut("swiglu out")?;
        swiglu::forward(&mut out, gate, up);
        Ok(())
    }

    fn swiglu_backward(
        &self,
        dgate: &mut RefBuffer,
        dup: &mut RefBuffer,
        gate: &RefBuffer,
        up: &RefBuffer,
        dout: &RefBuffer,
    ) -> Result<()> {
        fused::check_swiglu_backward(self, dgate, dup, gate, up, dout)?;
        let (gate, up, dout) = (
            gate.f32("swiglu gate")?,
            up.f32("swiglu up")?,
            dout.f32("swiglu dout")?,
        );
        let (mut dgate, mut dup) = (dgate.f32_mut("swiglu dgate")?, dup.f32_mut("swiglu dup")?);
        swiglu::backward(&mut dgate, &mut dup, gate, up, dout);
        Ok(())
    }

    fn pack_qkv(
        &self,
        qkv: &mut RefBuffer,
        q: &RefBuffer,
        k: &RefBuffer,
        v: &RefBuffer,
        shape: Heads,
    ) -> Result<()> {
        fused::check_pack_qkv(self, qkv, q, k, v, &shape)?;
        let (q, k, v) = (q.f32("queries")?, k.f32("keys")?, v.f32("values")?);
        let mut qkv = qkv.f32_mut("packed qkv")?;
        heads::pack(&mut qkv, q, k, v, shape);
        Ok(())
    }

    fn unpack_qkv_grad(
        &self,
        dq: &mut RefBuffer,
        dk: &mut RefBuffer,
        dv: &mut RefBuffer,
        dqkv: &RefBuffer,
        shape: Heads,
    ) -> Result<()> {
        fused::check_unpack_qkv_grad(self, dq, dk, dv, dqkv, &shape)?;
        let dqkv = dqkv.f32("packed qkv gradient")?;
        let (mut dq, mut dk, mut dv) = (
            dq.f32_mut("query gradient")?,
            dk.f32_mut("key gradient")?,
            dv.f32_mut("value gradient")?,
        );
        heads::unpack_grad(&mut dq, &mut dk, &mut dv, dqkv, shape);
        Ok(())
    }

    /// One f32 log-sum-exp per query row of each head (`[batch, heads, seq]`), whatever the
    /// dtype of the other operands: backward recomputes the probabilities from it.
    fn attention_state(&self, shape: Attention, _dtype: DType) -> Result<RefBuffer> {
        self.host.alloc_output(lse_len(shape)?, DType::F32)
    }

    fn attention_forward(
        &self,
        out: &mut RefBuffer,
        att: &mut RefBuffer,
        qkv: &RefBuffer,
        shape: Attention,
    ) -> Result<()> {
        check_heads(shape.channels, shape.heads)?;
        let qkv = qkv.f32("attention qkv")?;
        let (mut out, mut lse) = (
            out.f32_mut("attention out")?,
            att.f32_mut("attention state")?,
        );
        expect_len(
            "attention qkv",
            qkv.len(),
            check::elems(&[shape.batch, shape.seq, 3, shape.channels])?,
        )?;
        expect_len(
            "attention out",
            out.len(),
            check::elems(&[shape.batch, shape.seq, shape.channels])?,
        )?;
        expect_len("attention state", lse.len(), lse_len(shape)?)?;
        attention::forward(&mut out, &mut lse, qkv, shape);
        Ok(())
    }

    fn attention_backward(
        &self,
        dqkv: &mut RefBuffer,
        dout: &RefBuffer,
        qkv: &RefBuffer,
        out: &RefBuffer,
        att: &RefBuffer,
        shape: Attention,
    ) -> Result<()> {
        check_heads(shape.channels, shape.heads)?;
        let (dout, qkv, out, lse) = (
            dout.f32("attention dout")?,
            qkv.f32("attention qkv")?,
            out.f32("attention out")?,
            att.f32("attention state")?,
        );
        let mut dqkv = dqkv.f32_mut("attention dqkv")?;
        let qkv_len = check::elems(&[shape.batch, shape.seq, 3, shape.channels])?;
        let out_len = check::elems(&[shape.batch, shape.seq, shape.channels])?;
        expect_len("attention dqkv", dqkv.len(), qkv_len)?;
        expect_len("attention qkv", qkv.len(), qkv_len)?;
        expect_len("attention dout", dout.len(), out_len)?;
        expect_len("attention out", out.len(), out_len)?;
        expect_len("attention state", lse.len(), lse_len(shape)?)?;
        attention::backward(&mut dqkv, dout, qkv, out, lse, shape);
        Ok(())
    }

    fn attention_decode(
        &self,
        out: &mut RefBuffer,
        cache: &mut RefBuffer,
        qkv: &RefBuffer,
        shape: CachedAttention,
    ) -> Result<()> {
        self.host.attention_decode(out, cache, qkv, shape)
    }

    fn cross_entropy_forward(
        &self,
        losses: &mut RefBuffer,
        logits: &RefBuffer,
        targets: &RefBuffer,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        let (logits, targets) = (logits.f32("logits")?, targets.u32("targets")?);
        let mut losses = losses.f32_mut("losses")?;
        check_cross_entropy(logits.len(), targets, rows, vocab)?;
        expect_len("losses", losses.len(), rows)?;
        cross_entropy::forward(&mut losses, logits, targets, vocab);
        Ok(())
    }

    fn cross_entropy_backward(
        &self,
        dlogits: &mut RefBuffer,
        logits: &RefBuffer,
        targets: &RefBuffer,
        scale: f32,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        let (logits, targets) = (logits.f32("logits")?, targets.u32("targets")?);
        let mut dlogits = dlogits.f32_mut("dlogits")?;
        check_cross_entropy(logits.len(), targets, rows, vocab)?;
        expect_len("dlogits", dlogits.len(), logits.len())?;
        cross_entropy::backward(&mut dlogits, logits, targets, scale, vocab);
        Ok(())
    }

    fn adamw(
        &self,
        param: &mut RefBuffer,
        grad: &RefBuffer,
        m: &mut RefBuffer,
        v: &mut RefBuffer,
        hp: AdamW,
    ) -> Result<()> {
        let grad = grad.f32("adamw grad")?;
        let (mut param, mut m, mut v) = (
            param.f32_mut("adamw param")?,
            m.f32_mut("adamw m")?,
            v.f32_mut("adamw v")?,
        );
        checks::adamw(hp.step, param.len(), grad.len(), m.len(), v.len())?;
        adamw::step(&mut param, grad, &mut m, &mut v, hp);
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn mark(&self) -> Result<Instant> {
        Ok(Instant::now())
    }
    fn elapsed_ms(&self, start: &Instant, end: &Instant) -> Result<f64> {
        self.host.elapsed_ms(start, end)
    }
    fn memory(&self) -> MemoryStats {
        self.host.memory()
    }
    fn reset_peak_memory(&self) {
        self.host.reset_peak_memory()
    }
}

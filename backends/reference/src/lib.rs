//! pipit-reference: the host reference backend.
//!
//! Every operation of [`pipit_engine::Backend`] in plain f32 host code, written to be read and
//! trusted rather than fast: long sums (dot products, layernorm statistics, softmax
//! denominators, bias and embedding gradients) accumulate in f64, and every size is checked
//! against the buffers before any element is touched, so a wrong call is an error, never a
//! panic. Each layer family lives in its own module with its forward and backward side by side.

mod adamw;
mod attention;
mod buffer;
pub mod checks;
mod cross_entropy;
mod dot;
mod elementwise;
mod embedding;
mod gelu;
mod layernorm;
mod matmul;
mod simd;
mod threads;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use pipit_engine::backend::{
    host_elapsed_ms, AdamW, Attention, Backend, CachedAttention, DType, Matmul, MemoryMeter,
    MemoryStats,
};

use buffer::elems;
pub use buffer::{expect_len, FloatMut, RefBuffer};
/// The size and target checks of cross-entropy, shared with the CPU backend.
pub use cross_entropy::check as check_cross_entropy;
/// The threads a host backend may use now: the host's cores (less those of other processes on
/// it) divided among the host backends alive in this process; `PIPIT_THREADS` fixes it.
pub use threads::share as core_share;
pub use threads::CoreShare;

/// The host reference backend. Cheap to create; each value keeps its own memory accounting.
#[derive(Debug, Default)]
pub struct ReferenceBackend {
    meter: Arc<MemoryMeter>,
    space: Option<String>,
    /// This backend's place in the count that shares the cores ([`threads`]).
    _cores: threads::CoreShare,
}

impl ReferenceBackend {
    /// A new backend with its memory counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// A backend whose buffers other backends made with the same `space` may take over, as
    /// stages on one GPU do ([`Backend::memory_space`]): it lets the in-process hand-off of
    /// buffers be tested on the host. A rank's peak memory can then exceed a staged run's by
    /// the copies it makes to hand over.
    pub fn sharing_memory(space: &str) -> Self {
        Self {
            space: Some(space.to_string()),
            ..Self::default()
        }
    }
}

impl Backend for ReferenceBackend {
    type Buffer = RefBuffer;
    type Mark = Instant;

    fn describe(&self) -> String {
        "reference: host f32 (f64 accumulation; bf16 emulated)".to_string()
    }

    fn alloc(&self, len: usize, dtype: DType) -> Result<RefBuffer> {
        RefBuffer::zeroed(&self.meter, len, dtype)
    }

    /// NaN-filled (u32: zeros), so any use of an output before an op wrote it shows up as a
    /// NaN loss or gradient instead of passing unnoticed on zeros.
    fn alloc_output(&self, len: usize, dtype: DType) -> Result<RefBuffer> {
        let mut buf = RefBuffer::zeroed(&self.meter, len, dtype)?;
        if dtype.is_float() {
            buf.f32_mut("output")?.fill(f32::NAN);
        }
        Ok(buf)
    }

    fn upload(&self, data: &[f32]) -> Result<RefBuffer> {
        let mut buf = RefBuffer::zeroed(&self.meter, data.len(), DType::F32)?;
        buf.f32_mut("upload")?.copy_from_slice(data);
        Ok(buf)
    }

    fn upload_u32(&self, data: &[u32]) -> Result<RefBuffer> {
        let mut buf = RefBuffer::zeroed(&self.meter, data.len(), DType::U32)?;
        buf.u32_mut("upload_u32")?.copy_from_slice(data);
        Ok(buf)
    }

    fn write(&self, buf: &mut RefBuffer, data: &[f32]) -> Result<()> {
        let mut dst = buf.f32_mut("write destination")?;
        expect_len("write data", data.len(), dst.len())?;
        dst.copy_from_slice(data);
        Ok(())
    }

    fn download(&self, buf: &RefBuffer) -> Result<Vec<f32>> {
        Ok(buf.f32("download")?.to_vec())
    }

    fn len(&self, buf: &RefBuffer) -> usize {
        buf.len()
    }

    fn dtype(&self, buf: &RefBuffer) -> DType {
        buf.dtype()
    }

    fn supports(&self, _dtype: DType) -> bool {
        true
    }

    fn memory_space(&self) -> Option<String> {
        self.space.clone()
    }

    fn hand_over(&self, buf: &mut RefBuffer) {
        buf.claim.release();
    }

    fn take_over(&self, buf: &mut RefBuffer) {
        buf.claim.count_on(&self.meter);
    }

    fn fill(&self, buf: &mut RefBuffer, value: f32) -> Result<()> {
        buf.f32_mut("fill")?.fill(value);
        Ok(())
    }

    fn copy(&self, dst: &mut RefBuffer, src: &RefBuffer) -> Result<()> {
        dst.copy_from(src)
    }

    fn copy_range(
        &self,
        dst: &mut RefBuffer,
        dst_start: usize,
        src: &RefBuffer,
        src_start: usize,
        len: usize,
    ) -> Result<()> {
        pipit_engine::backend::fused::check_copy_range(self, dst, dst_start, src, src_start, len)?;
        let from = &src.f32("range copy source")?[src_start..src_start + len];
        let mut to = dst.f32_mut("range copy destination")?;
        to[dst_start..dst_start + len].copy_from_slice(from);
        Ok(())
    }

    fn add(&self, out: &mut RefBuffer, a: &RefBuffer, b: &RefBuffer) -> Result<()> {
        let (a, b) = (a.f32("add a")?, b.f32("add b")?);
        let mut out = out.f32_mut("add out")?;
        expect_len("add a", a.len(), out.len())?;
        expect_len("add b", b.len(), out.len())?;
        elementwise::add(&mut out, a, b);
        Ok(())
    }

    fn add_assign(&self, acc: &mut RefBuffer, x: &RefBuffer) -> Result<()> {
        let x = x.f32("add_assign x")?;
        let mut acc = acc.f32_mut("add_assign acc")?;
        expect_len("add_assign x", x.len(), acc.len())?;
        elementwise::add_assign(&mut acc, x);
        Ok(())
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
        let (tokens, wte, wpe) = (tokens.u32("tokens")?, wte.f32("wte")?, wpe.f32("wpe")?);
        let mut out = out.f32_mut("embedding out")?;
        let dims =
            embedding::Dims::check(tokens, wte.len(), wpe.len(), batch, seq, start, channels)?;
        expect_len("embedding out", out.len(), elems(&[batch, seq, channels])?)?;
        embedding::forward(&mut out, tokens, wte, wpe, dims);
        Ok(())
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
        let (dout, tokens) = (dout.f32("embedding dout")?, tokens.u32("tokens")?);
        let (mut dwte, mut dwpe) = (dwte.f32_mut("dwte")?, dwpe.f32_mut("dwpe")?);
        let dims = embedding::Dims::check(tokens, dwte.len(), dwpe.len(), batch, seq, 0, channels)?;
        expect_len(
            "embedding dout",
            dout.len(),
            elems(&[batch, seq, channels])?,
        )?;
        embedding::backward(&mut dwte, &mut dwpe, dout, tokens, dims);
        Ok(())
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
        layernorm::forward(&mut out, &mut mean, &mut rstd, inp, weight, bias, channels);
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
        layernorm::backward(
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
        expect_len("bias dout", dout.len(), elems(&[rows, cols])?)?;
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

    fn attention_forward(
        &self,
        out: &mut RefBuffer,
        att: &mut RefBuffer,
        qkv: &RefBuffer,
        shape: Attention,
    ) -> Result<()> {
        let qkv = qkv.f32("attention qkv")?;
        let (mut out, mut att) = (out.f32_mut("attention out")?, att.f32_mut("attention att")?);
        let sizes = attention::Sizes::check(shape)?;
        expect_len("attention qkv", qkv.len(), sizes.qkv_len)?;
        expect_len("attention out", out.len(), sizes.out_len)?;
        expect_len("attention att", att.len(), sizes.att_len)?;
        attention::forward(&mut out, &mut att, qkv, shape);
        Ok(())
    }

    fn attention_backward(
        &self,
        dqkv: &mut RefBuffer,
        dout: &RefBuffer,
        qkv: &RefBuffer,
        _out: &RefBuffer,
        att: &RefBuffer,
        shape: Attention,
    ) -> Result<()> {
        let (dout, qkv, att) = (
            dout.f32("attention dout")?,
            qkv.f32("attention qkv")?,
            att.f32("attention att")?,
        );
        let mut dqkv = dqkv.f32_mut("attention dqkv")?;
        let sizes = attention::Sizes::check(shape)?;
        expect_len("attention dqkv", dqkv.len(), sizes.qkv_len)?;
        expect_len("attention qkv", qkv.len(), sizes.qkv_len)?;
        expect_len("attention dout", dout.len(), sizes.out_len)?;
        expect_len("attention att", att.len(), sizes.att_len)?;
        attention::backward(&mut dqkv, dout, qkv, att, shape);
        Ok(())
    }

    fn attention_decode(
        &self,
        out: &mut RefBuffer,
        cache: &mut RefBuffer,
        qkv: &RefBuffer,
        shape: CachedAttention,
    ) -> Result<()> {
        shape.check()?;
        let qkv = qkv.f32("attention qkv")?;
        let (mut out, mut cache) = (
            out.f32_mut("attention out")?,
            cache.f32_mut("attention cache")?,
        );
        let sizes = attention::Sizes::check(shape.of_new())?;
        expect_len("attention qkv", qkv.len(), sizes.qkv_len)?;
        expect_len("attention out", out.len(), sizes.out_len)?;
        expect_len("attention cache", cache.len(), shape.cache_len()?)?;
        attention::decode(&mut out, &mut cache, qkv, shape);
        Ok(())
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
        cross_entropy::check(logits.len(), targets, rows, vocab)?;
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
        cross_entropy::check(logits.len(), targets, rows, vocab)?;
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
        // Host code runs each op to completion before returning.
        Ok(())
    }

    fn mark(&self) -> Result<Instant> {
        Ok(Instant::now())
    }

    fn elapsed_ms(&self, start: &Instant, end: &Instant) -> Result<f64> {
        Ok(host_elapsed_ms(start, end))
    }

    fn memory(&self) -> MemoryStats {
        self.meter.stats()
    }

    fn reset_peak_memory(&self) {
        self.meter.reset_peak();
    }
}

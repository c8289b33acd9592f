//! pipit-meta: a backend that allocates nothing and computes nothing.
//!
//! Its buffers have a length and a dtype and no contents; every op checks nothing and does
//! nothing, and [`Backend::download`] gives zeros. What it does keep is the memory accounting:
//! each buffer is counted from creation until drop, as the reference backend counts its own,
//! so a training step run on it reports, per rank, the peak bytes the engine would hold on a
//! device (parameters, gradients, optimizer state, saved activations and the transient
//! buffers of the ops) in the time the host takes to walk the schedule. `pipit train
//! --dry-run` runs one step on it.
//!
//! The figures are those of the buffers pipit allocates through [`Backend`]. A GPU adds its
//! libraries' workspaces, its allocator's rounding and whatever else shares the device. With
//! [`MetaBackend::like_cuda`] the attention counts as the CUDA backend's does: its state and
//! its scratch buffers (bf16 on tensor cores keeps a log-sum-exp per query row; otherwise the
//! probabilities, with f32 scores and per-head copies alive during the op). The CUDA backend's
//! other scratch, column partial sums of a few kilobytes, is not counted.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use pipit_engine::backend::{
    host_elapsed_ms, AdamW, Attention, Backend, CachedAttention, DType, Matmul, MemoryMeter,
    MemoryStats, MeterClaim,
};

/// The meta backend; each value keeps its own memory accounting.
#[derive(Debug, Default)]
pub struct MetaBackend {
    meter: Arc<MemoryMeter>,
    /// Counting as the CUDA backend, with its tensor-core attention or without.
    cuda: Option<bool>,
    /// Counting as the CPU backend: attention keeps a log-sum-exp per query row.
    cpu: bool,
    space: Option<String>,
}

impl MetaBackend {
    /// A backend that accounts as the reference (and wgpu) backends do.
    pub fn new() -> Self {
        Self::default()
    }

    /// A backend that accounts as the CUDA backend does, its bf16 attention on tensor cores
    /// (`tensor_core_attention`, its default) where the head size has a kernel (16, 32, 64 or
    /// 128) or through cuBLAS, with the scratch buffers each way allocates.
    pub fn like_cuda(tensor_core_attention: bool) -> Self {
        Self {
            cuda: Some(tensor_core_attention),
            ..Self::default()
        }
    }

    /// A backend that accounts as the CPU backend does: as the reference backend, except that
    /// attention keeps one f32 log-sum-exp per query row instead of the probabilities (its
    /// per-thread block of scores, a few hundred kilobytes at most, is not counted).
    pub fn like_cpu() -> Self {
        Self {
            cpu: true,
            ..Self::default()
        }
    }

    /// This backend, its buffers in memory `space` (as stages on one GPU share theirs): the
    /// in-process transport hands buffers over between backends of one space instead of
    /// staging them, and a handed-over buffer stays counted by its maker, as on a GPU.
    pub fn sharing_memory(self, space: &str) -> Self {
        Self {
            space: Some(space.to_string()),
            ..self
        }
    }

    /// Buffers alive together and then dropped, as an op's scratch: `(len, dtype)` each.
    fn scratch(&self, buffers: &[(usize, DType)]) -> Result<()> {
        let held = buffers
            .iter()
            .map(|&(len, dtype)| self.alloc(len, dtype))
            .collect::<Result<Vec<_>>>()?;
        drop(held);
        Ok(())
    }

    /// Whether the CUDA backend would take its tensor-core attention for `shape` in `dtype`.
    fn tensor_cores(&self, shape: Attention, dtype: DType) -> bool {
        let head = shape.channels.checked_div(shape.heads).unwrap_or(0);
        self.cuda == Some(true)
            && dtype == DType::BF16
            && shape.channels % shape.heads.max(1) == 0
            && matches!(head, 16 | 32 | 64 | 128)
            && shape.batch * shape.heads <= u16::MAX as usize
            && u32::try_from(shape.seq).is_ok()
    }
}

/// A buffer of the meta backend: a size, counted by its backend's meter until dropped.
#[derive(Debug)]
pub struct MetaBuffer {
    len: usize,
    dtype: DType,
    claim: MeterClaim,
}

impl Backend for MetaBackend {
    type Buffer = MetaBuffer;
    type Mark = Instant;

    fn describe(&self) -> String {
        let like = match (self.cuda, self.cpu) {
            (Some(_), _) => "CUDA",
            (None, true) => "CPU",
            (None, false) => "reference",
        };
        format!("meta: sizes only, no memory and no compute (accounting as the {like} backend)")
    }

    fn memory_space(&self) -> Option<String> {
        self.space.clone()
    }

    fn hand_over(&self, buf: &mut MetaBuffer) {
        buf.claim.release();
    }

    fn take_over(&self, buf: &mut MetaBuffer) {
        buf.claim.count_on(&self.meter);
    }

    fn supports(&self, _dtype: DType) -> bool {
        true
    }

    fn computes(&self) -> bool {
        false
    }

    fn alloc(&self, len: usize, dtype: DType) -> Result<MetaBuffer> {
        Ok(MetaBuffer {
            len,
            dtype,
            claim: MeterClaim::new(&self.meter, (len * dtype.size()) as u64),
        })
    }

    fn upload(&self, data: &[f32]) -> Result<MetaBuffer> {
        self.alloc(data.len(), DType::F32)
    }

    fn upload_u32(&self, data: &[u32]) -> Result<MetaBuffer> {
        self.alloc(data.len(), DType::U32)
    }

    fn write(&self, _buf: &mut MetaBuffer, _data: &[f32]) -> Result<()> {
        Ok(())
    }

    fn download(&self, buf: &MetaBuffer) -> Result<Vec<f32>> {
        Ok(vec![0.0; buf.len])
    }

    fn len(&self, buf: &MetaBuffer) -> usize {
        buf.len
    }

    fn dtype(&self, buf: &MetaBuffer) -> DType {
        buf.dtype
    }

    fn fill(&self, _buf: &mut MetaBuffer, _value: f32) -> Result<()> {
        Ok(())
    }

    fn copy(&self, _dst: &mut MetaBuffer, _src: &MetaBuffer) -> Result<()> {
        Ok(())
    }

    fn add(&self, _out: &mut MetaBuffer, _a: &MetaBuffer, _b: &MetaBuffer) -> Result<()> {
        Ok(())
    }

    fn add_assign(&self, _acc: &mut MetaBuffer, _x: &MetaBuffer) -> Result<()> {
        Ok(())
    }

    fn sum_squares(&self, _out: &mut MetaBuffer, _slot: usize, _x: &MetaBuffer) -> Result<()> {
        Ok(())
    }

    fn embedding_forward_at(
        &self,
        _out: &mut MetaBuffer,
        _tokens: &MetaBuffer,
        _wte: &MetaBuffer,
        _wpe: &MetaBuffer,
        _batch: usize,
        _seq: usize,
        _start: usize,
        _channels: usize,
    ) -> Result<()> {
        Ok(())
    }

    fn embedding_backward(
        &self,
        _dwte: &mut MetaBuffer,
        _dwpe: &mut MetaBuffer,
        _dout: &MetaBuffer,
        _tokens: &MetaBuffer,
        _batch: usize,
        _seq: usize,
        _channels: usize,
    ) -> Result<()> {
        Ok(())
    }

    fn layernorm_forward(
        &self,
        _out: &mut MetaBuffer,
        _mean: &mut MetaBuffer,
        _rstd: &mut MetaBuffer,
        _inp: &MetaBuffer,
        _weight: &MetaBuffer,
        _bias: &MetaBuffer,
        _rows: usize,
        _channels: usize,
    ) -> Result<()> {
        Ok(())
    }

    fn layernorm_backward(
        &self,
        _dinp: &mut MetaBuffer,
        _dweight: &mut MetaBuffer,
        _dbias: &mut MetaBuffer,
        _dout: &MetaBuffer,
        _inp: &MetaBuffer,
        _weight: &MetaBuffer,
        _mean: &MetaBuffer,
        _rstd: &MetaBuffer,
        _rows: usize,
        _channels: usize,
    ) -> Result<()> {
        Ok(())
    }

    fn matmul(
        &self,
        _out: &mut MetaBuffer,
        _a: &MetaBuffer,
        _b: &MetaBuffer,
        _bias: Option<&MetaBuffer>,
        _shape: Matmul,
    ) -> Result<()> {
        Ok(())
    }

    fn bias_backward(
        &self,
        _dbias: &mut MetaBuffer,
        _dout: &MetaBuffer,
        _rows: usize,
        _cols: usize,
    ) -> Result<()> {
        Ok(())
    }

    fn gelu_forward(&self, _out: &mut MetaBuffer, _inp: &MetaBuffer) -> Result<()> {
        Ok(())
    }

    fn gelu_backward(
        &self,
        _dinp: &mut MetaBuffer,
        _inp: &MetaBuffer,
        _dout: &MetaBuffer,
    ) -> Result<()> {
        Ok(())
    }

    fn attention_state(&self, shape: Attention, dtype: DType) -> Result<MetaBuffer> {
        let rows = shape.batch * shape.heads * shape.seq;
        if self.cpu || self.tensor_cores(shape, dtype) {
            self.alloc(rows, DType::F32)
        } else {
            self.alloc(rows * shape.seq, dtype)
        }
    }

    fn attention_forward(
        &self,
        out: &mut MetaBuffer,
        _att: &mut MetaBuffer,
        _qkv: &MetaBuffer,
        shape: Attention,
    ) -> Result<()> {
        let t = out.dtype;
        if self.cuda.is_none() || self.tensor_cores(shape, t) {
            return Ok(());
        }
        // Through cuBLAS: q and k split by head beside the f32 scores, then v and the heads'
        // output.
        let (n, scores) = (out.len, shape.batch * shape.heads * shape.seq * shape.seq);
        self.scratch(&[(n, t), (n, t), (scores, DType::F32)])?;
        self.scratch(&[(n, t), (n, t)])
    }

    fn attention_backward(
        &self,
        dqkv: &mut MetaBuffer,
        _dout: &MetaBuffer,
        _qkv: &MetaBuffer,
        _out: &MetaBuffer,
        _att: &MetaBuffer,
        shape: Attention,
    ) -> Result<()> {
        let t = dqkv.dtype;
        let rows = shape.batch * shape.heads * shape.seq;
        if self.cuda.is_none() {
            return Ok(());
        }
        if self.tensor_cores(shape, t) {
            // One f32 per query row.
            return self.scratch(&[(rows, DType::F32)]);
        }
        // Through cuBLAS, in the order the CUDA backend holds them: dY and V split by head
        // with dV, then with the f32 probability gradient, which then meets the score
        // gradient; that one stays while dQ and then dK are made from K and Q.
        let (n, scores) = (dqkv.len / 3, rows * shape.seq);
        let dy = self.alloc(n, t)?;
        let v = self.alloc(n, t)?;
        self.scratch(&[(n, t)])?;
        let datt = self.alloc(scores, DType::F32)?;
        drop((dy, v));
        let dscores = self.alloc(scores, t)?;
        drop(datt);
        self.scratch(&[(n, t), (n, t)])?;
        self.scratch(&[(n, t), (n, t)])?;
        drop(dscores);
        Ok(())
    }

    fn attention_decode(
        &self,
        _out: &mut MetaBuffer,
        _cache: &mut MetaBuffer,
        _qkv: &MetaBuffer,
        _shape: CachedAttention,
    ) -> Result<()> {
        Ok(())
    }

    fn cross_entropy_forward(
        &self,
        _losses: &mut MetaBuffer,
        _logits: &MetaBuffer,
        _targets: &MetaBuffer,
        _rows: usize,
        _vocab: usize,
    ) -> Result<()> {
        Ok(())
    }

    fn cross_entropy_backward(
        &self,
        _dlogits: &mut MetaBuffer,
        _logits: &MetaBuffer,
        _targets: &MetaBuffer,
        _scale: f32,
        _rows: usize,
        _vocab: usize,
    ) -> Result<()> {
        Ok(())
    }

    fn adamw(
        &self,
        _param: &mut MetaBuffer,
        _grad: &MetaBuffer,
        _m: &mut MetaBuffer,
        _v: &mut MetaBuffer,
        _hp: AdamW,
    ) -> Result<()> {
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
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

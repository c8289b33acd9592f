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
//! [`MetaBackend::like_cuda`] the attention state of bf16 is the CUDA backend's tensor-core
//! one (a log-sum-exp per query row instead of the probabilities).

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use pipit_engine::backend::{
    host_elapsed_ms, AdamW, Attention, Backend, CachedAttention, DType, Matmul, MemoryMeter,
    MemoryStats,
};

/// The meta backend; each value keeps its own memory accounting.
#[derive(Debug, Default)]
pub struct MetaBackend {
    meter: Arc<MemoryMeter>,
    flash_bf16: bool,
}

impl MetaBackend {
    /// A backend that accounts as the reference (and wgpu) backends do.
    pub fn new() -> Self {
        Self::default()
    }

    /// A backend that accounts as the CUDA backend does: bf16 attention keeps one f32
    /// log-sum-exp per query row where its head size has a tensor-core kernel (16, 32, 64 or
    /// 128), not the probabilities.
    pub fn like_cuda() -> Self {
        Self {
            flash_bf16: true,
            ..Self::default()
        }
    }
}

/// A buffer of the meta backend: a size, counted by its backend's meter until dropped.
#[derive(Debug)]
pub struct MetaBuffer {
    len: usize,
    dtype: DType,
    meter: Arc<MemoryMeter>,
}

impl MetaBuffer {
    fn bytes(&self) -> u64 {
        (self.len * self.dtype.size()) as u64
    }
}

impl Drop for MetaBuffer {
    fn drop(&mut self) {
        self.meter.release(self.bytes());
    }
}

impl Backend for MetaBackend {
    type Buffer = MetaBuffer;
    type Mark = Instant;

    fn describe(&self) -> String {
        let like = if self.flash_bf16 { "CUDA" } else { "reference" };
        format!("meta: sizes only, no memory and no compute (accounting as the {like} backend)")
    }

    fn supports(&self, _dtype: DType) -> bool {
        true
    }

    fn alloc(&self, len: usize, dtype: DType) -> Result<MetaBuffer> {
        let buf = MetaBuffer {
            len,
            dtype,
            meter: Arc::clone(&self.meter),
        };
        self.meter.acquire(buf.bytes());
        Ok(buf)
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
        let head = shape.channels.checked_div(shape.heads).unwrap_or(0);
        let flash = self.flash_bf16
            && dtype == DType::BF16
            && shape.channels % shape.heads.max(1) == 0
            && matches!(head, 16 | 32 | 64 | 128)
            && shape.batch * shape.heads <= u16::MAX as usize
            && u32::try_from(shape.seq).is_ok();
        if flash {
            self.alloc(rows, DType::F32)
        } else {
            self.alloc(rows * shape.seq, dtype)
        }
    }

    fn attention_forward(
        &self,
        _out: &mut MetaBuffer,
        _att: &mut MetaBuffer,
        _qkv: &MetaBuffer,
        _shape: Attention,
    ) -> Result<()> {
        Ok(())
    }

    fn attention_backward(
        &self,
        _dqkv: &mut MetaBuffer,
        _dout: &MetaBuffer,
        _qkv: &MetaBuffer,
        _out: &MetaBuffer,
        _att: &MetaBuffer,
        _shape: Attention,
    ) -> Result<()> {
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

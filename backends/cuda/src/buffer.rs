//! Device buffers and the memory accounting they feed.

use std::sync::Arc;

use anyhow::{bail, Result};
use cudarc::driver::CudaSlice;
use pipit_engine::backend::{DType, MemoryMeter};

/// What a buffer holds on the device.
#[derive(Debug)]
pub(crate) enum Data {
    /// f32 elements.
    F32(CudaSlice<f32>),
    /// u32 elements (token ids), with a host copy of the same ids: u32 buffers are only ever
    /// filled from the host (upload, zeroed allocation, or a copy of another u32 buffer), so
    /// the copy is always exact, and lets ops check ids and group positions by token without
    /// reading the device back.
    U32 {
        device: CudaSlice<u32>,
        host: Arc<[u32]>,
    },
}

/// A CUDA device buffer of one [`DType`], counted by its backend's meter from creation until
/// drop. Zero-length buffers hold one unused element, since CUDA cannot allocate nothing.
#[derive(Debug)]
pub struct CudaBuffer {
    pub(crate) data: Data,
    len: usize,
    meter: Arc<MemoryMeter>,
}

impl CudaBuffer {
    /// Wrap `data` holding `len` logical elements and count them as held by `meter`.
    pub(crate) fn new(data: Data, len: usize, meter: &Arc<MemoryMeter>) -> Self {
        let buf = Self {
            data,
            len,
            meter: Arc::clone(meter),
        };
        meter.acquire(buf.bytes());
        buf
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        match self.data {
            Data::F32(_) => DType::F32,
            Data::U32 { .. } => DType::U32,
        }
    }

    fn bytes(&self) -> u64 {
        self.len as u64 * self.dtype().size() as u64
    }

    /// The device slice of an f32 buffer; `what` names the operand in the error otherwise.
    pub(crate) fn f32(&self, what: &str) -> Result<&CudaSlice<f32>> {
        match &self.data {
            Data::F32(s) => Ok(s),
            Data::U32 { .. } => bail!("{what} must be an F32 buffer, got U32"),
        }
    }

    /// [`Self::f32`], for writing.
    pub(crate) fn f32_mut(&mut self, what: &str) -> Result<&mut CudaSlice<f32>> {
        match &mut self.data {
            Data::F32(s) => Ok(s),
            Data::U32 { .. } => bail!("{what} must be an F32 buffer, got U32"),
        }
    }

    /// The device slice and the host copy of a u32 buffer.
    pub(crate) fn u32(&self, what: &str) -> Result<(&CudaSlice<u32>, &[u32])> {
        match &self.data {
            Data::U32 { device, host } => Ok((device, host)),
            Data::F32(_) => bail!("{what} must be a U32 buffer, got F32"),
        }
    }
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        // The device memory is freed in stream order after the work already enqueued on it.
        self.meter.release(self.bytes());
    }
}

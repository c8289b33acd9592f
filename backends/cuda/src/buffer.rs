//! Device buffers and the memory accounting they feed.

use std::sync::Arc;

use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, LaunchArgs, PushKernelArg};
use pipit_engine::backend::{DType, MemoryMeter, MeterClaim};

/// What a buffer holds on the device.
#[derive(Debug)]
pub(crate) enum Data {
    /// f32 elements.
    F32(CudaSlice<f32>),
    /// bf16 elements, as their 16 bits (`struct bf16` in `cuda/common.cu`).
    BF16(CudaSlice<u16>),
    /// u32 elements (token ids), with a host copy of the same ids: u32 buffers are only ever
    /// filled from the host (upload, zeroed allocation, or a copy of another u32 buffer), so
    /// the copy is always exact, and lets ops check ids and group positions by token without
    /// reading the device back.
    U32 {
        device: CudaSlice<u32>,
        host: Arc<[u32]>,
    },
}

impl Data {
    fn dtype(&self) -> DType {
        match self {
            Data::F32(_) => DType::F32,
            Data::BF16(_) => DType::BF16,
            Data::U32 { .. } => DType::U32,
        }
    }
}

/// A CUDA device buffer of one [`DType`], counted by its backend's meter from creation until
/// drop (or until handed to another stage on the GPU). The device memory is freed in stream
/// order, after the work already enqueued on it. Zero-length buffers hold one unused element,
/// since CUDA cannot allocate nothing.
#[derive(Debug)]
pub struct CudaBuffer {
    pub(crate) data: Data,
    len: usize,
    pub(crate) claim: MeterClaim,
}

impl CudaBuffer {
    /// Wrap `data` holding `len` logical elements and count them as held by `meter`.
    pub(crate) fn new(data: Data, len: usize, meter: &Arc<MemoryMeter>) -> Self {
        let bytes = len as u64 * data.dtype().size() as u64;
        Self {
            data,
            len,
            claim: MeterClaim::new(meter, bytes),
        }
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
        self.data.dtype()
    }

    /// The device slice of an f32 buffer; `what` names the operand in the error otherwise.
    pub(crate) fn f32(&self, what: &str) -> Result<&CudaSlice<f32>> {
        match &self.data {
            Data::F32(s) => Ok(s),
            _ => bail!("{what} must be an F32 buffer, got {:?}", self.dtype()),
        }
    }

    /// [`Self::f32`], for writing.
    pub(crate) fn f32_mut(&mut self, what: &str) -> Result<&mut CudaSlice<f32>> {
        let dtype = self.dtype();
        match &mut self.data {
            Data::F32(s) => Ok(s),
            _ => bail!("{what} must be an F32 buffer, got {dtype:?}"),
        }
    }

    /// The device slice of a float buffer (f32 or bf16), as a kernel argument.
    pub(crate) fn floats(&self, what: &str) -> Result<Floats<'_>> {
        match &self.data {
            Data::F32(s) => Ok(Floats::F32(s)),
            Data::BF16(s) => Ok(Floats::BF16(s)),
            Data::U32 { .. } => bail!("{what} must be an F32 or BF16 buffer, got U32"),
        }
    }

    /// [`Self::floats`], for writing.
    pub(crate) fn floats_mut(&mut self, what: &str) -> Result<FloatsMut<'_>> {
        match &mut self.data {
            Data::F32(s) => Ok(FloatsMut::F32(s)),
            Data::BF16(s) => Ok(FloatsMut::BF16(s)),
            Data::U32 { .. } => bail!("{what} must be an F32 or BF16 buffer, got U32"),
        }
    }

    /// The device slice and the host copy of a u32 buffer.
    pub(crate) fn u32(&self, what: &str) -> Result<(&CudaSlice<u32>, &[u32])> {
        match &self.data {
            Data::U32 { device, host } => Ok((device, host)),
            _ => bail!("{what} must be a U32 buffer, got {:?}", self.dtype()),
        }
    }
}

/// A float buffer's device slice, whichever its element type: a kernel argument for the
/// `float*` or `bf16*` parameter of the kernel the op picked for that type.
pub(crate) enum Floats<'a> {
    F32(&'a CudaSlice<f32>),
    BF16(&'a CudaSlice<u16>),
}

/// [`Floats`], for a parameter the kernel writes.
pub(crate) enum FloatsMut<'a> {
    F32(&'a mut CudaSlice<f32>),
    BF16(&'a mut CudaSlice<u16>),
}

// SAFETY: each variant pushes its slice exactly as cudarc pushes a slice of that type; the
// kernel's parameter is a pointer either way.
unsafe impl<'a, 'b: 'a> PushKernelArg<Floats<'b>> for LaunchArgs<'a> {
    #[inline(always)]
    fn arg(&mut self, arg: Floats<'b>) -> &mut Self {
        match arg {
            Floats::F32(s) => self.arg(s),
            Floats::BF16(s) => self.arg(s),
        }
    }
}

// SAFETY: as for `Floats`, with cudarc's write tracking of a mutably borrowed slice.
unsafe impl<'a, 'b: 'a> PushKernelArg<FloatsMut<'b>> for LaunchArgs<'a> {
    #[inline(always)]
    fn arg(&mut self, arg: FloatsMut<'b>) -> &mut Self {
        match arg {
            FloatsMut::F32(s) => self.arg(s),
            FloatsMut::BF16(s) => self.arg(s),
        }
    }
}

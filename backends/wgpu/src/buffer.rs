//! Device buffers and the memory accounting they feed.

use std::sync::Arc;

use pipit_engine::backend::{DType, MemoryMeter};

/// A wgpu storage buffer of `len` elements of one [`DType`]; dropping it frees the memory.
#[derive(Debug)]
pub struct WgpuBuffer {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) len: usize,
    pub(crate) dtype: DType,
    counters: Arc<MemoryMeter>,
}

impl WgpuBuffer {
    /// Wrap `buffer` and count its `len` elements as held by `counters`.
    pub(crate) fn new(
        buffer: wgpu::Buffer,
        len: usize,
        dtype: DType,
        counters: Arc<MemoryMeter>,
    ) -> Self {
        counters.acquire(Self::bytes_of(len, dtype));
        Self {
            buffer,
            len,
            dtype,
            counters,
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
        self.dtype
    }

    fn bytes_of(len: usize, dtype: DType) -> u64 {
        (len * dtype.size()) as u64
    }
}

impl Drop for WgpuBuffer {
    fn drop(&mut self) {
        // wgpu keeps the memory alive until queued work that uses it has finished; from the
        // caller's point of view it is released now.
        self.counters.release(Self::bytes_of(self.len, self.dtype));
    }
}

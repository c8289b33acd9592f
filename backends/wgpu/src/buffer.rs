//! Device buffers and the memory accounting they feed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pipit_engine::backend::{DType, MemoryStats};

/// Bytes held by one backend's live buffers, shared with every buffer it made.
#[derive(Debug, Default)]
pub(crate) struct MemoryCounters {
    in_use: AtomicU64,
    peak: AtomicU64,
}

impl MemoryCounters {
    /// Record `bytes` newly held.
    pub(crate) fn grow(&self, bytes: u64) {
        let now = self.in_use.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    /// Record `bytes` released.
    pub(crate) fn shrink(&self, bytes: u64) {
        self.in_use.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Current and peak usage.
    pub(crate) fn stats(&self) -> MemoryStats {
        MemoryStats {
            in_use: self.in_use.load(Ordering::Relaxed),
            peak: self.peak.load(Ordering::Relaxed),
        }
    }

    /// Start a new peak window at the current usage.
    pub(crate) fn reset_peak(&self) {
        self.peak
            .store(self.in_use.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// A wgpu storage buffer of `len` elements of one [`DType`]; dropping it frees the memory.
#[derive(Debug)]
pub struct WgpuBuffer {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) len: usize,
    pub(crate) dtype: DType,
    counters: Arc<MemoryCounters>,
}

impl WgpuBuffer {
    /// Wrap `buffer` and count its `len` elements as held by `counters`.
    pub(crate) fn new(
        buffer: wgpu::Buffer,
        len: usize,
        dtype: DType,
        counters: Arc<MemoryCounters>,
    ) -> Self {
        counters.grow(Self::bytes_of(len, dtype));
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
        self.counters.shrink(Self::bytes_of(self.len, self.dtype));
    }
}

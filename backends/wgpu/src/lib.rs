//! pipit-wgpu: the portable GPU backend.
//!
//! Implements [`pipit_engine::Backend`] on wgpu (Vulkan, Metal, DX12, and Mesa lavapipe on
//! machines without a GPU) with the WGSL kernels of `shaders/`, one file per layer family.
//! Each [`WgpuBackend`] owns one device and queue, which is one pipeline rank; several can
//! share an adapter ([`WgpuBackend::for_ranks`]).
//!
//! Work larger than one storage binding (128 MiB on lavapipe) is cut into windows: matrix
//! products into sub-matrices, row-wise ops into row ranges, attention into (sequence, head)
//! units, embeddings into sequence and vocabulary ranges.
//!
//! Row kernels are tuned per [`KernelProfile`]: workgroup reductions on GPUs, one invocation
//! per row without barriers on CPU adapters (lavapipe), where barriers are costly. Work is
//! also cut so no invocation runs more than 65535 loop iterations, where llvmpipe stops loops.
//!
//! Marks for timing are device timestamps where the adapter supports them ([`WgpuMark`]), so
//! timing a step does not wait for the device between actions.

mod buffer;
mod context;
pub mod device;
mod fused;
mod kernels;
mod ops;
mod split;
mod timing;

pub use buffer::WgpuBuffer;
pub use context::WgpuBackend;
pub use device::{KernelProfile, Options};
pub use timing::WgpuMark;

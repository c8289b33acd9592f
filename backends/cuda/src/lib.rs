//! pipit-cuda: the CUDA backend for NVIDIA GPUs.
//!
//! Implements [`pipit_engine::Backend`] with cuBLAS for the matrix products and the CUDA C++
//! kernels of `cuda/` (one file per layer family), compiled at run time by NVRTC for the
//! device's own architecture, once per process. Each [`CudaBackend`] owns one CUDA stream on
//! its device, which is one pipeline rank; several can share a GPU.
//!
//! cudarc loads the CUDA libraries when the program runs (`dynamic-loading`), so this crate
//! builds on machines without CUDA. [`probe`] says whether CUDA is usable before anything
//! touches it, and [`CudaBackend::new`] reports a missing driver, compiler or GPU as an
//! ordinary error, never a panic.
//!
//! Between processes, [`NcclTransport`] moves tensors from GPU to GPU through NCCL (loaded at
//! run time too; [`nccl_probe`] says whether it is there), on a stream of its own, guarded by
//! a watchdog that aborts the communicator when a peer stops taking part.
//!
//! Every reduction (layernorm and softmax rows, bias and layernorm parameter gradients, the
//! embedding gradient) combines values in an order fixed by the sizes alone, without float
//! atomics, so a run repeats bit for bit. Activations are f32 or bf16 (mixed precision); bf16
//! attention runs on tensor cores without materialising its T×T matrices (`attention.rs`).

// First, so that its `launch!` macro is in scope in the modules after it.
#[macro_use]
mod kernels;
mod attention;
mod buffer;
mod context;
mod fused;
mod gemm;
mod groups;
mod nccl;
mod ops;
mod probe;
mod profile;
mod watchdog;

pub use attention::flash_enabled as tensor_core_attention;
pub use buffer::CudaBuffer;
pub use context::CudaBackend;
pub use nccl::{nccl_probe, NcclSetup, NcclTransport};
pub use probe::probe;

//! pipit: pipeline-parallel training and inference.
//!
//! A thin facade over the engine and the backends, so examples and tests name one crate;
//! the command line ([`cli`]); and the library surface the C and Python bindings wrap
//! ([`api`]).

pub mod api;
#[doc(hidden)]
pub mod cli;

pub use pipit_cpu as cpu;
pub use pipit_cuda as cuda;
pub use pipit_engine as engine;
pub use pipit_meta as meta;
pub use pipit_reference as reference;
pub use pipit_wgpu as wgpu;

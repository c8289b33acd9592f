//! pipit-engine: everything in pipit that is not device code.
//!
//! The planner (schedules, simulation, partitioning, analysis, rendering), GPT-2 expressed as
//! an ordered list of layers over the [`backend::Backend`] trait, and the executor that runs a
//! lowered schedule on any backend. Nothing here depends on a device crate.

pub mod analysis;
pub mod backend;
pub mod checkpoint;
pub mod data;
pub mod dist;
pub mod error;
pub mod exec;
pub mod model;
pub mod partition;
pub mod render;
pub mod rng;
pub mod schedule;
pub mod sim;
pub mod tokenizer;
pub mod train;

pub use backend::{Backend, Transport};
pub use error::{is_invalid_input, InvalidInput};

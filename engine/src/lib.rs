//! pipit-engine: everything in pipit that is not device code.
//!
//! The planner (schedules, simulation, partitioning, analysis, rendering), GPT-2 expressed as
//! an ordered list of layers over the [`backend::Backend`] trait, and the executor that runs a
//! lowered schedule on any backend. Nothing here depends on a device crate.

/// Serialize and deserialize a type as the name users write: its `Display` and `FromStr`
/// (so a config file, a checkpoint's settings and a flag spell it alike).
macro_rules! serde_as_name {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let name = String::deserialize(d)?;
                name.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

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
pub mod sample;
pub mod schedule;
pub mod serve;
pub mod sim;
pub mod tokenizer;
pub mod train;

pub use backend::{Backend, Transport};
pub use error::{is_invalid_input, InvalidInput};

//! Schedules as data: the IR, its generators, lowering to transfers, and validation.

mod action;

pub use action::{Action, Schedule};

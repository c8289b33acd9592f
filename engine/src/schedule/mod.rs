//! Schedules as data: the IR, its generators, lowering to transfers, and validation.
//!
//! The usual path: [`generate`] (compute actions only) -> [`lower`] (adds sends and receives)
//! -> [`validate`] (proves it completes) -> [`crate::sim::simulate`] (times it). A schedule
//! prints as text and parses back ([`Schedule::parse`]), so it can be written by hand.

mod action;
mod generate;
mod lower;
pub(crate) mod replay;
mod text;
pub(crate) mod validate;

pub use action::{Action, Schedule};
pub use generate::{
    dualpipe_v, generate, generate_for, gpipe, interleaved, looped_placement, naive, one_f_one_b,
    set_max_actions, v_placement, zero_bubble, zero_bubble_fixed, zero_bubble_for, zero_bubble_v,
    zero_bubble_v_fixed, zero_bubble_v_for, ScheduleChoice, ScheduleKind, DEFAULT_MAX_ACTIONS,
};
pub use lower::{lower, lower_for};
pub use validate::validate;

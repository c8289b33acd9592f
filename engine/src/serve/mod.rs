//! Serving: continuous batching of many sequences through the pipeline's stages.
//!
//! [`Pipeline`] keeps the ranks on their own threads, each running the ragged passes it is
//! handed in order; [`Scheduler`] decides what each pass holds (admission against a
//! key/value cache budget of fixed-size blocks, prompts in chunks beside decoding, as many
//! batches in flight as there are stages) and samples each sequence's next token. The HTTP
//! server of `pipit serve` sits on top and speaks to the scheduler through [`Command`]s.

mod pipeline;
mod scheduler;

pub use pipeline::{Job, Pipeline};
pub use scheduler::{Command, Event, Finish, Gauges, Limits, Request, Scheduler, Sink};

//! The executor: runs a lowered schedule on one worker per rank, over any backend.

pub mod collective;
mod infer;
mod step;
mod transport;

pub use infer::{
    decode_rank, evaluate_rank, forward, forward_rank, on_every_rank, Decoder, Pass, Piece,
    SequenceCaches, Want,
};
pub use step::{
    clip_scale, train_step, train_step_rank, Rank, RankReport, StepOptions, StepReport,
};
pub use transport::{
    check_len, in_process_mesh, in_process_mesh_over, InProcessTransport, DEFAULT_RECV_TIMEOUT,
};

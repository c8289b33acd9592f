//! `pipit eval`: the loss of a checkpoint on a text, in nats per byte, in one process or in one
//! process per rank (`pipit launch`, or RANK/WORLD_SIZE set), where rank 0 prints it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use pipit_engine::checkpoint;
use pipit_engine::data::split_text;
use pipit_engine::dist::frame::Fnv64;
use pipit_engine::dist::{watch_launcher, LaunchEnv, RankTrainer};
use pipit_engine::schedule::ScheduleKind;
use pipit_engine::train::{Init, TrainConfig, Trainer};
use pipit_engine::{invalid_input, Backend};
use serde_json::json;

use super::device::{with_backend, BackendChoice, BackendJob};
use super::train::{load_checkpoint, text, VAL_FRACTION};
use super::OutputFormat;
use pipit_engine::tokenizer::Tokenizer;

/// Mean cross-entropy of a checkpoint over consecutive non-overlapping windows of a text:
/// inputs are tokens [k·T, (k+1)·T), targets the same shifted by one, for every k with
/// (k+1)·T + 1 ≤ the text's length in tokens. Tokens are bytes (nats per byte), or GPT-2's
/// BPE tokens for a checkpoint with a vocab.json and merges.txt, or a tokenizer.json (nats
/// per token; the text must then be UTF-8).
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Checkpoint directory (pipit's, or a Hugging Face GPT-2 or Llama one; sharded or not).
    #[arg(long, value_name = "DIR", default_value = super::train::DEFAULT_CHECKPOINT)]
    checkpoint: PathBuf,
    /// Text to score; default: the validation split (last 10%) of the embedded corpus.
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    /// Window length T; default: the model's n_positions.
    #[arg(long)]
    seq_len: Option<usize>,
    /// Windows scored per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Pipeline ranks to cut the model into.
    #[arg(long, default_value_t = 1)]
    stages: usize,
    /// Device for every rank.
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendChoice,
    /// Output format: one line of text, or `{"loss": ..., "tokens": ..., "per": "byte" or
    /// "token"}`.
    #[arg(long, value_enum, default_value = "text")]
    format: OutputFormat,
    /// Multi-process runs: seconds a rank may stay silent before every other rank stops with
    /// an error naming it; also how long the rendezvous waits for missing ranks.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    peer_timeout: f64,
}

/// Run `pipit eval`.
pub fn run(args: EvalArgs) -> Result<()> {
    run_to(args, &mut std::io::stdout().lock())
}

/// Run `pipit eval`, writing what it prints to `out`.
pub fn run_to(args: EvalArgs, out: &mut dyn std::io::Write) -> Result<()> {
    // A rank started by `pipit launch` stops by itself once the launcher is gone.
    watch_launcher()?;
    if !(args.peer_timeout > 0.0 && args.peer_timeout.is_finite()) {
        return Err(invalid_input!(
            "--peer-timeout must be a positive number of seconds, got {}",
            args.peer_timeout
        ));
    }
    let header = checkpoint::load_header(&args.checkpoint)?;
    let text = match &args.data {
        Some(path) => std::fs::read(path)
            .map_err(|e| invalid_input!("cannot read --data {}: {e}", path.display()))?,
        None => split_text(&text(None)?, VAL_FRACTION)?.1.to_vec(),
    };
    let seq = args.seq_len.unwrap_or(header.config.n_positions);
    if seq == 0 || seq > header.config.n_positions {
        return Err(invalid_input!(
            "--seq-len must be between 1 and the model's n_positions = {}, got {seq}",
            header.config.n_positions
        ));
    }
    let config = TrainConfig {
        model: header.config.clone(),
        stages: args.stages,
        microbatches: 1,
        batch_size: args.batch_size,
        seq_len: seq,
        schedule: ScheduleKind::GPipe.into(),
        ..TrainConfig::default()
    };
    // Under a launcher with more than one process, this process runs only its own rank.
    let launch = LaunchEnv::from_env()?.filter(|env| env.world_size > 1);
    let ckpt = load_checkpoint(&args.checkpoint, &config, launch.as_ref())?;
    let leader = launch.as_ref().is_none_or(|env| env.rank == 0);
    let tokenizer = Tokenizer::for_checkpoint(&args.checkpoint, header.config.vocab_size)?;
    let ids = tokenizer.encode_bytes(&text)?;
    let per = tokenizer.unit();
    let (loss, tokens) = with_backend(
        args.backend,
        EvalJob {
            config,
            ckpt: &ckpt,
            text: &text,
            ids: &ids,
            launch,
            peer_timeout: Duration::from_secs_f64(args.peer_timeout),
        },
    )?;
    if !leader {
        return Ok(());
    }
    if !loss.is_finite() {
        return Err(ckpt.non_finite("the loss", loss));
    }
    match args.format {
        OutputFormat::Json => writeln!(
            out,
            "{}",
            json!({ "loss": loss, "tokens": tokens, "per": per })
        )?,
        OutputFormat::Text => writeln!(out, "loss {loss:.4} nats/{per} over {tokens} tokens")?,
    }
    Ok(())
}

struct EvalJob<'a> {
    config: TrainConfig,
    ckpt: &'a checkpoint::Checkpoint,
    /// The text as read, which every rank checks it shares.
    text: &'a [u8],
    /// Its tokens.
    ids: &'a [u32],
    launch: Option<LaunchEnv>,
    peer_timeout: Duration,
}

impl BackendJob for EvalJob<'_> {
    type Output = (f64, usize);

    fn run<B: Backend>(self, make: &mut dyn FnMut(usize) -> Result<B>) -> Result<(f64, usize)> {
        let seq = self.config.seq_len;
        let Some(env) = self.launch else {
            let mut trainer = Trainer::new(self.config, make, Init::Frozen(self.ckpt))?;
            return trainer.evaluate(self.ids, seq, 0);
        };
        let backend = make(env.local_rank)?;
        let init = Init::Frozen(self.ckpt);
        let mut rank = RankTrainer::new(self.config, backend, init, &env, self.peer_timeout)?;
        // The first stage reads the inputs and the last the targets: both must see the same text.
        let text = json!({ "bytes": self.text.len(), "checksum": Fnv64::of(self.text) });
        let result = rank
            .same_settings("text to score", &text)
            .and_then(|()| rank.evaluate(self.ids, seq, 0));
        rank.conclude(result)
    }
}

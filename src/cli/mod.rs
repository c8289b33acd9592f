//! Subcommands of the `pipit` command line, one file each ([`main`] is the binary's).

mod device;
mod dry_run;
pub(crate) mod eval;
pub(crate) mod generate;
mod interrupt;
mod launch;
mod partition;
pub(crate) mod plan;
mod serve;
mod trace;
pub(crate) mod train;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

/// pipit: pipeline-parallel training and inference.
///
/// Plan a pipeline before it runs (`pipit plan`), cut layers into stages (`pipit partition`),
/// train a GPT-2 or Llama model cut into stages (`pipit train`), then sample from it
/// (`pipit generate`) or score it (`pipit eval`).
#[derive(Parser)]
#[command(name = "pipit", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The most actions a generated plan may hold (each stage's forward and backward, and
    /// weight-gradient half where split, for every micro-batch); larger plans are refused at
    /// once, naming p, m and v.
    #[arg(long, global = true, value_name = "N", default_value_t = pipit_engine::schedule::DEFAULT_MAX_ACTIONS)]
    max_actions: usize,
    /// Load a checkpoint even when a file no longer matches the checksum pipit recorded
    /// when it saved it (`pipit-checksums.json`).
    #[arg(long, global = true)]
    no_verify: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Train a GPT-2 or Llama cut into pipeline stages (the main job: bytes, or a checkpoint's BPE tokens).
    Train(Box<train::TrainArgs>),
    /// Sample text from a checkpoint through the pipeline's stages.
    ///
    /// Tokens are bytes, or GPT-2's BPE tokens for a checkpoint with a vocab.json and
    /// merges.txt or a tokenizer.json (a Hugging Face GPT-2 directory); with those, a sample
    /// ends at `<|endoftext|>` (see --ignore-eos). Each stage keeps the keys and values of the
    /// tokens it has seen, so every new token runs through the pipeline alone (in f32). The
    /// context is at most the model's n_positions tokens: when it fills up, it restarts from
    /// its last half, which runs again once.
    Generate(generate::GenerateArgs),
    /// Score a checkpoint on a text: mean cross-entropy in nats per byte (or per BPE token).
    Eval(eval::EvalArgs),
    /// Plan a pipeline step: schedule, transfers, deadlock check, simulated bubble and memory.
    ///
    /// Times are in milliseconds, under the costs given (or measured by a `pipit train
    /// --trace`). For a model's memory in bytes on each rank, `pipit train --dry-run` runs one
    /// step of it on no device.
    Plan(plan::PlanArgs),
    /// Cut a model's layers into pipeline stages (uniform, balanced or memory-capped).
    Partition(partition::PartitionArgs),
    /// Serve a checkpoint over HTTP with OpenAI's completions API, batching requests continuously.
    ///
    /// `POST /v1/completions` (prompt, max_tokens, temperature, top_p, top_k, seed, stop, n,
    /// stream), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus). Requests join
    /// the running batch between passes and leave it as soon as they finish; the key/value
    /// cache is a budget of blocks (--kv-cache-bytes), and a request waits until its blocks
    /// are free. With --stages P the ranks run on P threads with P batches in flight.
    /// Try: `pipit serve --checkpoint runs/latest --port 8000`, then
    /// `curl localhost:8000/v1/completions -H 'Content-Type: application/json'
    /// -d '{"model": "latest", "prompt": "ROMEO:", "max_tokens": 40}'`.
    Serve(serve::ServeArgs),
    /// Start one process per pipeline rank on this host: `pipit launch --nproc-per-node 4 -- train ...`.
    Launch(launch::LaunchArgs),
}

/// Parse arguments, run the subcommand, and turn an error into one line and an exit status:
/// 2 for input the user got wrong, 1 for anything else.
pub fn main() -> ExitCode {
    let matches = Cli::command()
        .mut_subcommand("train", train::with_defaults_in_help)
        .get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    pipit_engine::schedule::set_max_actions(cli.max_actions);
    pipit_engine::checkpoint::verify_checksums(!cli.no_verify);
    let result: anyhow::Result<()> = match cli.command {
        Command::Train(args) => train::run(*args),
        Command::Generate(args) => generate::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Partition(args) => partition::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Launch(args) => launch::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Standard output closed by its reader (`pipit plan | head`): nothing more to say.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) if err.is::<interrupt::Interrupted>() => {
            eprintln!("{err}");
            ExitCode::from(130)
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            if pipit_engine::is_invalid_input(&err) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

thread_local! {
    /// Set while a library call runs without the command line's messages ([`quietly`]).
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread's messages are silenced ([`quietly`]).
pub(crate) fn is_quiet() -> bool {
    QUIET.with(|q| q.get())
}

/// Run `f` without the messages the command line prints on stderr (which device, how the
/// layers were cut, progress bars): what the library's calls do unless asked otherwise.
pub(crate) fn quietly<R>(f: impl FnOnce() -> R) -> R {
    let before = QUIET.with(|q| q.replace(true));
    let out = f();
    QUIET.with(|q| q.set(before));
    out
}

/// `eprintln!`, unless this thread runs [`quietly`].
macro_rules! say {
    ($($arg:tt)*) => {
        if !$crate::cli::is_quiet() {
            eprintln!($($arg)*);
        }
    };
}
pub(crate) use say;

/// Write `text` to standard output in one piece (a reader that goes away makes an error that
/// [`main`] takes quietly).
pub fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Whether `err` comes from writing to a pipe whose reader has gone.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// How a command that prints a result prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Text for people.
    Text,
    /// One JSON object, for programs.
    Json,
}

//! Subcommands of the `pipit` command line, one file each.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// pipit: pipeline-parallel training and inference.
///
/// Plan a pipeline before it runs (`pipit plan`), cut layers into stages (`pipit partition`),
/// and train a GPT-2-style model cut into stages (`pipit train`).
#[derive(Parser)]
#[command(name = "pipit", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {}

/// Parse arguments, run the subcommand, and turn an error into one line and an exit status:
/// 2 for input the user got wrong, 1 for anything else.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {};
    match result {
        Ok(()) => ExitCode::SUCCESS,
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

//! Helpers shared by the command-line tests: the pipit binary with a clean environment,
//! scratch folders, the tiny model they train, and checks on a finished command.

// Each test file uses its own subset of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// Variables of launchers and of pipit's multi-process runs, cleared so a test sets its own.
pub const LAUNCH_VARS: &[&str] = &[
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
    "PIPIT_TOKEN",
    "PIPIT_FAULT_ABORT_AFTER_STEP",
];

/// A tiny model (4 layers in all) on the reference backend with a constant learning rate, so a
/// run cut in two follows the same learning-rate schedule as an uninterrupted one.
pub const TINY_MODEL: &[&str] = &[
    "--backend",
    "reference",
    "--n-layer",
    "2",
    "--n-embd",
    "16",
    "--n-head",
    "2",
    "--n-positions",
    "16",
    "--seq-len",
    "16",
    "--batch-size",
    "4",
    "--microbatches",
    "2",
    "--lr",
    "0.003",
    "--min-lr",
    "0.003",
    "--warmup-steps",
    "0",
    "--eval-tokens",
    "256",
];

/// The pipit binary, with no launcher variables inherited from the test's environment:
/// `PIPIT_BIN` when set (a build carried to another machine, as scripts/gpu-check.sh does),
/// else the one cargo built for these tests.
pub fn pipit_command() -> Command {
    let bin = std::env::var_os("PIPIT_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_pipit").into());
    let mut cmd = Command::new(bin);
    cmd.env("XDG_RUNTIME_DIR", "/tmp");
    for var in LAUNCH_VARS {
        cmd.env_remove(var);
    }
    cmd
}

/// How many whole lines a file being written holds so far (none while it does not exist).
pub fn finished_lines(path: &Path) -> usize {
    std::fs::read(path).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count())
}

/// A fresh, empty folder for one test of one test file.
pub fn scratch(file: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pipit-{file}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The JSON objects of a `--log-json` file, one per line.
pub fn log_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The command succeeded; otherwise fail the test with its stderr.
pub fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

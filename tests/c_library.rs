//! The C library (`capi/`): `examples/c/train.c` compiled with `cc` against the built
//! `libpipit` and the committed header, then run; its plan, losses and sample must be the
//! command line's for the same settings. (The header's own checks are in `capi/tests/`.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{log_lines, ok, pipit_command, scratch};
use serde_json::Value;

/// The repository root.
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `target/<profile>`, where cargo put the pipit binary these tests run (and the library).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_pipit"))
        .parent()
        .expect("the binary's folder")
        .to_path_buf()
}

/// Compile and link the example against the C library of the tests' profile, which
/// `cargo test --workspace` builds (built here first where it is missing, as under
/// `cargo test -p pipit`).
fn build_example(dir: &Path) -> PathBuf {
    let target = target_dir();
    let library = target.join(format!(
        "{}pipit{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    if !library.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .current_dir(root())
            .args(["build", "-q", "-p", "pipit-capi"]);
        if target.ends_with("release") {
            build.arg("--release");
        }
        ok(&build.output().expect("cargo runs"));
    }
    assert!(library.exists(), "no {}", library.display());
    let exe = dir.join("train_c");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .arg(root().join("examples/c/train.c"))
        .arg("-std=c99")
        .arg("-Wall")
        .arg("-Werror")
        .arg(format!("-I{}", root().join("capi/include").display()))
        .arg(format!("-L{}", target.display()))
        .arg("-lpipit")
        .arg(format!("-Wl,-rpath,{}", target.display()))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("{cc} runs: {e}"));
    ok(&out);
    exe
}

/// The tiny run of the example, as `pipit train` flags.
const RUN: &[&str] = &[
    "--backend",
    "cpu",
    "--n-layer",
    "2",
    "--n-embd",
    "32",
    "--n-head",
    "2",
    "--n-positions",
    "32",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--stages",
    "2",
    "--microbatches",
    "2",
    "--steps",
    "6",
    "--lr",
    "0.003",
    "--warmup-steps",
    "0",
    "--eval-every",
    "3",
    "--eval-tokens",
    "512",
];

#[test]
fn the_c_example_plans_trains_and_samples_as_the_command_line_does() {
    let dir = scratch("c-library", "example");
    let exe = build_example(&dir);
    let ckpt = dir.join("ckpt");
    let out = Command::new(&exe)
        .arg(&ckpt)
        .env("XDG_RUNTIME_DIR", "/tmp")
        .output()
        .unwrap();
    ok(&out);
    // Without "verbose", the library prints nothing of its own.
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let field = |prefix: &str| -> Vec<&str> {
        stdout
            .lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .collect()
    };

    // The plan is `pipit plan --format json`'s.
    let plan: Value = serde_json::from_str(field("plan ")[0]).unwrap();
    let cli = pipit_command()
        .args([
            "plan",
            "--schedule",
            "1f1b",
            "--stages",
            "2",
            "--microbatches",
            "4",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    ok(&cli);
    assert_eq!(plan, serde_json::from_slice::<Value>(&cli.stdout).unwrap());

    // Every step's line is the one `pipit train --log-json` writes, but for the timings.
    let steps: Vec<Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let log = dir.join("cli.jsonl");
    let cli = pipit_command()
        .arg("train")
        .args(RUN)
        .args(["--no-save", "--log-json", log.to_str().unwrap()])
        .output()
        .unwrap();
    ok(&cli);
    let expected = log_lines(&log);
    assert_eq!(steps.len(), 6);
    assert_eq!(steps.len(), expected.len());
    for (got, want) in steps.iter().zip(&expected) {
        for key in ["step", "loss", "lr", "val_loss"] {
            assert_eq!(got.get(key), want.get(key), "{key}: {got} vs {want}");
        }
    }
    assert!(steps[2]["val_loss"].is_number() && steps[5]["val_loss"].is_number());
    let loss = |i: usize| steps[i]["loss"].as_f64().unwrap();
    assert!(
        loss(5) < loss(0) - 0.1,
        "the loss falls: {} to {}",
        loss(0),
        loss(5)
    );
    let val: f64 = field("val_loss ")[0].parse().unwrap();
    let last_val = expected[5]["val_loss"].as_f64().unwrap();
    assert!((val - last_val).abs() < 1e-6, "{val} vs {last_val}");

    // The checkpoint it saved samples as `pipit generate` does from it.
    assert_eq!(field("saved "), [ckpt.to_str().unwrap()]);
    let sample: Value = serde_json::from_str(field("generated ")[0]).unwrap();
    let cli = pipit_command()
        .args([
            "generate",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--prompt",
            "ROMEO:",
        ])
        .args([
            "--max-tokens",
            "16",
            "--temperature",
            "0",
            "--stages",
            "2",
            "--backend",
            "cpu",
        ])
        .args(["--format", "json"])
        .output()
        .unwrap();
    ok(&cli);
    let want: Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert_eq!(sample["samples"], want["samples"]);
    assert_eq!(sample["samples"][0]["ids"].as_array().unwrap().len(), 16);

    // The callback stopped the second run after two steps; bad input is a status and a line.
    let cancelled = field("cancelled ")[0];
    assert!(
        cancelled.starts_with("3 stopped by the progress callback after step 2 of 6"),
        "{cancelled}"
    );
    let refused = field("refused ");
    assert_eq!(refused.len(), 2);
    assert_eq!(refused[0], "2 --stages must be at least 1, got 0");
    assert!(
        refused[1].starts_with("2 unknown option `microbatchez`"),
        "{}",
        refused[1]
    );
}

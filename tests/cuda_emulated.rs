//! The CUDA backend end to end without a GPU: `pipit train --backend cuda` on host emulations
//! of the CUDA driver, NVRTC, cuBLAS and NCCL (`cuda/cpu-check/libraries.cpp`, built by
//! `scripts/cuda-cpu-backend.sh`; the kernels are the backend's own, built with g++ against
//! `cuda/cpu-check/emulate.h`). Four stages share the one emulated GPU and hand tensors over as
//! device buffers. The losses are the reference backend's, and every rank's peak memory is what
//! `--dry-run` predicts for CUDA, in f32 and in bf16 (tensor-core attention). And every kernel
//! on its own against float64 oracles (`scripts/cuda-cpu-check.sh`), and the emulation's memory
//! checks (`cuda/cpu-check/overrun.cpp`): a kernel writing past its buffer, or into one freed
//! first, is stopped and named; and its barrier checks (`cuda/cpu-check/hazards.cpp`): a
//! missing barrier gives wrong results in the warp-by-warp orders, and a deadlocked one stops.
//! Skipped, with the reason, where g++ is missing.

mod common;

use std::process::{Command, Output};

use common::{log_lines, ok, pipit_command, scratch, LAUNCH_VARS};
use serde_json::Value;

/// The default model with half its batch, two steps, evaluated at the second.
const RUN: &[&str] = &[
    "train",
    "--batch-size",
    "8",
    "--microbatches",
    "4",
    "--steps",
    "2",
    "--eval-every",
    "2",
    "--eval-tokens",
    "512",
    "--no-save",
];

/// `PROGRAM ARGS` with the emulated libraries built and on its library path.
fn on_emulated_libraries(program: &std::ffi::OsStr, args: &[String]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/cuda-cpu-backend.sh"
    ))
    .arg("--")
    .arg(program)
    .args(args)
    .env("XDG_RUNTIME_DIR", "/tmp");
    for var in LAUNCH_VARS {
        cmd.env_remove(var);
    }
    cmd.output().expect("bash runs")
}

/// `pipit ARGS` with the emulated libraries on its library path.
fn on_emulated_cuda(args: &[String]) -> Output {
    on_emulated_libraries(pipit_command().get_program(), args)
}

fn pipit(args: &[String]) -> Output {
    pipit_command().args(args).output().expect("pipit runs")
}

/// Each rank's predicted peak, from a `--dry-run --log-json` file.
fn predicted_peaks(path: &std::path::Path) -> Value {
    let ranks = log_lines(path)[0]["ranks"].as_array().unwrap().clone();
    ranks.iter().map(|r| r["peak_bytes"].clone()).collect()
}

/// Whether g++ is here to build the emulation; if not, says so on stderr.
fn have_gxx() -> bool {
    let here = Command::new("g++").arg("--version").output().is_ok();
    if !here {
        eprintln!("skipped: no g++ to build the emulated CUDA");
    }
    here
}

/// `cuda/cpu-check/NAME.cpp` built with g++ (and `extra` arguments) into a scratch folder.
fn build_check(name: &str, extra: &[&str]) -> std::path::PathBuf {
    let exe = scratch("cuda-emulated", name).join(name);
    ok(&Command::new("g++")
        .args(["-std=c++20", "-O1", "-o"])
        .arg(&exe)
        .arg(format!(
            "{}/cuda/cpu-check/{name}.cpp",
            env!("CARGO_MANIFEST_DIR")
        ))
        .args(extra)
        .output()
        .expect("g++ runs"));
    exe
}

#[test]
fn every_cuda_kernel_matches_its_oracle() {
    if !have_gxx() {
        return;
    }
    let out = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/cuda-cpu-check.sh"
        ))
        .output()
        .expect("bash runs");
    ok(&out);
    let report = String::from_utf8_lossy(&out.stdout);
    let passed = report.lines().filter(|l| l.starts_with("ok ")).count();
    // Once per order of blocks and threads: forward, reverse, shuffled.
    assert_eq!(report.matches("\n0 failures").count(), 3, "{report}");
    assert!(passed >= 3 * 147, "{passed} checks passed: {report}");
}

#[test]
fn the_cuda_backend_trains_like_the_reference_on_emulated_libraries() {
    if !have_gxx() {
        return;
    }
    let dir = scratch("cuda-emulated", "train");
    // f32 equals the reference up to float rounding (2.7e-9 apart when this was written); bf16
    // attention runs on emulated tensor cores, rounding where the reference does not (1.8e-6).
    for (dtype, tolerance) in [("f32", 1e-6), ("bf16", 1e-4)] {
        let log = |name: &str| dir.join(format!("{name}-{dtype}.jsonl"));
        let (cuda, reference, dry) = (log("cuda"), log("reference"), log("dry"));
        let run = |backend: &str, log: &std::path::Path, extra: &[&str]| {
            let mut a = RUN.to_vec();
            a.extend(["--backend", backend, "--dtype", dtype]);
            a.extend(["--log-json", log.to_str().unwrap()]);
            a.extend(extra);
            a.into_iter().map(String::from).collect::<Vec<_>>()
        };
        let out = on_emulated_cuda(&run("cuda", &cuda, &[]));
        ok(&out);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cuda: pipit host emulation"), "{err}");
        ok(&pipit(&run("reference", &reference, &[])));
        ok(&pipit(&run("cuda", &dry, &["--dry-run"])));

        let (got, want) = (log_lines(&cuda), log_lines(&reference));
        assert_eq!(got.len(), 2, "{dtype}: a line per step");
        for (g, w) in got.iter().zip(&want) {
            for key in ["loss", "val_loss"] {
                let (Some(a), Some(b)) = (g[key].as_f64(), w[key].as_f64()) else {
                    assert_eq!(g[key], w[key], "{dtype}, step {}: {key}", g["step"]);
                    continue;
                };
                assert!(
                    (a - b).abs() <= tolerance * b.abs(),
                    "{dtype}, step {}: {key} {a} on CUDA, {b} on the reference backend",
                    g["step"]
                );
            }
            assert_eq!(
                g["peak_bytes"],
                predicted_peaks(&dry),
                "{dtype}, step {}: measured peaks against the dry run's",
                g["step"]
            );
        }
    }
}

#[test]
fn a_kernel_outside_its_buffer_or_after_its_free_is_stopped_and_named() {
    if !have_gxx() {
        return;
    }
    // Builds the emulated libraries if needed, then the driver program against them.
    ok(&on_emulated_libraries("true".as_ref(), &[]));
    let lib = concat!(env!("CARGO_MANIFEST_DIR"), "/target/emulated-cuda");
    let exe = build_check(
        "overrun",
        &[&format!("-L{lib}"), "-lcuda", &format!("-Wl,-rpath,{lib}")],
    );
    let run = |mode: &str| Command::new(&exe).arg(mode).output().expect("runs");

    let inside = run("inside");
    ok(&inside);
    assert_eq!(String::from_utf8_lossy(&inside.stdout), "inside: ok\n");

    let at = "kernel fill_index touched byte";
    for (mode, byte, why) in [
        ("past", "4096", "outside it"),
        ("freed", "0", "after it was freed"),
    ] {
        let out = run(mode);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{mode}: went unseen: {err}");
        let says = format!("{at} {byte} of the 4096-byte allocation at ");
        assert!(err.contains(&says), "{mode}: {err}");
        assert!(err.contains(why), "{mode}: {err}");
        assert!(out.stdout.is_empty(), "{mode}: it ran on after the fault");
    }
}

#[test]
fn the_kernel_emulation_shows_missing_barriers_and_deadlocks() {
    if !have_gxx() {
        return;
    }
    let exe = build_check(
        "hazards",
        &[concat!("-I", env!("CARGO_MANIFEST_DIR"), "/cuda/cpu-check")],
    );
    let run = |case: &str, order: &str| {
        Command::new(&exe)
            .arg(case)
            .env("PIPIT_EMULATED_CUDA_ORDER", order)
            .output()
            .expect("runs")
    };
    // Races: the warp-by-warp orders must show them (the forward one moves warps in step and
    // may hide them).
    for case in ["neighbour", "between-warps"] {
        for order in ["reverse", "shuffle"] {
            let out = run(case, order);
            ok(&out);
            let said = String::from_utf8_lossy(&out.stdout);
            let wrong: u32 = said.split_whitespace().next().unwrap().parse().unwrap();
            assert!(wrong > 0, "{case} in the {order} order went unseen: {said}");
        }
    }
    // Deadlocks: every order must stop them with a line, not hang.
    for case in ["early-exit", "shuffle-short"] {
        for order in ["forward", "reverse", "shuffle"] {
            let out = run(case, order);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{case} in the {order} order: {err}");
            assert!(
                err.contains("wait at a barrier the others never reach"),
                "{case} in the {order} order: {err}"
            );
        }
    }
}

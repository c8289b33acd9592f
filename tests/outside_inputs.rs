//! What pipit reads and did not just make, as a user meets it: a plan too large to build is
//! refused at once, a checkpoint whose bytes changed after pipit saved it is refused by name,
//! and a weight that is not finite makes `eval` and `generate` fail naming the tensor.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::{ok, pipit_command, TINY_MODEL};
use serde_json::Value;

fn pipit(args: &[&str]) -> Output {
    pipit_command().args(args).output().expect("pipit runs")
}

/// Exit status 2, and a last line on stderr (after any line saying which device was picked)
/// that is the one error line and holds every one of `needles`.
fn refused(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "{err}");
    assert_eq!(err.matches("error").count(), 1, "one error line: {err}");
    for needle in needles {
        assert!(last.contains(needle), "{needle:?} in {err}");
    }
}

/// A checkpoint of the tiny model after one step, in a fresh folder.
fn checkpoint(name: &str) -> PathBuf {
    let dir = common::scratch("outside-inputs", name).join("ckpt");
    let mut args = vec!["train"];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(&["--steps", "1", "--eval-every", "0", "--stages", "2"]);
    args.extend_from_slice(&["--save", dir.to_str().unwrap()]);
    ok(&pipit(&args));
    dir
}

/// Where the bytes of tensor `name` lie in a safetensors file.
fn tensor_bytes(file: &[u8], name: &str) -> std::ops::Range<usize> {
    let len = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&file[8..8 + len]).unwrap();
    let offsets = &header[name]["data_offsets"];
    let start = 8 + len + offsets[0].as_u64().unwrap() as usize;
    start..8 + len + offsets[1].as_u64().unwrap() as usize
}

/// Invert `range` of `bytes` and write them to `path`.
fn flip(path: &Path, bytes: &mut [u8], range: std::ops::Range<usize>) {
    for b in &mut bytes[range] {
        *b ^= 0xff;
    }
    std::fs::write(path, bytes).unwrap();
}

fn eval(ckpt: &Path, extra: &[&str]) -> Output {
    let c = ckpt.to_str().unwrap();
    pipit(
        &[
            &["eval", "--backend", "reference", "--checkpoint", c],
            extra,
        ]
        .concat(),
    )
}

#[test]
fn a_plan_beyond_the_action_limit_is_refused_at_once() {
    let started = Instant::now();
    let out = pipit(&[
        "plan",
        "--schedule",
        "1f1b",
        "--stages",
        "10000",
        "--microbatches",
        "100000",
    ]);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    refused(
        &out,
        &[
            "p = 10000, m = 100000, v = 1",
            "2000000000 actions",
            "--max-actions",
        ],
    );
    // Zero bubble splits backward: three actions per stage and micro-batch.
    let out = pipit(&[
        "plan",
        "--schedule",
        "zb-h1",
        "-p",
        "4",
        "-m",
        "8",
        "--max-actions",
        "95",
    ]);
    refused(&out, &["96 actions", "limit of 95"]);
    ok(&pipit(&[
        "plan",
        "--schedule",
        "zb-h1",
        "-p",
        "4",
        "-m",
        "8",
        "--max-actions",
        "96",
    ]));
    // Training plans go through the same generator.
    let mut args = vec!["train", "--dry-run", "--max-actions", "7"];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(&["--stages", "2"]);
    refused(&pipit(&args), &["p = 2, m = 2, v = 1", "8 actions"]);
}

#[test]
fn a_checkpoint_changed_after_saving_is_refused_naming_the_file() {
    let ckpt = checkpoint("flipped");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("pipit-checksums.json")).unwrap()).unwrap();
    let files = manifest["files"].as_object().unwrap();
    for name in ["config.json", "model.safetensors", "optimizer.safetensors"] {
        assert!(files.contains_key(name), "{name} in {manifest}");
    }
    ok(&eval(&ckpt, &[]));
    // 64 bytes flipped inside one tensor's data.
    let path = ckpt.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = tensor_bytes(&bytes, "transformer.h.0.mlp.c_fc.weight").start;
    flip(&path, &mut bytes, at..at + 64);
    let out = eval(&ckpt, &[]);
    refused(&out, &["model.safetensors does not match", "--no-verify"]);
    // Every command that loads it refuses it alike.
    let c = ckpt.to_str().unwrap();
    let out = pipit(&[
        "generate",
        "--backend",
        "reference",
        "--checkpoint",
        c,
        "--max-tokens",
        "2",
    ]);
    refused(&out, &["model.safetensors does not match"]);
    // --no-verify loads it anyway: what follows is the flipped weights' own business.
    let out = eval(&ckpt, &["--no-verify"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("does not match"), "{err}");
    // A host may hold only some of the files: those it has are checked.
    flip(&path, &mut bytes, at..at + 64);
    std::fs::remove_file(ckpt.join("optimizer.safetensors")).unwrap();
    ok(&eval(&ckpt, &[]));
}

#[test]
fn a_weight_that_is_not_finite_fails_eval_and_generate_naming_it() {
    let ckpt = checkpoint("nan");
    // As a checkpoint made elsewhere: no checksums to stop it first.
    std::fs::remove_file(ckpt.join("pipit-checksums.json")).unwrap();
    let path = ckpt.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = tensor_bytes(&bytes, "transformer.h.1.attn.c_proj.weight").start + 4 * 5;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let named = ["transformer.h.1.attn.c_proj.weight holds NaN (element 5)"];
    let out = eval(&ckpt, &[]);
    refused(&out, &[&["the loss came out NaN"][..], &named].concat());
    let c = ckpt.to_str().unwrap();
    let out = pipit(&[
        "generate",
        "--backend",
        "reference",
        "--checkpoint",
        c,
        "--max-tokens",
        "3",
        "--stages",
        "2",
    ]);
    refused(&out, &[&["a logit came out NaN"][..], &named].concat());
}

//! `pipit train`, `generate` and `eval` as a user runs them: checkpoints that resume exactly,
//! logs and traces with the promised keys, and bad input that ends with one line and status 2
//! without touching a good checkpoint.

mod common;

use std::path::Path;
use std::process::Output;

use common::{log_lines, ok, TINY_MODEL};
use serde_json::Value;

fn pipit(args: &[&str]) -> Output {
    common::pipit_command()
        .args(args)
        .output()
        .expect("the pipit binary runs")
}

fn scratch(name: &str) -> std::path::PathBuf {
    common::scratch("train-cli", name)
}

/// `pipit train` on the tiny model; it writes no checkpoint unless `extra` says `--save`.
fn train(extra: &[&str]) -> Output {
    let mut args = vec!["train"];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(&["--stages", "2", "--eval-every", "0"]);
    args.extend_from_slice(extra);
    if !extra.contains(&"--save") {
        args.push("--no-save");
    }
    pipit(&args)
}

/// Exit status 2 and exactly one line on stderr that contains `needle`.
fn refused(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(
        last.starts_with("error: ") && last.contains(needle),
        "stderr: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "stderr: {err}"
    );
}

#[test]
fn resuming_gives_the_losses_of_an_uninterrupted_run() {
    let dir = scratch("resume");
    let (full, half, rest) = (
        dir.join("full.jsonl"),
        dir.join("half.jsonl"),
        dir.join("rest.jsonl"),
    );
    let ckpt = dir.join("ckpt");
    ok(&train(&[
        "--steps",
        "6",
        "--log-json",
        full.to_str().unwrap(),
    ]));
    ok(&train(&[
        "--steps",
        "3",
        "--log-json",
        half.to_str().unwrap(),
        "--save",
        ckpt.to_str().unwrap(),
    ]));
    for file in [
        "model.safetensors",
        "config.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(ckpt.join(file).is_file(), "{file} is written");
    }
    // Resume to step 6, logging to `log`, with `extra` flags.
    let resume = |log: &Path, extra: &[&str]| {
        let c = ckpt.to_str().unwrap();
        let base = ["train", "--resume", c, "--steps", "6", "--no-save"];
        ok(&pipit(
            &[&base[..], extra, &["--log-json", log.to_str().unwrap()]].concat(),
        ));
    };
    resume(&rest, &[]);
    // The checkpoint is the model's, not the pipeline's: it resumes on another cut too.
    let other = dir.join("other.jsonl");
    resume(&other, &["--stages", "1", "--schedule", "gpipe"]);

    let full = log_lines(&full);
    let mut cut = log_lines(&half);
    cut.extend(log_lines(&rest));
    assert_eq!(full.len(), 6);
    assert_eq!(cut.len(), 6);
    let other = log_lines(&other);
    assert_eq!(other.len(), 3);
    for (a, b) in full[3..].iter().zip(&other) {
        assert_eq!(
            (&a["step"], &a["loss"]),
            (&b["step"], &b["loss"]),
            "the same steps on one stage"
        );
    }
    for (a, b) in full.iter().zip(&cut) {
        assert_eq!(a["step"], b["step"]);
        assert_eq!(
            a["loss"], b["loss"],
            "step {}: same loss after resuming",
            a["step"]
        );
    }
    for key in [
        "step",
        "loss",
        "val_loss",
        "lr",
        "tokens_per_sec",
        "bubble_fraction",
        "peak_bytes",
    ] {
        assert!(!full[5][key].is_null(), "the last log line has {key}");
    }
    assert_eq!(
        full[5]["peak_bytes"].as_array().unwrap().len(),
        2,
        "one peak per rank"
    );
    assert!(
        full[0]["val_loss"].is_null(),
        "val_loss only when evaluated"
    );
}

#[test]
fn same_seed_same_losses_and_trace_opens_as_chrome_json() {
    let dir = scratch("seed");
    let (a, b, trace) = (
        dir.join("a.jsonl"),
        dir.join("b.jsonl"),
        dir.join("trace.json"),
    );
    ok(&train(&[
        "--steps",
        "2",
        "--schedule",
        "gpipe",
        "--log-json",
        a.to_str().unwrap(),
        "--trace",
        trace.to_str().unwrap(),
    ]));
    ok(&train(&[
        "--steps",
        "2",
        "--schedule",
        "gpipe",
        "--log-json",
        b.to_str().unwrap(),
    ]));
    // Speeds differ from run to run; losses must not.
    let figures = |p: &Path| -> Vec<(Value, Value, Value)> {
        log_lines(p)
            .into_iter()
            .map(|v| (v["step"].clone(), v["loss"].clone(), v["lr"].clone()))
            .collect()
    };
    assert_eq!(figures(&a), figures(&b));

    let trace: Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    let slices: Vec<&Value> = events.iter().filter(|e| e["ph"] == "X").collect();
    // GPipe, p = 2, m = 2: each rank runs 2 forwards, 2 backwards, and 4 transfers.
    assert_eq!(slices.iter().filter(|e| e["cat"] == "forward").count(), 4);
    assert_eq!(slices.iter().filter(|e| e["cat"] == "backward").count(), 4);
    assert_eq!(
        events.iter().filter(|e| e["ph"] == "s").count(),
        4,
        "one arrow per transfer"
    );

    // The planner takes the measured step's costs: each stage's mean forward, as the trace has
    // it; the run did not split its backwards, so the weight share stays the flag's.
    let t = dir.join("trace.json");
    let plan = |extra: &[&str]| {
        let mut args = vec!["plan", "-m", "2", "--costs-from", t.to_str().unwrap()];
        args.extend_from_slice(extra);
        pipit(&args)
    };
    let out = plan(&[
        "-p",
        "2",
        "--schedule",
        "zb-h1",
        "--weight-share",
        "0.3",
        "--format",
        "json",
    ]);
    ok(&out);
    let value: Value = serde_json::from_slice(&out.stdout).unwrap();
    for stage in 0..2 {
        let mean = |cat: &str| {
            let durs: Vec<f64> = slices
                .iter()
                .filter(|e| {
                    e["cat"] == cat
                        && e["name"]
                            .as_str()
                            .unwrap()
                            .starts_with(&format!("S{stage}"))
                })
                .map(|e| e["dur"].as_f64().unwrap() / 1000.0)
                .collect();
            durs.iter().sum::<f64>() / durs.len() as f64
        };
        let fwd = value["costs"]["fwd"][stage].as_f64().unwrap();
        assert!((fwd - mean("forward")).abs() < 1e-6, "stage {stage}: {fwd}");
        let bwd = value["costs"]["bwd"][stage].as_f64().unwrap();
        assert!(
            (bwd - mean("backward")).abs() < 1e-6,
            "stage {stage}: {bwd}"
        );
        assert_eq!(value["costs"]["weight_share"][stage], 0.3);
    }
    ok(&plan(&["-p", "2", "--compare"]));
    let out = plan(&["--schedule", "1f1b", "-p", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the measured run has stage 1"));
}

#[test]
fn generate_dry_run_counts_weights_caches_and_activations_alone() {
    let dir = scratch("generate-dry-run");
    let ckpt = dir.join("ckpt");
    ok(&train(&["--steps", "1", "--save", ckpt.to_str().unwrap()]));
    let dry = |tokens: &str, samples: &str| -> Value {
        let c = ckpt.to_str().unwrap();
        let out = pipit(&[
            "generate",
            "--dry-run",
            "--checkpoint",
            c,
            "--stages",
            "2",
            "--max-tokens",
            tokens,
            "--samples",
            samples,
            "--format",
            "json",
        ]);
        ok(&out);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let short = dry("2", "1");
    let long = dry("40", "4");
    let ranks = |v: &Value| v["ranks"].as_array().unwrap().clone();
    assert_eq!(ranks(&short).len(), 2);
    for (s, l) in ranks(&short).iter().zip(&ranks(&long)) {
        // f32 weights and nothing else at rest: no gradients, no AdamW moments.
        let params = s["parameters"].as_u64().unwrap();
        assert_eq!(s["weight_bytes"].as_u64().unwrap(), 4 * params, "{s}");
        assert_eq!(s["weight_bytes"], l["weight_bytes"]);
        let transient = |r: &Value| r["cache_and_activation_bytes"].as_u64().unwrap();
        assert!(transient(s) > 0, "{s}");
        // More samples with caches grown to the window hold more.
        assert!(transient(l) > transient(s), "{s} {l}");
        assert_eq!(
            l["peak_bytes"].as_u64().unwrap(),
            l["weight_bytes"].as_u64().unwrap() + transient(l)
        );
    }
}

#[test]
fn generate_and_eval_read_the_checkpoint() {
    let dir = scratch("generate");
    let ckpt = dir.join("ckpt");
    ok(&train(&["--steps", "2", "--save", ckpt.to_str().unwrap()]));
    // `pipit generate` from the checkpoint after the prompt "KING:", with `extra` flags.
    let generate = |extra: &[&str]| {
        let mut a = vec!["generate", "--backend", "reference", "--prompt", "KING:"];
        a.extend_from_slice(&["--checkpoint", ckpt.to_str().unwrap()]);
        a.extend_from_slice(extra);
        pipit(&a)
    };
    let gen = |t: &str| generate(&["--max-tokens", "20", "--temperature", t, "--stages", "3"]);
    let (g1, g2) = (gen("0"), gen("0"));
    ok(&g1);
    assert_eq!(g1.stdout, g2.stdout, "greedy decoding is deterministic");
    assert!(g1.stdout.starts_with(b"KING:"));
    assert_eq!(
        g1.stdout.len(),
        "KING:".len() + 20 + 1,
        "prompt, 20 bytes, newline"
    );

    // Samples side by side, in passes of 2 and 1 (the default for 3 samples over 2 stages),
    // each pass with its own caches: sample i is what one sample with seed
    // 1337 + i gives (30 tokens after a 5-byte prompt pass the 16-position window).
    let sampled = |extra: &[&str]| {
        let out = generate(&[&["--max-tokens", "30", "--stages", "2"], extra].concat());
        ok(&out);
        out.stdout
    };
    let three = sampled(&["--samples", "3"]);
    let alone: Vec<Vec<u8>> = ["1337", "1338", "1339"]
        .iter()
        .map(|seed| sampled(&["--seed", seed]))
        .collect();
    let want: Vec<u8> = alone
        .iter()
        .enumerate()
        .flat_map(|(i, text)| {
            let header = format!("--- sample {} of 3 (seed {}) ---\n", i + 1, 1337 + i);
            [header.into_bytes(), text.clone()].concat()
        })
        .collect();
    assert_eq!(three, want);
    assert!(alone[0] != alone[1] || alone[1] != alone[2], "seeds differ");
    let report: Value =
        serde_json::from_slice(&sampled(&["--samples", "2", "--format", "json"])).unwrap();
    assert_eq!(report["tokens"], 60);
    assert!(report["tokens_per_sec"].as_f64().unwrap() > 0.0);
    for (i, s) in report["samples"].as_array().unwrap().iter().enumerate() {
        assert_eq!(s["seed"], 1337 + i);
        let bytes: Vec<u8> = s["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(bytes, alone[i]["KING:".len()..alone[i].len() - 1]);
    }

    // Prompts from a file, two samples each: the two 3-byte prompts share passes with each
    // other (all four of their samples are one length), and every sample is the one its
    // prompt and seed give alone.
    let prompts = ["KING:", "Ay\n", "Oh!"];
    let file = dir.join("prompts.jsonl");
    let lines: Vec<String> = prompts
        .iter()
        .map(|p| Value::from(*p).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n") + "\n\n").unwrap();
    let f = file.to_str().unwrap();
    // Without the helper's --prompt.
    let c = ckpt.to_str().unwrap();
    let generate = |extra: &[&str]| {
        pipit(
            &[
                &["generate", "--backend", "reference", "--checkpoint", c],
                extra,
            ]
            .concat(),
        )
    };
    // 30 tokens from 2 stages as JSON, with `extra` flags.
    let report = |extra: &[&str]| -> Value {
        let common = ["--max-tokens", "30", "--stages", "2", "--format", "json"];
        let out = generate(&[&common[..], extra].concat());
        ok(&out);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let all = report(&["--prompts", f, "--samples", "2"]);
    // One sample a pass: three waves of two samples, the same samples; --output has each
    // wave's as it ends, with its index.
    let written = dir.join("samples.jsonl");
    let w = written.to_str().unwrap();
    let waves = report(&[
        "--prompts",
        f,
        "--samples",
        "2",
        "--batch-size",
        "1",
        "--output",
        w,
    ]);
    assert_eq!(waves["samples"], all["samples"]);
    let mut lines = log_lines(&written);
    assert_eq!(lines.len(), 6);
    lines.sort_by_key(|l| l["index"].as_u64().unwrap());
    for (i, line) in lines.iter_mut().enumerate() {
        assert_eq!(line["index"], i);
        line.as_object_mut().unwrap().remove("index");
        assert_eq!(line, &all["samples"][i]);
    }
    let samples = all["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 6);
    assert!(all.get("prompt").is_none());
    for (i, s) in samples.iter().enumerate() {
        let prompt = prompts[i / 2];
        assert_eq!(s["prompt"], prompt);
        let alone = report(&["--prompt", prompt, "--seed", &(1337 + i).to_string()]);
        assert_eq!(s["ids"], alone["samples"][0]["ids"], "sample {i}");
        assert_eq!(s["text"], alone["samples"][0]["text"], "sample {i}");
    }
    std::fs::write(&file, "\"KING:\"\nROMEO\n").unwrap();
    refused(
        &generate(&["--prompts", f]),
        &format!("--prompts {f} line 2: not a JSON string"),
    );
    std::fs::write(&file, "\n").unwrap();
    refused(&generate(&["--prompts", f]), "holds no prompt");
    std::fs::write(&file, "\n\"\"\n").unwrap();
    refused(
        &generate(&["--prompts", f]),
        &format!("--prompts {f} line 2: a prompt must hold at least one byte"),
    );

    let text = dir.join("text.txt");
    std::fs::write(&text, "a".repeat(16 * 5 + 3)).unwrap();
    let out = pipit(&[
        "eval",
        "--backend",
        "reference",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--data",
        text.to_str().unwrap(),
        "--format",
        "json",
    ]);
    ok(&out);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tokens"], 5 * 16, "windows k with (k+1)·T + 1 ≤ len");
    assert!(v["loss"].as_f64().unwrap() > 0.0);
}

/// A tiny model trained one step into `dir/ckpt`, with a GPT-2 style tokenizer beside it: the
/// 256 bytes, then `extra` tokens (ids 256 on, the model's vocabulary just large enough), and
/// `merges`. Returns the checkpoint and the vocab.json written.
fn toy_bpe_checkpoint(dir: &Path, extra: &[&str], merges: &str) -> (std::path::PathBuf, String) {
    let ckpt = dir.join("ckpt");
    let vocab_size = (256 + extra.len()).to_string();
    ok(&train(&[
        "--steps",
        "1",
        "--vocab-size",
        &vocab_size,
        "--save",
        ckpt.to_str().unwrap(),
    ]));
    let table = pipit_engine::tokenizer::byte_chars();
    let mut vocab: serde_json::Map<String, Value> = (0..256)
        .map(|b| (table[b].to_string(), Value::from(b)))
        .collect();
    for (i, s) in extra.iter().enumerate() {
        vocab.insert(s.to_string(), Value::from(256 + i));
    }
    let vocab = serde_json::to_string(&vocab).unwrap();
    std::fs::write(ckpt.join("vocab.json"), &vocab).unwrap();
    std::fs::write(ckpt.join("merges.txt"), merges).unwrap();
    (ckpt, vocab)
}

/// A checkpoint that carries a GPT-2 style vocab.json and merges.txt speaks BPE tokens: the
/// prompt and the text to score are encoded with its merges, generated ids decode through its
/// vocabulary, and eval counts tokens, not bytes. Here a toy vocabulary: the 256 bytes and
/// "th", "the", " the".
#[test]
fn generate_and_eval_speak_a_checkpoints_bpe_vocabulary() {
    use pipit_engine::tokenizer::Bpe;
    let dir = scratch("bpe");
    let merges = "#version: 0.2\nt h\nth e\n\u{120} the\n";
    let (ckpt, vocab) = toy_bpe_checkpoint(&dir, &["th", "the", "\u{120}the"], merges);
    let c = ckpt.to_str().unwrap();
    let bpe = Bpe::new(&vocab, merges).unwrap();

    let out = pipit(&[
        "generate",
        "--backend",
        "reference",
        "--checkpoint",
        c,
        "--prompt",
        "the the",
        "--format",
        "json",
        "--max-tokens",
        "12",
    ]);
    ok(&out);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let sample = &report["samples"][0];
    let ids: Vec<u32> = sample["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids.len(), 12);
    let mut text = b"the the".to_vec();
    for &id in &ids {
        text.extend(bpe.decode(id).unwrap());
    }
    assert_eq!(sample["text"], String::from_utf8_lossy(&text).as_ref());

    // 16 * 5 + 3 "the " is 332 bytes but 166 tokens: "the", then " the" 82 times, then " ".
    let data = dir.join("the.txt");
    std::fs::write(&data, "the ".repeat(83)).unwrap();
    let tokens = bpe.encode(&"the ".repeat(83)).unwrap().len();
    assert_eq!(tokens, 84);
    let out = pipit(&[
        "eval",
        "--backend",
        "reference",
        "--checkpoint",
        c,
        "--data",
        data.to_str().unwrap(),
        "--format",
        "json",
    ]);
    ok(&out);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["per"], "token");
    assert_eq!(v["tokens"], (tokens - 1) / 16 * 16, "windows of BPE tokens");

    // Training on from the checkpoint trains on its tokens (the text cut as the split cuts
    // it), and the new checkpoint carries the tokenizer.
    let tuned = dir.join("tuned");
    let long = "the ".repeat(830);
    std::fs::write(&data, &long).unwrap();
    let d = data.to_str().unwrap();
    let out = train(&[
        "--init",
        c,
        "--data",
        d,
        "--steps",
        "2",
        "--save",
        tuned.to_str().unwrap(),
    ]);
    ok(&out);
    let cut = pipit_engine::data::split_text(long.as_bytes(), 0.1)
        .unwrap()
        .0
        .len();
    let (train_ids, val_ids) = (
        bpe.encode(&long[..cut]).unwrap(),
        bpe.encode(&long[cut..]).unwrap(),
    );
    assert!(
        train_ids.len() < cut / 3,
        "{} tokens for {cut} bytes",
        train_ids.len()
    );
    let said = format!(
        "{} to train on and {} held out",
        train_ids.len(),
        val_ids.len()
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&said),
        "{said}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("nats/token"));
    for file in ["vocab.json", "merges.txt"] {
        assert_eq!(
            std::fs::read(tuned.join(file)).unwrap(),
            std::fs::read(ckpt.join(file)).unwrap(),
            "{file}"
        );
    }

    // A vocabulary the model is too small for is refused, and so is a broken one.
    let mut bigger: Value = serde_json::from_str(&vocab).unwrap();
    bigger["xyz"] = Value::from(259);
    std::fs::write(ckpt.join("vocab.json"), bigger.to_string()).unwrap();
    refused(
        &pipit(&["generate", "--backend", "reference", "--checkpoint", c]),
        "maps text to 260 tokens but the model has a vocabulary of 259",
    );
    std::fs::write(ckpt.join("vocab.json"), "[1, 2]").unwrap();
    refused(
        &pipit(&["eval", "--backend", "reference", "--checkpoint", c]),
        "vocab.json is not a map of tokens to ids",
    );
}

/// With GPT-2's `<|endoftext|>` in the vocabulary, a sample ends when it draws it (unless
/// `--ignore-eos`), and the marker written in a prompt is that one token. The model here is
/// made to always pick it: the final layer norm gives every position the same vector `u`
/// (weight 0, bias `u`), and the tied embedding's row of `<|endoftext|>` is `10 u`.
#[test]
fn a_sample_ends_at_end_of_text() {
    use pipit_engine::checkpoint;
    let dir = scratch("eos");
    let merges = "#version: 0.2\n";
    let (ckpt, vocab) = toy_bpe_checkpoint(&dir, &["<|endoftext|>"], merges);
    let c = ckpt.to_str().unwrap();
    let mut model = checkpoint::load(&ckpt).unwrap();
    let width = model.config.n_embd;
    let u: Vec<f32> = (0..width)
        .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    model.params.get_mut("ln_f.weight").unwrap().data.fill(0.0);
    model
        .params
        .get_mut("ln_f.bias")
        .unwrap()
        .data
        .copy_from_slice(&u);
    let wte = &mut model.params.get_mut("wte").unwrap().data;
    for (w, x) in wte[256 * width..].iter_mut().zip(&u) {
        *w = 10.0 * x;
    }
    let tokenizer = [
        ("vocab.json", vocab.as_bytes()),
        ("merges.txt", merges.as_bytes()),
    ];
    checkpoint::save_with(&ckpt, &model, &tokenizer).unwrap();

    let generate = |extra: &[&str]| {
        let mut a = vec!["generate", "--backend", "reference", "--checkpoint", c];
        a.extend_from_slice(&["--max-tokens", "5", "--stages", "2", "--format", "json"]);
        a.extend_from_slice(extra);
        let out = pipit(&a);
        ok(&out);
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let ended = generate(&["--prompt", "Hi<|endoftext|>", "--samples", "2"]);
    for sample in ended["samples"].as_array().unwrap() {
        assert_eq!(sample["ids"], serde_json::json!([256]), "{sample}");
        assert_eq!(sample["end"], "end_of_text");
        assert_eq!(sample["text"], "Hi<|endoftext|>", "the prompt, as given");
    }
    assert_eq!(ended["tokens"], 2);
    let on = generate(&["--prompt", "Hi", "--ignore-eos"]);
    assert_eq!(on["samples"][0]["ids"], serde_json::json!(vec![256; 5]));
    assert_eq!(on["samples"][0]["end"], "max_tokens");
    assert_eq!(
        on["samples"][0]["text"],
        format!("Hi{}", "<|endoftext|>".repeat(5))
    );
}

/// `--dry-run` walks one step on no device and reports each rank's memory: the peaks a real
/// first step measures, to the byte, for every schedule and with checkpointing.
#[test]
fn a_dry_run_predicts_the_memory_a_step_measures() {
    let dir = scratch("dry-run");
    for extra in [
        &["--schedule", "1f1b"][..],
        &["--schedule", "zb-v"],
        &["--schedule", "gpipe", "--checkpoint-activations"],
    ] {
        let (dry, real) = (dir.join("dry.json"), dir.join("real.json"));
        let (dry_s, real_s) = (dry.to_str().unwrap(), real.to_str().unwrap());
        let out = train(&[extra, &["--log-json", dry_s, "--dry-run"]].concat());
        ok(&out);
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(table.contains("step peak"), "{table}");
        ok(&train(
            &[extra, &["--log-json", real_s, "--steps", "1"]].concat(),
        ));
        let predicted = &log_lines(&dry)[0];
        let busy = predicted["simulated_efficiency"].as_f64().unwrap();
        assert!(busy > 0.0 && busy <= 1.0, "{busy}");
        let measured = &log_lines(&real)[0];
        let peaks: Vec<&Value> = predicted["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| &r["peak_bytes"])
            .collect();
        assert_eq!(peaks.len(), 2, "{extra:?}");
        assert_eq!(
            Value::from(peaks.into_iter().cloned().collect::<Vec<_>>()),
            measured["peak_bytes"],
            "{extra:?}"
        );
    }
}

/// `--schedule auto` takes the schedule whose step simulates fastest; `--memory-limit` leaves
/// out those whose dry run peaks above it, and refuses when none fits.
#[test]
fn auto_takes_the_fastest_schedule_that_fits() {
    use pipit_engine::train::TrainConfig;
    let dir = scratch("auto");
    let log = dir.join("dry.json");
    let dry = |extra: &[&str]| -> (Output, Value) {
        let base = ["--dry-run", "--log-json", log.to_str().unwrap()];
        let out = train(&[&base[..], extra].concat());
        let line = if out.status.success() {
            log_lines(&log).remove(0)
        } else {
            Value::Null
        };
        (out, line)
    };
    let peak = |v: &Value| -> u64 {
        let ranks = v["ranks"].as_array().unwrap();
        ranks
            .iter()
            .map(|r| r["peak_bytes"].as_u64().unwrap())
            .max()
            .unwrap()
    };
    let (out, auto) = dry(&["--schedule", "auto"]);
    ok(&out);
    let config: TrainConfig = serde_json::from_value(auto["config"].clone()).unwrap();
    let choices = config.schedule_choices();
    let (fastest, _) = TrainConfig::fastest(&choices).unwrap();
    assert_eq!(
        (&config.schedule, config.chunks),
        (&fastest.schedule, fastest.chunks)
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&format!("schedule auto: {}", config.schedule)),
        "{said}"
    );

    // Just below the fastest one's peak: another schedule, within the limit.
    let limit = (peak(&auto) - 1).to_string();
    let (out, fitting) = dry(&["--schedule", "auto", "--memory-limit", &limit]);
    ok(&out);
    assert_ne!(fitting["config"]["schedule"], auto["config"]["schedule"]);
    assert!(peak(&fitting) < peak(&auto));
    let (out, _) = dry(&["--schedule", "auto", "--memory-limit", "1kB"]);
    refused(&out, "--memory-limit 1.0 kB: no schedule fits");
    refused(
        &train(&["--memory-limit", "1GB"]),
        "use it with --schedule auto or --dry-run",
    );
    // A dry run says whether every rank fits a limit.
    let (out, checked) = dry(&["--memory-limit", &peak(&fitting).to_string()]);
    ok(&out);
    let fits = peak(&checked) <= peak(&fitting);
    assert_eq!(checked["fits"], fits);
    let (out, checked) = dry(&["--memory-limit", &(peak(&checked) - 1).to_string()]);
    ok(&out);
    assert_eq!(checked["fits"], false);
    assert!(String::from_utf8_lossy(&out.stdout).contains("does not fit --memory-limit"));
    let (out, checked) = dry(&["--memory-limit", &peak(&checked).to_string()]);
    ok(&out);
    assert_eq!(checked["fits"], true);
    assert!(String::from_utf8_lossy(&out.stdout).contains("fits --memory-limit"));
    refused(
        &dry(&["--schedule", "auto", "--memory-limit", "1x"]).0,
        "got 1x",
    );
}

#[test]
fn bad_input_is_one_line_and_status_2_and_keeps_the_checkpoint() {
    let dir = scratch("bad");
    let ckpt = dir.join("ckpt");
    ok(&train(&["--steps", "1", "--save", ckpt.to_str().unwrap()]));
    let before = std::fs::read(ckpt.join("model.safetensors")).unwrap();
    let c = ckpt.to_str().unwrap();

    refused(&train(&["--data", "/nonexistent/corpus.txt"]), "--data");
    refused(
        &pipit(&[
            "train",
            "--backend",
            "reference",
            "--stages",
            "9",
            "--no-save",
        ]),
        "exceeds",
    );
    refused(
        &pipit(&[
            "train",
            "--backend",
            "reference",
            "--batch-size",
            "10",
            "--microbatches",
            "4",
            "--no-save",
        ]),
        "--batch-size",
    );
    refused(&train(&["--schedule", "zigzag"]), "zigzag");
    refused(
        &train(&["--grad-clip=-1"]),
        "--grad-clip must be a norm of 0",
    );
    refused(&train(&["--grad-clip", "nan"]), "got NaN");
    refused(
        &train(&["--weight-decay=-0.1"]),
        "--weight-decay must be a number of 0 or more, got -0.1",
    );
    refused(
        &pipit(&["train", "--min-lr=-1", "--no-save"]),
        "--min-lr must be a number of 0 or more",
    );
    refused(
        &pipit(&[
            "train", "--resume", c, "--n-embd", "32", "--n-head", "2", "--save", c,
        ]),
        "the flags ask for another: --n-embd 32 (it has 16)",
    );
    // Flags that agree with the checkpoint are no contradiction; the others are named.
    refused(
        &pipit(&[
            "train",
            "--init",
            c,
            "--n-layer",
            "2",
            "--vocab-size",
            "300",
            "--dry-run",
        ]),
        "another: --vocab-size 300 (it has 256)",
    );
    let agreeing = pipit(&[
        "train",
        "--init",
        c,
        "--n-layer",
        "2",
        "--n-embd",
        "16",
        "--dry-run",
    ]);
    ok(&agreeing);
    refused(
        &pipit(&[
            "train",
            "--resume",
            dir.join("missing").to_str().unwrap(),
            "--no-save",
        ]),
        "does not exist",
    );

    let corrupt = dir.join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    std::fs::copy(ckpt.join("config.json"), corrupt.join("config.json")).unwrap();
    std::fs::write(
        corrupt.join("model.safetensors"),
        &before[..before.len() / 2],
    )
    .unwrap();
    refused(
        &pipit(&[
            "eval",
            "--backend",
            "reference",
            "--checkpoint",
            corrupt.to_str().unwrap(),
        ]),
        "safetensors",
    );
    refused(
        &pipit(&["train", "--resume", corrupt.to_str().unwrap(), "--save", c]),
        "safetensors",
    );
    refused(
        &pipit(&["generate", "--checkpoint", c, "--samples", "0"]),
        "--samples must be at least 1, got 0",
    );
    refused(
        &pipit(&["generate", "--checkpoint", c, "--top-p", "0"]),
        "--top-p must be in (0, 1], got 0",
    );

    assert_eq!(
        std::fs::read(ckpt.join("model.safetensors")).unwrap(),
        before,
        "the good checkpoint is untouched"
    );
}

#[test]
fn a_toml_config_holds_the_same_fields_as_the_flags() {
    let dir = scratch("config");
    let (config, from_file, from_flags) = (
        dir.join("run.toml"),
        dir.join("file.jsonl"),
        dir.join("flags.jsonl"),
    );
    std::fs::write(
        &config,
        "n_layer = 2\nn_embd = 16\nn_head = 2\nn_positions = 16\nseq_len = 16\nbatch_size = 4\n\
         microbatches = 2\nstages = 2\nlr = 0.003\nmin_lr = 0.003\nwarmup_steps = 0\neval_every = 0\n\
         eval_tokens = 256\nschedule = \"gpipe\"\nsteps = 2\n",
    )
    .unwrap();
    ok(&pipit(&[
        "train",
        "--backend",
        "reference",
        "--no-save",
        "--config",
        config.to_str().unwrap(),
        "--log-json",
        from_file.to_str().unwrap(),
    ]));
    ok(&train(&[
        "--schedule",
        "gpipe",
        "--steps",
        "2",
        "--log-json",
        from_flags.to_str().unwrap(),
    ]));
    let losses = |p: &Path| {
        log_lines(p)
            .iter()
            .map(|v| v["loss"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&from_file), losses(&from_flags));

    // --show-config writes the merged settings as a config file that loads back as they are.
    let shown = pipit(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--steps",
        "5",
        "--show-config",
    ]);
    ok(&shown);
    let text = String::from_utf8(shown.stdout).unwrap();
    assert!(
        text.contains("steps = 5") && text.contains("schedule = \"gpipe\""),
        "{text}"
    );
    std::fs::write(&config, &text).unwrap();
    let again = pipit(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--show-config",
    ]);
    assert_eq!(String::from_utf8(again.stdout).unwrap(), text);

    // zb-v runs two stages per rank: named without --chunks, it takes 2; other counts are
    // refused with the constraint.
    let shown = pipit(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--schedule",
        "zb-v",
        "--show-config",
    ]);
    ok(&shown);
    assert!(String::from_utf8(shown.stdout)
        .unwrap()
        .contains("chunks = 2\n"));
    refused(
        &train(&["--schedule", "zb-v", "--chunks", "3"]),
        "chunks must be 2 (got 3)",
    );
    // A config file naming zb-v without chunks gets its two as well; one that says 3 is refused.
    let v_config = dir.join("v.toml");
    std::fs::write(&v_config, "schedule = \"zb-v\"\nstages = 2\n").unwrap();
    let shown = pipit(&[
        "train",
        "--config",
        v_config.to_str().unwrap(),
        "--show-config",
    ]);
    ok(&shown);
    assert!(String::from_utf8(shown.stdout)
        .unwrap()
        .contains("chunks = 2\n"));
    std::fs::write(&v_config, "schedule = \"zb-v\"\nstages = 2\nchunks = 3\n").unwrap();
    refused(
        &pipit(&["train", "--no-save", "--config", v_config.to_str().unwrap()]),
        "chunks must be 2 (got 3)",
    );

    std::fs::write(&config, "n_layrs = 3\n").unwrap();
    refused(
        &pipit(&["train", "--no-save", "--config", config.to_str().unwrap()]),
        "n_layrs",
    );
}

#[test]
fn init_starts_from_a_checkpoints_weights_with_a_fresh_optimizer() {
    let dir = scratch("init");
    let (ckpt, first, second) = (
        dir.join("ckpt"),
        dir.join("first.jsonl"),
        dir.join("second.jsonl"),
    );
    ok(&train(&[
        "--steps",
        "8",
        "--save",
        ckpt.to_str().unwrap(),
        "--log-json",
        first.to_str().unwrap(),
    ]));
    ok(&train(&[
        "--steps",
        "1",
        "--init",
        ckpt.to_str().unwrap(),
        "--log-json",
        second.to_str().unwrap(),
    ]));
    let (first, second) = (log_lines(&first), log_lines(&second));
    assert_eq!(second[0]["step"], 1, "a fresh run: step counting restarts");
    // Same first batch (same seed), trained weights: the loss starts well below the fresh one.
    assert!(
        second[0]["loss"].as_f64().unwrap() < first[0]["loss"].as_f64().unwrap() - 0.05,
        "{} vs {}",
        second[0]["loss"],
        first[0]["loss"]
    );
}

#[test]
fn train_help_shows_each_settings_default_from_the_config_defaults() {
    let out = pipit(&["train", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let defaults = pipit_engine::train::TrainConfig::default();
    for (flag, value) in [
        ("--lr", defaults.lr.to_string()),
        ("--min-lr", defaults.min_lr.to_string()),
        ("--steps", defaults.steps.to_string()),
        ("--schedule", defaults.schedule.to_string()),
        ("--n-embd", defaults.model.n_embd.to_string()),
    ] {
        let at = help
            .find(&format!("      {flag} "))
            .unwrap_or_else(|| panic!("{flag} in the help"));
        let entry = &help[at..];
        let entry = &entry[..entry[1..].find("\n      --").map_or(entry.len(), |e| e + 1)];
        assert!(
            entry.contains(&format!("[default: {value}]")),
            "{flag}: {entry}"
        );
    }
}

/// Ctrl-C ends a run after the step in progress with its checkpoint saved and status 130; the
/// run then resumes from that step to the same losses as one never interrupted.
#[cfg(unix)]
#[test]
fn ctrl_c_saves_the_checkpoint_and_the_run_resumes() {
    let dir = scratch("interrupt");
    let (ckpt, log, rest, full) = (
        dir.join("ckpt"),
        dir.join("cut.jsonl"),
        dir.join("rest.jsonl"),
        dir.join("full.jsonl"),
    );
    let mut args: Vec<&str> = vec!["train"];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(&["--stages", "2", "--eval-every", "0", "--steps", "100000"]);
    args.extend_from_slice(&["--save", ckpt.to_str().unwrap()]);
    args.extend_from_slice(&["--log-json", log.to_str().unwrap()]);
    let child = common::pipit_command()
        .args(&args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while common::finished_lines(&log) < 3 {
        assert!(t0.elapsed().as_secs() < 60, "three steps within a minute");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: signals the child this test started.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "stderr: {err}");
    let cut = log_lines(&log);
    let last = cut.len();
    let line = err.lines().last().unwrap();
    let want = format!(
        "stopped by Ctrl-C after step {last} of 100000; saved {}",
        ckpt.display()
    );
    assert!(line.starts_with(&want), "{line}");

    let steps = (last + 2).to_string();
    let c = ckpt.to_str().unwrap();
    ok(&pipit(&[
        "train",
        "--resume",
        c,
        "--steps",
        &steps,
        "--no-save",
        "--log-json",
        rest.to_str().unwrap(),
    ]));
    ok(&train(&[
        "--steps",
        &steps,
        "--log-json",
        full.to_str().unwrap(),
    ]));
    let (rest, full) = (log_lines(&rest), log_lines(&full));
    assert_eq!(rest.len(), 2);
    for (a, b) in cut.iter().chain(&rest).zip(&full) {
        assert_eq!(a["step"], b["step"]);
        assert_eq!(a["loss"], b["loss"], "step {}", a["step"]);
    }
}

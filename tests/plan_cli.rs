//! `pipit plan` and `pipit partition` as a user runs them: the seed's figures, the formats,
//! hand-written schedules, and one-line errors with exit status 2.

use std::process::{Command, Output};

use serde_json::Value;

fn pipit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pipit"))
        .args(args)
        .output()
        .expect("running pipit")
}

fn json(args: &[&str]) -> Value {
    let out = pipit(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// Exit status 2 and exactly one line on stderr, containing `needle`.
fn fails_with(args: &[&str], needle: &str) {
    let out = pipit(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
}

#[test]
fn gpipe_efficiency_matches_the_seed() {
    for (m, expected) in [
        (1, "25.0"),
        (2, "40.0"),
        (4, "57.1"),
        (8, "72.7"),
        (16, "84.2"),
    ] {
        let m = m.to_string();
        let args = [
            "plan",
            "--schedule",
            "gpipe",
            "--stages",
            "4",
            "--microbatches",
            &m,
        ];
        let out = pipit(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("efficiency {expected} %")),
            "m={m}: {text}"
        );
        let value = json(&[&args[..], &["--format", "json"]].concat());
        assert_eq!(
            format!("{:.1}", 100.0 * value["efficiency"].as_f64().unwrap()),
            expected
        );
    }
}

#[test]
fn peak_activations_match_the_seed() {
    let peaks = |schedule: &str| -> Vec<u64> {
        let value = json(&[
            "plan",
            "--schedule",
            schedule,
            "-p",
            "4",
            "-m",
            "8",
            "--format",
            "json",
        ]);
        assert_eq!(value["stages"], 4);
        assert_eq!(value["microbatches"], 8);
        assert_eq!(value["chunks"], 1);
        assert_eq!(value["makespan"], 33.0);
        assert!((value["bubble_fraction"].as_f64().unwrap() - 3.0 / 11.0).abs() < 1e-12);
        value["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                assert_eq!(
                    r["busy"].as_f64().unwrap() + r["idle"].as_f64().unwrap(),
                    33.0
                );
                r["peak_activations"].as_u64().unwrap()
            })
            .collect()
    };
    assert_eq!(peaks("gpipe"), vec![8, 8, 8, 8]);
    assert_eq!(peaks("1f1b"), vec![4, 3, 2, 1]);
}

#[test]
fn text_timeline_and_advice() {
    let out = pipit(&["plan", "--schedule", "1f1b", "-p", "2", "-m", "2"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("T0: [S0F0] [    ]\nT1: [S0F1] [S1F0]\n"),
        "{text}"
    );
    assert!(text.contains("raise micro-batches from 2 to 9"), "{text}");
}

#[test]
fn zero_bubble_plans_split_backwards() {
    let args = ["plan", "--schedule", "zb-h1", "-p", "4", "-m", "8"];
    let text = String::from_utf8(pipit(&args).stdout).unwrap();
    assert!(
        text.starts_with("T 0: [S0F0] [    ] [    ] [    ]\n"),
        "{text}"
    );
    assert!(text.contains("[S3I0]") && text.contains("[S0W7]"), "{text}");
    assert!(text.contains("efficiency 88.9 %"), "{text}");
    // A lighter weight half leaves less to fill the drain with: I 1.5 ms and W 0.5 ms of the
    // 2 ms backward take 30 ms (27 at equal halves, 33 under 1F1B).
    let value = json(&[&args[..], &["--weight-share", "0.25", "--format", "json"]].concat());
    assert_eq!(value["makespan"].as_f64().unwrap(), 30.0);
    fails_with(
        &[&args[..], &["--weight-share", "1"]].concat(),
        "between 0 and 1, exclusive (got 1)",
    );
    // With chunks, interleaving's order split the same way: 3 m v + p - 1 = 51 units, where
    // interleaving takes 57.
    let value = json(&[&args[..], &["--chunks", "2", "--format", "json"]].concat());
    assert_eq!(value["makespan"].as_f64().unwrap(), 51.0);
}

/// The V: two chunks per rank without asking, rank r running stages r and 2p-1-r; 6m + p - 1
/// units, the least possible, holding 2p half-size chunks per rank.
#[test]
fn zero_bubble_v_plans_a_v() {
    let args = ["plan", "--schedule", "zb-v", "-p", "4", "-m", "8"];
    let value = json(&[&args[..], &["--format", "json"]].concat());
    assert_eq!(value["makespan"].as_f64().unwrap(), 51.0);
    assert_eq!(value["chunks"].as_u64().unwrap(), 2);
    let text =
        String::from_utf8(pipit(&[&args[..], &["--format", "schedule"]].concat()).stdout).unwrap();
    assert!(text.contains("placement: 0 1 2 3 3 2 1 0\n"), "{text}");
    fails_with(
        &[&args[..], &["--chunks", "3"]].concat(),
        "zb-v runs two stages per rank, in a V: chunks must be 2 (got 3)",
    );
}

#[test]
fn compare_plans_every_schedule_under_the_same_costs() {
    let out = pipit(&["plan", "--compare", "-p", "4", "-m", "8"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let row = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} row: {text}"))
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(row("gpipe"), "33.00 72.7 % 8 8 8 8");
    assert_eq!(row("1f1b"), "33.00 72.7 % 4 3 2 1");
    assert_eq!(row("zb-h1"), "27.00 88.9 % 4 4 4 4");
    // Without --chunks the V runs its two, each half a stage: 6m + p - 1 half-units.
    assert_eq!(row("zb-v"), "25.50 94.1 % 4 4 4 4");
    assert!(text.contains("zb-v runs 2 chunks per rank here"), "{text}");
    // DualPipeV on the same V: zb-v's time here, one chunk more held on every rank.
    assert_eq!(row("dualpipev"), "25.50 94.1 % 4.5 4.5 4.5 4.5");
    let value = json(&[
        "plan",
        "--compare",
        "-p",
        "4",
        "-m",
        "8",
        "-v",
        "2",
        "--format",
        "json",
    ]);
    let rows = value.as_array().unwrap();
    assert_eq!(rows.len(), 7);
    let ofob = rows.iter().find(|r| r["schedule"] == "1f1b").unwrap();
    assert!(ofob["error"].as_str().unwrap().contains("chunks must be 1"));
    let zb = rows.iter().find(|r| r["schedule"] == "zb-h1").unwrap();
    assert_eq!(zb["makespan"].as_f64().unwrap(), 51.0);
    let interleaved = rows
        .iter()
        .find(|r| r["schedule"] == "interleaved")
        .unwrap();
    assert_eq!(interleaved["makespan"].as_f64().unwrap(), 57.0);
    // The V matches zb-h1's time on the same chunks, holding 8 chunks a rank; so does zb-h1 in
    // ZB-1P's order, whose warm-up is shorter than interleaving's (11 on the first rank).
    let v = rows.iter().find(|r| r["schedule"] == "zb-v").unwrap();
    assert_eq!(v["makespan"].as_f64().unwrap(), 51.0);
    assert_eq!(v["peak_activations"], serde_json::json!([8, 8, 8, 8]));
    assert_eq!(zb["peak_activations"], serde_json::json!([8, 8, 8, 8]));
    assert_eq!(
        interleaved["peak_activations"],
        serde_json::json!([11, 9, 7, 5])
    );
    fails_with(
        &["plan", "--compare", "-p", "4", "-m", "8", "--format", "svg"],
        "--compare prints text or json",
    );
    fails_with(
        &["plan", "--compare", "-p", "0", "-m", "8"],
        "stages must be at least 1 (got 0)",
    );
}

#[test]
fn chrome_and_svg_outputs() {
    let value = json(&[
        "plan",
        "--schedule",
        "interleaved",
        "-p",
        "2",
        "-m",
        "4",
        "-v",
        "2",
        "--format",
        "chrome",
    ]);
    let events = value["traceEvents"].as_array().unwrap();
    let slices = events
        .iter()
        .filter(|e| e["ph"] == "X" && e["cat"] == "forward")
        .count();
    assert_eq!(slices, 2 * 2 * 4);
    let starts = events.iter().filter(|e| e["ph"] == "s").count();
    let ends = events.iter().filter(|e| e["ph"] == "f").count();
    // 3 stage boundaries cross ranks, each carrying 4 activations and 4 gradients.
    assert_eq!((starts, ends), (24, 24));

    let out = pipit(&[
        "plan",
        "--schedule",
        "gpipe",
        "-p",
        "2",
        "-m",
        "3",
        "--format",
        "svg",
    ]);
    let svg = String::from_utf8(out.stdout).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("rank 1"));
    assert_eq!(svg.matches("<rect").count(), 2 * 3 * 2 + 4);
}

#[test]
fn schedule_files_round_trip_and_errors_name_the_place() {
    let dir = std::env::temp_dir().join(format!("pipit-plan-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.txt");
    let path_str = path.to_str().unwrap();
    let out = pipit(&[
        "plan",
        "--schedule",
        "1f1b",
        "-p",
        "3",
        "-m",
        "4",
        "--format",
        "schedule",
        "-o",
        path_str,
    ]);
    assert!(out.status.success());
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("rank 0: S0F0 S0F0>"), "{text}");
    let value = json(&["plan", "--schedule-file", path_str, "--format", "json"]);
    assert_eq!(value["schedule"], "1f1b");
    assert!((value["efficiency"].as_f64().unwrap() - 4.0 / 6.0).abs() < 1e-12);

    // A compute-only hand-written file gets its transfers inserted.
    std::fs::write(
        &path,
        "rank 0: S0F0 S0F1 S0B0 S0B1\nrank 1: S1F0 S1B0 S1F1 S1B1\n",
    )
    .unwrap();
    let value = json(&["plan", "--schedule-file", path_str, "--format", "json"]);
    assert_eq!(value["microbatches"], 2);

    std::fs::write(&path, "rank 0: S0F0 S0Q1\n").unwrap();
    fails_with(
        &["plan", "--schedule-file", path_str],
        "line 1, token 2: `S0Q1`",
    );
    std::fs::write(
        &path,
        "rank 0: S0F0 S0F1 S0B0\nrank 1: S1F0 S1B0 S1F1 S1B1\n",
    )
    .unwrap();
    fails_with(
        &["plan", "--schedule-file", path_str],
        "rank 0 is missing S0B1",
    );
    std::fs::write(
        &path,
        "rank 0: S0F0 S0B0 S0F1 S0B1\nrank 1: S1F1 S1F0 S1B0 S1B1\n",
    )
    .unwrap();
    fails_with(&["plan", "--schedule-file", path_str], "deadlocks");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_exits_2_with_one_line() {
    fails_with(
        &[
            "plan",
            "--schedule",
            "gpipe",
            "--stages",
            "0",
            "--microbatches",
            "4",
        ],
        "stages must be at least 1 (got 0)",
    );
    fails_with(
        &[
            "plan",
            "--schedule",
            "gpipe",
            "--stages",
            "4",
            "--microbatches",
            "0",
        ],
        "microbatches must be at least 1 (got 0)",
    );
    fails_with(
        &[
            "plan",
            "--schedule",
            "1f1b",
            "-p",
            "4",
            "-m",
            "8",
            "--chunks",
            "2",
        ],
        "chunks must be 1 (got 2)",
    );
    // clap's own errors: status 2, the first line names the value.
    let out = pipit(&["plan", "--schedule", "zero-bubble", "-p", "4", "-m", "8"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr
            .lines()
            .next()
            .unwrap()
            .contains("invalid value 'zero-bubble'"),
        "{stderr}"
    );
    fails_with(
        &[
            "plan",
            "--schedule",
            "gpipe",
            "-p",
            "4",
            "-m",
            "8",
            "--fwd",
            "1,2",
        ],
        "--fwd: got 2 values but the pipeline has 4 stages",
    );
    fails_with(
        &[
            "plan",
            "--schedule",
            "gpipe",
            "-p",
            "4",
            "-m",
            "8",
            "--bwd",
            "2,x,2,2",
        ],
        "--bwd: `x` is not a number",
    );
    fails_with(
        &[
            "plan",
            "--schedule",
            "gpipe",
            "-p",
            "4",
            "-m",
            "8",
            "--fwd",
            "0",
        ],
        "must be a positive number",
    );
    fails_with(
        &[
            "plan",
            "--schedule",
            "gpipe",
            "-p",
            "4",
            "-m",
            "8",
            "--target-efficiency",
            "1.5",
        ],
        "target efficiency",
    );
    fails_with(
        &[
            "partition",
            "--stages",
            "4",
            "--chunks",
            "4",
            "--blocks",
            "10",
        ],
        "cannot cut 12 layers into 16 stages",
    );
    fails_with(
        &["partition", "--stages", "2", "--costs", "1,2,x"],
        "--costs: `x` is not a number",
    );
}

#[test]
fn partition_text_and_json() {
    let out = pipit(&[
        "partition",
        "--stages",
        "4",
        "--blocks",
        "12",
        "--head-cost",
        "3",
        "--embedding-cost",
        "0.5",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("partition balanced: 14 layers into 4 stages on 4 ranks"),
        "{text}"
    );
    assert!(text.contains("slowest stage 4.00"), "{text}");

    let costs = vec!["1"; 16].join(",");
    let value = json(&[
        "partition",
        "--stages",
        "2",
        "--chunks",
        "2",
        "--method",
        "uniform",
        "--costs",
        &costs,
        "--format",
        "json",
    ]);
    assert_eq!(
        value["ranks"][0]["chunks"],
        serde_json::json!([[0, 4], [8, 12]])
    );
    assert_eq!(
        value["ranks"][1]["chunks"],
        serde_json::json!([[4, 8], [12, 16]])
    );

    // The V pairs the model's ends on rank 0; balanced evens out each rank's pair: a head worth
    // five blocks goes with no block beside it (5.1 against 6.0; uniform gives rank 0 7.1).
    let v = [
        "partition",
        "-p",
        "2",
        "--placement",
        "v",
        "--blocks",
        "6",
        "--head-cost",
        "5",
        "--embedding-cost",
        "0.1",
    ];
    let value = json(&[&v[..], &["--format", "json"]].concat());
    assert_eq!(
        value["ranks"][0]["chunks"],
        serde_json::json!([[0, 1], [7, 8]])
    );
    assert_eq!(value["ranks"][1]["cost"].as_f64().unwrap(), 6.0);
    let text =
        String::from_utf8(pipit(&[&v[..], &["--method", "uniform"]].concat()).stdout).unwrap();
    assert!(text.contains("busiest rank 7.10, mean 5.55"), "{text}");
    fails_with(
        &[&v[..], &["--chunks", "3"]].concat(),
        "--placement v runs two stages per rank: chunks must be 2 (got 3)",
    );

    let value = json(&[
        "partition",
        "--stages",
        "3",
        "--costs",
        "1,1,1,1,1,1",
        "--memory",
        "4,4,1,1,1,1",
        "--method",
        "memory-capped",
        "--budget",
        "5",
        "--format",
        "json",
    ]);
    let layers: Vec<Value> = value["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["layers"].clone())
        .collect();
    assert_eq!(
        layers,
        vec![
            serde_json::json!([0, 1]),
            serde_json::json!([1, 3]),
            serde_json::json!([3, 6])
        ]
    );
    fails_with(
        &[
            "partition",
            "--stages",
            "3",
            "--costs",
            "1,1,1,1,1,1",
            "--memory",
            "4,4,1,1,1,1",
            "--method",
            "memory-capped",
            "--budget",
            "3",
        ],
        "smallest budget that fits is 4 bytes",
    );
}

#[test]
fn help_teaches_units_and_defaults() {
    let out = pipit(&["plan", "--help"]);
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--schedule <SCHEDULE>",
        "in ms",
        "[default: 2]",
        "--target-efficiency",
        "GB/s",
        "--schedule-file",
    ] {
        assert!(help.contains(needle), "missing {needle}: {help}");
    }
}

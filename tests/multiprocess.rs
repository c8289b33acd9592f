//! Multi-process runs as users start them: `pipit launch`, or `pipit train` processes started
//! by hand with torchrun's or srun's variables. The runs give the single-process losses and
//! checkpoint exactly, and `generate` and `eval` print what one process prints; a rank that
//! crashes, is killed or stops answering makes every other rank exit non-zero naming it; no
//! rank outlives a killed launcher; the rendezvous refuses a wrong token, a taken rank and
//! different settings.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{log_lines, ok, LAUNCH_VARS, TINY_MODEL};
use serde_json::Value;

/// Only a guard against a hung test: far beyond the peer timeouts used below.
const GUARD: Duration = Duration::from_secs(120);

fn pipit(args: &[String], env: &[(&str, String)]) -> Command {
    let mut cmd = common::pipit_command();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

fn scratch(name: &str) -> PathBuf {
    common::scratch("multiprocess", name)
}

/// `train` with the tiny model, a schedule, and `extra` flags.
fn train_args(schedule: &str, stages: usize, chunks: usize, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec!["train".into()];
    args.extend(TINY_MODEL.iter().map(|s| s.to_string()));
    args.extend(["--eval-every".to_string(), "2".to_string()]);
    for (flag, value) in [
        ("--schedule", schedule.to_string()),
        ("--stages", stages.to_string()),
        ("--chunks", chunks.to_string()),
    ] {
        args.push(flag.into());
        args.push(value);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Wait for `child` (at most [`GUARD`]) and collect its output.
fn finish(child: Child) -> Output {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(GUARD) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("process {pid} still ran after {GUARD:?}");
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    finish(cmd.spawn().expect("the pipit binary runs"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn same_losses(single: &Path, multi: &Path, ranks: usize) {
    let (a, b) = (log_lines(single), log_lines(multi));
    assert_eq!(a.len(), b.len(), "one line per step");
    assert!(!a.is_empty());
    for (x, y) in a.iter().zip(&b) {
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(x), keys(y), "the same keys");
        for key in ["step", "loss", "lr", "val_loss", "peak_bytes", "grad_norm"] {
            assert_eq!(x[key], y[key], "step {}: {key}", x["step"]);
        }
        assert_eq!(y["peak_bytes"].as_array().unwrap().len(), ranks);
    }
    assert!(
        b.iter().any(|v| !v["val_loss"].is_null()),
        "validation ran across the ranks"
    );
}

fn same_files(a: &Path, b: &Path) {
    for file in [
        "model.safetensors",
        "optimizer.safetensors",
        "config.json",
        "trainer_state.json",
    ] {
        let (x, y) = (
            std::fs::read(a.join(file)).unwrap(),
            std::fs::read(b.join(file)).unwrap(),
        );
        assert!(
            x == y,
            "{file} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// torchrun's variables for `rank` of `world` meeting at `port`.
fn torchrun_env(rank: usize, world: usize, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("RANK", rank.to_string()),
        ("WORLD_SIZE", world.to_string()),
        ("LOCAL_RANK", rank.to_string()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", port.to_string()),
    ]
}

/// Start `world` ranks of `args` by hand, each with the variables `env(rank)` gives.
fn start_ranks(
    world: usize,
    args: &[String],
    env: impl Fn(usize) -> Vec<(&'static str, String)>,
) -> Vec<Child> {
    (0..world)
        .map(|r| pipit(args, &env(r)).spawn().unwrap())
        .collect()
}

#[test]
fn launched_runs_give_the_single_process_losses_and_checkpoint() {
    let dir = scratch("launch");
    // The clipped run's ranks agree on one gradient norm across processes.
    for (schedule, p, v, clip) in [
        ("gpipe", 4, 1, "0"),
        ("1f1b", 4, 1, "0.05"),
        ("interleaved", 2, 2, "0"),
        ("zb-h1", 4, 1, "0"),
        ("zb-v", 2, 2, "0.05"),
    ] {
        let (single_log, multi_log) = (
            dir.join(format!("{schedule}-1.jsonl")),
            dir.join(format!("{schedule}-n.jsonl")),
        );
        let (single_ckpt, multi_ckpt) = (
            dir.join(format!("{schedule}-1")),
            dir.join(format!("{schedule}-n")),
        );
        let extra = |log: &Path, ckpt: &Path| {
            train_args(
                schedule,
                p,
                v,
                &[
                    "--steps",
                    "3",
                    "--grad-clip",
                    clip,
                    "--log-json",
                    log.to_str().unwrap(),
                    "--save",
                    ckpt.to_str().unwrap(),
                ],
            )
        };
        ok(&run(&mut pipit(&extra(&single_log, &single_ckpt), &[])));

        let mut launch: Vec<String> = ["launch", "--nproc-per-node", &p.to_string(), "--"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        launch.extend(extra(&multi_log, &multi_ckpt));
        let out = run(&mut pipit(&launch, &[]));
        ok(&out);
        same_losses(&single_log, &multi_log, p);
        same_files(&single_ckpt, &multi_ckpt);

        let (text, err) = (String::from_utf8_lossy(&out.stdout), stderr(&out));
        assert!(
            text.lines().all(|l| l.starts_with("[rank ")),
            "stdout: {text}"
        );
        assert!(
            err.lines()
                .all(|l| l.starts_with("[rank ") || l.starts_with("launch: ")),
            "stderr: {err}"
        );
        assert!(
            text.contains("[rank 0] step 3: loss"),
            "rank 0 reports the run: {text}"
        );
        for r in 0..p {
            assert!(
                err.contains(&format!("[rank {r}]   rank {r}: ")),
                "rank {r} describes its stages: {err}"
            );
        }
    }
}

#[test]
fn a_launched_run_resumes_from_its_checkpoint_exactly() {
    let dir = scratch("resume");
    let (full, half, rest, ckpt) = (
        dir.join("full.jsonl"),
        dir.join("half.jsonl"),
        dir.join("rest.jsonl"),
        dir.join("ckpt"),
    );
    let launch = |extra: &[&str]| {
        let mut a: Vec<String> = ["launch", "--nproc-per-node", "2", "--"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(train_args("1f1b", 2, 1, extra));
        run(&mut pipit(&a, &[]))
    };
    ok(&run(&mut pipit(
        &train_args(
            "1f1b",
            2,
            1,
            &[
                "--steps",
                "4",
                "--no-save",
                "--log-json",
                full.to_str().unwrap(),
            ],
        ),
        &[],
    )));
    ok(&launch(&[
        "--steps",
        "2",
        "--save",
        ckpt.to_str().unwrap(),
        "--log-json",
        half.to_str().unwrap(),
    ]));
    ok(&launch(&[
        "--steps",
        "4",
        "--resume",
        ckpt.to_str().unwrap(),
        "--no-save",
        "--log-json",
        rest.to_str().unwrap(),
    ]));
    let mut cut = log_lines(&half);
    cut.extend(log_lines(&rest));
    let full = log_lines(&full);
    assert_eq!(cut.len(), 4);
    for (a, b) in full.iter().zip(&cut) {
        assert_eq!(
            (&a["step"], &a["loss"]),
            (&b["step"], &b["loss"]),
            "the same loss after resuming"
        );
    }
}

#[test]
fn a_launched_wgpu_run_gives_the_single_process_losses() {
    let dir = scratch("wgpu");
    let args = |log: &Path| {
        let mut a = train_args(
            "1f1b",
            2,
            1,
            &[
                "--steps",
                "2",
                "--no-save",
                "--log-json",
                log.to_str().unwrap(),
            ],
        );
        let backend = a.iter().position(|x| x == "reference").unwrap();
        a[backend] = "wgpu".into();
        a
    };
    let (single, multi) = (dir.join("single.jsonl"), dir.join("multi.jsonl"));
    ok(&run(&mut pipit(&args(&single), &[])));
    let mut launch: Vec<String> = ["launch", "--nproc-per-node", "2", "--"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    launch.extend(args(&multi));
    let out = run(&mut pipit(&launch, &[]));
    ok(&out);
    assert!(
        stderr(&out).contains("[rank 1]   rank 1: wgpu"),
        "{}",
        stderr(&out)
    );
    same_losses(&single, &multi, 2);
}

#[test]
fn processes_started_by_hand_with_torchrun_or_srun_variables() {
    let dir = scratch("by-hand");
    let single = dir.join("single.jsonl");
    let args = |log: &Path| {
        train_args(
            "1f1b",
            4,
            1,
            &[
                "--steps",
                "3",
                "--no-save",
                "--log-json",
                log.to_str().unwrap(),
            ],
        )
    };
    ok(&run(&mut pipit(&args(&single), &[])));

    let torchrun = dir.join("torchrun.jsonl");
    let port = free_port();
    for out in start_ranks(4, &args(&torchrun), |r| torchrun_env(r, 4, port))
        .into_iter()
        .map(finish)
    {
        ok(&out);
    }
    same_losses(&single, &torchrun, 4);

    let srun = dir.join("srun.jsonl");
    let port = free_port();
    let slurm = |r: usize| {
        vec![
            ("SLURM_PROCID", r.to_string()),
            ("SLURM_NTASKS", "4".to_string()),
            ("SLURM_LOCALID", r.to_string()),
            ("SLURM_JOB_NODELIST", "localhost".to_string()),
            ("MASTER_PORT", port.to_string()),
        ]
    };
    for out in start_ranks(4, &args(&srun), slurm).into_iter().map(finish) {
        ok(&out);
    }
    same_losses(&single, &srun, 4);
}

/// The last line of a rank's stderr: the one error line.
/// The real torchrun: `$PIPIT_TORCHRUN`, else `torchrun` on the PATH; `None` says why not.
fn real_torchrun() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("PIPIT_TORCHRUN") {
        return Ok(PathBuf::from(path));
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("torchrun"))
            .find(|p| p.is_file())
    });
    found.ok_or_else(|| "no torchrun: set PIPIT_TORCHRUN or put torch's torchrun on PATH".into())
}

/// `torchrun --nproc-per-node 4 --no-python pipit train ...`, as a new user types it: the
/// agent already serves its own TCPStore on the master port, and the ranks meet in it. The
/// losses are the single process's.
#[test]
fn the_real_torchrun_runs_a_pipeline() {
    let torchrun = match real_torchrun() {
        Ok(path) => path,
        Err(why) => {
            assert!(
                std::env::var_os("PIPIT_REQUIRE_TORCHRUN").is_none(),
                "PIPIT_REQUIRE_TORCHRUN is set, but {why}"
            );
            eprintln!("skipped: {why}");
            return;
        }
    };
    let dir = scratch("real-torchrun");
    let args = |log: &Path| {
        let extra = [
            "--steps",
            "3",
            "--no-save",
            "--log-json",
            log.to_str().unwrap(),
        ];
        train_args("1f1b", 4, 1, &extra)
    };
    let single = dir.join("single.jsonl");
    ok(&run(&mut pipit(&args(&single), &[])));
    let multi = dir.join("torchrun.jsonl");
    let bin = std::env::var_os("PIPIT_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_pipit").into());
    let mut cmd = Command::new(&torchrun);
    cmd.args(["--nproc-per-node", "4", "--master-port"])
        .arg(free_port().to_string())
        .arg("--no-python")
        .arg(&bin)
        .args(args(&multi))
        .env("XDG_RUNTIME_DIR", "/tmp")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in LAUNCH_VARS {
        cmd.env_remove(var);
    }
    let out = run(&mut cmd);
    ok(&out);
    same_losses(&single, &multi, 4);
}

fn error_line(out: &Output) -> String {
    let err = stderr(out);
    let last = err.lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with("error: "), "stderr: {err}");
    assert_eq!(err.matches("error: ").count(), 1, "one error line: {err}");
    last
}

#[test]
fn a_rank_that_crashes_stops_every_other_rank_naming_it() {
    // Rank 2 aborts (SIGABRT, no goodbye) after computing step 2, before reporting it; the
    // checkpoint saved after step 1 stays the one on disk, whole.
    let dir = scratch("crash");
    let ckpt = dir.join("ckpt");
    let mut launch: Vec<String> = ["launch", "--nproc-per-node", "4", "--"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    launch.extend(train_args(
        "1f1b",
        4,
        1,
        &[
            "--steps",
            "100000",
            "--save",
            ckpt.to_str().unwrap(),
            "--save-every",
            "1",
            "--peer-timeout",
            "20",
        ],
    ));
    let out = run(&mut pipit(
        &launch,
        &[("PIPIT_FAULT_ABORT_AFTER_STEP", "2:2".into())],
    ));
    let state: Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 1, "the last good checkpoint is step 1's");
    assert!(
        ckpt.join("model.safetensors").is_file() && ckpt.join("optimizer.safetensors").is_file()
    );
    assert_eq!(
        out.status.code(),
        Some(128 + 6),
        "the crashed rank's status: {}",
        stderr(&out)
    );
    let err = stderr(&out);
    for r in [0, 1, 3] {
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with(&format!("[rank {r}] error: ")))
            .collect();
        assert_eq!(lines.len(), 1, "rank {r} stops with one line: {err}");
        assert!(
            lines[0].contains("rank 2 stopped without finishing"),
            "{}",
            lines[0]
        );
        assert!(
            lines[0].contains(&format!("; rank {r} stopped ")),
            "says what it was doing: {}",
            lines[0]
        );
    }
    assert!(
        err.lines()
            .last()
            .unwrap()
            .starts_with("launch: rank 2 failed first"),
        "{err}"
    );
}

/// Start three ranks of a long run by hand; returns them once rank 0 has logged a step.
fn three_running_ranks(dir: &Path, peer_timeout: &str) -> Vec<Child> {
    let log = dir.join("log.jsonl");
    let args = train_args(
        "gpipe",
        3,
        1,
        &[
            "--steps",
            "100000",
            "--no-save",
            "--peer-timeout",
            peer_timeout,
            "--log-json",
            log.to_str().unwrap(),
        ],
    );
    let port = free_port();
    let mut children = start_ranks(3, &args, |r| torchrun_env(r, 3, port));
    let start = Instant::now();
    while std::fs::read_to_string(&log)
        .map(|t| t.lines().count())
        .unwrap_or(0)
        < 1
    {
        if start.elapsed() > GUARD || children.iter_mut().any(|c| c.try_wait().unwrap().is_some()) {
            children.iter_mut().for_each(|c| drop(c.kill()));
            panic!("the run did not get going");
        }
        thread::sleep(Duration::from_millis(20));
    }
    children
}

#[test]
fn a_killed_rank_stops_the_others_naming_it() {
    let dir = scratch("killed");
    let mut ranks = three_running_ranks(&dir, "20");
    let mut victim = ranks.remove(1);
    victim.kill().unwrap();
    victim.wait().unwrap();
    for (r, out) in [0, 2].into_iter().zip(ranks.into_iter().map(finish)) {
        assert!(!out.status.success(), "rank {r} exits non-zero");
        let line = error_line(&out);
        assert!(
            line.contains("rank 1 stopped without finishing"),
            "rank {r}: {line}"
        );
    }
}

#[test]
fn a_rank_that_stops_answering_is_named_after_the_peer_timeout() {
    let dir = scratch("stopped");
    let mut ranks = three_running_ranks(&dir, "3");
    let pid = ranks[1].id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let mut stopped = ranks.remove(1);
    let outs: Vec<Output> = ranks.into_iter().map(finish).collect();
    stopped.kill().unwrap();
    stopped.wait().unwrap();
    for (r, out) in [0, 2].into_iter().zip(outs) {
        assert!(!out.status.success(), "rank {r} exits non-zero");
        let line = error_line(&out);
        assert!(
            line.contains("rank 1 stopped answering"),
            "rank {r}: {line}"
        );
        assert!(line.contains("for 3 s"), "rank {r}: {line}");
    }
}

#[test]
fn the_rendezvous_refuses_a_wrong_token_and_different_settings() {
    let args = train_args(
        "gpipe",
        2,
        1,
        &["--steps", "2", "--no-save", "--peer-timeout", "3"],
    );
    let port = free_port();
    let ranks = start_ranks(2, &args, |r| {
        let mut env = torchrun_env(r, 2, port);
        env.push(("PIPIT_TOKEN", if r == 0 { "right" } else { "wrong" }.into()));
        env
    });
    let outs: Vec<Output> = ranks.into_iter().map(finish).collect();
    assert_eq!(outs[1].status.code(), Some(2), "{}", stderr(&outs[1]));
    assert!(error_line(&outs[1]).contains("refused rank 1: wrong PIPIT_TOKEN"));
    assert!(!outs[0].status.success());
    assert!(error_line(&outs[0]).contains("rank(s) 1 of 2 never joined"));

    let port = free_port();
    let ranks: Vec<Child> = (0..2)
        .map(|r| {
            let mut a = args.clone();
            a.extend(["--seed".to_string(), (7 + r).to_string()]);
            pipit(&a, &torchrun_env(r, 2, port)).spawn().unwrap()
        })
        .collect();
    let outs: Vec<Output> = ranks.into_iter().map(finish).collect();
    assert_eq!(outs[1].status.code(), Some(2), "{}", stderr(&outs[1]));
    assert!(
        error_line(&outs[1]).contains("settings differ from rank 0's (seed: 8 here, 7 on rank 0)")
    );
    let line = error_line(&outs[0]);
    assert!(
        line.contains("rank 1 failed") && line.contains("settings differ"),
        "{line}"
    );

    // The same settings but another text on rank 1: the first stage would read one text and
    // the last score another.
    let dir = scratch("other-text");
    let port = free_port();
    let ranks: Vec<Child> = (0..2)
        .map(|r| {
            let text = dir.join(format!("text{r}.txt"));
            std::fs::write(&text, format!("{} {r}", "To be, or not to be. ".repeat(40))).unwrap();
            let mut a = args.clone();
            a.extend(["--data".to_string(), text.to_str().unwrap().to_string()]);
            pipit(&a, &torchrun_env(r, 2, port)).spawn().unwrap()
        })
        .collect();
    let outs: Vec<Output> = ranks.into_iter().map(finish).collect();
    assert_eq!(outs[1].status.code(), Some(2), "{}", stderr(&outs[1]));
    assert!(
        error_line(&outs[1]).contains("rank 1 was given other training tokens than rank 0"),
        "{}",
        stderr(&outs[1])
    );
    assert!(error_line(&outs[0]).contains("rank 1 failed"));
}

#[test]
fn a_second_process_for_a_taken_rank_is_refused() {
    // Rank 2 starts only once one of the two rank-1 processes has been turned away, so both
    // reach the rendezvous while it is still gathering ranks.
    let args = train_args(
        "gpipe",
        3,
        1,
        &["--steps", "2", "--no-save", "--peer-timeout", "30"],
    );
    let port = free_port();
    let mut first_two = start_ranks(3, &args, |i| torchrun_env(i.min(1), 3, port));
    let start = Instant::now();
    let turned_away = loop {
        if let Some(i) = (1..3).find(|&i| first_two[i].try_wait().unwrap().is_some()) {
            break i;
        }
        assert!(
            start.elapsed() < GUARD,
            "neither rank-1 process was refused"
        );
        thread::sleep(Duration::from_millis(20));
    };
    let refused = finish(first_two.remove(turned_away));
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(error_line(&refused).contains("rank 1 is already taken"));
    let last = pipit(&args, &torchrun_env(2, 3, port)).spawn().unwrap();
    for out in first_two.into_iter().chain([last]).map(finish) {
        ok(&out);
    }
}

#[test]
fn launch_refuses_bad_input() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["launch", "--nproc-per-node", "2", "--", "plan"],
            "runs `train`, `generate` or `eval`",
        ),
        (
            &["launch", "--nproc-per-node", "0", "--", "train"],
            "--nproc-per-node",
        ),
        (
            &[
                "launch",
                "--nproc-per-node",
                "2",
                "--nnodes",
                "2",
                "--node-rank",
                "2",
                "--",
                "train",
            ],
            "--node-rank",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let out = run(&mut pipit(&args, &[]));
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            error_line(&out).contains(needle),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    // A pipeline of 2 ranks in 3 processes is refused by every rank.
    let mut launch: Vec<String> = ["launch", "--nproc-per-node", "3", "--"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    launch.extend(train_args("gpipe", 2, 1, &["--steps", "1", "--no-save"]));
    let out = run(&mut pipit(&launch, &[]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("WORLD_SIZE is 3 but the pipeline has 2 ranks"),
        "{}",
        stderr(&out)
    );
}

/// How long the ranks of a killed launcher may take to go: far beyond the watch's period.
const ORPHAN_BOUND: Duration = Duration::from_secs(30);

/// A process's state letter and parent, from `/proc/PID/stat`; `None` once it is reaped.
fn proc_state(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces; the fields after it are plain.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((state, parent))
}

/// Still running: not reaped and not a zombie (a zombie has exited; its new parent may never
/// reap it).
fn running(pid: u32) -> bool {
    matches!(proc_state(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| {
            let child: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            (proc_state(child)?.1 == pid).then_some(child)
        })
        .collect()
}

#[test]
fn no_rank_outlives_a_killed_launcher() {
    let dir = scratch("orphans");
    let log = dir.join("log.jsonl");
    let mut args = train_args(
        "gpipe",
        2,
        1,
        &[
            "--steps",
            "100000",
            "--no-save",
            "--log-json",
            log.to_str().unwrap(),
        ],
    );
    // No validation before the last step: once training runs the ranks print nothing, so
    // only the launcher watch can stop them, not a failed write to the dead launcher's pipes.
    let every = args.iter().position(|a| a == "--eval-every").unwrap();
    args[every + 1] = "0".into();
    let mut launch: Vec<String> = ["launch", "--nproc-per-node", "2", "--"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    launch.extend(args);
    let mut launcher = pipit(&launch, &[]).spawn().unwrap();
    let start = Instant::now();
    while std::fs::read_to_string(&log).map_or(0, |t| t.lines().count()) < 1 {
        if start.elapsed() > GUARD || launcher.try_wait().unwrap().is_some() {
            let _ = launcher.kill();
            panic!("the run did not get going: {}", stderr(&finish(launcher)));
        }
        thread::sleep(Duration::from_millis(20));
    }
    let ranks = children_of(launcher.id());
    assert_eq!(ranks.len(), 2, "the launcher's ranks: {ranks:?}");
    assert!(ranks.iter().all(|&pid| running(pid)));
    launcher.kill().unwrap(); // SIGKILL: the launcher can do nothing for its ranks.
    launcher.wait().unwrap();
    let start = Instant::now();
    while ranks.iter().any(|&pid| running(pid)) && start.elapsed() < ORPHAN_BOUND {
        thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<u32> = ranks.iter().copied().filter(|&pid| running(pid)).collect();
    for pid in &left {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    assert!(
        left.is_empty(),
        "ranks {left:?} still ran {ORPHAN_BOUND:?} after their launcher was killed"
    );
}

#[test]
fn a_rank_whose_launcher_is_gone_stops_with_one_line() {
    // The test, not the process the variable names, is this process's parent: as for a rank
    // whose launcher died and which was handed to another parent.
    let args = train_args("gpipe", 1, 1, &["--steps", "100000", "--no-save"]);
    let gone = u32::MAX.to_string();
    let out = run(&mut pipit(&args, &[("PIPIT_LAUNCHER_PID", gone.clone())]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let line = error_line(&out);
    assert!(
        line.contains(&format!("pipit launch (process {gone}) exited")),
        "{line}"
    );
    let out = run(&mut pipit(&args, &[("PIPIT_LAUNCHER_PID", "me".into())]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(error_line(&out).contains("PIPIT_LAUNCHER_PID must be a process id"));
}

/// What `rank` wrote to the launcher's stdout, without the prefixes; every line must be its.
fn output_of_rank(stdout: &[u8], rank: usize) -> Vec<u8> {
    let prefix = format!("[rank {rank}] ");
    let mut out = Vec::new();
    for line in stdout.split_inclusive(|&b| b == b'\n') {
        let rest = line.strip_prefix(prefix.as_bytes()).unwrap_or_else(|| {
            panic!(
                "a line not from rank {rank}: {:?}",
                String::from_utf8_lossy(line)
            )
        });
        out.extend_from_slice(rest);
    }
    out
}

#[test]
fn launched_generate_and_eval_print_what_one_process_prints() {
    let dir = scratch("infer");
    let ckpt = dir.join("ckpt");
    let save = ["--steps", "2", "--save", ckpt.to_str().unwrap()];
    ok(&run(&mut pipit(&train_args("gpipe", 2, 1, &save), &[])));
    let corpus = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/data/shakespeare.txt"));
    let text = dir.join("text.txt");
    std::fs::write(&text, &corpus.unwrap()[..4000]).unwrap();
    let with = |command: &str, flags: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [command, "--backend", "reference", "--stages", "2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(["--checkpoint".into(), ckpt.to_str().unwrap().to_string()]);
        a.extend(flags.iter().map(|s| s.to_string()));
        a
    };
    let launched = |args: &[String]| {
        let mut a: Vec<String> = ["launch", "--nproc-per-node", "2", "--"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(args.iter().cloned());
        let out = run(&mut pipit(&a, &[]));
        ok(&out);
        output_of_rank(&out.stdout, 0)
    };
    // 40 tokens after a 7-byte prompt: the context slides past the 16-position window.
    let generate = with("generate", &["--max-tokens", "40", "--seed", "7"]);
    let single = run(&mut pipit(&generate, &[]));
    ok(&single);
    assert_eq!(
        single.stdout.len(),
        "ROMEO:\n".len() + 40 + 1,
        "prompt, tokens, newline"
    );
    assert_eq!(launched(&generate), single.stdout, "the same sample");
    // Several samples flow through the two processes' pipeline side by side.
    let samples = with(
        "generate",
        &["--max-tokens", "40", "--seed", "7", "--samples", "3"],
    );
    let single = run(&mut pipit(&samples, &[]));
    ok(&single);
    assert_eq!(launched(&samples), single.stdout, "the same samples");

    let eval = with(
        "eval",
        &["--data", text.to_str().unwrap(), "--format", "json"],
    );
    let single = run(&mut pipit(&eval, &[]));
    ok(&single);
    let v: Value = serde_json::from_slice(&single.stdout).unwrap();
    assert!(v["loss"].as_f64().unwrap() > 0.0 && v["tokens"].as_u64().unwrap() > 3000);
    assert_eq!(launched(&eval), single.stdout, "the same loss, every digit");

    // Ranks started with different sampling settings are refused before any token.
    let port = free_port();
    let ranks: Vec<Child> = (0..2)
        .map(|r| {
            let mut a = with("generate", &["--max-tokens", "5", "--peer-timeout", "10"]);
            a.extend(["--seed".to_string(), (7 + r).to_string()]);
            pipit(&a, &torchrun_env(r, 2, port)).spawn().unwrap()
        })
        .collect();
    let outs: Vec<Output> = ranks.into_iter().map(finish).collect();
    assert_eq!(outs[1].status.code(), Some(2), "{}", stderr(&outs[1]));
    assert!(error_line(&outs[1]).contains(
        "rank 1 was given other generation settings than rank 0 (seed: 8 here, 7 on rank 0)"
    ));
    assert!(
        outs[0].stdout.len() <= "ROMEO:\n".len(),
        "rank 0 sampled no token"
    );
    let line = error_line(&outs[0]);
    assert!(line.contains("rank 1 failed"), "{line}");
}

/// Two network namespaces joined by a veth pair, removed when dropped.
struct TwoHosts {
    names: [String; 2],
}

impl TwoHosts {
    /// Hosts `{tag}-a` (10.77.x.1) and `{tag}-b` (10.77.x.2), `x` from the process id.
    fn new(tag: &str) -> Self {
        let names = [format!("{tag}-a"), format!("{tag}-b")];
        let hosts = Self { names };
        let net = std::process::id() % 200 + 20;
        let (a, b) = (&hosts.names[0], &hosts.names[1]);
        let veth = (format!("pv{net}a"), format!("pv{net}b"));
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), a.clone()],
            vec!["netns".into(), "add".into(), b.clone()],
            vec![
                "link".into(),
                "add".into(),
                veth.0.clone(),
                "netns".into(),
                a.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                veth.1.clone(),
                "netns".into(),
                b.clone(),
            ],
            vec![
                "-n".into(),
                a.clone(),
                "addr".into(),
                "add".into(),
                format!("10.77.{net}.1/24"),
                "dev".into(),
                veth.0.clone(),
            ],
            vec![
                "-n".into(),
                b.clone(),
                "addr".into(),
                "add".into(),
                format!("10.77.{net}.2/24"),
                "dev".into(),
                veth.1.clone(),
            ],
            vec![
                "-n".into(),
                a.clone(),
                "link".into(),
                "set".into(),
                veth.0.clone(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                b.clone(),
                "link".into(),
                "set".into(),
                veth.1.clone(),
                "up".into(),
            ],
            // Local delivery of a host's own address goes through its lo device.
            vec![
                "-n".into(),
                a.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                b.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
        ];
        for step in steps {
            let status = Command::new("ip")
                .args(&step)
                .status()
                .expect("the ip command runs");
            assert!(status.success(), "ip {}", step.join(" "));
        }
        hosts
    }

    fn master(&self) -> String {
        format!("10.77.{}.1", std::process::id() % 200 + 20)
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

#[test]
#[ignore = "needs root and iproute2: cargo test --test multiprocess -- --ignored"]
fn a_launch_across_two_network_namespaces_gives_the_single_process_losses() {
    let dir = scratch("netns");
    let hosts = TwoHosts::new(&format!("pipit{}", std::process::id()));
    let single = dir.join("single.jsonl");
    let args = |log: &Path| {
        train_args(
            "1f1b",
            4,
            1,
            &[
                "--steps",
                "3",
                "--no-save",
                "--log-json",
                log.to_str().unwrap(),
            ],
        )
    };
    ok(&run(&mut pipit(&args(&single), &[])));

    let multi = dir.join("multi.jsonl");
    let master = hosts.master();
    let nodes: Vec<Child> = (0..2)
        .map(|node| {
            let mut cmd: Vec<String> = [
                "netns",
                "exec",
                hosts.names[node].as_str(),
                env!("CARGO_BIN_EXE_pipit"),
                "launch",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            for (flag, value) in [
                ("--nproc-per-node", "2".to_string()),
                ("--nnodes", "2".into()),
                ("--node-rank", node.to_string()),
                ("--master-addr", master.clone()),
                ("--master-port", "29533".into()),
            ] {
                cmd.push(flag.into());
                cmd.push(value);
            }
            cmd.push("--".into());
            cmd.extend(args(&multi));
            let mut c = Command::new("ip");
            c.args(&cmd)
                .env("PIPIT_TOKEN", "two-hosts")
                .env("XDG_RUNTIME_DIR", "/tmp");
            for var in LAUNCH_VARS.iter().filter(|v| **v != "PIPIT_TOKEN") {
                c.env_remove(var);
            }
            c.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<Output> = nodes.into_iter().map(finish).collect();
    for out in &outs {
        ok(out);
    }
    let rank0 = stderr(&outs[0]);
    assert!(
        rank0.contains(&format!("rendezvous at {master}:29533")),
        "{rank0}"
    );
    same_losses(&single, &multi, 4);
}

/// The number of CUDA devices, or `None` after printing why CUDA is not usable here (a
/// failure instead with `PIPIT_REQUIRE_CUDA` set, as on GPU machines).
fn cuda_devices() -> Option<usize> {
    match pipit::cuda::probe() {
        Ok(n) => Some(n),
        Err(why) => {
            assert!(
                std::env::var_os("PIPIT_REQUIRE_CUDA").is_none(),
                "PIPIT_REQUIRE_CUDA is set, but CUDA is not usable: {why}"
            );
            eprintln!("skipped: CUDA is not usable here: {why}");
            None
        }
    }
}

/// [`same_losses`] for CUDA ranks: every key and step, with losses equal to float rounding
/// (1e-5 relative) and, where `same_memory`, the same per-rank peaks.
fn close_losses(single: &Path, multi: &Path, ranks: usize, same_memory: bool) {
    let (a, b) = (log_lines(single), log_lines(multi));
    assert_eq!(a.len(), b.len(), "one line per step");
    assert!(!a.is_empty());
    for (x, y) in a.iter().zip(&b) {
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(x), keys(y), "the same keys");
        assert_eq!((&x["step"], &x["lr"]), (&y["step"], &y["lr"]));
        for key in ["loss", "val_loss"] {
            match (x[key].as_f64(), y[key].as_f64()) {
                (Some(p), Some(q)) => assert!(
                    (p - q).abs() <= 1e-5 * p.abs().max(1.0),
                    "step {}: {key} {p} in one process, {q} across processes",
                    x["step"]
                ),
                _ => assert_eq!(x[key], y[key], "step {}: {key}", x["step"]),
            }
        }
        assert_eq!(y["peak_bytes"].as_array().unwrap().len(), ranks);
        if same_memory {
            assert_eq!(x["peak_bytes"], y["peak_bytes"], "step {}", x["step"]);
        }
    }
}

/// CUDA ranks in separate processes give the single-process CUDA losses. One GPU holds both
/// ranks only with tensors over TCP (NCCL refuses two ranks on one GPU), so that run is the
/// one every GPU machine checks; with a GPU per rank the NCCL run must match too, and on a
/// single GPU asking for NCCL ends at once with one error line per rank that names NCCL.
#[test]
fn a_launched_cuda_run_gives_the_single_process_losses() {
    let Some(gpus) = cuda_devices() else {
        return;
    };
    let dir = scratch("cuda");
    let args = |log: &Path, transport: &str| {
        let mut a = train_args(
            "1f1b",
            2,
            1,
            &[
                "--steps",
                "2",
                "--no-save",
                "--log-json",
                log.to_str().unwrap(),
                "--transport",
                transport,
                "--peer-timeout",
                "20",
            ],
        );
        let backend = a.iter().position(|x| x == "reference").unwrap();
        a[backend] = "cuda".into();
        a
    };
    let launch = |log: &Path, transport: &str| {
        let mut a: Vec<String> = ["launch", "--nproc-per-node", "2", "--"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(args(log, transport));
        run(&mut pipit(&a, &[]))
    };
    let single = dir.join("single.jsonl");
    ok(&run(&mut pipit(&args(&single, "auto"), &[])));

    let tcp = dir.join("tcp.jsonl");
    let out = launch(&tcp, "tcp");
    ok(&out);
    let err = stderr(&out);
    assert!(err.contains("[rank 1]   rank 1: cuda"), "{err}");
    assert!(!err.contains("tensors over nccl"), "{err}");
    close_losses(&single, &tcp, 2, true);

    let nccl = dir.join("nccl.jsonl");
    let out = launch(&nccl, "nccl");
    let err = stderr(&out);
    if gpus >= 2 {
        ok(&out);
        for r in 0..2 {
            assert!(
                err.lines()
                    .any(|l| l.starts_with(&format!("[rank {r}]   rank {r}: cuda"))
                        && l.ends_with("| tensors over nccl")),
                "rank {r} moves tensors over NCCL: {err}"
            );
        }
        // Staged copies of sent tensors count towards the senders' peaks.
        close_losses(&single, &nccl, 2, false);
    } else {
        assert!(
            !out.status.success(),
            "NCCL refused two ranks on one GPU: {err}"
        );
        for r in 0..2 {
            let lines: Vec<&str> = err
                .lines()
                .filter(|l| l.starts_with(&format!("[rank {r}] error: ")))
                .collect();
            assert_eq!(lines.len(), 1, "rank {r} stops with one line: {err}");
            assert!(lines[0].contains("NCCL"), "{}", lines[0]);
        }
    }
}

//! `pipit launch`: start one `pipit` process per rank on this host, as torchrun does, with
//! each line of their output prefixed by the rank, and stop them all when one fails. The
//! ranks watch the launcher and stop by themselves if it is killed.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use pipit_engine::dist::env::DEFAULT_MASTER_PORT;
use pipit_engine::dist::launcher_watch::LAUNCHER_PID_ENV;
use pipit_engine::invalid_input;

/// How often the launcher looks at its children.
const POLL: Duration = Duration::from_millis(10);

/// Start one process per rank of a multi-process run on this host.
///
/// Each process runs `pipit <ARGS>` (`train`, `generate` or `eval`) with torchrun's variables
/// set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); rank 0
/// serves the rendezvous and prints the result. The launcher exits with the status of the
/// first rank that fails (128 + signal for a rank killed by a signal), after stopping the
/// others; if the launcher itself is killed, the ranks notice and exit.
#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Processes (ranks) to start on this host.
    #[arg(long, value_name = "N")]
    nproc_per_node: usize,
    /// Hosts taking part; each runs `pipit launch` with its own --node-rank.
    #[arg(long, value_name = "K", default_value_t = 1)]
    nnodes: usize,
    /// This host's index in 0..K; node 0 runs rank 0, which serves the rendezvous.
    #[arg(long, value_name = "R", default_value_t = 0)]
    node_rank: usize,
    /// Address of node 0's rendezvous (beyond loopback, set PIPIT_TOKEN on every node).
    #[arg(long, value_name = "HOST", default_value = "127.0.0.1")]
    master_addr: String,
    /// Port of the rendezvous (default: a free port with one host, 29500 with several).
    #[arg(long, value_name = "PORT")]
    master_port: Option<u16>,
    /// Seconds the other ranks get to stop by themselves after one fails, before they are
    /// killed.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
    grace: f64,
    /// The pipit command every rank runs, after `--`: `-- train --stages 4 ...` (or `generate`,
    /// `eval`).
    #[arg(last = true, required = true, value_name = "ARGS")]
    command: Vec<String>,
}

/// Run `pipit launch`; on a failed rank the process exits with that rank's status.
pub fn run(args: LaunchArgs) -> Result<()> {
    if args.nproc_per_node == 0 || args.nnodes == 0 {
        return Err(invalid_input!(
            "--nproc-per-node and --nnodes must be at least 1, got {} and {}",
            args.nproc_per_node,
            args.nnodes
        ));
    }
    if args.node_rank >= args.nnodes {
        return Err(invalid_input!(
            "--node-rank must be below --nnodes = {}, got {}",
            args.nnodes,
            args.node_rank
        ));
    }
    if !(args.grace >= 0.0 && args.grace.is_finite()) {
        return Err(invalid_input!(
            "--grace must be a number of seconds ≥ 0, got {}",
            args.grace
        ));
    }
    if !matches!(
        args.command.first().map(String::as_str),
        Some("train" | "generate" | "eval")
    ) {
        return Err(invalid_input!(
            "pipit launch runs `train`, `generate` or `eval` (one process per pipeline rank), got `{}`",
            args.command.join(" ")
        ));
    }
    let port = match args.master_port {
        Some(p) => p,
        None if args.nnodes == 1 => free_port(&args.master_addr)?,
        None => DEFAULT_MASTER_PORT,
    };
    let (n, world) = (args.nproc_per_node, args.nproc_per_node * args.nnodes);
    let first_rank = args.node_rank * n;
    eprintln!(
        "launch: ranks {}..{} of {world} on this host, rendezvous at {}:{port}",
        first_rank,
        first_rank + n - 1,
        args.master_addr
    );
    let exe = std::env::current_exe().context("finding the pipit executable")?;
    let mut children: Vec<Child> = Vec::with_capacity(n);
    let mut pumps: Vec<JoinHandle<()>> = Vec::with_capacity(2 * n);
    for local in 0..n {
        let rank = first_rank + local;
        let spawned = Command::new(&exe)
            .args(&args.command)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("GROUP_RANK", args.node_rank.to_string())
            .env("MASTER_ADDR", &args.master_addr)
            .env("MASTER_PORT", port.to_string())
            .env(LAUNCHER_PID_ENV, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                stop_all(&mut children);
                return Err(e).with_context(|| format!("starting rank {rank} ({})", exe.display()));
            }
        };
        if let Some(out) = child.stdout.take() {
            pumps.push(pump(rank, out, false));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(pump(rank, err, true));
        }
        children.push(child);
    }
    let outcome = supervise(
        &mut children,
        first_rank,
        Duration::from_secs_f64(args.grace),
    );
    for p in pumps {
        let _ = p.join();
    }
    let (rank, status, killed) = match outcome? {
        None => return Ok(()),
        Some(failure) => failure,
    };
    let code = exit_code(status);
    let stopped = if killed.is_empty() {
        String::new()
    } else {
        format!(
            "; killed ranks {killed:?}, which had not stopped after {} s",
            args.grace
        )
    };
    eprintln!(
        "launch: rank {rank} failed first ({}){stopped}",
        describe(status)
    );
    std::process::exit(code);
}

/// A port nothing listens on now (the rendezvous binds it a moment later).
fn free_port(host: &str) -> Result<u16> {
    let listener = TcpListener::bind((host, 0))
        .map_err(|e| invalid_input!("--master-addr {host} is not an address of this host: {e}"))?;
    Ok(listener.local_addr()?.port())
}

/// Copy `from` to this process's stdout or stderr line by line, each line prefixed with the
/// rank. The bytes pass unchanged (generated text need not be UTF-8); a last line without a
/// newline gets one.
fn pump(rank: usize, from: impl Read + Send + 'static, to_stderr: bool) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let prefix = format!("[rank {rank}] ");
        let mut line = prefix.clone().into_bytes();
        loop {
            line.truncate(prefix.len());
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line.last() != Some(&b'\n') {
                line.push(b'\n');
            }
            let _ = if to_stderr {
                io::stderr().lock().write_all(&line)
            } else {
                io::stdout().lock().write_all(&line)
            };
        }
    })
}

/// Wait for every child. After the first failure, the others get `grace` to stop by
/// themselves and are killed after it. Returns the failure to report `(rank, status, killed
/// ranks)`, or `None` when every rank succeeded.
fn supervise(
    children: &mut [Child],
    first_rank: usize,
    grace: Duration,
) -> Result<Option<(usize, ExitStatus, Vec<usize>)>> {
    let mut status: Vec<Option<ExitStatus>> = vec![None; children.len()];
    // Failures in the order seen, before the launcher killed anything.
    let mut failures: Vec<(usize, ExitStatus)> = Vec::new();
    let mut kill_at: Option<Instant> = None;
    let mut killed = Vec::new();
    loop {
        for (i, child) in children.iter_mut().enumerate() {
            if status[i].is_some() {
                continue;
            }
            if let Some(s) = child.try_wait().context("waiting for a rank")? {
                status[i] = Some(s);
                if !s.success() && killed.is_empty() {
                    failures.push((i, s));
                }
            }
        }
        if kill_at.is_none() && !failures.is_empty() {
            kill_at = Some(Instant::now() + grace);
        }
        if status.iter().all(Option::is_some) {
            break;
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) && killed.is_empty() {
            for (i, child) in children.iter_mut().enumerate() {
                if status[i].is_none() {
                    let _ = child.kill();
                    killed.push(first_rank + i);
                }
            }
        }
        thread::sleep(POLL);
    }
    // The others stop because of the first to fail; a rank killed by a signal (a crash) is
    // that one even when a peer's exit was noticed a moment before it.
    let cause = failures
        .iter()
        .find(|(_, s)| signal(*s).is_some())
        .or(failures.first());
    Ok(cause.map(|&(i, s)| (first_rank + i, s, killed)))
}

/// Kill and reap every child (used when a later child could not even start).
fn stop_all(children: &mut [Child]) {
    for child in children.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The status a shell would report: the exit code, or 128 + the signal.
fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), signal(status)) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), signal(status)) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}, status {}", 128 + sig),
        (None, None) => "unknown status".into(),
    }
}

/// The signal that ended a process, where the platform has signals.
fn signal(status: ExitStatus) -> Option<i32> {
    #[cfg(unix)]
    {
        std::os::unix::process::ExitStatusExt::signal(&status)
    }
    #[cfg(not(unix))]
    {
        let _ = status;
        None
    }
}

//! `pipit serve` end to end: a small checkpoint served over HTTP and checked with the real
//! `openai` Python client (tests/serve_client.py) against `pipit generate --temperature 0`;
//! a client that disconnects gives its cache blocks back; SIGTERM stops the server with
//! status 0; bad settings are one line and status 2.
//!
//! The client needs Python with the `openai` package: `$PIPIT_PYTHON`, else `python3`. Where
//! it is missing the client's checks are skipped with the reason (CI sets
//! PIPIT_REQUIRE_OPENAI, so there they cannot be).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ok, pipit_command, scratch};
use serde_json::Value;

const WINDOW: usize = 64;
const MAX_TOKENS: usize = 24;

/// A small byte-level GPT-2 trained for a few steps, saved in `dir`.
fn checkpoint(dir: &Path) -> PathBuf {
    let ckpt = dir.join("ckpt");
    let window = WINDOW.to_string();
    let out = pipit_command()
        .args([
            "train",
            "--backend",
            "cpu",
            "--n-layer",
            "2",
            "--n-embd",
            "32",
            "--n-head",
        ])
        .args([
            "2",
            "--n-positions",
            &window,
            "--seq-len",
            &window,
            "--batch-size",
            "4",
        ])
        .args([
            "--microbatches",
            "2",
            "--stages",
            "2",
            "--steps",
            "30",
            "--eval-tokens",
        ])
        .args(["256", "--save"])
        .arg(&ckpt)
        .output()
        .unwrap();
    ok(&out);
    ckpt
}

/// Python with the openai package, or why there is none.
fn python() -> Result<PathBuf, String> {
    let python = std::env::var_os("PIPIT_PYTHON").map_or("python3".into(), PathBuf::from);
    let found = Command::new(&python).args(["-c", "import openai"]).output();
    match found {
        Ok(out) if out.status.success() => Ok(python),
        Ok(_) => Err(format!("{} has no openai package", python.display())),
        Err(e) => Err(format!("cannot run {}: {e}", python.display())),
    }
}

/// A server that is killed if the test fails before it stops it.
struct Server(Option<Child>);

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `pipit serve` on a free port with `flags`; its address.
fn serve(ckpt: &Path, flags: &[&str]) -> (Server, String) {
    let mut child = pipit_command()
        .args(["serve", "--backend", "cpu", "--port", "0", "--checkpoint"])
        .arg(ckpt)
        .args(flags)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("pipit serve: listening on ")
        .unwrap_or_else(|| panic!("the server's first line: {line:?}"))
        .to_string();
    (Server(Some(child)), url)
}

/// SIGTERM the server; it must exit with status 0 within 15 s.
fn stop(mut server: Server) {
    let mut child = server.0.take().expect("a running server");
    let started = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "the server exited with {status}");
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the server did not stop within 15 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The greedy samples `pipit generate` gives `prompts`, as the client script reads them.
fn expected(dir: &Path, ckpt: &Path, prompts: &[&str]) -> PathBuf {
    let file = dir.join("prompts.jsonl");
    let lines: Vec<String> = prompts
        .iter()
        .map(|p| Value::from(*p).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out = pipit_command()
        .args([
            "generate",
            "--backend",
            "cpu",
            "--stages",
            "1",
            "--temperature",
            "0",
        ])
        .args([
            "--max-tokens",
            &MAX_TOKENS.to_string(),
            "--format",
            "json",
            "--checkpoint",
        ])
        .arg(ckpt)
        .arg("--prompts")
        .arg(&file)
        .output()
        .unwrap();
    ok(&out);
    let mut report: Value = serde_json::from_slice(&out.stdout).unwrap();
    report["max_tokens"] = MAX_TOKENS.into();
    report["window"] = WINDOW.into();
    let path = dir.join("expected.json");
    std::fs::write(&path, report.to_string()).unwrap();
    path
}

/// Run the client script's `case` against `url`.
fn client(python: &Path, case: &str, url: &str, expected: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve_client.py");
    let out = Command::new(python)
        .arg(script)
        .args([case, url])
        .arg(expected)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the openai client's checks ({case}) failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_openai_client_gets_greedy_text_streams_and_errors_from_the_server() {
    let python = match python() {
        Ok(p) => p,
        Err(why) => {
            assert!(
                std::env::var_os("PIPIT_REQUIRE_OPENAI").is_none(),
                "PIPIT_REQUIRE_OPENAI is set, but {why}"
            );
            eprintln!("skipped: {why}");
            return;
        }
    };
    let dir = scratch("serve", "openai");
    let ckpt = checkpoint(&dir);
    let prompts = [
        "ROMEO:\n",
        "To be, or not",
        "JULIET: O",
        "First Citizen:\nBefore we",
    ];
    let expected = expected(&dir, &ckpt, &prompts);
    // Two stages, two batches in flight.
    let (server, url) = serve(&ckpt, &["--stages", "2"]);
    client(&python, "main", &url, &expected);
    stop(server);
    // Room in the cache for one whole context (4 blocks of 16 positions, one block layer a
    // rank: 4 × 16 × 2 × 32 × 4 bytes), and two waiting requests.
    let (server, url) = serve(
        &ckpt,
        &[
            "--stages",
            "2",
            "--kv-cache-bytes",
            "16384",
            "--max-waiting",
            "2",
        ],
    );
    client(&python, "tight", &url, &expected);
    stop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_server_settings_are_one_line_and_status_2() {
    let dir = scratch("serve", "settings");
    let ckpt = checkpoint(&dir);
    for (flags, says) in [
        (
            &["--kv-cache-bytes", "100"][..],
            "--kv-cache-bytes 100 holds 0 blocks",
        ),
        (
            &["--stages", "9"][..],
            "--stages must be between 1 and the model's 4 layers, got 9",
        ),
        (
            &["--max-batch-tokens", "0"][..],
            "--max-batch-tokens must be at least 1, got 0",
        ),
    ] {
        let out = pipit_command()
            .args(["serve", "--backend", "cpu", "--port", "0", "--checkpoint"])
            .arg(&ckpt)
            .args(flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {stderr}");
        let last = stderr.lines().last().unwrap_or("");
        assert!(
            last.starts_with("error: ") && last.contains(says),
            "{flags:?}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

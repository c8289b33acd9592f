//! A load generator for `pipit serve`: open-loop arrivals of requests with mixed prompt and
//! output lengths, drawn with a fixed seed, streamed, timed as a client sees them.
//!
//! Prompts are passages of the corpus of `--prompt-min..=--prompt-max` bytes (one token a
//! byte for the byte-level models `pipit train` makes), each asking for
//! `--output-min..=--output-max` tokens with the end-of-text token ignored, so every request
//! generates what it asks for. Arrivals are all at once (`--rate 0`), or a Poisson process of
//! `--rate` requests a second; at most `--concurrency` are in flight. Prints one JSON object:
//! output tokens, seconds, output tokens/s, and time to first token and time per output token
//! (a request's mean gap after its first) at p50 and p99, in milliseconds.
//!
//! ```text
//! pipit serve --checkpoint runs/latest &
//! cargo run --release --example loadgen -- --requests 256 --concurrency 32
//! ```
//!
//! `--write-prompts FILE` writes the prompts as `pipit generate --prompts` reads them, so the
//! same requests can run as offline waves (with `--max-tokens` the longest output asked for,
//! which the report gives as `longest_output`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use pipit_engine::rng::Rng;
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    /// The server.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    #[arg(long, default_value_t = 256)]
    requests: usize,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Requests a second, arriving as a Poisson process (0: all at once).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "data/shakespeare.txt")]
    corpus: std::path::PathBuf,
    #[arg(long, default_value_t = 8)]
    prompt_min: usize,
    #[arg(long, default_value_t = 48)]
    prompt_max: usize,
    #[arg(long, default_value_t = 16)]
    output_min: usize,
    #[arg(long, default_value_t = 64)]
    output_max: usize,
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Also write the prompts, one JSON string a line.
    #[arg(long, value_name = "FILE")]
    write_prompts: Option<std::path::PathBuf>,
}

/// What one request saw.
struct Seen {
    tokens: usize,
    first: Duration,
    per_token: Option<Duration>,
}

/// `between(rng, lo, hi)`: uniform in `lo..=hi`.
fn between(rng: &mut Rng, lo: usize, hi: usize) -> usize {
    lo + rng.below((hi - lo + 1) as u64) as usize
}

/// One streamed completion from `host:port`, its server-sent events read as they come.
async fn one(
    host: &str,
    port: u16,
    model: &str,
    prompt: &str,
    max_tokens: usize,
    args: &Args,
) -> Result<Seen> {
    let body = json!({
        "model": model, "prompt": prompt, "max_tokens": max_tokens,
        "temperature": args.temperature, "seed": args.seed, "stream": true,
        "stream_options": {"include_usage": true}, "ignore_eos": true,
    });
    let start = Instant::now();
    let stream = tokio::net::TcpStream::connect((host, port)).await?;
    stream.set_nodelay(true)?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::post("/v1/completions")
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let mut res = send.send_request(req).await?;
    let status = res.status();
    if status != 200 {
        let text = res.into_body().collect().await?.to_bytes();
        bail!("status {status}: {}", String::from_utf8_lossy(&text));
    }
    let (mut first, mut last, mut tokens) = (None, start, 0);
    let mut pending = Vec::new();
    while let Some(frame) = res.body_mut().frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let line = String::from_utf8_lossy(&event);
            let Some(data) = line.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let chunk: Value = serde_json::from_str(data)?;
            if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
                tokens = n as usize;
            }
            let text = chunk["choices"].as_array().into_iter().flatten();
            if text
                .filter_map(|c| c["text"].as_str())
                .any(|t| !t.is_empty())
            {
                last = Instant::now();
                first.get_or_insert(last);
            }
        }
    }
    let first = first.context("a request produced no text")?;
    Ok(Seen {
        tokens,
        first: first - start,
        per_token: (tokens > 1).then(|| (last - first) / (tokens as u32 - 1)),
    })
}

/// The `p`-th percentile of `xs` in milliseconds (nearest rank).
fn percentile(xs: &mut [Duration], p: f64) -> Option<f64> {
    xs.sort();
    let i = ((p / 100.0) * (xs.len().checked_sub(1)? as f64)).round() as usize;
    Some((xs[i].as_secs_f64() * 1e5).round() / 100.0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    if args.prompt_min == 0
        || args.prompt_min > args.prompt_max
        || args.output_min == 0
        || args.output_min > args.output_max
        || args.concurrency == 0
    {
        bail!("need 0 < --prompt-min <= --prompt-max, 0 < --output-min <= --output-max, --concurrency >= 1");
    }
    let text = std::fs::read_to_string(&args.corpus)
        .with_context(|| format!("reading {}", args.corpus.display()))?;
    let mut rng = Rng::new(args.seed);
    let requests: Vec<(String, usize)> = (0..args.requests)
        .map(|_| {
            let n = between(&mut rng, args.prompt_min, args.prompt_max);
            let at = rng.below((text.len() - n) as u64) as usize;
            let prompt = String::from_utf8_lossy(&text.as_bytes()[at..at + n]).into_owned();
            (prompt, between(&mut rng, args.output_min, args.output_max))
        })
        .collect();
    if let Some(path) = &args.write_prompts {
        let lines: Vec<String> = requests
            .iter()
            .map(|(p, _)| Value::from(p.as_str()).to_string())
            .collect();
        std::fs::write(path, lines.join("\n") + "\n")?;
    }
    let url = args
        .url
        .strip_prefix("http://")
        .context("--url must be http://HOST:PORT")?;
    let (host, port) = url
        .trim_end_matches('/')
        .rsplit_once(':')
        .context("--url needs a port")?;
    let (host, port): (String, u16) = (host.to_string(), port.parse()?);
    // The served model's name.
    let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/v1/models")
        .header("host", &host)
        .body(Full::new(Bytes::new()))?;
    let models: Value = serde_json::from_slice(
        &send
            .send_request(req)
            .await?
            .into_body()
            .collect()
            .await?
            .to_bytes(),
    )?;
    let model = models["data"][0]["id"]
        .as_str()
        .context("no model in /v1/models")?
        .to_string();

    let gate = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
    let mut arrivals = Rng::new(args.seed + 1);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (prompt, max_tokens) in requests.iter().cloned() {
        let (gate, a, host, model) = (
            Arc::clone(&gate),
            Arc::clone(&args),
            host.clone(),
            model.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _slot = gate.acquire_owned().await?;
            one(&host, port, &model, &prompt, max_tokens, &a).await
        }));
        if args.rate > 0.0 {
            let gap = -(1.0 - arrivals.uniform()).ln() / args.rate;
            tokio::time::sleep(Duration::from_secs_f64(gap)).await;
        }
    }
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await??);
    }
    let seconds = started.elapsed().as_secs_f64();
    let tokens: usize = seen.iter().map(|s| s.tokens).sum();
    let mut first: Vec<Duration> = seen.iter().map(|s| s.first).collect();
    let mut per: Vec<Duration> = seen.iter().filter_map(|s| s.per_token).collect();
    let report = json!({
        "requests": requests.len(),
        "concurrency": args.concurrency,
        "rate": args.rate,
        "output_tokens": tokens,
        "asked_tokens": requests.iter().map(|r| r.1).sum::<usize>(),
        "longest_output": requests.iter().map(|r| r.1).max(),
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "output_tokens_per_s": (tokens as f64 / seconds * 10.0).round() / 10.0,
        "ttft_ms_p50": percentile(&mut first, 50.0),
        "ttft_ms_p99": percentile(&mut first, 99.0),
        "tpot_ms_p50": percentile(&mut per, 50.0),
        "tpot_ms_p99": percentile(&mut per, 99.0),
    });
    println!("{report}");
    Ok(())
}

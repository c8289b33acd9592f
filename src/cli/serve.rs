//! `pipit serve`: an OpenAI-compatible HTTP server (axum on tokio) in front of the
//! continuous-batching scheduler, which runs the checkpoint's stages on their own threads.
//!
//! Routes: `POST /v1/completions`, `GET /v1/models`, `GET /health`, `GET /metrics`. Each
//! completion choice is one sequence of the scheduler; its tokens come back through a channel,
//! are turned into text as whole UTF-8 characters, and end at `max_tokens`, at the end-of-text
//! token or at a stop string. A client that goes away cancels its sequences at their next
//! token.

mod api;
mod metrics;
mod text;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use pipit_engine::checkpoint;
use pipit_engine::dist::LaunchEnv;
use pipit_engine::schedule::ScheduleKind;
use pipit_engine::serve::{Command, Event, Finish, Gauges, Limits, Pipeline, Request, Scheduler};
use pipit_engine::tokenizer::Tokenizer;
use pipit_engine::train::{Init, TrainConfig, Trainer};
use pipit_engine::{invalid_input, Backend};
use serde_json::{json, Value};
use tokio::sync::mpsc as tmpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use self::api::{ApiError, CompletionRequest};
use self::metrics::Metrics;
use self::text::TextStream;
use super::device::{with_backend, BackendChoice, BackendJob};
use super::say;
use super::train::load_checkpoint;

/// The settings of `pipit serve` (its help is on the subcommand in `cli/mod.rs`).
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Checkpoint directory (pipit's, or a Hugging Face GPT-2 or Llama one; sharded or not).
    #[arg(long, value_name = "DIR", default_value = super::train::DEFAULT_CHECKPOINT)]
    checkpoint: PathBuf,
    /// Pipeline ranks to cut the model into, each on its own thread; as many batches are in
    /// flight at once, so every rank works on one while the next works on another.
    #[arg(long, default_value_t = 1)]
    stages: usize,
    /// Device for every rank.
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendChoice,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The model's name in the API (`model` of requests, `/v1/models`). [default: the
    /// checkpoint directory's name]
    #[arg(long, value_name = "NAME")]
    served_model_name: Option<String>,
    /// Bytes of key/value cache each rank may hold. The cache is cut into blocks of
    /// --kv-block-tokens positions; a request reserves the blocks of its prompt and of its
    /// max_tokens when it starts, and waits while they are not free.
    #[arg(long, value_name = "BYTES", default_value_t = 256 << 20)]
    kv_cache_bytes: u64,
    /// Positions per block of the key/value cache.
    #[arg(long, value_name = "N", default_value_t = 16)]
    kv_block_tokens: usize,
    /// Tokens one pass of a batch takes at most: one per decoding sequence, the rest for
    /// prompts, which fill in chunks over several passes when they are longer.
    #[arg(long, value_name = "N", default_value_t = 512)]
    max_batch_tokens: usize,
    /// Sequences a batch holds at most.
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_batch_size: usize,
    /// Requests that may wait for room; beyond them the server answers 429.
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_waiting: usize,
    /// After Ctrl-C or SIGTERM, seconds the sequences running may take to finish before
    /// they are cancelled (their clients get what was generated, finish_reason "cancelled").
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    shutdown_timeout: f64,
}

/// Run `pipit serve`.
pub fn run(args: ServeArgs) -> Result<()> {
    if LaunchEnv::from_env()?.is_some_and(|env| env.world_size > 1) {
        return Err(invalid_input!(
            "pipit serve runs in one process, its --stages on threads; it cannot run under a \
             launcher with more than one process"
        ));
    }
    for (name, value) in [
        ("--kv-block-tokens", args.kv_block_tokens),
        ("--max-batch-tokens", args.max_batch_tokens),
        ("--max-batch-size", args.max_batch_size),
    ] {
        if value == 0 {
            return Err(invalid_input!("{name} must be at least 1, got 0"));
        }
    }
    if !(args.shutdown_timeout >= 0.0 && args.shutdown_timeout.is_finite()) {
        return Err(invalid_input!(
            "--shutdown-timeout must be 0 or more seconds, got {}",
            args.shutdown_timeout
        ));
    }
    let header = checkpoint::load_header(&args.checkpoint)?;
    let model = header.config.clone();
    let layers = model.n_layer + 2;
    if args.stages == 0 || args.stages > layers {
        return Err(invalid_input!(
            "--stages must be between 1 and the model's {layers} layers, got {}",
            args.stages
        ));
    }
    let tokenizer = Tokenizer::for_checkpoint(&args.checkpoint, model.vocab_size)?;
    let config = TrainConfig {
        model: model.clone(),
        stages: args.stages,
        microbatches: 1,
        batch_size: 1,
        seq_len: model.n_positions,
        schedule: ScheduleKind::GPipe.into(),
        ..TrainConfig::default()
    };
    // The cache budget per rank: the rank with the most blocks sets the bytes of a block.
    let ranges = config.stage_layers()?;
    let most_blocks = ranges
        .iter()
        .map(|r| r.clone().filter(|&l| l > 0 && l <= model.n_layer).count())
        .max()
        .unwrap_or(0)
        .max(1);
    let block_bytes = (args.kv_block_tokens * 2 * model.n_embd * 4 * most_blocks) as u64;
    let blocks = (args.kv_cache_bytes / block_bytes) as usize;
    let least = model.n_positions.div_ceil(args.kv_block_tokens);
    if blocks < least {
        return Err(invalid_input!(
            "--kv-cache-bytes {} holds {blocks} blocks of {block_bytes} bytes; one full context \
             of {} tokens needs {least} (at least {} bytes)",
            args.kv_cache_bytes,
            model.n_positions,
            least as u64 * block_bytes
        ));
    }
    let limits = Limits {
        window: model.n_positions,
        block_tokens: args.kv_block_tokens,
        blocks,
        max_batch_tokens: args.max_batch_tokens,
        max_batch_size: args.max_batch_size,
        max_waiting: args.max_waiting,
        groups: args.stages,
        drawn: tokenizer.len(),
    };
    let name = args.served_model_name.clone().unwrap_or_else(|| {
        let dir = args
            .checkpoint
            .canonicalize()
            .unwrap_or(args.checkpoint.clone());
        dir.file_name()
            .map_or("pipit".into(), |n| n.to_string_lossy().into_owned())
    });
    let ckpt = load_checkpoint(&args.checkpoint, &config, None)?;
    // The HTTP side and the scheduler take a share of the host's cores like a rank, so a
    // host backend's products leave them room (on two cores, one rank computes on one
    // thread and never waits for a second that is busy answering clients).
    let _http_share = pipit_reference::CoreShare::default();
    let engine = with_backend(
        args.backend,
        StartJob {
            config,
            ckpt: &ckpt,
            limits,
        },
    )?;
    drop(ckpt);
    say!(
        "key/value cache: {blocks} blocks of {} positions ({} bytes a rank)",
        args.kv_block_tokens,
        blocks as u64 * block_bytes
    );
    let shared = Arc::new(Shared {
        name,
        tokenizer,
        limits,
        commands: engine.commands,
        gauges: engine.gauges,
        metrics: Metrics::default(),
        next_id: AtomicU64::new(1),
        failed: AtomicBool::new(false),
        started: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the HTTP server's runtime")?;
    let served = runtime.block_on(http(args, Arc::clone(&shared)));
    let scheduled = engine
        .scheduler
        .join()
        .map_err(|_| anyhow::anyhow!("the scheduler panicked"))?;
    served?;
    scheduled.context("the pipeline failed")
}

/// The scheduler on its thread, and how to reach it.
struct Engine {
    commands: mpsc::Sender<Command>,
    gauges: Arc<Gauges>,
    scheduler: std::thread::JoinHandle<Result<()>>,
}

/// Build the stages on the backend and start the scheduler over them.
struct StartJob<'a> {
    config: TrainConfig,
    ckpt: &'a checkpoint::Checkpoint,
    limits: Limits,
}

impl BackendJob for StartJob<'_> {
    type Output = Engine;

    fn run<B: Backend>(self, make: &mut dyn FnMut(usize) -> Result<B>) -> Result<Engine> {
        let trainer = Trainer::new(self.config, make, Init::Frozen(self.ckpt))?;
        let placement = trainer.schedule.placement.clone();
        let pipeline = Pipeline::start(placement, trainer.ranks);
        let gauges = Arc::new(Gauges::default());
        let scheduler = Scheduler::new(self.limits, Arc::clone(&gauges));
        let (commands, receive) = mpsc::channel();
        let scheduler = std::thread::Builder::new()
            .name("pipit-scheduler".into())
            .spawn(move || scheduler.run(pipeline, receive))
            .context("starting the scheduler")?;
        Ok(Engine {
            commands,
            gauges,
            scheduler,
        })
    }
}

/// What every request handler reads.
struct Shared {
    name: String,
    tokenizer: Tokenizer,
    limits: Limits,
    commands: mpsc::Sender<Command>,
    gauges: Arc<Gauges>,
    metrics: Metrics,
    next_id: AtomicU64,
    /// The pipeline has failed: every request is answered 503.
    failed: AtomicBool,
    /// When the server started (the model's `created`).
    started: u64,
}

impl Shared {
    fn send(&self, command: Command) -> bool {
        let sent = self.commands.send(command).is_ok();
        if !sent {
            self.failed.store(true, Ordering::Relaxed);
        }
        sent
    }
}

/// Serve HTTP until Ctrl-C or SIGTERM, then let the running sequences finish (for at most
/// `--shutdown-timeout` seconds) and stop the scheduler.
async fn http(args: ServeArgs, shared: Arc<Shared>) -> Result<()> {
    let app = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError::not_found("no such route").into_response() })
        .with_state(Arc::clone(&shared));
    let address = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .map_err(|e| invalid_input!("cannot listen on {address}: {e}"))?;
    let bound: SocketAddr = listener.local_addr()?;
    // One line on stdout a script can wait for.
    println!("pipit serve: listening on http://{bound}");
    use std::io::Write;
    std::io::stdout().flush()?;
    let timeout = Duration::from_secs_f64(args.shutdown_timeout);
    let stopping = Arc::clone(&shared);
    let shutdown = async move {
        stop_signal().await;
        eprintln!(
            "pipit serve: stopping; running sequences get {:.1} s to finish",
            timeout.as_secs_f64()
        );
        stopping.send(Command::Shutdown { cancel: false });
        let later = Arc::clone(&stopping);
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            later.send(Command::Shutdown { cancel: true });
        });
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving HTTP")?;
    // Stop the scheduler even when no signal came (the server failed).
    shared.send(Command::Shutdown { cancel: true });
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
}

async fn health(State(s): State<Arc<Shared>>) -> Response {
    if s.failed.load(Ordering::Relaxed) {
        return ApiError::unavailable("the pipeline has failed").into_response();
    }
    Json(json!({"status": "ok"})).into_response()
}

async fn models(State(s): State<Arc<Shared>>) -> Response {
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.name,
            "object": "model",
            "created": s.started,
            "owned_by": "pipit",
            "max_model_len": s.limits.window,
        }],
    }))
    .into_response()
}

async fn metrics_text(State(s): State<Arc<Shared>>) -> Response {
    let body = s.metrics.render(&s.gauges, &s.limits);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// One choice's sequence as the handler sees it: its events, and its text so far.
struct Choice {
    index: usize,
    id: u64,
    events: tmpsc::UnboundedReceiver<Event>,
    text: TextStream,
    tokens: usize,
    finish: Option<&'static str>,
}

/// What a finished choice's `finish_reason` says, or the error that ends the request.
fn finish_reason(f: Finish) -> Result<&'static str, ApiError> {
    match f {
        Finish::Length => Ok("length"),
        Finish::EndOfText => Ok("stop"),
        Finish::Cancelled => Ok("cancelled"),
        Finish::Busy => Err(ApiError::busy()),
        Finish::Failed(m) => Err(ApiError::internal(&m)),
    }
}

impl Choice {
    /// Wait for the next event and apply it: `Ok(Some(text))` with new text (possibly empty),
    /// `Ok(None)` once the choice is over.
    async fn next(&mut self, shared: &Shared) -> Result<Option<String>, ApiError> {
        if self.finish.is_some() {
            return Ok(None);
        }
        let event = self.events.recv().await;
        let event = event.unwrap_or(Event::Finished(Finish::Failed(
            "the scheduler has stopped".into(),
        )));
        match event {
            Event::Token(t) => {
                self.tokens += 1;
                let bytes = shared
                    .tokenizer
                    .decode(t)
                    .map_err(|e| ApiError::internal(&format!("{e:#}")))?;
                let (text, stopped) = self.text.push(&bytes);
                if stopped {
                    // A stop string: the sequence ends here, whatever it would draw next.
                    shared.send(Command::Cancel(self.id));
                    self.finish = Some("stop");
                }
                Ok(Some(text))
            }
            Event::Finished(f) => {
                self.finish = Some(finish_reason(f)?);
                Ok(Some(self.text.finish()))
            }
        }
    }
}

async fn completions(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    match start_completion(&s, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn start_completion(s: &Arc<Shared>, body: &[u8]) -> Result<Response, ApiError> {
    if s.failed.load(Ordering::Relaxed) {
        return Err(ApiError::unavailable("the pipeline has failed"));
    }
    let req = CompletionRequest::parse(body)?;
    if req.model != s.name {
        return Err(ApiError::model_not_found(&req.model, &s.name));
    }
    let prompts = req.prompts(&s.tokenizer, s.limits.drawn)?;
    let max_tokens = req.max_tokens.unwrap_or(16);
    for p in &prompts {
        s.limits
            .check(p.len(), max_tokens)
            .map_err(|e| ApiError::invalid(&e.to_string(), "max_tokens"))?;
    }
    let sampling = req.sampling()?;
    let n = req.n.unwrap_or(1);
    let count = prompts.len() * n;
    if s.gauges.waiting.load(Ordering::Relaxed) + count > s.limits.max_waiting {
        return Err(ApiError::busy());
    }
    let base_seed = req.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let end = s.tokenizer.end_of_text().filter(|_| !req.ignore_eos);
    let stops = req.stop();
    let arrived = Instant::now();
    let mut choices = Vec::with_capacity(count);
    // As OpenAI counts them: each prompt once, however many choices it has.
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    for (i, prompt) in prompts.iter().enumerate() {
        for j in 0..n {
            let (send, events) = tmpsc::unbounded_channel();
            let id = s.next_id.fetch_add(1, Ordering::Relaxed);
            let request = Request {
                id,
                prompt: prompt.clone(),
                max_tokens,
                sampling,
                // Choice j of prompt i draws from seed + i·n + j, as `pipit generate`'s
                // sample j of prompt i does from seed + i·samples + j.
                seed: base_seed.wrapping_add((i * n + j) as u64),
                end,
                sink: Box::new(move |e| send.send(e).is_ok()),
            };
            if !s.send(Command::Submit(request)) {
                return Err(ApiError::unavailable("the pipeline has failed"));
            }
            choices.push(Choice {
                index: i * n + j,
                id,
                events,
                text: TextStream::new(stops.clone()),
                tokens: 0,
                finish: None,
            });
        }
    }
    s.metrics.prompt_tokens(prompt_tokens);
    let id = format!("cmpl-{}", choices[0].id);
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if req.stream {
        return stream(
            Arc::clone(s),
            choices,
            id,
            created,
            prompt_tokens,
            req.include_usage(),
            arrived,
        )
        .await;
    }
    let mut texts = vec![String::new(); choices.len()];
    let mut first = None;
    // The choices are read in turn; each one's events queue meanwhile.
    for c in choices.iter_mut() {
        let mut last = Instant::now();
        while let Some(t) = c.next(s).await? {
            let now = Instant::now();
            if c.finish.is_none() || !t.is_empty() {
                if first.is_none() {
                    first = Some(now);
                    s.metrics.first_token(now - arrived);
                } else {
                    s.metrics.next_token(now - last);
                }
            }
            last = now;
            texts[c.index].push_str(&t);
        }
    }
    let completion: usize = choices.iter().map(|c| c.tokens).sum();
    s.metrics.finished(completion);
    let list: Vec<Value> = choices
        .iter()
        .map(|c| {
            json!({
                "index": c.index,
                "text": texts[c.index],
                "logprobs": null,
                "finish_reason": c.finish,
            })
        })
        .collect();
    Ok(Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": s.name,
        "choices": list,
        "usage": usage(prompt_tokens, completion),
    }))
    .into_response())
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// Answer with server-sent events: a chunk for each piece of text of any choice as it comes,
/// a last chunk per choice with its `finish_reason`, the usage when asked, then `[DONE]`.
/// The first event is awaited before answering, so a request turned away gets its status.
async fn stream(
    s: Arc<Shared>,
    mut choices: Vec<Choice>,
    id: String,
    created: u64,
    prompt_tokens: usize,
    include_usage: bool,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let chunk = {
        let (id, model) = (id.clone(), s.name.clone());
        move |choices: Value, usage: Value| {
            let mut v = json!({
                "id": id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
            });
            if !usage.is_null() {
                v["usage"] = usage;
            }
            SseEvent::default().data(v.to_string())
        }
    };
    // Each choice's events on a task of its own, merged into one stream of (index, event).
    let (merged_send, mut merged) = tmpsc::unbounded_channel::<(
        usize,
        Result<Option<String>, ApiError>,
        Option<&'static str>,
        usize,
    )>();
    for mut c in choices.drain(..) {
        let (s, send) = (Arc::clone(&s), merged_send.clone());
        tokio::spawn(async move {
            loop {
                let r = c.next(&s).await;
                let over = !matches!(r, Ok(Some(_))) || c.finish.is_some();
                if send.send((c.index, r, c.finish, c.tokens)).is_err() {
                    // The client went away: dropping the events cancels the sequence.
                    return;
                }
                if over {
                    return;
                }
            }
        });
    }
    drop(merged_send);
    // The first event decides the status.
    let first = merged.recv().await;
    if let Some((_, Err(e), _, _)) = first {
        return Err(e);
    }
    let (out_send, out) = tmpsc::unbounded_channel::<Result<SseEvent, std::convert::Infallible>>();
    tokio::spawn(async move {
        let mut pending = first;
        let mut tokens = 0usize;
        let mut last_token = Instant::now();
        let mut seen_first = false;
        let mut per_choice = std::collections::BTreeMap::new();
        while let Some((index, result, finish, count)) = pending.take() {
            let text = match result {
                Ok(Some(t)) => t,
                Ok(None) => String::new(),
                Err(e) => {
                    let _ = out_send.send(Ok(SseEvent::default().data(e.body().to_string())));
                    break;
                }
            };
            let grew = per_choice
                .insert(index, count)
                .map_or(count > 0, |c| count > c);
            if grew {
                let now = Instant::now();
                if !seen_first {
                    seen_first = true;
                    s.metrics.first_token(now - arrived);
                } else {
                    s.metrics.next_token(now - last_token);
                }
                last_token = now;
            }
            if !text.is_empty() || finish.is_some() {
                let body = json!([{
                    "index": index,
                    "text": text,
                    "logprobs": null,
                    "finish_reason": finish,
                }]);
                if out_send.send(Ok(chunk(body, Value::Null))).is_err() {
                    return;
                }
            }
            pending = merged.recv().await;
        }
        tokens += per_choice.values().sum::<usize>();
        s.metrics.finished(tokens);
        if include_usage {
            let _ = out_send.send(Ok(chunk(json!([]), usage(prompt_tokens, tokens))));
        }
        let _ = out_send.send(Ok(SseEvent::default().data("[DONE]")));
    });
    let sse = Sse::new(UnboundedReceiverStream::new(out)).keep_alive(KeepAlive::default());
    Ok((StatusCode::OK, sse).into_response())
}

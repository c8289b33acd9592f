//! Continuous batching: which sequences run in the next pass, and what each pass's logits
//! make of them.
//!
//! Requests wait in arrival order until the key/value cache has room for them: the cache is a
//! budget of fixed-size blocks of `block_tokens` positions, and a request reserves, when it is
//! admitted, the blocks of its prompt and all the tokens it may generate, so a running
//! sequence never runs out and the server never runs out of memory. Admitted sequences are
//! spread over `groups` batches, as many as the pipeline has stages, which go through the
//! stages one behind the other. A batch's next pass is planned as soon as its last one comes
//! back: every running sequence of it decodes one token, and what is left of
//! `max_batch_tokens` goes to prompts, in chunks, so a long prompt fills in over several passes
//! beside the decoding ones. Finished sequences leave at once, and waiting ones take their
//! place in the next pass.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use anyhow::{bail, Result};

use super::pipeline::{Job, Pipeline};
use crate::exec::Piece;
use crate::rng::Rng;
use crate::sample::Sampling;

/// What a sequence's sink hears.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The next token (never the end-of-text token, which ends the sequence instead).
    Token(u32),
    /// The sequence is over.
    Finished(Finish),
}

/// Why a sequence ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Finish {
    /// It drew the end-of-text token.
    EndOfText,
    /// It generated its `max_tokens`.
    Length,
    /// It was cancelled (its client went away, or a stop string matched).
    Cancelled,
    /// It never ran: more requests were waiting than the server queues.
    Busy,
    /// The pipeline failed.
    Failed(String),
}

/// Hears a sequence's events; returns `false` when nobody listens any more (the client
/// disconnected), which cancels the sequence.
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

/// One sequence to generate.
pub struct Request {
    /// The caller's name for it, unique while it runs ([`Command::Cancel`] takes it).
    pub id: u64,
    /// Its prompt's tokens (at least one).
    pub prompt: Vec<u32>,
    /// Tokens to generate at most; the prompt and they must fit the model's window.
    pub max_tokens: usize,
    /// How its tokens are picked.
    pub sampling: Sampling,
    /// Seed of its sampler.
    pub seed: u64,
    /// The token that ends it (`None`: it runs to `max_tokens`).
    pub end: Option<u32>,
    /// Where its tokens go.
    pub sink: Sink,
}

/// What the scheduler is told.
pub enum Command {
    /// Queue a request.
    Submit(Request),
    /// End a sequence at its next token.
    Cancel(u64),
    /// Take no more requests; stop once every sequence is done (`cancel`: cancel them).
    Shutdown {
        /// Cancel the running and waiting sequences instead of finishing them.
        cancel: bool,
    },
}

/// The scheduler's bounds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The model's window: a prompt and its tokens fit it.
    pub window: usize,
    /// Positions per block of the cache.
    pub block_tokens: usize,
    /// Blocks in the cache budget.
    pub blocks: usize,
    /// Tokens a pass of one batch takes at most (decoding and prompts together).
    pub max_batch_tokens: usize,
    /// Sequences a batch holds at most.
    pub max_batch_size: usize,
    /// Requests that may wait; more are turned away ([`Finish::Busy`]).
    pub max_waiting: usize,
    /// Batches in flight at once (the pipeline's stages).
    pub groups: usize,
    /// Tokens that may be drawn (the logits beyond are a padded vocabulary's).
    pub drawn: usize,
}

impl Limits {
    /// Blocks a sequence of `prompt` tokens that may generate `max_tokens` reserves.
    pub fn blocks_for(&self, prompt: usize, max_tokens: usize) -> usize {
        (prompt + max_tokens)
            .min(self.window)
            .div_ceil(self.block_tokens)
    }

    /// Errors unless a request of `prompt` tokens and `max_tokens` can ever run: it fits the
    /// window and the cache budget. The message names the constraint and the numbers.
    pub fn check(&self, prompt: usize, max_tokens: usize) -> Result<()> {
        if prompt == 0 {
            bail!("the prompt holds no token");
        }
        if prompt + max_tokens > self.window {
            bail!(
                "the prompt's {prompt} tokens and max_tokens {max_tokens} exceed the model's \
                 context of {} tokens",
                self.window
            );
        }
        let need = self.blocks_for(prompt, max_tokens);
        if need > self.blocks {
            bail!(
                "the prompt's {prompt} tokens and max_tokens {max_tokens} need {need} blocks \
                 of the key/value cache, which holds {}",
                self.blocks
            );
        }
        Ok(())
    }
}

/// What the scheduler is doing, for metrics (read at any time from any thread).
#[derive(Debug, Default)]
pub struct Gauges {
    /// Sequences in the running batches.
    pub running: AtomicUsize,
    /// Requests waiting for room.
    pub waiting: AtomicUsize,
    /// Blocks of the cache reserved.
    pub blocks_used: AtomicUsize,
    /// Tokens in the last pass.
    pub batch_tokens: AtomicUsize,
    /// Sequences in the last pass.
    pub batch_sequences: AtomicUsize,
    /// Passes run.
    pub passes: AtomicUsize,
}

/// A running sequence.
struct Sequence {
    request: Request,
    /// Its tokens: the prompt, then those generated.
    tokens: Vec<u32>,
    /// How many of `tokens` its caches hold.
    cached: usize,
    generated: usize,
    rng: Rng,
    blocks: usize,
    /// It is to leave at the next chance.
    cancelled: bool,
    /// Its sink has heard how it ended.
    told: bool,
}

/// A piece of a pass in flight: its sequence, its tokens, and whether the pass brings the
/// sequence to its next token.
#[derive(Clone, Copy, Debug)]
struct Held {
    id: u64,
    tokens: usize,
    completes: bool,
}

/// The continuous-batching scheduler over a [`Pipeline`].
pub struct Scheduler {
    limits: Limits,
    waiting: VecDeque<Request>,
    /// The running sequences of each batch, in admission order.
    groups: Vec<Vec<Sequence>>,
    /// What each batch's pass in flight holds: per piece, its sequence, its tokens, and
    /// whether the pass brings it to its next token; `None` when the batch is not in flight.
    in_flight: Vec<Option<Vec<Held>>>,
    /// Sequences whose caches the ranks are yet to drop.
    to_free: Vec<u64>,
    blocks_used: usize,
    gauges: Arc<Gauges>,
}

impl Scheduler {
    /// A scheduler with nothing to do.
    pub fn new(limits: Limits, gauges: Arc<Gauges>) -> Self {
        Self {
            waiting: VecDeque::new(),
            groups: (0..limits.groups.max(1)).map(|_| Vec::new()).collect(),
            in_flight: vec![None; limits.groups.max(1)],
            to_free: Vec::new(),
            blocks_used: 0,
            limits,
            gauges,
        }
    }

    /// Serve `commands` through `pipeline` until they end or a shutdown completes. A failing
    /// pipeline ends every sequence with [`Finish::Failed`] and returns the error.
    pub fn run(mut self, mut pipeline: Pipeline, commands: mpsc::Receiver<Command>) -> Result<()> {
        let mut shutdown: Option<bool> = None;
        loop {
            let idle = self.is_idle();
            if idle && shutdown.is_some() {
                return Ok(());
            }
            if idle {
                match commands.recv() {
                    Ok(c) => self.command(c, &mut shutdown),
                    Err(_) => return Ok(()),
                }
            }
            while let Ok(c) = commands.try_recv() {
                self.command(c, &mut shutdown);
            }
            let result = self.plan_and_run(&mut pipeline);
            if let Err(e) = result {
                let message = format!("{e:#}");
                for s in self.groups.iter_mut().flat_map(|g| g.drain(..)) {
                    let mut sink = s.request.sink;
                    sink(Event::Finished(Finish::Failed(message.clone())));
                }
                for mut r in self.waiting.drain(..) {
                    (r.sink)(Event::Finished(Finish::Failed(message.clone())));
                }
                return Err(e);
            }
            self.update_gauges();
        }
    }

    fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.groups.iter().all(Vec::is_empty)
    }

    fn command(&mut self, command: Command, shutdown: &mut Option<bool>) {
        match command {
            Command::Submit(mut r) => {
                if shutdown.is_some() {
                    (r.sink)(Event::Finished(Finish::Cancelled));
                } else if self.waiting.len() >= self.limits.max_waiting {
                    (r.sink)(Event::Finished(Finish::Busy));
                } else if let Err(e) = self.limits.check(r.prompt.len(), r.max_tokens) {
                    (r.sink)(Event::Finished(Finish::Failed(e.to_string())));
                } else {
                    self.waiting.push_back(r);
                }
            }
            Command::Cancel(id) => self.cancel(id),
            Command::Shutdown { cancel } => {
                *shutdown = Some(cancel);
                if cancel {
                    for mut r in self.waiting.drain(..) {
                        (r.sink)(Event::Finished(Finish::Cancelled));
                    }
                    for s in self.groups.iter_mut().flatten() {
                        s.cancelled = true;
                    }
                }
            }
        }
    }

    fn cancel(&mut self, id: u64) {
        if let Some(i) = self.waiting.iter().position(|r| r.id == id) {
            let mut r = self.waiting.remove(i).expect("a waiting request");
            (r.sink)(Event::Finished(Finish::Cancelled));
        }
        for s in self.groups.iter_mut().flatten() {
            if s.request.id == id {
                s.cancelled = true;
            }
        }
    }

    /// Plan the next pass of every batch not in flight, then take the logits of one pass.
    fn plan_and_run(&mut self, pipeline: &mut Pipeline) -> Result<()> {
        for g in 0..self.groups.len() {
            if self.in_flight[g].is_some() {
                continue;
            }
            self.retire_cancelled(g);
            self.admit(g);
            let pieces = self.pieces(g);
            if pieces.is_empty() {
                continue;
            }
            let held = pieces
                .iter()
                .map(|p| {
                    let s = self.groups[g].iter().find(|s| s.request.id == p.id);
                    let s = s.expect("a piece's sequence");
                    Held {
                        id: p.id,
                        tokens: p.tokens.len(),
                        completes: s.cached + p.tokens.len() == s.tokens.len(),
                    }
                })
                .collect();
            self.gauges.batch_tokens.store(
                pieces.iter().map(|p| p.tokens.len()).sum(),
                Ordering::Relaxed,
            );
            self.gauges
                .batch_sequences
                .store(pieces.len(), Ordering::Relaxed);
            self.gauges.passes.fetch_add(1, Ordering::Relaxed);
            let free = std::mem::take(&mut self.to_free);
            pipeline.submit(Job {
                group: g,
                pieces,
                free,
            })?;
            self.in_flight[g] = Some(held);
        }
        if pipeline.in_flight() == 0 {
            if !self.to_free.is_empty() {
                let free = std::mem::take(&mut self.to_free);
                pipeline.submit(Job {
                    free,
                    ..Job::default()
                })?;
            }
            return Ok(());
        }
        let (g, logits) = pipeline.next()?;
        let held = self.in_flight[g].take().unwrap_or_default();
        self.advance(g, &held, &logits)
    }

    /// Move waiting requests into batch `g` while it and the cache have room, oldest first.
    fn admit(&mut self, g: usize) {
        while let Some(front) = self.waiting.front() {
            let blocks = self.limits.blocks_for(front.prompt.len(), front.max_tokens);
            if self.groups[g].len() >= self.limits.max_batch_size
                || self.blocks_used + blocks > self.limits.blocks
            {
                return;
            }
            let request = self.waiting.pop_front().expect("a waiting request");
            self.blocks_used += blocks;
            self.groups[g].push(Sequence {
                tokens: request.prompt.clone(),
                cached: 0,
                generated: 0,
                rng: Rng::new(request.seed),
                blocks,
                cancelled: false,
                told: false,
                request,
            });
        }
    }

    /// Batch `g`'s next pass: one token for each decoding sequence, then prompt chunks within
    /// what is left of the token budget.
    fn pieces(&self, g: usize) -> Vec<Piece> {
        let mut budget = self.limits.max_batch_tokens.max(1);
        let mut pieces = Vec::new();
        let capacity = |s: &Sequence| (s.blocks * self.limits.block_tokens).min(self.limits.window);
        let group = &self.groups[g];
        for s in group.iter().filter(|s| s.tokens.len() - s.cached == 1) {
            if budget == 0 {
                break;
            }
            budget -= 1;
            pieces.push(Piece {
                id: s.request.id,
                tokens: vec![s.tokens[s.cached]],
                capacity: capacity(s),
            });
        }
        for s in group.iter().filter(|s| s.tokens.len() - s.cached > 1) {
            if budget == 0 {
                break;
            }
            let n = (s.tokens.len() - s.cached).min(budget);
            budget -= n;
            pieces.push(Piece {
                id: s.request.id,
                tokens: s.tokens[s.cached..s.cached + n].to_vec(),
                capacity: capacity(s),
            });
        }
        pieces
    }

    /// Take batch `g`'s logits (a row per piece of `held`): the sequences whose pass ended
    /// at their last token draw the next one; finished sequences leave.
    fn advance(&mut self, g: usize, held: &[Held], logits: &[f32]) -> Result<()> {
        if held.is_empty() || logits.len() % held.len() != 0 {
            bail!(
                "{} logits are no rows for {} sequences",
                logits.len(),
                held.len()
            );
        }
        let vocab = logits.len() / held.len();
        let drawn = self.limits.drawn.min(vocab);
        for (h, row) in held.iter().zip(logits.chunks_exact(vocab)) {
            let Some(s) = self.groups[g].iter_mut().find(|s| s.request.id == h.id) else {
                continue;
            };
            s.cached += h.tokens;
            if !h.completes || s.cancelled {
                continue;
            }
            let row = &row[..drawn];
            let finish = if let Some(x) = row.iter().find(|x| !x.is_finite()) {
                Some(Finish::Failed(format!("the model produced a logit of {x}")))
            } else {
                let token = s.request.sampling.pick(row, &mut s.rng) as u32;
                s.generated += 1;
                if Some(token) == s.request.end {
                    Some(Finish::EndOfText)
                } else {
                    s.tokens.push(token);
                    if !(s.request.sink)(Event::Token(token)) {
                        Some(Finish::Cancelled)
                    } else if s.generated >= s.request.max_tokens {
                        Some(Finish::Length)
                    } else {
                        None
                    }
                }
            };
            if let Some(f) = finish {
                (s.request.sink)(Event::Finished(f));
                s.cancelled = true;
                s.told = true;
            }
        }
        self.retire_cancelled(g);
        Ok(())
    }

    /// Drop batch `g`'s sequences that are over (their sinks already told, or told now that
    /// they were cancelled), returning their blocks.
    fn retire_cancelled(&mut self, g: usize) {
        let group = std::mem::take(&mut self.groups[g]);
        for mut s in group {
            if !s.cancelled {
                self.groups[g].push(s);
                continue;
            }
            if !s.told {
                (s.request.sink)(Event::Finished(Finish::Cancelled));
            }
            self.blocks_used -= s.blocks;
            if s.cached > 0 {
                self.to_free.push(s.request.id);
            }
        }
    }

    fn update_gauges(&self) {
        let running = self.groups.iter().map(Vec::len).sum();
        self.gauges.running.store(running, Ordering::Relaxed);
        self.gauges
            .waiting
            .store(self.waiting.len(), Ordering::Relaxed);
        self.gauges
            .blocks_used
            .store(self.blocks_used, Ordering::Relaxed);
    }
}

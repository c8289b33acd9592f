//! Forward-only passes through the pipeline's stages, for evaluation and text generation.
//!
//! Each rank runs its own stages ([`forward_rank`] and the loops over it), receiving inputs
//! from and handing outputs to the other ranks through its transport, like a training step:
//! in one process every rank on its own thread ([`on_every_rank`]), or one rank per process.
//!
//! A pass runs whole sequences ([`Pass::Whole`]), or the tokens that follow those whose keys
//! and values each stage keeps in a cache ([`Pass::Cached`]): text generation feeds one token
//! at a time that way, through a [`Decoder`], instead of running the whole context again.

use std::collections::{BTreeMap, HashMap};

use anyhow::{anyhow, bail, Context, Result};

use crate::backend::{Backend, DType, Transport};
use crate::data::Batch;
use crate::model::{Keep, KvCache, StageInput, StageModel, StageOutput};

use super::step::Rank;

/// What the last stage should produce.
#[derive(Clone, Copy)]
pub enum Want<'a> {
    /// Per-token cross-entropy against these targets (`[batch·seq]`).
    Losses(&'a [u32]),
    /// Logits `[batch·seq, vocab]`.
    Logits,
}

/// How a forward-only pass runs each stage.
pub enum Pass<'a, B: Backend> {
    /// `batch` whole sequences of `seq` tokens; the last stage produces what `want` says.
    Whole {
        /// Losses or logits.
        want: Want<'a>,
        /// Sequences.
        batch: usize,
        /// Tokens per sequence.
        seq: usize,
    },
    /// The tokens of the caches' sequences (as many per sequence, one sequence after the
    /// other) that follow those in the caches (by stage index), which take them in; the last
    /// stage produces the new tokens' logits.
    Cached(&'a mut BTreeMap<usize, KvCache<B>>),
    /// The new tokens of several sequences (continuous batching), each at its own length,
    /// their tokens one sequence after the other: `pieces` says whose and how many, `caches`
    /// holds every sequence's cache on this rank (made on a sequence's first piece); the last
    /// stage produces each sequence's next-token logits.
    Ragged {
        /// The sequences and their new tokens, in the order of the rows.
        pieces: &'a [Piece],
        /// This rank's caches.
        caches: &'a mut SequenceCaches<B>,
    },
}

/// One sequence's share of a ragged pass ([`Pass::Ragged`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// The sequence.
    pub id: u64,
    /// Its tokens after those in its cache.
    pub tokens: Vec<u32>,
    /// Positions its cache holds (fixed when its first piece makes it).
    pub capacity: usize,
}

/// The key/value caches of the sequences a rank serves, by sequence and stage: each of one
/// sequence, of its own capacity.
pub struct SequenceCaches<B: Backend> {
    caches: HashMap<(u64, usize), KvCache<B>>,
}

impl<B: Backend> Default for SequenceCaches<B> {
    fn default() -> Self {
        Self {
            caches: HashMap::new(),
        }
    }
}

impl<B: Backend> SequenceCaches<B> {
    /// Forget the sequence `id` (its memory with it).
    pub fn free(&mut self, id: u64) {
        self.caches.retain(|(s, _), _| *s != id);
    }

    /// Run `model` (stage `stage`) on the ragged batch `pieces`, from their caches.
    fn run(
        &mut self,
        backend: &B,
        model: &StageModel<B>,
        stage: usize,
        input: StageInput<'_, B>,
        pieces: &[Piece],
    ) -> Result<StageOutput<B>> {
        let mut taken = Vec::with_capacity(pieces.len());
        for p in pieces {
            let cache = match self.caches.remove(&(p.id, stage)) {
                Some(c) => c,
                None => model.kv_cache(backend, 1, p.capacity)?,
            };
            taken.push((cache, p.tokens.len()));
        }
        let mut refs: Vec<(&mut KvCache<B>, usize)> =
            taken.iter_mut().map(|(c, n)| (c, *n)).collect();
        let out = model.decode_ragged(backend, input, &mut refs);
        drop(refs);
        // On failure the caches are dropped: their sequences cannot go on.
        let out = out?;
        for (p, (cache, _)) in pieces.iter().zip(taken) {
            self.caches.insert((p.id, stage), cache);
        }
        Ok(out)
    }
}

impl<B: Backend> Pass<'_, B> {
    /// Run `model`, stage `stage` (the pipeline's last when `last`), on `input`, where
    /// `tokens` tokens go through the pass.
    pub(crate) fn run(
        &mut self,
        backend: &B,
        model: &StageModel<B>,
        stage: usize,
        last: bool,
        input: StageInput<'_, B>,
        tokens: usize,
    ) -> Result<StageOutput<B>> {
        match self {
            Pass::Whole { want, batch, seq } => {
                let targets = match want {
                    Want::Losses(t) if last => Some(backend.upload_u32(t)?),
                    _ => None,
                };
                let (out, _) = model.forward(
                    backend,
                    input,
                    targets.as_ref(),
                    *batch,
                    *seq,
                    Keep::Nothing,
                )?;
                Ok(out)
            }
            Pass::Ragged { pieces, caches } => caches.run(backend, model, stage, input, pieces),
            Pass::Cached(caches) => {
                let cache = caches
                    .get_mut(&stage)
                    .ok_or_else(|| anyhow!("stage {stage} has no key/value cache"))?;
                let new = tokens / cache.batch();
                model.decode(backend, input, cache, new)
            }
        }
    }
}

/// This rank's part of a forward-only pass of `tokens` through the stages `placement` puts on
/// the ranks: each of its stages takes its input from the stage before (received from that
/// stage's rank through `rank.transport` unless it is here), and hands its output on. Returns
/// what the last stage produces (per-token losses or logits for [`Pass::Whole`], the new
/// tokens' logits for [`Pass::Cached`]) on the rank that holds it, `None` on the others. Every
/// rank of the pipeline calls it with the same tokens.
pub fn forward_rank<B: Backend, T: Transport<B>>(
    placement: &[usize],
    rank: &mut Rank<B, T>,
    tokens: &[u32],
    mut pass: Pass<'_, B>,
) -> Result<Option<Vec<f32>>> {
    let last = placement.len() - 1;
    let Rank {
        rank: me,
        backend,
        transport,
        stages,
    } = rank;
    let me = *me;
    let mut local: Option<B::Buffer> = None;
    for (stage, &owner) in placement.iter().enumerate() {
        if owner != me {
            continue;
        }
        let what = || format!("rank {me}, forward of stage {stage}");
        let model = &stages
            .iter()
            .find(|(s, _)| *s == stage)
            .ok_or_else(|| anyhow!("rank {me} does not hold stage {stage}"))?
            .1;
        let token_buf;
        let input = if stage == 0 {
            token_buf = backend.upload_u32(tokens)?;
            StageInput::Tokens(&token_buf)
        } else if placement[stage - 1] == me {
            StageInput::Hidden(
                local
                    .take()
                    .ok_or_else(|| anyhow!("stage {stage} has no input"))?,
            )
        } else {
            let len = tokens.len() * model.config().n_embd;
            let h = transport
                .recv(backend, placement[stage - 1], len)
                .with_context(what)?;
            StageInput::Hidden(h)
        };
        match pass.run(backend, model, stage, stage == last, input, tokens.len())? {
            StageOutput::Hidden(h) if placement[stage + 1] == me => local = Some(h),
            StageOutput::Hidden(h) => transport
                .send(backend, placement[stage + 1], &h)
                .with_context(what)?,
            StageOutput::Loss { losses } => return Ok(Some(backend.download(&losses)?)),
            StageOutput::Logits(logits) => return Ok(Some(backend.download(&logits)?)),
        }
    }
    Ok(None)
}

/// Evaluation batches the first stage may run ahead of the last one.
pub const EVAL_WINDOW: usize = 8;

/// This rank's part of scoring `batches`: the sum of the per-token losses, in f64 and in
/// order, and their count on the rank holding the last stage; `(0, 0)` on the others. The
/// batches flow through the pipeline one after another, so its ranks work on several at once,
/// but no more than `EVAL_WINDOW`: at the end of every window the last stage's rank tells the
/// first stage's that it is done, and the first waits for that before it goes on, so a long
/// text never queues its activations without bound.
pub fn evaluate_rank<B: Backend, T: Transport<B>>(
    placement: &[usize],
    rank: &mut Rank<B, T>,
    batches: &[Batch],
) -> Result<(f64, usize)> {
    let (first, last) = (placement[0], placement[placement.len() - 1]);
    let (mut sum, mut count) = (0.0f64, 0usize);
    for (i, b) in batches.iter().enumerate() {
        let pass = Pass::Whole {
            want: Want::Losses(&b.targets),
            batch: b.batch,
            seq: b.seq,
        };
        if let Some(losses) = forward_rank(placement, rank, &b.inputs, pass)? {
            sum += losses.iter().map(|&x| x as f64).sum::<f64>();
            count += losses.len();
        }
        let window_done = (i + 1) % EVAL_WINDOW == 0 || i + 1 == batches.len();
        if window_done && first != last {
            let Rank {
                rank: me,
                backend,
                transport,
                ..
            } = rank;
            if *me == last {
                transport.send(backend, first, &backend.upload(&[i as f32])?)?;
            } else if *me == first {
                let done = backend.download(&transport.recv(backend, last, 1)?)?;
                if done != [i as f32] {
                    bail!("rank {last} finished evaluation batch {done:?}, not {i}");
                }
            }
        }
    }
    Ok((sum, count))
}

/// This rank's part of one decoding round: the next token's logits after each of `contexts`
/// (sequences generated side by side). The sequences go through the stages in passes of up to
/// `batch` at once, consecutive ones of the same length (pass `k` with `decoders[k]`, made on
/// first use for `capacity` positions), and each pass is handed on as soon as this rank is done
/// with it, so rank `r + 1` works on one pass while rank `r` works on the next. Returns every
/// sequence's last-position logits (`vocab` each, one after the other) on the rank holding the
/// last stage, nothing on the others.
pub fn decode_rank<B: Backend, T: Transport<B>>(
    placement: &[usize],
    rank: &mut Rank<B, T>,
    decoders: &mut Vec<Decoder<B>>,
    contexts: &[&[u32]],
    batch: usize,
    capacity: usize,
    vocab: usize,
) -> Result<Vec<f32>> {
    let mut rows = Vec::new();
    let passes = passes(contexts, batch);
    // Caches of passes beyond this round's are dropped (their memory with them).
    decoders.truncate(passes.len());
    for (k, group) in passes.into_iter().enumerate() {
        let decoder = Decoder::nth(
            decoders,
            k,
            std::slice::from_ref(rank),
            group.len(),
            capacity,
        )?;
        let logits = decoder.extend(group, |new, pass| forward_rank(placement, rank, new, pass))?;
        if let Some(l) = logits {
            // The last position of each sequence of the pass.
            let per = l.len() / (group.len() * vocab);
            if per == 0 || l.len() != per * group.len() * vocab {
                bail!(
                    "{} logits are no whole positions for {} sequences of a vocabulary of {vocab}",
                    l.len(),
                    group.len()
                );
            }
            for row in l.chunks_exact(per * vocab) {
                rows.extend_from_slice(&row[(per - 1) * vocab..]);
            }
        }
    }
    Ok(rows)
}

/// `contexts` cut into runs of consecutive ones of the same length, at most `batch` each
/// (at least one).
fn passes<'a, 'b>(contexts: &'b [&'a [u32]], batch: usize) -> Vec<&'b [&'a [u32]]> {
    let mut out = Vec::new();
    let mut rest = contexts;
    while !rest.is_empty() {
        let n = rest
            .iter()
            .take(batch.max(1))
            .take_while(|c| c.len() == rest[0].len())
            .count();
        let (pass, tail) = rest.split_at(n);
        out.push(pass);
        rest = tail;
    }
    out
}

/// Run `f` on every rank of an in-process pipeline at once, rank `r` on its own thread with
/// `extras[r]`; the results by rank. A rank whose `f` fails stops its transport, so the ranks
/// waiting on it fail at once too; the error returned is the first that is not such a
/// consequence.
pub fn on_every_rank<B, T, X, R>(
    ranks: &mut [Rank<B, T>],
    extras: &mut [X],
    f: impl Fn(&mut Rank<B, T>, &mut X) -> Result<R> + Sync,
) -> Result<Vec<R>>
where
    B: Backend,
    T: Transport<B>,
    X: Send,
    R: Send,
{
    if extras.len() != ranks.len() {
        return Err(anyhow!("{} ranks but {} extras", ranks.len(), extras.len()));
    }
    let f = &f;
    let results: Vec<Result<R>> = std::thread::scope(|scope| {
        let handles: Vec<_> = ranks
            .iter_mut()
            .zip(extras.iter_mut())
            .map(|(rank, extra)| {
                scope.spawn(move || {
                    let r = rank.rank;
                    let result = f(rank, extra).with_context(|| format!("rank {r}"));
                    if result.is_err() {
                        rank.transport.stop();
                    }
                    result
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a rank's worker panicked")))
            })
            .collect()
    });
    let consequence = |e: &anyhow::Error| format!("{e:#}").contains("has stopped");
    if let Some(i) = results
        .iter()
        .position(|r| r.as_ref().is_err_and(|e| !consequence(e)))
        .or_else(|| results.iter().position(Result::is_err))
    {
        return Err(results
            .into_iter()
            .nth(i)
            .and_then(Result::err)
            .expect("an error"));
    }
    Ok(results.into_iter().map(|r| r.expect("no error")).collect())
}

/// Run `batch` sequences of `seq` tokens forward through an in-process pipeline (the ranks of
/// `placement`, each on its own thread) and return what the last stage produces, as `want`
/// says.
pub fn forward<B: Backend, T: Transport<B>>(
    placement: &[usize],
    ranks: &mut [Rank<B, T>],
    tokens: &[u32],
    want: Want<'_>,
    batch: usize,
    seq: usize,
) -> Result<Vec<f32>> {
    let holder = placement[placement.len() - 1];
    let mut none = vec![(); ranks.len()];
    let mut out = on_every_rank(ranks, &mut none, |rank, _| {
        let pass = Pass::Whole { want, batch, seq };
        forward_rank(placement, rank, tokens, pass)
    })?;
    out[holder]
        .take()
        .ok_or_else(|| anyhow!("rank {holder} holds the last stage but produced nothing"))
}

/// Key/value caches for the stages of some ranks and the sequences whose tokens they hold (of
/// equal length, run together), so each next token of growing contexts runs alone through the
/// pipeline.
///
/// The caches are f32: when a stage computes in another dtype (bf16 mixed precision), the
/// decoder holds none and every context runs whole.
pub struct Decoder<B: Backend> {
    /// By stage index; `None` when the contexts run whole.
    caches: Option<BTreeMap<usize, KvCache<B>>>,
    /// The tokens the caches hold, per sequence (empty after a failed pass).
    held: Vec<Vec<u32>>,
    /// Sequences.
    batch: usize,
    capacity: usize,
}

impl<B: Backend> Decoder<B> {
    /// Decoder `k` of `decoders` (one per pass of sequences generated side by side), made
    /// for `batch` sequences when it is missing or holds another count, for the stages of
    /// `ranks`.
    pub fn nth<'a, T: Transport<B>>(
        decoders: &'a mut Vec<Decoder<B>>,
        k: usize,
        ranks: &[Rank<B, T>],
        batch: usize,
        capacity: usize,
    ) -> Result<&'a mut Decoder<B>> {
        while decoders.len() <= k {
            decoders.push(Decoder::new(ranks, batch, capacity)?);
        }
        if decoders[k].batch != batch {
            decoders[k] = Decoder::new(ranks, batch, capacity)?;
        }
        Ok(&mut decoders[k])
    }

    /// Empty caches of `capacity` positions (at most the model's `n_positions`) for `batch`
    /// sequences, for every stage of `ranks`.
    pub fn new<T: Transport<B>>(
        ranks: &[Rank<B, T>],
        batch: usize,
        capacity: usize,
    ) -> Result<Self> {
        let stages = || {
            ranks
                .iter()
                .flat_map(|r| r.stages.iter().map(move |s| (r, s)))
        };
        let caches = if stages().all(|(_, (_, model))| model.dtype() == DType::F32) {
            let mut caches = BTreeMap::new();
            for (rank, (stage, model)) in stages() {
                caches.insert(*stage, model.kv_cache(&rank.backend, batch, capacity)?);
            }
            Some(caches)
        } else {
            None
        };
        Ok(Self {
            caches,
            held: Vec::new(),
            batch,
            capacity,
        })
    }

    /// Run `pass` on what `contexts` (one per sequence, all of one length) add to the held
    /// tokens: their tokens after them, when each begins with its sequence's and they are as
    /// many for every sequence, else (the caches cleared first) all of them. `pass` gets those
    /// tokens, sequence after sequence, and the [`Pass`] to run them with: [`Pass::Cached`],
    /// or [`Pass::Whole`] for logits without caches.
    pub fn extend<R>(
        &mut self,
        contexts: &[&[u32]],
        pass: impl FnOnce(&[u32], Pass<'_, B>) -> Result<R>,
    ) -> Result<R> {
        let len = contexts.first().map_or(0, |c| c.len());
        if contexts.len() != self.batch || contexts.iter().any(|c| c.len() != len) {
            bail!(
                "a decoder for {} sequences was given {} contexts of lengths {:?}",
                self.batch,
                contexts.len(),
                contexts.iter().map(|c| c.len()).collect::<Vec<_>>()
            );
        }
        if len == 0 || len > self.capacity {
            bail!(
                "a context of {len} tokens does not fit a cache of 1..={} positions",
                self.capacity
            );
        }
        let Some(caches) = self.caches.as_mut() else {
            let whole = Pass::Whole {
                want: Want::Logits,
                batch: self.batch,
                seq: len,
            };
            return pass(&contexts.concat(), whole);
        };
        let held = std::mem::take(&mut self.held);
        let past = held.first().map_or(0, Vec::len);
        let follows = held.len() == contexts.len()
            && len > past
            && contexts.iter().zip(&held).all(|(c, h)| c.starts_with(h));
        let start = if follows {
            past
        } else {
            caches.values_mut().for_each(KvCache::clear);
            0
        };
        let new: Vec<u32> = contexts.iter().flat_map(|c| &c[start..]).copied().collect();
        let result = pass(&new, Pass::Cached(caches))?;
        self.held = contexts.iter().map(|c| c.to_vec()).collect();
        Ok(result)
    }
}

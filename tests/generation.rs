//! Text generation with key/value caches: each next token runs alone through the pipeline's
//! stages, against the keys and values the stages kept, and its logits are those of the whole
//! context run again. Checked on the reference backend (to the bit) and on wgpu, in one and in
//! several stages, while the context grows one token at a time, after a prompt, and when a
//! context does not extend the last one (the caches start over).

use pipit_engine::backend::{Backend, Transport};
use pipit_engine::data::Corpus;
use pipit_engine::exec::{self, Want};
use pipit_engine::model::ModelConfig;
use pipit_engine::rng::Rng;
use pipit_engine::train::{Init, TrainConfig, Trainer};
use pipit_reference::ReferenceBackend;

fn config(stages: usize, dtype: &str) -> TrainConfig {
    TrainConfig {
        model: ModelConfig {
            vocab_size: 61,
            n_positions: 24,
            n_embd: 32,
            n_layer: 4,
            n_head: 4,
            ..ModelConfig::default()
        },
        stages,
        schedule: "gpipe".parse().unwrap(),
        microbatches: 1,
        batch_size: 1,
        seq_len: 24,
        dtype: dtype.parse().unwrap(),
        ..TrainConfig::default()
    }
}

/// A freshly initialised trainer for `cfg` on the reference backend.
fn reference(cfg: TrainConfig) -> Trainer<ReferenceBackend> {
    Trainer::new(cfg, |_| Ok(ReferenceBackend::new()), Init::Fresh).unwrap()
}

/// The last position's logits of `context`, the whole context run through every stage.
fn whole<B: Backend>(trainer: &mut Trainer<B>, context: &[u32]) -> Vec<f32> {
    let placement = trainer.schedule.placement.clone();
    let (want, seq) = (Want::Logits, context.len());
    let logits = exec::forward(&placement, &mut trainer.ranks, context, want, 1, seq).unwrap();
    logits[logits.len() - trainer.config.model.vocab_size..].to_vec()
}

/// Largest |a − b| over the largest |b|.
fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(1e-12f64, |m, &x| m.max(x.abs() as f64));
    let err = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    err / scale
}

/// Grow a context from a 5-token prompt to the model's 24 positions, then start a different
/// context; every cached answer against the whole-context one, within `tol` (0: the same bits).
fn cached_logits_match_whole_passes<B: Backend>(
    make: impl Fn() -> B,
    stages: usize,
    dtype: &str,
    tol: f64,
) {
    let cfg = config(stages, dtype);
    let mut trainer = Trainer::new(cfg.clone(), |_| Ok(make()), Init::Fresh).unwrap();
    let mut rng = Rng::new(5);
    let mut context: Vec<u32> = (0..5).map(|_| rng.below(61) as u32).collect();
    let mut checked = 0;
    loop {
        let cached = trainer.next_token_logits(&context).unwrap();
        let want = whole(&mut trainer, &context);
        let err = relative_error(&cached, &want);
        assert!(
            err <= tol,
            "{stages} stages, {dtype}, {} tokens: relative error {err:e} > {tol:e}",
            context.len()
        );
        checked += 1;
        if context.len() == cfg.model.n_positions {
            break;
        }
        context.push(rng.below(61) as u32);
    }
    assert_eq!(checked, 20);
    // A context that does not begin with the cached tokens: the caches start over.
    context[0] = (context[0] + 1) % 61;
    context.truncate(9);
    let cached = trainer.next_token_logits(&context).unwrap();
    assert!(relative_error(&cached, &whole(&mut trainer, &context)) <= tol);
    // And a shorter one (a prefix of the held tokens) also starts over.
    context.truncate(3);
    let cached = trainer.next_token_logits(&context).unwrap();
    assert!(relative_error(&cached, &whole(&mut trainer, &context)) <= tol);
    // A context longer than the caches is refused, naming both sizes.
    let long = vec![1u32; cfg.model.n_positions + 1];
    let err = format!("{:#}", trainer.next_token_logits(&long).unwrap_err());
    assert!(err.contains("25") && err.contains("24"), "{err}");
}

#[test]
fn reference_cached_decoding_gives_the_bits_of_whole_passes() {
    for stages in [1, 3] {
        cached_logits_match_whole_passes(ReferenceBackend::new, stages, "f32", 0.0);
    }
}

/// Several sequences side by side, on two ranks holding two stages each in a loop (rank 0
/// stages 0 and 2, rank 1 stages 1 and 3): each sequence keeps its own caches, and every answer
/// is its whole context's, to the bit, while the sequences grow at different rates.
#[test]
fn samples_side_by_side_on_looped_stages() {
    let cfg = TrainConfig {
        schedule: "interleaved".parse().unwrap(),
        chunks: 2,
        ..config(2, "f32")
    };
    let mut trainer = reference(cfg);
    assert_eq!(trainer.schedule.placement, [0, 1, 0, 1]);
    let mut rng = Rng::new(9);
    let mut contexts: Vec<Vec<u32>> = (1..4)
        .map(|n| (0..n).map(|_| rng.below(61) as u32).collect())
        .collect();
    for round in 0..10 {
        let views: Vec<&[u32]> = contexts.iter().map(Vec::as_slice).collect();
        // Sequences of different lengths never share a pass, whatever the batch.
        let rows = trainer.next_tokens_logits(&views, 3).unwrap();
        assert_eq!(rows.len(), 3);
        for (row, context) in rows.iter().zip(&contexts) {
            assert_eq!(row, &whole(&mut trainer, context), "round {round}");
        }
        // Sequence i grows by i + 1 tokens a round; the third restarts from its last 10 tokens
        // when it would outgrow the 24 positions.
        for (i, c) in contexts.iter_mut().enumerate() {
            c.extend((0..=i).map(|_| rng.below(61) as u32));
            if c.len() > 21 {
                c.drain(..c.len() - 10);
            }
        }
    }
}

/// Five sequences of one length in passes of two (2, 2 and 1 sequences, each pass with its
/// caches for that many), growing a token a round, restarting together from their last 10
/// tokens as generation does: every answer is its whole context's, within `tol`.
fn batched_passes_match_whole_passes<B: Backend>(make: impl Fn() -> B, tol: f64) {
    let cfg = TrainConfig {
        schedule: "interleaved".parse().unwrap(),
        chunks: 2,
        ..config(2, "f32")
    };
    let mut trainer = Trainer::new(cfg, |_| Ok(make()), Init::Fresh).unwrap();
    let mut rng = Rng::new(11);
    let mut contexts: Vec<Vec<u32>> = (0..5)
        .map(|_| (0..4).map(|_| rng.below(61) as u32).collect())
        .collect();
    for round in 0..24 {
        let views: Vec<&[u32]> = contexts.iter().map(Vec::as_slice).collect();
        let rows = trainer.next_tokens_logits(&views, 2).unwrap();
        assert_eq!(rows.len(), 5);
        for (i, (row, context)) in rows.iter().zip(&contexts).enumerate() {
            let err = relative_error(row, &whole(&mut trainer, context));
            assert!(err <= tol, "round {round}, sequence {i}: {err:e} > {tol:e}");
        }
        for c in contexts.iter_mut() {
            c.push(rng.below(61) as u32);
            if c.len() > 24 {
                c.drain(..c.len() - 10);
            }
        }
    }
}

#[test]
fn reference_batched_passes_give_the_bits_of_whole_passes() {
    batched_passes_match_whole_passes(ReferenceBackend::new, 0.0);
}

/// A training step changes the weights: the keys and values cached before it are dropped, so
/// the next answer is the new model's.
#[test]
fn a_training_step_drops_the_caches() {
    let mut trainer = reference(config(2, "f32"));
    let context: Vec<u32> = (0..10).map(|i| i * 5 % 61).collect();
    let before = trainer.next_token_logits(&context[..9]).unwrap();
    assert_eq!(before, whole(&mut trainer, &context[..9]));
    let text: Vec<u8> = (0..2000u32).map(|i| (i * 7 % 61) as u8).collect();
    let corpus = Corpus::split(&text, 0.1).unwrap();
    trainer.train_step(&corpus).unwrap();
    let after = trainer.next_token_logits(&context).unwrap();
    assert_eq!(after, whole(&mut trainer, &context));
    assert_ne!(before, after[..].to_vec(), "the step changed the model");
}

/// When one in-process rank fails, a rank waiting for its tensor learns so at once (not after
/// the 60 s receive timeout), and the error reported is the first rank's own.
#[test]
fn a_failing_rank_stops_the_ranks_waiting_on_it() {
    let mut trainer = reference(config(2, "f32"));
    let mut none = vec![(); 2];
    let started = std::time::Instant::now();
    let err = exec::on_every_rank(&mut trainer.ranks, &mut none, |rank, _| {
        if rank.rank == 0 {
            anyhow::bail!("the first rank's own failure");
        }
        rank.transport.recv(&rank.backend, 0, 16).map(drop)
    })
    .unwrap_err();
    assert!(started.elapsed().as_secs() < 30, "{:?}", started.elapsed());
    let text = format!("{err:#}");
    assert!(
        text.contains("rank 0: the first rank's own failure"),
        "{text}"
    );
}

#[test]
fn mixed_precision_runs_whole_passes() {
    // The caches are f32; under bf16 every call runs the whole context, so the answers agree
    // to the bit by construction.
    cached_logits_match_whole_passes(ReferenceBackend::new, 2, "bf16", 0.0);
}

#[test]
fn wgpu_cached_decoding_matches_whole_passes() {
    batched_passes_match_whole_passes(
        || pipit_wgpu::WgpuBackend::new().expect("a wgpu adapter"),
        1e-5,
    );
    for stages in [1, 2] {
        cached_logits_match_whole_passes(
            || pipit_wgpu::WgpuBackend::new().expect("a wgpu adapter"),
            stages,
            "f32",
            1e-5,
        );
    }
}

/// Continuous batching's ragged passes through the serving pipeline (the ranks on their
/// threads, `stages` batches in flight): sequences at different lengths share a pass, prompts
/// fill in chunks beside tokens that decode one at a time, sequences leave and others join;
/// each sequence's logits are those of its whole context run again, within `tol`.
fn ragged_passes_match_whole_passes(model: ModelConfig, stages: usize, tol: f64) {
    use pipit_engine::exec::Piece;
    use pipit_engine::serve::{Job, Pipeline};
    let cfg = TrainConfig {
        model,
        ..config(stages, "f32")
    };
    let mut oracle = reference(cfg.clone());
    let serving = reference(cfg.clone());
    let vocab = cfg.model.vocab_size;
    let mut pipeline = Pipeline::start(serving.schedule.placement.clone(), serving.ranks);
    let mut rng = Rng::new(9);
    let mut draw = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.below(61) as u32).collect() };
    // Each sequence's whole context, and how much of it the caches hold.
    let mut contexts: Vec<Vec<u32>> = vec![draw(5), draw(9), draw(2), draw(13)];
    let mut cached = vec![0usize; contexts.len()];
    // Passes: (sequence, tokens) pieces; a piece that reaches the end of its context is
    // checked, and its sequence then grows by one token.
    let passes: Vec<(Vec<(usize, usize)>, Vec<u64>)> = vec![
        (vec![(0, 5), (1, 4), (2, 2)], vec![]),
        (vec![(0, 1), (1, 5), (2, 1)], vec![]),
        (vec![(2, 1), (0, 1), (1, 1), (3, 6)], vec![]),
        (vec![(3, 7), (1, 1)], vec![0]),
        (vec![(3, 1), (1, 1), (2, 1)], vec![]),
    ];
    let mut checked = 0;
    for (k, (pieces, free)) in passes.into_iter().enumerate() {
        let job = Job {
            group: k,
            pieces: pieces
                .iter()
                .map(|&(s, n)| Piece {
                    id: s as u64,
                    tokens: contexts[s][cached[s]..cached[s] + n].to_vec(),
                    capacity: 24,
                })
                .collect(),
            free,
        };
        pipeline.submit(job).unwrap();
        let (group, logits) = pipeline.next().unwrap();
        assert_eq!(group, k);
        assert_eq!(logits.len(), pieces.len() * vocab);
        for (&(s, n), row) in pieces.iter().zip(logits.chunks_exact(vocab)) {
            cached[s] += n;
            if cached[s] < contexts[s].len() {
                continue;
            }
            let want = whole(&mut oracle, &contexts[s]);
            let err = relative_error(row, &want);
            assert!(
                err <= tol,
                "pass {k}, sequence {s} at {} tokens: relative error {err:e} > {tol:e}",
                contexts[s].len()
            );
            checked += 1;
            let next = draw(1)[0];
            contexts[s].push(next);
        }
    }
    assert_eq!(checked, 13);
}

#[test]
fn ragged_passes_of_gpt2_match_whole_passes() {
    for stages in [1, 2, 3] {
        ragged_passes_match_whole_passes(config(stages, "f32").model, stages, 0.0);
    }
}

#[test]
fn ragged_passes_of_llama_with_grouped_query_attention_match_whole_passes() {
    let model = ModelConfig {
        family: pipit_engine::model::Family::Llama,
        n_kv_head: Some(2),
        ..config(1, "f32").model
    };
    for stages in [1, 2] {
        ragged_passes_match_whole_passes(model.clone(), stages, 0.0);
    }
}

/// The continuous-batching scheduler with a key/value budget for only two sequences at a time
/// and prompts longer than a pass's token budget: every request is answered with the greedy
/// tokens of its context run whole, requests beyond the queue are turned away, and the budget
/// is never exceeded.
#[test]
fn the_scheduler_answers_every_request_with_greedy_tokens_within_its_budget() {
    use pipit_engine::sample::Sampling;
    use pipit_engine::serve::{
        Command, Event, Finish, Gauges, Limits, Pipeline, Request, Scheduler,
    };
    use std::sync::atomic::Ordering;
    use std::sync::{mpsc, Arc, Mutex};
    let cfg = config(2, "f32");
    let mut oracle = reference(cfg.clone());
    let serving = reference(cfg.clone());
    let pipeline = Pipeline::start(serving.schedule.placement.clone(), serving.ranks);
    // Each request reserves ceil((prompt + 6) / 8) blocks, 2 for these prompts: 4 blocks
    // hold two sequences.
    let limits = Limits {
        window: 24,
        block_tokens: 8,
        blocks: 4,
        max_batch_tokens: 4,
        max_batch_size: 8,
        max_waiting: 5,
        groups: 2,
        drawn: 61,
    };
    let gauges = Arc::new(Gauges::default());
    let scheduler = Scheduler::new(limits, Arc::clone(&gauges));
    let (commands, receive) = mpsc::channel();
    let mut rng = Rng::new(3);
    let prompts: Vec<Vec<u32>> = (0..7)
        .map(|i| (0..3 + i % 5).map(|_| rng.below(61) as u32).collect())
        .collect();
    let heard: Vec<Arc<Mutex<Vec<Event>>>> = prompts.iter().map(|_| Arc::default()).collect();
    let most_blocks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for (i, prompt) in prompts.iter().enumerate() {
        let (events, g, most) = (
            Arc::clone(&heard[i]),
            Arc::clone(&gauges),
            Arc::clone(&most_blocks),
        );
        commands
            .send(Command::Submit(Request {
                id: i as u64,
                prompt: prompt.clone(),
                max_tokens: 6,
                sampling: Sampling::GREEDY,
                seed: 0,
                end: None,
                sink: Box::new(move |e| {
                    most.fetch_max(g.blocks_used.load(Ordering::Relaxed), Ordering::Relaxed);
                    events.lock().unwrap().push(e);
                    true
                }),
            }))
            .unwrap();
    }
    commands.send(Command::Shutdown { cancel: false }).unwrap();
    // Every command is queued before the scheduler starts, so which are turned away is fixed.
    std::thread::spawn(move || scheduler.run(pipeline, receive))
        .join()
        .unwrap()
        .unwrap();
    assert!(most_blocks.load(Ordering::Relaxed) <= 4);
    let mut busy = 0;
    for (i, prompt) in prompts.iter().enumerate() {
        let events = heard[i].lock().unwrap().clone();
        if events == [Event::Finished(Finish::Busy)] {
            busy += 1;
            continue;
        }
        let mut context = prompt.clone();
        for e in &events[..6] {
            let logits = whole(&mut oracle, &context);
            let best = Sampling::GREEDY.pick(&logits, &mut Rng::new(0)) as u32;
            assert_eq!(
                e,
                &Event::Token(best),
                "request {i} after {} tokens",
                context.len()
            );
            context.push(best);
        }
        assert_eq!(
            events[6..],
            [Event::Finished(Finish::Length)],
            "request {i}"
        );
    }
    // Five may wait; the other two are turned away.
    assert_eq!(busy, 2);
}

/// A sequence whose listener goes away (a client that disconnected) is cancelled at its next
/// token and gives its blocks back: with room for one sequence, the request waiting behind it
/// runs to its end.
#[test]
fn a_sequence_nobody_listens_to_gives_its_room_to_the_next() {
    use pipit_engine::sample::Sampling;
    use pipit_engine::serve::{
        Command, Event, Finish, Gauges, Limits, Pipeline, Request, Scheduler,
    };
    use std::sync::{mpsc, Arc, Mutex};
    let cfg = config(1, "f32");
    let serving = reference(cfg);
    let pipeline = Pipeline::start(serving.schedule.placement.clone(), serving.ranks);
    let limits = Limits {
        window: 24,
        block_tokens: 8,
        blocks: 3,
        max_batch_tokens: 32,
        max_batch_size: 8,
        max_waiting: 4,
        groups: 1,
        drawn: 61,
    };
    let scheduler = Scheduler::new(limits, Arc::new(Gauges::default()));
    let (commands, receive) = mpsc::channel();
    let heard: Vec<Arc<Mutex<Vec<Event>>>> = (0..2).map(|_| Arc::default()).collect();
    for (i, events) in heard.iter().enumerate() {
        let events = Arc::clone(events);
        commands
            .send(Command::Submit(Request {
                id: i as u64,
                prompt: vec![1, 2, 3, 4],
                max_tokens: 20,
                sampling: Sampling::GREEDY,
                seed: 0,
                end: None,
                sink: Box::new(move |e| {
                    let mut events = events.lock().unwrap();
                    events.push(e);
                    // The first listener hangs up after its second token.
                    i == 1 || events.len() < 2
                }),
            }))
            .unwrap();
    }
    commands.send(Command::Shutdown { cancel: false }).unwrap();
    std::thread::spawn(move || scheduler.run(pipeline, receive))
        .join()
        .unwrap()
        .unwrap();
    let first = heard[0].lock().unwrap().clone();
    assert!(
        matches!(
            first[..],
            [
                Event::Token(_),
                Event::Token(_),
                Event::Finished(Finish::Cancelled)
            ]
        ),
        "{first:?}"
    );
    let second = heard[1].lock().unwrap().clone();
    assert_eq!(second.len(), 21, "{second:?}");
    assert_eq!(second[20], Event::Finished(Finish::Length));
}

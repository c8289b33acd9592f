//! GPT-2 as layers, on the reference backend: cutting the model into stages, splitting a batch
//! into micro-batches and checkpointing activations change nothing but rounding; gradients
//! are the derivatives of the loss; the optimizer, checkpoints and memory accounting behave.

use std::ops::Range;

use pipit_engine::backend::Backend;
use pipit_engine::is_invalid_input;
use pipit_engine::model::{
    init_parameters, AdamWConfig, HostTensors, Keep, ModelConfig, StageInput, StageModel,
    StageOutput,
};
use pipit_engine::rng::Rng;
use pipit_reference::ReferenceBackend;

fn tiny() -> ModelConfig {
    ModelConfig {
        vocab_size: 37,
        n_positions: 16,
        n_embd: 16,
        n_layer: 2,
        n_head: 2,
        ..ModelConfig::default()
    }
}

fn tokens(rng: &mut Rng, len: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|_| rng.below(vocab as u64) as u32).collect()
}

/// One micro-batch: token ids and targets, `batch × seq` each.
struct Micro {
    tokens: Vec<u32>,
    targets: Vec<u32>,
    batch: usize,
}

fn micro_batches(
    cfg: &ModelConfig,
    seed: u64,
    count: usize,
    batch: usize,
    seq: usize,
) -> Vec<Micro> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|_| Micro {
            tokens: tokens(&mut rng, batch * seq, cfg.vocab_size),
            targets: tokens(&mut rng, batch * seq, cfg.vocab_size),
            batch,
        })
        .collect()
}

/// Run every micro-batch forward and backward through `stages` in order (a pipeline without a
/// schedule), scaling the loss by `1/total tokens`. Returns each micro-batch's summed loss.
fn run_pipeline<B: Backend>(
    b: &B,
    stages: &mut [StageModel<B>],
    micros: &[Micro],
    seq: usize,
    keep: Keep,
) -> Vec<f64> {
    let total: usize = micros.iter().map(|m| m.tokens.len()).sum();
    let mut losses = Vec::new();
    for m in micros {
        let (tok, tgt) = (
            b.upload_u32(&m.tokens).unwrap(),
            b.upload_u32(&m.targets).unwrap(),
        );
        let mut saved = Vec::new();
        let mut input = StageInput::Tokens(&tok);
        for stage in stages.iter() {
            let (out, s) = stage
                .forward(b, input, Some(&tgt), m.batch, seq, keep)
                .unwrap();
            saved.push(s);
            input = match out {
                StageOutput::Hidden(h) => StageInput::Hidden(h),
                StageOutput::Loss { losses: l } => {
                    losses.push(b.download(&l).unwrap().iter().map(|&x| x as f64).sum());
                    break;
                }
                StageOutput::Logits(_) => panic!("targets were given"),
            };
        }
        let mut grad = None;
        for (stage, s) in stages.iter_mut().zip(saved).rev() {
            grad = stage.backward(b, s, grad, 1.0 / total as f32).unwrap();
        }
        assert!(grad.is_none(), "the first stage returns no input gradient");
    }
    losses
}

fn build<B: Backend>(
    b: &B,
    cfg: &ModelConfig,
    host: &HostTensors,
    cuts: &[Range<usize>],
) -> Vec<StageModel<B>> {
    cuts.iter()
        .map(|r| StageModel::new(b, cfg, r.clone(), host).unwrap())
        .collect()
}

/// The whole model as one stage.
fn build_whole<B: Backend>(b: &B, cfg: &ModelConfig, host: &HostTensors) -> Vec<StageModel<B>> {
    vec![StageModel::new(b, cfg, 0..cfg.layers().len(), host).unwrap()]
}

/// Every stage's gradients in one map, the copies of the tied `wte` summed.
fn merged_grads<B: Backend>(b: &B, stages: &[StageModel<B>]) -> HostTensors {
    let mut out = HostTensors::new();
    for stage in stages {
        for (name, t) in stage.download_grads(b).unwrap().iter() {
            let mut data = t.data.clone();
            if let Some(prev) = out.get(name) {
                for (d, p) in data.iter_mut().zip(&prev.data) {
                    *d += p;
                }
            }
            out.insert(name, t.shape.clone(), data).unwrap();
        }
    }
    out
}

fn relative_norm(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let norm: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

fn assert_grads_close(what: &str, got: &HostTensors, want: &HostTensors, tol: f64) {
    assert_eq!(
        got.names().collect::<Vec<_>>(),
        want.names().collect::<Vec<_>>(),
        "{what}"
    );
    for (name, w) in want.iter() {
        let err = relative_norm(&got.get(name).unwrap().data, &w.data);
        assert!(
            err <= tol,
            "{what}: gradient of {name} differs by {err:.3e} (relative norm)"
        );
    }
}

/// All ways to cut `layers` layers into contiguous non-empty stages.
fn all_cuts(layers: usize) -> Vec<Vec<Range<usize>>> {
    (0..1u32 << (layers - 1))
        .map(|mask| {
            let mut cuts = Vec::new();
            let mut start = 0;
            for i in 1..layers {
                if mask & (1 << (i - 1)) != 0 {
                    cuts.push(start..i);
                    start = i;
                }
            }
            cuts.push(start..layers);
            cuts
        })
        .collect()
}

#[test]
fn every_partition_matches_single_device() {
    let b = ReferenceBackend::new();
    let cfg = tiny();
    let host = init_parameters(&cfg, 1).unwrap();
    let micros = micro_batches(&cfg, 2, 2, 2, 7);
    let layers = cfg.layers().len();
    let mut single = build_whole(&b, &cfg, &host);
    let want_losses = run_pipeline(&b, &mut single, &micros, 7, Keep::All);
    let want = merged_grads(&b, &single);
    let cuts = all_cuts(layers);
    assert_eq!(cuts.len(), 8);
    for cut in cuts {
        for keep in [Keep::All, Keep::Input] {
            let mut stages = build(&b, &cfg, &host, &cut);
            let losses = run_pipeline(&b, &mut stages, &micros, 7, keep);
            assert_eq!(losses, want_losses, "{cut:?} {keep:?}: losses");
            // Only the two copies of wte are summed in another order than on one device.
            assert_grads_close(
                &format!("{cut:?} {keep:?}"),
                &merged_grads(&b, &stages),
                &want,
                1e-6,
            );
        }
    }
}

#[test]
fn micro_batches_accumulate_to_the_whole_batch() {
    let b = ReferenceBackend::new();
    let cfg = tiny();
    let host = init_parameters(&cfg, 3).unwrap();
    let micros = micro_batches(&cfg, 4, 3, 1, 9);
    let whole = Micro {
        tokens: micros.iter().flat_map(|m| m.tokens.clone()).collect(),
        targets: micros.iter().flat_map(|m| m.targets.clone()).collect(),
        batch: 3,
    };
    let mut split = build_whole(&b, &cfg, &host);
    let split_losses: f64 = run_pipeline(&b, &mut split, &micros, 9, Keep::All)
        .iter()
        .sum();
    let mut one = build_whole(&b, &cfg, &host);
    let one_loss: f64 = run_pipeline(&b, &mut one, &[whole], 9, Keep::All)
        .iter()
        .sum();
    assert!(
        (split_losses - one_loss).abs() <= 1e-6 * one_loss,
        "{split_losses} vs {one_loss}"
    );
    assert_grads_close(
        "micro-batches",
        &merged_grads(&b, &split),
        &merged_grads(&b, &one),
        1e-5,
    );
}

/// Mean loss of the whole model on one micro-batch, without keeping anything.
fn eval_loss(
    b: &ReferenceBackend,
    cfg: &ModelConfig,
    host: &HostTensors,
    m: &Micro,
    seq: usize,
) -> f64 {
    let model = StageModel::new(b, cfg, 0..cfg.layers().len(), host).unwrap();
    let (tok, tgt) = (
        b.upload_u32(&m.tokens).unwrap(),
        b.upload_u32(&m.targets).unwrap(),
    );
    let (out, _) = model
        .forward(
            b,
            StageInput::Tokens(&tok),
            Some(&tgt),
            m.batch,
            seq,
            Keep::Nothing,
        )
        .unwrap();
    let StageOutput::Loss { losses } = out else {
        panic!("expected losses")
    };
    let l = b.download(&losses).unwrap();
    l.iter().map(|&x| x as f64).sum::<f64>() / l.len() as f64
}

#[test]
fn whole_model_gradients_match_finite_differences() {
    let b = ReferenceBackend::new();
    let cfg = ModelConfig {
        vocab_size: 11,
        n_positions: 8,
        n_embd: 8,
        n_layer: 1,
        n_head: 2,
        ..ModelConfig::default()
    };
    let mut host = init_parameters(&cfg, 5).unwrap();
    // Larger weights than GPT-2's 0.02 give every tensor a gradient well above f32 noise.
    let mut rng = Rng::new(6);
    let names: Vec<String> = host.names().map(str::to_string).collect();
    for name in &names {
        for x in &mut host.get_mut(name).unwrap().data {
            *x += (rng.normal() * 0.3) as f32;
        }
    }
    let seq = 5;
    let micro = &micro_batches(&cfg, 7, 1, 2, seq)[0];
    let mut model = build_whole(&b, &cfg, &host);
    run_pipeline(&b, &mut model, std::slice::from_ref(micro), seq, Keep::All);
    let grads = model[0].download_grads(&b).unwrap();
    let h = 1e-2f32;
    for name in &names {
        let g = &grads.get(name).unwrap().data;
        let scale = g.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
        for _ in 0..3 {
            let i = rng.below(g.len() as u64) as usize;
            let mut plus = host.clone();
            plus.get_mut(name).unwrap().data[i] += h;
            let mut minus = host.clone();
            minus.get_mut(name).unwrap().data[i] -= h;
            let fd = (eval_loss(&b, &cfg, &plus, micro, seq)
                - eval_loss(&b, &cfg, &minus, micro, seq))
                / (2.0 * h as f64);
            let err = (fd - g[i] as f64).abs();
            assert!(
                err <= 2e-2 * scale + 2e-4,
                "{name}[{i}]: finite difference {fd:.5e}, gradient {:.5e} (largest in tensor {scale:.3e})",
                g[i]
            );
        }
    }
}

#[test]
fn adamw_training_lowers_the_loss_and_decays_only_matrices() {
    let b = ReferenceBackend::new();
    let cfg = tiny();
    let host = init_parameters(&cfg, 8).unwrap();
    let micros = micro_batches(&cfg, 9, 1, 2, 12);
    let mut model = build_whole(&b, &cfg, &host);
    let opt = AdamWConfig::default();
    let mut losses = Vec::new();
    for step in 1..=25 {
        model[0].zero_grads(&b).unwrap();
        let l = run_pipeline(&b, &mut model, &micros, 12, Keep::All)[0] / 24.0;
        losses.push(l);
        model[0].optimizer_step(&b, 1e-2, step, &opt).unwrap();
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(
        (first - (cfg.vocab_size as f64).ln()).abs() < 0.1,
        "initial loss {first} is near ln(vocab)"
    );
    assert!(
        last < 0.5 * first,
        "25 steps on one batch: loss {first} -> {last}"
    );

    // With zero gradients only weight decay moves parameters, and only 2-D ones.
    let before = model[0].download_params(&b).unwrap();
    model[0].zero_grads(&b).unwrap();
    let decay = AdamWConfig {
        weight_decay: 0.5,
        ..opt
    };
    let fresh = init_parameters(&cfg, 8).unwrap();
    let mut clean = build_whole(&b, &cfg, &fresh);
    clean[0].load_params(&b, &before).unwrap();
    clean[0].optimizer_step(&b, 0.1, 1, &decay).unwrap();
    let after = clean[0].download_params(&b).unwrap();
    for (name, t) in before.iter() {
        let a = &after.get(name).unwrap().data;
        if t.shape.len() == 2 {
            for (x, y) in t.data.iter().zip(a) {
                assert!(
                    (*y as f64 - *x as f64 * 0.95).abs() <= 1e-7 * x.abs() as f64 + 1e-12,
                    "{name} decays"
                );
            }
        } else {
            assert_eq!(
                &t.data, a,
                "{name} (a bias or layernorm parameter) must not decay"
            );
        }
    }
}

#[test]
fn parameters_and_optimizer_state_round_trip() {
    let b = ReferenceBackend::new();
    let cfg = tiny();
    let micros = micro_batches(&cfg, 10, 1, 1, 5);
    let mut a = build(&b, &cfg, &init_parameters(&cfg, 1).unwrap(), &[0..2, 2..4]);
    run_pipeline(&b, &mut a, &micros, 5, Keep::All);
    for s in &mut a {
        s.optimizer_step(&b, 1e-3, 1, &AdamWConfig::default())
            .unwrap();
    }
    let mut params = HostTensors::new();
    let mut state = (HostTensors::new(), HostTensors::new());
    for s in &a {
        params.extend(s.download_params(&b).unwrap());
        let st = s.optimizer_state(&b).unwrap();
        state.0.extend(st.m);
        state.1.extend(st.v);
    }
    assert_eq!(params.len(), cfg.all_params().len());
    // Load into a model cut differently and initialised from another seed.
    let mut c = build(&b, &cfg, &init_parameters(&cfg, 2).unwrap(), &[0..1, 1..4]);
    let opt_state = pipit_engine::model::OptimizerState {
        m: state.0.clone(),
        v: state.1.clone(),
    };
    for s in &mut c {
        s.load_params(&b, &params).unwrap();
        s.load_optimizer_state(&b, &opt_state).unwrap();
    }
    for s in &c {
        for (name, t) in s.download_params(&b).unwrap().iter() {
            assert_eq!(&params.get(name).unwrap().data, &t.data, "{name}");
        }
        assert_eq!(
            s.optimizer_state(&b)
                .unwrap()
                .v
                .get("wpe")
                .map(|t| t.data.len()),
            s.param_shape("wpe").map(|s| s[0] * s[1])
        );
    }
    let m = c[1].optimizer_state(&b).unwrap().m;
    assert_eq!(
        m.get("h.1.mlp.c_fc.weight"),
        state.0.get("h.1.mlp.c_fc.weight")
    );

    let mut wrong = params.clone();
    wrong.insert("wpe", vec![3, 16], vec![0.0; 48]).unwrap();
    let err = c[0].load_params(&b, &wrong).unwrap_err();
    assert!(is_invalid_input(&err), "{err}");
    wrong.remove("wpe");
    assert!(is_invalid_input(&c[0].load_params(&b, &wrong).unwrap_err()));
}

#[test]
fn stages_hold_hugging_face_tensors() {
    let b = ReferenceBackend::new();
    let cfg = tiny();
    let host = init_parameters(&cfg, 1).unwrap();
    let whole = StageModel::new(&b, &cfg, 0..4, &host).unwrap();
    let names = whole.param_names();
    assert_eq!(
        names.iter().filter(|n| *n == "wte").count(),
        1,
        "one shared wte"
    );
    assert_eq!(
        names,
        cfg.all_params()
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>()
    );
    assert_eq!(whole.num_parameters(), cfg.num_parameters());
    assert_eq!(
        whole.param_shape("h.1.attn.c_attn.weight"),
        Some(&[16, 48][..])
    );
    assert_eq!(
        whole.param_shape("h.0.mlp.c_proj.weight"),
        Some(&[64, 16][..])
    );

    let head = StageModel::new(&b, &cfg, 3..4, &host).unwrap();
    assert_eq!(head.param_names(), vec!["ln_f.weight", "ln_f.bias", "wte"]);
    let middle = StageModel::new(&b, &cfg, 1..3, &host).unwrap();
    assert!(middle.param("wte").is_none());
    assert_eq!(middle.param_names().len(), 24);
    let first = StageModel::new(&b, &cfg, 0..1, &host).unwrap();
    assert_eq!(
        b.download(first.param("wte").unwrap()).unwrap(),
        host.get("wte").unwrap().data
    );
}

#[test]
fn mistakes_are_errors() {
    let b = ReferenceBackend::new();
    let cfg = tiny();
    let host = init_parameters(&cfg, 1).unwrap();
    for bad in [0..0, 2..5, 3..3] {
        let err = StageModel::new(&b, &cfg, bad.clone(), &host).err().unwrap();
        assert!(is_invalid_input(&err), "{bad:?}: {err}");
    }
    let mut partial = host.clone();
    partial.remove("h.1.ln_2.bias");
    assert!(is_invalid_input(
        &StageModel::new(&b, &cfg, 0..4, &partial).err().unwrap()
    ));

    let (first, mut head) = (
        StageModel::new(&b, &cfg, 0..2, &host).unwrap(),
        StageModel::new(&b, &cfg, 2..4, &host).unwrap(),
    );
    let tok = b.upload_u32(&[1, 2, 3, 4]).unwrap();
    let err = first
        .forward(&b, StageInput::Tokens(&tok), None, 1, 17, Keep::All)
        .err()
        .unwrap();
    assert!(is_invalid_input(&err), "seq beyond n_positions: {err}");
    assert!(
        first
            .forward(&b, StageInput::Tokens(&tok), None, 1, 3, Keep::All)
            .is_err(),
        "wrong token count"
    );
    assert!(
        head.forward(&b, StageInput::Tokens(&tok), Some(&tok), 1, 4, Keep::All)
            .is_err(),
        "tokens into a middle stage"
    );
    let hidden = || b.upload(&[0.5; 4 * 16]).unwrap();
    assert!(
        head.forward(&b, StageInput::Hidden(hidden()), None, 1, 4, Keep::All)
            .is_err(),
        "keeping without targets"
    );
    let (_, saved) = head
        .forward(
            &b,
            StageInput::Hidden(hidden()),
            Some(&tok),
            1,
            4,
            Keep::Nothing,
        )
        .unwrap();
    assert_eq!(saved.bytes(), 0);
    assert!(
        head.backward(&b, saved, None, 1.0).is_err(),
        "backward after Keep::Nothing"
    );
    let (_, saved) = head
        .forward(
            &b,
            StageInput::Hidden(hidden()),
            Some(&tok),
            1,
            4,
            Keep::All,
        )
        .unwrap();
    assert!(
        head.backward(&b, saved, Some(hidden()), 1.0).is_err(),
        "the head takes no output gradient"
    );
    assert!(
        head.optimizer_step(&b, 1e-3, 0, &AdamWConfig::default())
            .is_err(),
        "step 0"
    );
}

#[test]
fn logits_without_targets_give_the_same_losses() {
    let b = ReferenceBackend::new();
    let cfg = tiny();
    let host = init_parameters(&cfg, 1).unwrap();
    let model = StageModel::new(&b, &cfg, 0..4, &host).unwrap();
    let m = &micro_batches(&cfg, 3, 1, 2, 6)[0];
    let (tok, tgt) = (
        b.upload_u32(&m.tokens).unwrap(),
        b.upload_u32(&m.targets).unwrap(),
    );
    let (out, _) = model
        .forward(&b, StageInput::Tokens(&tok), None, 2, 6, Keep::Nothing)
        .unwrap();
    let StageOutput::Logits(logits) = out else {
        panic!("expected logits")
    };
    let logits = b.download(&logits).unwrap();
    assert_eq!(logits.len(), 12 * cfg.vocab_size);
    let (out, _) = model
        .forward(
            &b,
            StageInput::Tokens(&tok),
            Some(&tgt),
            2,
            6,
            Keep::Nothing,
        )
        .unwrap();
    let StageOutput::Loss { losses } = out else {
        panic!("expected losses")
    };
    for ((row, &t), l) in logits
        .chunks(cfg.vocab_size)
        .zip(&m.targets)
        .zip(b.download(&losses).unwrap())
    {
        let max = row.iter().fold(f64::MIN, |a, &x| a.max(x as f64));
        let lse = max
            + row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        assert!((lse - row[t as usize] as f64 - l as f64).abs() < 1e-5);
    }
}

#[test]
fn saved_bytes_match_the_memory_they_hold_and_backward_frees_them() {
    let b = ReferenceBackend::new();
    let cfg = tiny();
    let host = init_parameters(&cfg, 1).unwrap();
    let mut stages = build(&b, &cfg, &host, &[0..2, 2..4]);
    let m = &micro_batches(&cfg, 3, 1, 2, 8)[0];
    let (tok, tgt) = (
        b.upload_u32(&m.tokens).unwrap(),
        b.upload_u32(&m.targets).unwrap(),
    );
    let resting = b.memory().in_use;
    let mut bytes = Vec::new();
    for keep in [Keep::All, Keep::Input] {
        let before = b.memory().in_use;
        let (out, saved) = stages[0]
            .forward(&b, StageInput::Tokens(&tok), None, 2, 8, keep)
            .unwrap();
        let StageOutput::Hidden(h) = out else {
            panic!("expected hidden states")
        };
        let out_bytes = 4 * b.len(&h) as u64;
        assert_eq!(
            b.memory().in_use - before,
            saved.bytes() + out_bytes,
            "{keep:?}: first stage"
        );
        let before_head = b.memory().in_use;
        let (loss, saved_head) = stages[1]
            .forward(&b, StageInput::Hidden(h), Some(&tgt), 2, 8, keep)
            .unwrap();
        // The head took ownership of the hidden states: they count in its saved bytes or are freed.
        let StageOutput::Loss { losses } = loss else {
            panic!("expected losses")
        };
        let grown = b.memory().in_use + out_bytes - before_head;
        assert_eq!(
            grown,
            saved_head.bytes() + 4 * b.len(&losses) as u64,
            "{keep:?}: head stage"
        );
        bytes.push((saved.bytes(), saved_head.bytes()));
        drop(losses);
        let g = stages[1].backward(&b, saved_head, None, 0.01).unwrap();
        stages[0].backward(&b, saved, g, 1.0).unwrap();
        assert_eq!(
            b.memory().in_use,
            resting,
            "{keep:?}: backward frees every activation"
        );
    }
    assert!(
        bytes[1].0 < bytes[0].0 / 10,
        "checkpointing keeps far less: {bytes:?}"
    );
    assert_eq!(
        bytes[1].1,
        4 * (2 * 8 * 16 + 16) as u64,
        "the head keeps its input and targets"
    );
}

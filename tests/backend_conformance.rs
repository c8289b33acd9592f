//! Backend conformance: every [`Backend`] operation, forward and backward, against the float64
//! oracles in `oracle/` on random inputs and awkward shapes, plus a whole tiny GPT-2 forward
//! and backward against the reference backend. Written once, generic over the backend;
//! `conformance!(name, constructor)` instantiates the whole suite for one backend.
//!
//! - **Error measure.** A tensor `got` (f32) matches `want` (f64) when
//!   `max_i |got_i − want_i| / max(max_i |want_i|, 1e-12) ≤ 1e-4`.
//! - **Poisoning.** Every output an op overwrites is filled with NaN before the op, and every
//!   element must come back finite, so an element left unwritten fails. Outputs an op
//!   accumulates into (parameter gradients, `Matmul::accumulate`) start from random values and
//!   the oracle adds to those, which checks that they are accumulated, not overwritten.
//! - **Awkward shapes.** Sizes that are not multiples of 4, 16, 64 or 256, one token,
//!   vocabularies of 131, 257, 1031 and 50257, sequences of 300 tokens, channels beyond 1024,
//!   and one case whose logits exceed a 128 MiB storage binding.
//! - **bf16.** On backends that support it, every op again with bf16 operands where the
//!   `Backend` docs allow them, against the oracles fed the same bf16-rounded inputs, within
//!   a relative error of 1e-2; and a whole tiny GPT-2 in mixed precision against the f32
//!   reference.

mod oracle;

use pipit_engine::backend::{
    round_bf16, AdamW, Attention, Backend, CachedAttention, DType, Matmul,
};
use pipit_engine::model::{
    init_parameters, HostTensors, Keep, ModelConfig, StageInput, StageModel, StageOutput,
};
use pipit_engine::rng::Rng;
use pipit_reference::ReferenceBackend;

/// Largest accepted error, relative to the largest expected magnitude.
const TOL: f64 = 1e-4;

fn rand(rng: &mut Rng, len: usize, scale: f64) -> Vec<f32> {
    rng.uniform_vec(len, -scale, scale)
}

fn rand_tokens(rng: &mut Rng, len: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|_| rng.below(vocab as u64) as u32).collect()
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// A buffer full of NaN: whatever the op does not write stays NaN and fails the check.
fn poisoned<B: Backend>(b: &B, len: usize) -> B::Buffer {
    b.upload(&vec![f32::NAN; len]).unwrap()
}

fn up<B: Backend>(b: &B, x: &[f32]) -> B::Buffer {
    b.upload(x).unwrap()
}

/// Relative error of `got` against `want` (see the module docs), and where it is largest.
fn relative_error(got: &[f32], want: &[f64]) -> (f64, usize) {
    let scale = want.iter().fold(0f64, |m, w| m.max(w.abs())).max(1e-12);
    let (at, err) = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs())
        .enumerate()
        .fold(
            (0, 0f64),
            |best, (i, e)| if e > best.1 { (i, e) } else { best },
        );
    (err / scale, at)
}

fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().position(|x| !x.is_finite()) {
        panic!(
            "{what}: element {i} of {} is {} (left unwritten?)",
            got.len(),
            got[i]
        );
    }
    let (err, at) = relative_error(got, want);
    assert!(
        err <= tol,
        "{what}: relative error {err:.3e} > {tol:.0e} (element {at}: got {}, want {})",
        got[at],
        want[at]
    );
}

fn check<B: Backend>(b: &B, what: &str, buf: &B::Buffer, want: &[f64]) {
    assert_close(what, &b.download(buf).unwrap(), want, TOL);
}

/// Allocation, upload/download, write, fill, copy (f32 and u32), add and add_assign.
pub fn check_buffers<B: Backend>(b: &B) {
    let mut rng = Rng::new(1);
    for len in [1, 3, 257, 65_537] {
        let zeros = b.alloc(len, DType::F32).unwrap();
        assert_eq!(b.len(&zeros), len);
        assert_eq!(
            b.download(&zeros).unwrap(),
            vec![0.0; len],
            "alloc zero-fills"
        );
        assert_eq!(b.len(&b.alloc(len, DType::U32).unwrap()), len);

        let (x, y) = (rand(&mut rng, len, 2.0), rand(&mut rng, len, 2.0));
        let mut bx = up(b, &x);
        assert_eq!(b.download(&bx).unwrap(), x, "upload/download round trip");
        b.write(&mut bx, &y).unwrap();
        assert_eq!(b.download(&bx).unwrap(), y, "write");
        b.fill(&mut bx, 0.25).unwrap();
        assert_eq!(b.download(&bx).unwrap(), vec![0.25; len], "fill");

        let (bx, by) = (up(b, &x), up(b, &y));
        let mut dst = poisoned(b, len);
        b.copy(&mut dst, &bx).unwrap();
        assert_eq!(b.download(&dst).unwrap(), x, "copy");
        // The middle third of `y` into the last third of `x`'s copy; the rest stays.
        let third = len / 3;
        b.copy_range(&mut dst, len - third, &by, third, third)
            .unwrap();
        let mut want = x.clone();
        want[len - third..].copy_from_slice(&y[third..2 * third]);
        assert_eq!(b.download(&dst).unwrap(), want, "copy_range");
        let overrun = b.copy_range(&mut dst, len - third, &by, third, third + 1);
        assert!(overrun.unwrap_err().to_string().contains("overrun"));
        let mut sum = poisoned(b, len);
        b.add(&mut sum, &bx, &by).unwrap();
        let want: Vec<f64> = x
            .iter()
            .zip(&y)
            .map(|(&a, &c)| a as f64 + c as f64)
            .collect();
        check(b, "add", &sum, &want);
        let mut acc = up(b, &x);
        b.add_assign(&mut acc, &by).unwrap();
        check(b, "add_assign", &acc, &want);
    }
    // u32 buffers cannot be downloaded: check a copied token buffer through the embedding.
    let tokens = [3u32, 0, 2, 1, 3];
    let src = b.upload_u32(&tokens).unwrap();
    let mut copied = b.alloc(tokens.len(), DType::U32).unwrap();
    b.copy(&mut copied, &src).unwrap();
    drop(src);
    let (wte, wpe) = (rand(&mut rng, 4 * 3, 1.0), rand(&mut rng, 5 * 3, 1.0));
    let mut out = poisoned(b, tokens.len() * 3);
    b.embedding_forward(&mut out, &copied, &up(b, &wte), &up(b, &wpe), 1, 5, 3)
        .unwrap();
    check(
        b,
        "embedding of copied u32 tokens",
        &out,
        &oracle::embedding(&tokens, &wte, &wpe, 5, 3),
    );
}

/// Memory accounting: a buffer counts from allocation to drop; the peak remembers it.
pub fn check_memory<B: Backend>(b: &B) {
    let before = b.memory();
    let len = 1_000_003;
    let buf = b.alloc(len, DType::F32).unwrap();
    let during = b.memory();
    assert!(
        during.in_use >= before.in_use + 4 * len as u64,
        "{before:?} -> {during:?}"
    );
    assert!(during.peak >= during.in_use);
    drop(buf);
    let after = b.memory();
    assert_eq!(after.in_use, before.in_use, "dropping a buffer frees it");
    assert!(
        after.peak >= during.in_use,
        "the peak remembers the freed buffer"
    );
    b.reset_peak_memory();
    assert_eq!(
        b.memory().peak,
        b.memory().in_use,
        "reset starts the peak at current use"
    );
}

/// Every matmul layout, with and without bias and accumulation, over awkward sizes.
pub fn check_matmul<B: Backend>(b: &B) {
    let mut rng = Rng::new(2);
    let sizes = [
        (1, 1, 1),
        (3, 5, 7),
        (17, 33, 65),
        (67, 129, 31),
        (1, 257, 40),
        (130, 3, 300),
        (64, 64, 64),
    ];
    for (case, &(m, n, k)) in sizes.iter().enumerate() {
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut s = Matmul::new(m, n, k);
            s.trans_a = trans_a;
            s.trans_b = trans_b;
            s.accumulate = (case + trans_a as usize) % 2 == 1;
            let with_bias = (case + trans_b as usize) % 2 == 0;
            let (a, bm) = (rand(&mut rng, m * k, 1.0), rand(&mut rng, k * n, 1.0));
            let bias = with_bias.then(|| rand(&mut rng, n, 1.0));
            let init = s.accumulate.then(|| rand(&mut rng, m * n, 1.0));
            let mut out = match &init {
                Some(x) => up(b, x),
                None => poisoned(b, m * n),
            };
            let bias_buf = bias.as_ref().map(|x| up(b, x));
            b.matmul(&mut out, &up(b, &a), &up(b, &bm), bias_buf.as_ref(), s)
                .unwrap();
            let want = oracle::matmul(&a, &bm, bias.as_deref(), init.as_deref(), s);
            check(b, &format!("matmul {s:?} bias={with_bias}"), &out, &want);
        }
    }
}

/// `dbias += Σ_rows dout`.
pub fn check_bias_backward<B: Backend>(b: &B) {
    let mut rng = Rng::new(3);
    for (rows, cols) in [(1, 1), (7, 13), (300, 257), (1030, 3)] {
        let (init, dout) = (rand(&mut rng, cols, 1.0), rand(&mut rng, rows * cols, 1.0));
        let mut dbias = up(b, &init);
        b.bias_backward(&mut dbias, &up(b, &dout), rows, cols)
            .unwrap();
        check(
            b,
            &format!("bias_backward {rows}x{cols}"),
            &dbias,
            &oracle::bias_backward(&init, &dout, cols),
        );
    }
}

/// Token + position embedding, forward and backward, including many repeats of few tokens.
pub fn check_embedding<B: Backend>(b: &B) {
    let mut rng = Rng::new(4);
    for (batch, seq, c, vocab, positions) in [
        (1, 1, 1, 1, 1),
        (2, 7, 13, 131, 9),
        (3, 300, 20, 257, 300),
        (4, 65, 64, 5, 70),
    ] {
        let what = format!("embedding b{batch} t{seq} c{c} v{vocab}");
        let tokens = rand_tokens(&mut rng, batch * seq, vocab);
        let (wte, wpe) = (
            rand(&mut rng, vocab * c, 1.0),
            rand(&mut rng, positions * c, 1.0),
        );
        let tok = b.upload_u32(&tokens).unwrap();
        let mut out = poisoned(b, batch * seq * c);
        b.embedding_forward(&mut out, &tok, &up(b, &wte), &up(b, &wpe), batch, seq, c)
            .unwrap();
        check(
            b,
            &what,
            &out,
            &oracle::embedding(&tokens, &wte, &wpe, seq, c),
        );

        let dout = rand(&mut rng, batch * seq * c, 1.0);
        let (dwte0, dwpe0) = (
            rand(&mut rng, vocab * c, 1.0),
            rand(&mut rng, positions * c, 1.0),
        );
        let (mut dwte, mut dwpe) = (up(b, &dwte0), up(b, &dwpe0));
        b.embedding_backward(&mut dwte, &mut dwpe, &up(b, &dout), &tok, batch, seq, c)
            .unwrap();
        let (want_wte, want_wpe) =
            oracle::embedding_backward(&dwte0, &dwpe0, &dout, &tokens, seq, c);
        check(b, &format!("{what} dwte"), &dwte, &want_wte);
        check(b, &format!("{what} dwpe"), &dwpe, &want_wpe);
    }
}

/// Layernorm forward (output, mean, rstd) and backward, on inputs with a large common offset.
pub fn check_layernorm<B: Backend>(b: &B) {
    let mut rng = Rng::new(5);
    for (rows, c) in [(1, 1), (1, 7), (5, 48), (33, 257), (3, 1537), (300, 16)] {
        let what = format!("layernorm {rows}x{c}");
        let inp: Vec<f32> = rand(&mut rng, rows * c, 1.0)
            .iter()
            .map(|x| x + 3.0)
            .collect();
        let (w, bias) = (rand(&mut rng, c, 1.5), rand(&mut rng, c, 1.0));
        let (inp_b, w_b) = (up(b, &inp), up(b, &w));
        let (mut out, mut mean, mut rstd) =
            (poisoned(b, rows * c), poisoned(b, rows), poisoned(b, rows));
        b.layernorm_forward(
            &mut out,
            &mut mean,
            &mut rstd,
            &inp_b,
            &w_b,
            &up(b, &bias),
            rows,
            c,
        )
        .unwrap();
        let (want, want_mean, want_rstd) =
            oracle::layernorm(&f64s(&inp), &f64s(&w), &f64s(&bias), c);
        check(b, &format!("{what} out"), &out, &want);
        check(b, &format!("{what} mean"), &mean, &want_mean);
        check(b, &format!("{what} rstd"), &rstd, &want_rstd);

        let dout = rand(&mut rng, rows * c, 1.0);
        let (dw0, db0) = (rand(&mut rng, c, 1.0), rand(&mut rng, c, 1.0));
        let (mut dinp, mut dw, mut db) = (poisoned(b, rows * c), up(b, &dw0), up(b, &db0));
        b.layernorm_backward(
            &mut dinp,
            &mut dw,
            &mut db,
            &up(b, &dout),
            &inp_b,
            &w_b,
            &mean,
            &rstd,
            rows,
            c,
        )
        .unwrap();
        let (want_dinp, want_dw, want_db) =
            oracle::layernorm_backward(&f64s(&dout), &f64s(&inp), &f64s(&w), c);
        let plus = |init: &[f32], d: Vec<f64>| -> Vec<f64> {
            init.iter().zip(d).map(|(&i, d)| i as f64 + d).collect()
        };
        check(b, &format!("{what} dinp"), &dinp, &want_dinp);
        check(b, &format!("{what} dweight"), &dw, &plus(&dw0, want_dw));
        check(b, &format!("{what} dbias"), &db, &plus(&db0, want_db));
    }
}

/// GELU (tanh approximation) forward and backward.
pub fn check_gelu<B: Backend>(b: &B) {
    let mut rng = Rng::new(6);
    for len in [1, 7, 1000, 70_001] {
        let (x, dout) = (rand(&mut rng, len, 6.0), rand(&mut rng, len, 1.0));
        let xb = up(b, &x);
        let mut out = poisoned(b, len);
        b.gelu_forward(&mut out, &xb).unwrap();
        let want: Vec<f64> = x.iter().map(|&v| oracle::gelu(v as f64)).collect();
        check(b, &format!("gelu {len}"), &out, &want);
        let mut dinp = poisoned(b, len);
        b.gelu_backward(&mut dinp, &xb, &up(b, &dout)).unwrap();
        let want: Vec<f64> = x
            .iter()
            .zip(&dout)
            .map(|(&v, &g)| oracle::gelu_grad(v as f64) * g as f64)
            .collect();
        check(b, &format!("gelu backward {len}"), &dinp, &want);
    }
}

/// Causal attention forward (output and probabilities, zero above the diagonal) and backward.
pub fn check_attention<B: Backend>(b: &B) {
    let mut rng = Rng::new(7);
    for (batch, seq, channels, heads) in [
        (1, 1, 8, 2),
        (2, 5, 12, 3),
        (1, 17, 48, 4),
        (1, 300, 16, 2),
        (3, 33, 64, 1),
    ] {
        let s = Attention {
            batch,
            seq,
            channels,
            heads,
        };
        let what = format!("attention {s:?}");
        let qkv = rand(&mut rng, batch * seq * 3 * channels, 1.0);
        let qkv_b = up(b, &qkv);
        let mut out = poisoned(b, batch * seq * channels);
        let mut att = b.attention_state(s, DType::F32).unwrap();
        b.attention_forward(&mut out, &mut att, &qkv_b, s).unwrap();
        let (want_out, want_att) = oracle::attention(&f64s(&qkv), s);
        check(b, &format!("{what} out"), &out, &want_out);
        if keeps_probabilities(b, &att, s) {
            check(b, &format!("{what} att"), &att, &want_att);
        }

        let dout = rand(&mut rng, batch * seq * channels, 1.0);
        let mut dqkv = poisoned(b, qkv.len());
        b.attention_backward(&mut dqkv, &up(b, &dout), &qkv_b, &out, &att, s)
            .unwrap();
        check(
            b,
            &format!("{what} dqkv"),
            &dqkv,
            &oracle::attention_backward(&f64s(&dout), &f64s(&qkv), s),
        );
    }
}

/// Decoding ops: the embedding of positions after a cache, and attention of new tokens against
/// the cached keys and values of earlier ones, which must give the whole sequence's rows. The
/// sequence goes in as a prefix and the rest, or one token at a time; the cache is poisoned,
/// so reading a position never written fails.
pub fn check_decode<B: Backend>(b: &B) {
    let mut rng = Rng::new(8);
    for (batch, seq, c, vocab, start) in [(2, 1, 13, 131, 8), (1, 4, 20, 7, 11), (3, 5, 64, 5, 0)] {
        let what = format!("embedding b{batch} t{seq} c{c} from position {start}");
        let tokens = rand_tokens(&mut rng, batch * seq, vocab);
        let positions = start + seq + 2;
        let (wte, wpe) = (
            rand(&mut rng, vocab * c, 1.0),
            rand(&mut rng, positions * c, 1.0),
        );
        let mut out = poisoned(b, batch * seq * c);
        let (tok, wte_b, wpe_b) = (b.upload_u32(&tokens).unwrap(), up(b, &wte), up(b, &wpe));
        b.embedding_forward_at(&mut out, &tok, &wte_b, &wpe_b, batch, seq, start, c)
            .unwrap();
        let want = oracle::embedding(&tokens, &wte, &wpe[start * c..], seq, c);
        check(b, &what, &out, &want);
        // Positions past the table's end.
        let beyond = positions - seq + 1;
        assert!(b
            .embedding_forward_at(&mut out, &tok, &wte_b, &wpe_b, batch, seq, beyond, c)
            .is_err());
    }

    for (batch, seq, channels, heads, cuts) in [
        (1, 1, 8, 2, vec![1]),
        (2, 9, 12, 3, vec![8, 1]),
        (1, 300, 16, 2, vec![290, 10]),
        (2, 40, 64, 1, vec![13, 27]),
        (1, 6, 48, 4, vec![1; 6]),
    ] {
        let whole = Attention {
            batch,
            seq,
            channels,
            heads,
        };
        let qkv = rand(&mut rng, batch * seq * 3 * channels, 1.0);
        let (want, _) = oracle::attention(&f64s(&qkv), whole);
        let capacity = seq + 3;
        let mut cache = poisoned(b, batch * capacity * 2 * channels);
        let mut past = 0;
        for new in cuts {
            let shape = CachedAttention {
                batch,
                new,
                past,
                capacity,
                channels,
                heads,
            };
            let what = format!("cached attention {shape:?}");
            // The new tokens of every sequence, and the whole sequences' rows for them.
            let rows = |x: &[f32], width: usize| -> Vec<f32> {
                (0..batch)
                    .flat_map(|s| {
                        x[(s * seq + past) * width..(s * seq + past + new) * width].to_vec()
                    })
                    .collect()
            };
            let part = rows(&qkv, 3 * channels);
            let want_part: Vec<f64> = (0..batch)
                .flat_map(|s| {
                    want[(s * seq + past) * channels..(s * seq + past + new) * channels].to_vec()
                })
                .collect();
            let mut out = poisoned(b, batch * new * channels);
            b.attention_decode(&mut out, &mut cache, &up(b, &part), shape)
                .unwrap();
            check(b, &what, &out, &want_part);
            past += new;
        }
        let full = CachedAttention {
            batch,
            new: 4,
            past: seq,
            capacity,
            channels,
            heads,
        };
        let mut out = poisoned(b, batch * 4 * channels);
        let qkv4 = up(b, &rand(&mut rng, batch * 4 * 3 * channels, 1.0));
        let err = b
            .attention_decode(&mut out, &mut cache, &qkv4, full)
            .unwrap_err();
        assert!(format!("{err:#}").contains("exceed"), "{err:#}");
    }
}

/// Whether an attention state holds the `[batch, heads, seq, seq]` probabilities (the default
/// of `Backend::attention_state`), which the tests then check too. At one token a state of one
/// log-sum-exp per row has the same length, so the length tells only for longer sequences.
fn keeps_probabilities<B: Backend>(b: &B, att: &B::Buffer, s: Attention) -> bool {
    s.seq > 1 && b.len(att) == s.batch * s.heads * s.seq * s.seq
}

/// Cross-entropy losses and logits gradient, including a row offset by +80 (stable log-sum-exp).
pub fn check_cross_entropy<B: Backend>(b: &B) {
    let mut rng = Rng::new(8);
    for (rows, vocab) in [(1, 1), (1, 2), (3, 131), (5, 257), (2, 1031), (3, 50257)] {
        let what = format!("cross_entropy {rows}x{vocab}");
        let mut logits = rand(&mut rng, rows * vocab, 4.0);
        for x in &mut logits[(rows - 1) * vocab..] {
            *x += 80.0;
        }
        let targets = rand_tokens(&mut rng, rows, vocab);
        let (lb, tb) = (up(b, &logits), b.upload_u32(&targets).unwrap());
        let mut losses = poisoned(b, rows);
        b.cross_entropy_forward(&mut losses, &lb, &tb, rows, vocab)
            .unwrap();
        let rows_of = || logits.chunks(vocab).zip(&targets);
        let want: Vec<f64> = rows_of()
            .map(|(r, &t)| oracle::cross_entropy_row(r, t))
            .collect();
        check(b, &what, &losses, &want);
        let scale = 0.37;
        let mut dlogits = poisoned(b, rows * vocab);
        b.cross_entropy_backward(&mut dlogits, &lb, &tb, scale, rows, vocab)
            .unwrap();
        let want: Vec<f64> = rows_of()
            .flat_map(|(r, &t)| oracle::cross_entropy_grad_row(r, t, scale as f64))
            .collect();
        check(b, &format!("{what} dlogits"), &dlogits, &want);
    }
}

/// AdamW against PyTorch's formulation, at the first step and later ones, with and without
/// decay, and from a scaled gradient (clipping).
pub fn check_adamw<B: Backend>(b: &B) {
    let mut rng = Rng::new(9);
    for (len, step, wd, scale) in [
        (1, 1, 0.0, 1.0f32),
        (1000, 5, 0.1, 0.3),
        (4099, 1000, 0.1, 1.0),
    ] {
        let (p, g, m) = (
            rand(&mut rng, len, 1.0),
            rand(&mut rng, len, 1.0),
            rand(&mut rng, len, 0.1),
        );
        let v: Vec<f32> = rand(&mut rng, len, 0.1).iter().map(|x| x * x).collect();
        let hp = AdamW {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: wd,
            step,
            grad_scale: scale,
        };
        let (mut pb, mut mb, mut vb) = (up(b, &p), up(b, &m), up(b, &v));
        b.adamw(&mut pb, &up(b, &g), &mut mb, &mut vb, hp).unwrap();
        // The kernels scale in f32, as this does.
        let scaled: Vec<f32> = g.iter().map(|x| x * scale).collect();
        let (wp, wm, wv) = oracle::adamw(
            &p,
            &scaled,
            &m,
            &v,
            3e-3,
            (0.9, 0.95),
            1e-8,
            wd as f64,
            step as i32,
        );
        let what = format!("adamw len {len} step {step} scale {scale}");
        check(b, &format!("{what} param"), &pb, &wp);
        check(b, &format!("{what} m"), &mb, &wm);
        check(b, &format!("{what} v"), &vb, &wv);
    }
}

/// Sums of squares (clipping's norm) into their slots, the other slots untouched, the same
/// bits when repeated; a slot past the end is an error.
pub fn check_sum_squares<B: Backend>(b: &B) {
    let mut rng = Rng::new(11);
    for len in [1, 1000, 70_001] {
        let x = rand(&mut rng, len, 2.0);
        let mut out = up(b, &[7.0, 7.0, 7.0]);
        b.sum_squares(&mut out, 1, &up(b, &x)).unwrap();
        let got = b.download(&out).unwrap();
        let want: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        assert_eq!((got[0], got[2]), (7.0, 7.0), "len {len}: other slots");
        let rel = (f64::from(got[1]) - want).abs() / want;
        assert!(rel < 1e-5, "len {len}: {} vs {want}", got[1]);
        b.sum_squares(&mut out, 2, &up(b, &x)).unwrap();
        assert_eq!(b.download(&out).unwrap()[2], got[1], "len {len}: repeated");
    }
    let mut out = up(b, &[0.0]);
    assert!(b.sum_squares(&mut out, 1, &up(b, &[1.0])).is_err());
}

/// Sizes that do not match the buffers are errors, never panics.
pub fn check_size_errors<B: Backend>(b: &B) {
    let (x6, x7) = (
        b.alloc(6, DType::F32).unwrap(),
        b.alloc(7, DType::F32).unwrap(),
    );
    let mut out = b.alloc(6, DType::F32).unwrap();
    assert!(
        b.matmul(&mut out, &x7, &x6, None, Matmul::new(2, 3, 3))
            .is_err(),
        "matmul with a too long a"
    );
    assert!(
        b.add(&mut out, &x6, &x7).is_err(),
        "add of different lengths"
    );
    assert!(b.copy(&mut out, &x7).is_err(), "copy of different lengths");
    let (mut mean, mut rstd) = (
        b.alloc(2, DType::F32).unwrap(),
        b.alloc(2, DType::F32).unwrap(),
    );
    let w = b.alloc(3, DType::F32).unwrap();
    assert!(
        b.layernorm_forward(&mut out, &mut mean, &mut rstd, &x6, &w, &w, 3, 3)
            .is_err(),
        "layernorm rows"
    );
    let s = Attention {
        batch: 1,
        seq: 1,
        channels: 2,
        heads: 3,
    };
    let mut att = b.alloc(3, DType::F32).unwrap();
    assert!(
        b.attention_forward(&mut out, &mut att, &x6, s).is_err(),
        "channels not divisible by heads"
    );
}

/// The head at a vocabulary of 32771 over 1030 rows: logits and their gradient (135 MB each)
/// exceed a 128 MiB storage binding, so a backend must split them. Checked on sampled rows;
/// every element must be written.
pub fn check_large_logits<B: Backend>(b: &B) {
    let (rows, vocab, c) = (1030usize, 32771usize, 4usize);
    assert!(rows * vocab * 4 > 128 << 20);
    let mut rng = Rng::new(10);
    let (x, wte) = (
        rand(&mut rng, rows * c, 1.0),
        rand(&mut rng, vocab * c, 1.0),
    );
    let targets = rand_tokens(&mut rng, rows, vocab);
    let (xb, wb, tb) = (up(b, &x), up(b, &wte), b.upload_u32(&targets).unwrap());
    let mut sample: Vec<usize> = (0..24).map(|_| rng.below(rows as u64) as usize).collect();
    sample.push(rows - 1);

    let s = Matmul::new(rows, vocab, c).trans_b();
    let mut logits = poisoned(b, rows * vocab);
    b.matmul(&mut logits, &xb, &wb, None, s).unwrap();
    let got = b.download(&logits).unwrap();
    assert!(got.iter().all(|v| v.is_finite()), "every logit written");
    for &r in &sample {
        assert_close(
            &format!("large logits row {r}"),
            &got[r * vocab..][..vocab],
            &oracle::matmul_row(&x, &wte, s, r),
            TOL,
        );
    }

    let mut losses = poisoned(b, rows);
    b.cross_entropy_forward(&mut losses, &logits, &tb, rows, vocab)
        .unwrap();
    let want: Vec<f64> = got
        .chunks(vocab)
        .zip(&targets)
        .map(|(r, &t)| oracle::cross_entropy_row(r, t))
        .collect();
    check(b, "large cross-entropy", &losses, &want);
    let scale = 1.0 / rows as f32;
    let mut dlogits = poisoned(b, rows * vocab);
    b.cross_entropy_backward(&mut dlogits, &logits, &tb, scale, rows, vocab)
        .unwrap();
    drop(logits);
    let dl = b.download(&dlogits).unwrap();
    assert!(
        dl.iter().all(|v| v.is_finite()),
        "every logit gradient written"
    );
    for &r in &sample {
        let want =
            oracle::cross_entropy_grad_row(&got[r * vocab..][..vocab], targets[r], scale as f64);
        assert_close(
            &format!("large dlogits row {r}"),
            &dl[r * vocab..][..vocab],
            &want,
            TOL,
        );
    }
    drop(got);

    // The two products of the head's backward, reading the large gradient.
    let sd = Matmul::new(vocab, c, rows).trans_a();
    let mut dwte = poisoned(b, vocab * c);
    b.matmul(&mut dwte, &dlogits, &xb, None, sd).unwrap();
    let got = b.download(&dwte).unwrap();
    let sx = Matmul::new(rows, c, vocab);
    let mut dx = poisoned(b, rows * c);
    b.matmul(&mut dx, &dlogits, &wb, None, sx).unwrap();
    let got_dx = b.download(&dx).unwrap();
    assert!(
        got.iter().chain(&got_dx).all(|v| v.is_finite()),
        "every gradient written"
    );
    let mut vocab_sample: Vec<usize> = (0..24).map(|_| rng.below(vocab as u64) as usize).collect();
    vocab_sample.push(vocab - 1);
    // Rows of tokens that are no target are tiny: judge the sampled rows together, with a
    // target's row among them to set the scale.
    vocab_sample.push(targets[0] as usize);
    let mut got_rows = Vec::new();
    let mut want_rows = Vec::new();
    for &v in &vocab_sample {
        got_rows.extend_from_slice(&got[v * c..][..c]);
        want_rows.extend(oracle::matmul_row(&dl, &x, sd, v));
    }
    assert_close("large dwte (sampled rows)", &got_rows, &want_rows, TOL);
    for &r in &sample {
        assert_close(
            &format!("large dx row {r}"),
            &got_dx[r * c..][..c],
            &oracle::matmul_row(&dl, &wte, sx, r),
            TOL,
        );
    }
}

/// A tiny GPT-2 configuration with awkward sizes: vocabulary 131, 3 heads of 16, 19 tokens.
pub fn tiny_gpt2() -> ModelConfig {
    ModelConfig {
        vocab_size: 131,
        n_positions: 40,
        n_embd: 48,
        n_layer: 2,
        n_head: 3,
        ..ModelConfig::default()
    }
}

/// GPT-2's initialisation, with every tensor nudged so biases and layernorm parameters are
/// not trivially zero or one.
pub fn tiny_gpt2_params(cfg: &ModelConfig, seed: u64) -> HostTensors {
    let mut host = init_parameters(cfg, seed).unwrap();
    let mut rng = Rng::new(seed ^ 0x5eed);
    let names: Vec<String> = host.names().map(str::to_string).collect();
    for name in names {
        for x in &mut host.get_mut(&name).unwrap().data {
            *x += (rng.normal() * 0.05) as f32;
        }
    }
    host
}

/// Mean loss and every parameter gradient of one forward + backward over the whole model.
pub fn gpt2_loss_and_grads<B: Backend>(
    b: &B,
    cfg: &ModelConfig,
    host: &HostTensors,
    tokens: &[u32],
    targets: &[u32],
    seq: usize,
    dtype: DType,
) -> (f64, HostTensors) {
    let batch = tokens.len() / seq;
    let mut model = StageModel::new(b, cfg, 0..cfg.n_layer + 2, host).unwrap();
    model.set_dtype(b, dtype).unwrap();
    let (tok, tgt) = (
        b.upload_u32(tokens).unwrap(),
        b.upload_u32(targets).unwrap(),
    );
    let (out, saved) = model
        .forward(
            b,
            StageInput::Tokens(&tok),
            Some(&tgt),
            batch,
            seq,
            Keep::All,
        )
        .unwrap();
    let StageOutput::Loss { losses } = out else {
        panic!("a stage ending with the head returns losses when given targets");
    };
    let losses = b.download(&losses).unwrap();
    let loss = losses.iter().map(|&l| l as f64).sum::<f64>() / losses.len() as f64;
    let din = model
        .backward(b, saved, None, 1.0 / losses.len() as f32)
        .unwrap();
    assert!(din.is_none(), "the first stage returns no input gradient");
    (loss, model.download_grads(b).unwrap())
}

/// Relative norm `‖a − b‖ / ‖b‖` of two tensors.
pub fn relative_norm(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let norm: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

/// Largest accepted error of a result stored in bf16 (or computed from bf16 operands).
const BF16_TOL: f64 = 1e-2;

/// `x` rounded to bf16, as the values a bf16 buffer holds.
fn bf16s(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| round_bf16(v)).collect()
}

/// A bf16 buffer holding `x` (rounded).
fn up16<B: Backend>(b: &B, x: &[f32]) -> B::Buffer {
    let mut buf = b.alloc(x.len(), DType::BF16).unwrap();
    b.write(&mut buf, x).unwrap();
    buf
}

/// A bf16 buffer full of NaN.
fn poisoned16<B: Backend>(b: &B, len: usize) -> B::Buffer {
    let mut buf = b.alloc(len, DType::BF16).unwrap();
    b.fill(&mut buf, f32::NAN).unwrap();
    buf
}

fn check16<B: Backend>(b: &B, what: &str, buf: &B::Buffer, want: &[f64]) {
    assert_eq!(b.dtype(buf), DType::BF16, "{what}: dtype");
    assert_close(what, &b.download(buf).unwrap(), want, BF16_TOL);
}

/// True when `b` has bf16; otherwise says the bf16 checks are skipped.
fn has_bf16<B: Backend>(b: &B) -> bool {
    let yes = b.supports(DType::BF16);
    if !yes {
        eprintln!("skipped: {} has no bf16", b.describe());
        assert!(
            b.alloc(1, DType::BF16).is_err(),
            "a backend without bf16 refuses bf16 buffers"
        );
    }
    yes
}

/// bf16 buffers: two bytes an element, conversions from and to f32 round to nearest even
/// (exactly as `round_bf16`), write and fill round, and `add` takes a bf16 addend.
pub fn check_bf16_buffers<B: Backend>(b: &B) {
    if !has_bf16(b) {
        return;
    }
    let mut rng = Rng::new(21);
    for len in [1, 3, 257, 65_537] {
        let mut x = rand(&mut rng, len, 3.0);
        // A tie (exactly half-way between two bf16 values) must round to even.
        x[0] = f32::from_bits(0x3f80_8000);
        let want = bf16s(&x);
        assert_eq!(want[0], 1.0, "the tie rounds to the even neighbour");
        let mut h = b.alloc(len, DType::BF16).unwrap();
        assert_eq!(b.dtype(&h), DType::BF16);
        assert_eq!(b.bytes(&h), 2 * len as u64);
        b.copy(&mut h, &up(b, &x)).unwrap();
        assert_eq!(b.download(&h).unwrap(), want, "f32 -> bf16 copy, len {len}");
        let mut f = poisoned(b, len);
        b.copy(&mut f, &h).unwrap();
        assert_eq!(b.download(&f).unwrap(), want, "bf16 -> f32 copy, len {len}");
        assert_eq!(b.download(&up16(b, &x)).unwrap(), want, "write rounds");
        b.fill(&mut h, 1.0 / 3.0).unwrap();
        assert!(b
            .download(&h)
            .unwrap()
            .iter()
            .all(|&v| v == round_bf16(1.0 / 3.0)));

        let a = rand(&mut rng, len, 2.0);
        let mut out = poisoned(b, len);
        b.add(&mut out, &up(b, &a), &up16(b, &x)).unwrap();
        let sum: Vec<f64> = a
            .iter()
            .zip(&want)
            .map(|(&p, &q)| p as f64 + q as f64)
            .collect();
        check(b, &format!("add f32 + bf16, len {len}"), &out, &sum);
    }
}

/// bf16 matmuls in every layout: bf16 operands into a bf16 output (with an f32 bias), and into
/// an f32 output that accumulates (weight gradients).
pub fn check_bf16_matmul<B: Backend>(b: &B) {
    if !has_bf16(b) {
        return;
    }
    let mut rng = Rng::new(22);
    for &(m, n, k) in &[
        (1, 1, 1),
        (3, 5, 7),
        (17, 33, 65),
        (130, 3, 300),
        (64, 96, 64),
    ] {
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut s = Matmul::new(m, n, k);
            s.trans_a = trans_a;
            s.trans_b = trans_b;
            let (a, bm) = (
                bf16s(&rand(&mut rng, m * k, 1.0)),
                bf16s(&rand(&mut rng, k * n, 1.0)),
            );
            let (ab, bb) = (up16(b, &a), up16(b, &bm));
            let bias = rand(&mut rng, n, 1.0);
            let mut out = poisoned16(b, m * n);
            b.matmul(&mut out, &ab, &bb, Some(&up(b, &bias)), s)
                .unwrap();
            let want = oracle::matmul(&a, &bm, Some(&bias), None, s);
            check16(b, &format!("bf16 matmul {s:?} into bf16"), &out, &want);

            let acc = s.accumulate();
            let init = rand(&mut rng, m * n, 1.0);
            let mut out = up(b, &init);
            b.matmul(&mut out, &ab, &bb, None, acc).unwrap();
            let want = oracle::matmul(&a, &bm, None, Some(&init), acc);
            assert_close(
                &format!("bf16 matmul {acc:?} into f32"),
                &b.download(&out).unwrap(),
                &want,
                BF16_TOL,
            );
        }
    }
}

/// Layernorm, GELU, attention, cross-entropy and bias gradients with bf16 activations.
pub fn check_bf16_layers<B: Backend>(b: &B) {
    if !has_bf16(b) {
        return;
    }
    let mut rng = Rng::new(23);
    let (rows, c) = (33, 257);
    let inp: Vec<f32> = rand(&mut rng, rows * c, 1.0)
        .iter()
        .map(|x| x + 3.0)
        .collect();
    let (w, bias) = (rand(&mut rng, c, 1.5), rand(&mut rng, c, 1.0));
    let (inp_b, w_b) = (up(b, &inp), up(b, &w));
    let (mut out, mut mean, mut rstd) = (
        poisoned16(b, rows * c),
        poisoned(b, rows),
        poisoned(b, rows),
    );
    b.layernorm_forward(
        &mut out,
        &mut mean,
        &mut rstd,
        &inp_b,
        &w_b,
        &up(b, &bias),
        rows,
        c,
    )
    .unwrap();
    let (want, want_mean, want_rstd) = oracle::layernorm(&f64s(&inp), &f64s(&w), &f64s(&bias), c);
    check16(b, "bf16 layernorm out", &out, &want);
    check(b, "bf16 layernorm mean", &mean, &want_mean);
    check(b, "bf16 layernorm rstd", &rstd, &want_rstd);
    let dout = bf16s(&rand(&mut rng, rows * c, 1.0));
    let (mut dinp, mut dw, mut db) = (
        poisoned(b, rows * c),
        up(b, &vec![0.0; c]),
        up(b, &vec![0.0; c]),
    );
    b.layernorm_backward(
        &mut dinp,
        &mut dw,
        &mut db,
        &up16(b, &dout),
        &inp_b,
        &w_b,
        &mean,
        &rstd,
        rows,
        c,
    )
    .unwrap();
    let (want_dinp, want_dw, want_db) =
        oracle::layernorm_backward(&f64s(&dout), &f64s(&inp), &f64s(&w), c);
    for (what, buf, want) in [
        ("dinp", &dinp, &want_dinp),
        ("dweight", &dw, &want_dw),
        ("dbias", &db, &want_db),
    ] {
        let got = b.download(buf).unwrap();
        assert_close(&format!("bf16 layernorm {what}"), &got, want, BF16_TOL);
    }

    let mut dbias = up(b, &vec![0.0; c]);
    b.bias_backward(&mut dbias, &up16(b, &dout), rows, c)
        .unwrap();
    let want = oracle::bias_backward(&vec![0.0; c], &dout, c);
    assert_close(
        "bf16 bias_backward",
        &b.download(&dbias).unwrap(),
        &want,
        BF16_TOL,
    );

    let len = 70_001;
    let (x, g) = (
        bf16s(&rand(&mut rng, len, 6.0)),
        bf16s(&rand(&mut rng, len, 1.0)),
    );
    let xb = up16(b, &x);
    let mut out = poisoned16(b, len);
    b.gelu_forward(&mut out, &xb).unwrap();
    let want: Vec<f64> = x.iter().map(|&v| oracle::gelu(v as f64)).collect();
    check16(b, "bf16 gelu", &out, &want);
    let mut dinp = poisoned16(b, len);
    b.gelu_backward(&mut dinp, &xb, &up16(b, &g)).unwrap();
    let want: Vec<f64> = x
        .iter()
        .zip(&g)
        .map(|(&v, &d)| oracle::gelu_grad(v as f64) * d as f64)
        .collect();
    check16(b, "bf16 gelu backward", &dinp, &want);

    // Head sizes 4, 8, then 16, 32, 64 and 128, which a backend may run on tensor cores.
    for (batch, seq, channels, heads) in [
        (2, 5, 12, 3),
        (1, 300, 16, 2),
        (2, 70, 32, 2),
        (1, 130, 64, 2),
        (3, 33, 64, 1),
        (1, 67, 128, 1),
    ] {
        let s = Attention {
            batch,
            seq,
            channels,
            heads,
        };
        let qkv = bf16s(&rand(&mut rng, batch * seq * 3 * channels, 1.0));
        let qkv_b = up16(b, &qkv);
        let mut out = poisoned16(b, batch * seq * channels);
        let mut att = b.attention_state(s, DType::BF16).unwrap();
        b.attention_forward(&mut out, &mut att, &qkv_b, s).unwrap();
        let (want_out, want_att) = oracle::attention(&f64s(&qkv), s);
        check16(b, &format!("bf16 attention {s:?} out"), &out, &want_out);
        if keeps_probabilities(b, &att, s) {
            check16(b, &format!("bf16 attention {s:?} att"), &att, &want_att);
        }
        let dout = bf16s(&rand(&mut rng, batch * seq * channels, 1.0));
        let mut dqkv = poisoned16(b, qkv.len());
        b.attention_backward(&mut dqkv, &up16(b, &dout), &qkv_b, &out, &att, s)
            .unwrap();
        let want = oracle::attention_backward(&f64s(&dout), &f64s(&qkv), s);
        check16(b, &format!("bf16 attention {s:?} dqkv"), &dqkv, &want);
    }

    for (rows, vocab) in [(3, 131), (2, 1031), (3, 50257)] {
        let logits = bf16s(&rand(&mut rng, rows * vocab, 4.0));
        let targets = rand_tokens(&mut rng, rows, vocab);
        let (lb, tb) = (up16(b, &logits), b.upload_u32(&targets).unwrap());
        let mut losses = poisoned(b, rows);
        b.cross_entropy_forward(&mut losses, &lb, &tb, rows, vocab)
            .unwrap();
        let rows_of = || logits.chunks(vocab).zip(&targets);
        let want: Vec<f64> = rows_of()
            .map(|(r, &t)| oracle::cross_entropy_row(r, t))
            .collect();
        check(
            b,
            &format!("bf16 cross_entropy {rows}x{vocab}"),
            &losses,
            &want,
        );
        let mut dlogits = poisoned16(b, rows * vocab);
        b.cross_entropy_backward(&mut dlogits, &lb, &tb, 0.37, rows, vocab)
            .unwrap();
        let want: Vec<f64> = rows_of()
            .flat_map(|(r, &t)| oracle::cross_entropy_grad_row(r, t, 0.37))
            .collect();
        check16(
            b,
            &format!("bf16 cross_entropy {rows}x{vocab} dlogits"),
            &dlogits,
            &want,
        );
    }
}

/// A whole tiny GPT-2 in bf16 mixed precision on `b` against the f32 reference: loss within
/// 1e-2 relative, every parameter gradient within 5e-2 relative norm.
pub fn check_gpt2_bf16_matches_reference<B: Backend>(b: &B) {
    if !has_bf16(b) {
        return;
    }
    let cfg = tiny_gpt2();
    let host = tiny_gpt2_params(&cfg, 11);
    let mut rng = Rng::new(12);
    let seq = 19;
    let tokens = rand_tokens(&mut rng, 2 * seq, cfg.vocab_size);
    let targets = rand_tokens(&mut rng, 2 * seq, cfg.vocab_size);
    let run = |dtype| gpt2_loss_and_grads(b, &cfg, &host, &tokens, &targets, seq, dtype);
    let (loss, grads) = run(DType::BF16);
    let reference = ReferenceBackend::new();
    let (ref_loss, ref_grads) =
        gpt2_loss_and_grads(&reference, &cfg, &host, &tokens, &targets, seq, DType::F32);
    assert!(
        ((loss - ref_loss) / ref_loss).abs() <= BF16_TOL,
        "bf16 loss {loss} vs f32 reference {ref_loss}"
    );
    for (name, want) in ref_grads.iter() {
        let got = grads
            .get(name)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let err = relative_norm(&got.data, &want.data);
        assert!(
            err <= 5e-2,
            "bf16 gradient of {name}: relative norm error {err:.3e}"
        );
    }
}

/// A whole tiny GPT-2 forward + backward on `b` agrees with the reference backend: loss within
/// 1e-5 relative, every parameter gradient within 1e-3 relative norm.
pub fn check_gpt2_matches_reference<B: Backend>(b: &B) {
    let cfg = tiny_gpt2();
    let host = tiny_gpt2_params(&cfg, 11);
    let mut rng = Rng::new(12);
    let seq = 19;
    let tokens = rand_tokens(&mut rng, 2 * seq, cfg.vocab_size);
    let targets = rand_tokens(&mut rng, 2 * seq, cfg.vocab_size);
    let (loss, grads) = gpt2_loss_and_grads(b, &cfg, &host, &tokens, &targets, seq, DType::F32);
    let (ref_loss, ref_grads) = gpt2_loss_and_grads(
        &ReferenceBackend::new(),
        &cfg,
        &host,
        &tokens,
        &targets,
        seq,
        DType::F32,
    );
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    assert!(
        ((loss - ref_loss) / ref_loss).abs() <= 1e-5,
        "loss {loss} vs reference {ref_loss}"
    );
    assert_eq!(grads.len(), ref_grads.len());
    for (name, want) in ref_grads.iter() {
        let got = grads
            .get(name)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(got.shape, want.shape, "{name}");
        assert!(
            got.data.iter().all(|x| x.is_finite()),
            "{name} has non-finite gradients"
        );
        let err = relative_norm(&got.data, &want.data);
        assert!(
            err <= 1e-3,
            "gradient of {name}: relative norm error {err:.3e}"
        );
    }
}

/// Instantiate the whole suite for one backend: `conformance!(module_name, constructor)`,
/// where `constructor` is a function or closure taking nothing and returning the backend, or
/// `conformance!(module_name, optional constructor)` with a constructor returning `None` where
/// the backend is not available (each test then passes without checking anything).
macro_rules! conformance {
    ($name:ident, optional $make:expr) => {
        mod $name {
            use super::*;

            #[allow(clippy::redundant_closure_call)]
            fn backend() -> Option<impl Backend> {
                ($make)()
            }

            #[test]
            fn buffers() {
                if let Some(b) = backend() {
                    check_buffers(&b);
                }
            }
            #[test]
            fn memory() {
                if let Some(b) = backend() {
                    check_memory(&b);
                }
            }
            #[test]
            fn matmul() {
                if let Some(b) = backend() {
                    check_matmul(&b);
                }
            }
            #[test]
            fn bias_backward() {
                if let Some(b) = backend() {
                    check_bias_backward(&b);
                }
            }
            #[test]
            fn embedding() {
                if let Some(b) = backend() {
                    check_embedding(&b);
                }
            }
            #[test]
            fn layernorm() {
                if let Some(b) = backend() {
                    check_layernorm(&b);
                }
            }
            #[test]
            fn gelu() {
                if let Some(b) = backend() {
                    check_gelu(&b);
                }
            }
            #[test]
            fn attention() {
                if let Some(b) = backend() {
                    check_attention(&b);
                }
            }
            #[test]
            fn decode() {
                if let Some(b) = backend() {
                    check_decode(&b);
                }
            }
            #[test]
            fn cross_entropy() {
                if let Some(b) = backend() {
                    check_cross_entropy(&b);
                }
            }
            #[test]
            fn adamw() {
                if let Some(b) = backend() {
                    check_adamw(&b);
                }
            }
            #[test]
            fn sum_squares() {
                if let Some(b) = backend() {
                    check_sum_squares(&b);
                }
            }
            #[test]
            fn size_errors() {
                if let Some(b) = backend() {
                    check_size_errors(&b);
                }
            }
            #[test]
            fn large_logits() {
                if let Some(b) = backend() {
                    check_large_logits(&b);
                }
            }
            #[test]
            fn gpt2_matches_reference() {
                if let Some(b) = backend() {
                    check_gpt2_matches_reference(&b);
                }
            }
            #[test]
            fn bf16_buffers() {
                if let Some(b) = backend() {
                    check_bf16_buffers(&b);
                }
            }
            #[test]
            fn bf16_matmul() {
                if let Some(b) = backend() {
                    check_bf16_matmul(&b);
                }
            }
            #[test]
            fn bf16_layers() {
                if let Some(b) = backend() {
                    check_bf16_layers(&b);
                }
            }
            #[test]
            fn gpt2_bf16_matches_reference() {
                if let Some(b) = backend() {
                    check_gpt2_bf16_matches_reference(&b);
                }
            }
        }
    };
    ($name:ident, $make:expr) => {
        conformance!($name, optional || Some(($make)()));
    };
}

conformance!(reference, ReferenceBackend::new);
conformance!(cpu, pipit_cpu::CpuBackend::new);
conformance!(wgpu, || pipit_wgpu::WgpuBackend::new()
    .expect("a wgpu adapter"));
conformance!(cuda, optional cuda_backend);

/// The CUDA backend on device 0, or `None` with the reason on stderr where CUDA is not usable
/// (no driver, toolkit or GPU). With `PIPIT_REQUIRE_CUDA` set (as on GPU machines) that is a
/// failure instead; and where CUDA is usable, a backend that does not open is one too.
fn cuda_backend() -> Option<pipit_cuda::CudaBackend> {
    if let Err(why) = pipit_cuda::probe() {
        assert!(
            std::env::var_os("PIPIT_REQUIRE_CUDA").is_none(),
            "PIPIT_REQUIRE_CUDA is set, but CUDA is not usable: {why}"
        );
        eprintln!("skipped: CUDA is not usable here: {why}");
        return None;
    }
    Some(pipit_cuda::CudaBackend::new(0).expect("CUDA is usable, so its backend opens"))
}

/// Central differences of a scalar `loss` at coordinates `at` of `x`, against `grad`:
/// `max |fd − grad| ≤ tol · max |grad|` over those coordinates.
#[allow(clippy::too_many_arguments)]
fn finite_differences<T: Copy + Into<f64>>(
    what: &str,
    x: &[T],
    grad: &[f64],
    at: &[usize],
    h: f64,
    tol: f64,
    perturb: impl Fn(T, f64) -> T,
    mut loss: impl FnMut(&[T]) -> f64,
) {
    let scale = at.iter().map(|&i| grad[i].abs()).fold(1e-6, f64::max);
    for &i in at {
        let (mut plus, mut minus) = (x.to_vec(), x.to_vec());
        plus[i] = perturb(x[i], h);
        minus[i] = perturb(x[i], -h);
        let step = plus[i].into() - minus[i].into();
        let fd = (loss(&plus) - loss(&minus)) / step;
        assert!(
            (fd - grad[i]).abs() <= tol * scale,
            "{what}: coordinate {i}: finite difference {fd:.6e}, gradient {:.6e}",
            grad[i]
        );
    }
}

fn coords(rng: &mut Rng, len: usize, count: usize) -> Vec<usize> {
    (0..count).map(|_| rng.below(len as u64) as usize).collect()
}

fn dot(w: &[f64], y: &[f64]) -> f64 {
    w.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// The oracles' backward passes are the gradients of their forward passes (float64 central
/// differences), so the per-op checks above compare against correct gradients.
#[test]
fn oracle_gradients_match_finite_differences() {
    let mut rng = Rng::new(20);
    let f64_step = |x: f64, h: f64| x + h;
    let (h, tol) = (1e-5, 1e-6);

    let (rows, c) = (3, 11);
    let x: Vec<f64> = f64s(&rand(&mut rng, rows * c, 2.0));
    let (w, bias) = (f64s(&rand(&mut rng, c, 1.5)), f64s(&rand(&mut rng, c, 1.0)));
    let dout = f64s(&rand(&mut rng, rows * c, 1.0));
    let (dinp, dw, db) = oracle::layernorm_backward(&dout, &x, &w, c);
    let at = coords(&mut rng, rows * c, 12);
    let ln = |x: &[f64], w: &[f64], b: &[f64]| dot(&dout, &oracle::layernorm(x, w, b, c).0);
    finite_differences("layernorm dinp", &x, &dinp, &at, h, tol, f64_step, |x| {
        ln(x, &w, &bias)
    });
    let at: Vec<usize> = (0..c).collect();
    finite_differences("layernorm dweight", &w, &dw, &at, h, tol, f64_step, |w| {
        ln(&x, w, &bias)
    });
    finite_differences("layernorm dbias", &bias, &db, &at, h, tol, f64_step, |b| {
        ln(&x, &w, b)
    });

    let xs: Vec<f64> = (-40..=40).map(|i| i as f64 * 0.15).collect();
    let grads: Vec<f64> = xs.iter().map(|&x| oracle::gelu_grad(x)).collect();
    let all: Vec<usize> = (0..xs.len()).collect();
    let sum_gelu = |x: &[f64]| x.iter().map(|&v| oracle::gelu(v)).sum::<f64>();
    finite_differences("gelu", &xs, &grads, &all, h, tol, f64_step, sum_gelu);

    let s = Attention {
        batch: 2,
        seq: 5,
        channels: 6,
        heads: 2,
    };
    let qkv = f64s(&rand(&mut rng, 2 * 5 * 18, 1.0));
    let dout = f64s(&rand(&mut rng, 2 * 5 * 6, 1.0));
    let dqkv = oracle::attention_backward(&dout, &qkv, s);
    let at = coords(&mut rng, qkv.len(), 40);
    finite_differences("attention", &qkv, &dqkv, &at, h, tol, f64_step, |q| {
        dot(&dout, &oracle::attention(q, s).0)
    });

    let (rows, vocab) = (2, 9);
    let logits = rand(&mut rng, rows * vocab, 3.0);
    let targets = rand_tokens(&mut rng, rows, vocab);
    let grad: Vec<f64> = logits
        .chunks(vocab)
        .zip(&targets)
        .flat_map(|(r, &t)| oracle::cross_entropy_grad_row(r, t, 1.0))
        .collect();
    let total = |l: &[f64]| -> f64 {
        let l32: Vec<f32> = l.iter().map(|&v| v as f32).collect();
        l32.chunks(vocab)
            .zip(&targets)
            .map(|(r, &t)| oracle::cross_entropy_row(r, t))
            .sum()
    };
    // The cross-entropy oracle reads f32 logits: step by an amount f32 represents exactly.
    let at: Vec<usize> = (0..rows * vocab).collect();
    finite_differences(
        "cross-entropy",
        &f64s(&logits),
        &grad,
        &at,
        1.0 / 1024.0,
        1e-5,
        f64_step,
        total,
    );
}

/// On the given backend, every op's backward is the gradient of its own forward, by f32
/// central differences (step 1e-2; tolerance 1e-2 of the largest checked gradient).
pub fn check_finite_differences<B: Backend>(b: &B) {
    let mut rng = Rng::new(21);
    let f32_step = |x: f32, h: f64| x + h as f32;
    let (h, tol) = (1e-2, 1e-2);
    let weighted = |out: &B::Buffer, w: &[f32]| dot(&f64s(&b.download(out).unwrap()), &f64s(w));

    // Layernorm, through its input.
    let (rows, c) = (4, 37);
    let (x, w, bias) = (
        rand(&mut rng, rows * c, 2.0),
        rand(&mut rng, c, 1.5),
        rand(&mut rng, c, 1.0),
    );
    let dout = rand(&mut rng, rows * c, 1.0);
    let (wb, bb) = (up(b, &w), up(b, &bias));
    let ln = |x: &[f32]| {
        let (mut out, mut mean, mut rstd) =
            (poisoned(b, rows * c), poisoned(b, rows), poisoned(b, rows));
        b.layernorm_forward(&mut out, &mut mean, &mut rstd, &up(b, x), &wb, &bb, rows, c)
            .unwrap();
        (out, mean, rstd)
    };
    let (_, mean, rstd) = ln(&x);
    let (mut dinp, mut dw, mut db) = (
        poisoned(b, rows * c),
        b.alloc(c, DType::F32).unwrap(),
        b.alloc(c, DType::F32).unwrap(),
    );
    b.layernorm_backward(
        &mut dinp,
        &mut dw,
        &mut db,
        &up(b, &dout),
        &up(b, &x),
        &wb,
        &mean,
        &rstd,
        rows,
        c,
    )
    .unwrap();
    let grad = f64s(&b.download(&dinp).unwrap());
    let at = coords(&mut rng, x.len(), 16);
    finite_differences("layernorm", &x, &grad, &at, h, tol, f32_step, |x| {
        weighted(&ln(x).0, &dout)
    });

    // GELU.
    let x = rand(&mut rng, 64, 4.0);
    let dout = rand(&mut rng, 64, 1.0);
    let gelu = |x: &[f32]| {
        let mut out = poisoned(b, x.len());
        b.gelu_forward(&mut out, &up(b, x)).unwrap();
        out
    };
    let mut dinp = poisoned(b, 64);
    b.gelu_backward(&mut dinp, &up(b, &x), &up(b, &dout))
        .unwrap();
    let grad = f64s(&b.download(&dinp).unwrap());
    finite_differences(
        "gelu",
        &x,
        &grad,
        &(0..64).collect::<Vec<_>>(),
        1e-3,
        tol,
        f32_step,
        |x| weighted(&gelu(x), &dout),
    );

    // Attention, through q, k and v.
    let s = Attention {
        batch: 2,
        seq: 7,
        channels: 12,
        heads: 3,
    };
    let qkv = rand(&mut rng, 2 * 7 * 36, 1.0);
    let dout = rand(&mut rng, 2 * 7 * 12, 1.0);
    let attn = |q: &[f32]| {
        let (mut out, mut att) = (
            poisoned(b, 2 * 7 * 12),
            b.attention_state(s, DType::F32).unwrap(),
        );
        b.attention_forward(&mut out, &mut att, &up(b, q), s)
            .unwrap();
        (out, att)
    };
    let (out, att) = attn(&qkv);
    let mut dqkv = poisoned(b, qkv.len());
    b.attention_backward(&mut dqkv, &up(b, &dout), &up(b, &qkv), &out, &att, s)
        .unwrap();
    let grad = f64s(&b.download(&dqkv).unwrap());
    let at = coords(&mut rng, qkv.len(), 24);
    finite_differences("attention", &qkv, &grad, &at, h, tol, f32_step, |q| {
        weighted(&attn(q).0, &dout)
    });

    // Cross-entropy, through the logits.
    let (rows, vocab) = (3, 131);
    let logits = rand(&mut rng, rows * vocab, 3.0);
    let tb = b.upload_u32(&rand_tokens(&mut rng, rows, vocab)).unwrap();
    let ce = |l: &[f32]| {
        let mut losses = poisoned(b, rows);
        b.cross_entropy_forward(&mut losses, &up(b, l), &tb, rows, vocab)
            .unwrap();
        b.download(&losses)
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .sum::<f64>()
    };
    let mut dlogits = poisoned(b, rows * vocab);
    b.cross_entropy_backward(&mut dlogits, &up(b, &logits), &tb, 1.0, rows, vocab)
        .unwrap();
    let grad = f64s(&b.download(&dlogits).unwrap());
    let at = coords(&mut rng, logits.len(), 24);
    finite_differences("cross-entropy", &logits, &grad, &at, h, tol, f32_step, ce);

    // Matmul (the backward products the model uses), through a.
    let (m, n, k) = (5, 7, 9);
    let (a, bm, dout) = (
        rand(&mut rng, m * k, 1.0),
        rand(&mut rng, k * n, 1.0),
        rand(&mut rng, m * n, 1.0),
    );
    let mm = |a: &[f32]| {
        let mut out = poisoned(b, m * n);
        b.matmul(&mut out, &up(b, a), &up(b, &bm), None, Matmul::new(m, n, k))
            .unwrap();
        out
    };
    // dA = dout · Bᵀ, as the model computes input gradients.
    let mut da = poisoned(b, m * k);
    b.matmul(
        &mut da,
        &up(b, &dout),
        &up(b, &bm),
        None,
        Matmul::new(m, k, n).trans_b(),
    )
    .unwrap();
    let grad = f64s(&b.download(&da).unwrap());
    finite_differences(
        "matmul",
        &a,
        &grad,
        &(0..m * k).collect::<Vec<_>>(),
        h,
        tol,
        f32_step,
        |a| weighted(&mm(a), &dout),
    );
}

#[test]
fn reference_gradients_match_finite_differences() {
    check_finite_differences(&ReferenceBackend::new());
}

#[test]
fn cuda_gradients_match_finite_differences() {
    if let Some(b) = cuda_backend() {
        check_finite_differences(&b);
    }
}

/// Token ids outside the vocabulary are errors on the reference backend (a device backend may
/// not be able to check them without a read-back).
#[test]
fn reference_rejects_out_of_range_ids() {
    let b = ReferenceBackend::new();
    let tokens = b.upload_u32(&[0, 5]).unwrap();
    let (wte, wpe) = (
        b.alloc(5 * 2, DType::F32).unwrap(),
        b.alloc(4 * 2, DType::F32).unwrap(),
    );
    let mut out = b.alloc(2 * 2, DType::F32).unwrap();
    let err = b
        .embedding_forward(&mut out, &tokens, &wte, &wpe, 1, 2, 2)
        .unwrap_err();
    assert!(err.to_string().contains("token id 5"), "{err}");
    let mut losses = b.alloc(2, DType::F32).unwrap();
    let logits = b.alloc(2 * 5, DType::F32).unwrap();
    assert!(b
        .cross_entropy_forward(&mut losses, &logits, &tokens, 2, 5)
        .is_err());
}

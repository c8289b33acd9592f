//! The fused ops a family may use beyond GPT-2's (RMSNorm, rotary positions, SwiGLU,
//! grouped-query packing, the token-only embedding), on every backend: forward against float64
//! oracles, backward against central differences of the backend's own forward (or, for the
//! linear ops, as the adjoint of the forward), with outputs poisoned with NaN and gradients
//! that accumulate starting from random values. Then a whole tiny Llama: its gradients against
//! finite differences of its loss on the reference backend, and every backend against the
//! reference.

use pipit_engine::backend::{Backend, DType, Heads, Rope};
use pipit_engine::model::{
    init_parameters, Family, HostTensors, Keep, ModelConfig, StageInput, StageModel, StageOutput,
};
use pipit_engine::rng::Rng;
use pipit_reference::ReferenceBackend;

fn rand(rng: &mut Rng, len: usize, scale: f64) -> Vec<f32> {
    rng.uniform_vec(len, -scale, scale)
}

fn up<B: Backend>(b: &B, x: &[f32]) -> B::Buffer {
    b.upload(x).unwrap()
}

fn poisoned<B: Backend>(b: &B, len: usize) -> B::Buffer {
    b.upload(&vec![f32::NAN; len]).unwrap()
}

fn down<B: Backend>(b: &B, buf: &B::Buffer) -> Vec<f64> {
    b.download(buf)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

/// `max |got − want| ≤ tol · max(max |want|, 1e-12)`, and every element finite.
fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1e-12f64, |m, w| m.max(w.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}: element {i} is {g}");
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}: element {i} is {g}, want {w} (scale {scale})"
        );
    }
}

/// Central differences of `loss` at a few coordinates of `x` against `grad`.
fn finite_differences(
    what: &str,
    x: &[f32],
    grad: &[f64],
    rng: &mut Rng,
    mut loss: impl FnMut(&[f32]) -> f64,
) {
    let h = 1e-2f32;
    let at: Vec<usize> = (0..12)
        .map(|_| rng.below(x.len() as u64) as usize)
        .collect();
    let scale = at.iter().map(|&i| grad[i].abs()).fold(1e-5, f64::max);
    for &i in &at {
        let (mut plus, mut minus) = (x.to_vec(), x.to_vec());
        plus[i] += h;
        minus[i] -= h;
        let fd = (loss(&plus) - loss(&minus)) / f64::from(plus[i] - minus[i]);
        assert!(
            (fd - grad[i]).abs() <= 1e-2 * scale,
            "{what}: coordinate {i}: finite difference {fd:.6e}, gradient {:.6e}",
            grad[i]
        );
    }
}

pub fn check_rmsnorm<B: Backend>(b: &B) {
    let mut rng = Rng::new(31);
    for (rows, c) in [(1, 1), (3, 7), (5, 48), (33, 257)] {
        let what = format!("rmsnorm {rows}x{c}");
        let eps = 1e-5f32;
        let (x, w) = (rand(&mut rng, rows * c, 2.0), rand(&mut rng, c, 1.5));
        let wb = up(b, &w);
        let forward = |x: &[f32]| {
            let (mut out, mut rstd) = (poisoned(b, rows * c), poisoned(b, rows));
            b.rmsnorm_forward(&mut out, &mut rstd, &up(b, x), &wb, rows, c, eps)
                .unwrap();
            (out, rstd)
        };
        let (out, rstd) = forward(&x);
        let mut want = Vec::new();
        let mut want_rstd = Vec::new();
        for row in x.chunks(c) {
            let ms = row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / c as f64;
            let s = 1.0 / (ms + f64::from(eps)).sqrt();
            want_rstd.push(s);
            want.extend(
                row.iter()
                    .zip(&w)
                    .map(|(&v, &w)| f64::from(v) * s * f64::from(w)),
            );
        }
        assert_close(&format!("{what} out"), &down(b, &out), &want, 1e-5);
        assert_close(&format!("{what} rstd"), &down(b, &rstd), &want_rstd, 1e-5);

        let dout = rand(&mut rng, rows * c, 1.0);
        let dw0 = rand(&mut rng, c, 1.0);
        let (mut dx, mut dw) = (poisoned(b, rows * c), up(b, &dw0));
        b.rmsnorm_backward(
            &mut dx,
            &mut dw,
            &up(b, &dout),
            &up(b, &x),
            &wb,
            &rstd,
            rows,
            c,
        )
        .unwrap();
        let loss = |x: &[f32]| dot(&down(b, &forward(x).0), &f64s(&dout));
        finite_differences(&format!("{what} dinp"), &x, &down(b, &dx), &mut rng, loss);
        // dweight[j] = Σ_rows dout · x̂, added to what was there.
        let mut want_dw = f64s(&dw0);
        for (r, row) in x.chunks(c).enumerate() {
            for j in 0..c {
                want_dw[j] += f64::from(dout[r * c + j]) * f64::from(row[j]) * want_rstd[r];
            }
        }
        assert_close(&format!("{what} dweight"), &down(b, &dw), &want_dw, 1e-5);
    }
}

pub fn check_rope<B: Backend>(b: &B) {
    let mut rng = Rng::new(32);
    for (batch, seq, heads, d, start, theta) in [
        (1, 1, 1, 2, 0, 10_000.0),
        (2, 5, 3, 8, 0, 10_000.0),
        (1, 300, 2, 16, 0, 500_000.0),
        (3, 2, 4, 6, 17, 10_000.0),
    ] {
        let what = format!("rope {batch}x{seq}x{heads}x{d} from {start}");
        let n = batch * seq * heads * d;
        let shape = Rope {
            batch,
            seq,
            heads,
            head_dim: d,
            start,
            theta,
            inverse: false,
        };
        let x = rand(&mut rng, n, 1.0);
        let mut y = poisoned(b, n);
        b.rope(&mut y, &up(b, &x), shape).unwrap();
        let half = d / 2;
        let mut want = vec![0.0f64; n];
        for (i, (xs, ws)) in x.chunks(d).zip(want.chunks_mut(d)).enumerate() {
            let pos = (start + (i / heads) % seq) as f64;
            for j in 0..half {
                let angle = pos * f64::from(theta).powf(-((2 * j) as f64) / d as f64);
                let (c, s) = (angle.cos(), angle.sin());
                let (a, bb) = (f64::from(xs[j]), f64::from(xs[j + half]));
                ws[j] = a * c - bb * s;
                ws[j + half] = bb * c + a * s;
            }
        }
        assert_close(&what, &down(b, &y), &want, 1e-4);
        // The inverse undoes it, and is its adjoint (so it is its backward).
        let mut back = poisoned(b, n);
        let inverse = Rope {
            inverse: true,
            ..shape
        };
        b.rope(&mut back, &y, inverse).unwrap();
        assert_close(&format!("{what} inverse"), &down(b, &back), &f64s(&x), 1e-5);
        let g = rand(&mut rng, n, 1.0);
        let mut gt = poisoned(b, n);
        b.rope(&mut gt, &up(b, &g), inverse).unwrap();
        let (lhs, rhs) = (dot(&down(b, &y), &f64s(&g)), dot(&f64s(&x), &down(b, &gt)));
        assert!(
            (lhs - rhs).abs() <= 1e-5 * lhs.abs().max(1.0),
            "{what}: ⟨rope x, g⟩ = {lhs}, ⟨x, rope⁻¹ g⟩ = {rhs}"
        );
    }
}

pub fn check_swiglu<B: Backend>(b: &B) {
    let mut rng = Rng::new(33);
    for len in [1, 7, 1000, 70_001] {
        let (g, u, dy) = (
            rand(&mut rng, len, 6.0),
            rand(&mut rng, len, 2.0),
            rand(&mut rng, len, 1.0),
        );
        let (gb, ub) = (up(b, &g), up(b, &u));
        let mut out = poisoned(b, len);
        b.swiglu_forward(&mut out, &gb, &ub).unwrap();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let want: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| f64::from(g) * sig(f64::from(g)) * f64::from(u))
            .collect();
        assert_close(&format!("swiglu {len}"), &down(b, &out), &want, 1e-5);
        let (mut dg, mut du) = (poisoned(b, len), poisoned(b, len));
        b.swiglu_backward(&mut dg, &mut du, &gb, &ub, &up(b, &dy))
            .unwrap();
        let (mut want_dg, mut want_du) = (Vec::new(), Vec::new());
        for i in 0..len {
            let (x, s) = (f64::from(g[i]), sig(f64::from(g[i])));
            want_dg.push(f64::from(dy[i]) * f64::from(u[i]) * s * (1.0 + x * (1.0 - s)));
            want_du.push(f64::from(dy[i]) * x * s);
        }
        assert_close(
            &format!("swiglu dgate {len}"),
            &down(b, &dg),
            &want_dg,
            1e-5,
        );
        assert_close(&format!("swiglu dup {len}"), &down(b, &du), &want_du, 1e-5);
    }
}

pub fn check_pack_qkv<B: Backend>(b: &B) {
    let mut rng = Rng::new(34);
    for (rows, heads, kv_heads, d) in [(1, 1, 1, 1), (5, 4, 2, 3), (7, 6, 1, 4), (3, 4, 4, 2)] {
        let what = format!("pack {rows} rows, {heads} heads on {kv_heads}, width {d}");
        let shape = Heads {
            rows,
            heads,
            kv_heads,
            head_dim: d,
        };
        let (qw, kw) = (heads * d, kv_heads * d);
        let (q, k, v) = (
            rand(&mut rng, rows * qw, 1.0),
            rand(&mut rng, rows * kw, 1.0),
            rand(&mut rng, rows * kw, 1.0),
        );
        let mut qkv = poisoned(b, rows * 3 * qw);
        b.pack_qkv(&mut qkv, &up(b, &q), &up(b, &k), &up(b, &v), shape)
            .unwrap();
        let group = heads / kv_heads;
        let mut want = Vec::new();
        for r in 0..rows {
            want.extend(f64s(&q[r * qw..(r + 1) * qw]));
            for src in [&k, &v] {
                for h in 0..heads {
                    let at = r * kw + (h / group) * d;
                    want.extend(f64s(&src[at..at + d]));
                }
            }
        }
        assert_close(&what, &down(b, &qkv), &want, 0.0);
        // Unpacking the gradient is the adjoint: ⟨pack(q, k, v), g⟩ = ⟨(q, k, v), unpack(g)⟩.
        let g = rand(&mut rng, rows * 3 * qw, 1.0);
        let (mut dq, mut dk, mut dv) = (
            poisoned(b, rows * qw),
            poisoned(b, rows * kw),
            poisoned(b, rows * kw),
        );
        b.unpack_qkv_grad(&mut dq, &mut dk, &mut dv, &up(b, &g), shape)
            .unwrap();
        let lhs = dot(&want, &f64s(&g));
        let rhs = dot(&f64s(&q), &down(b, &dq))
            + dot(&f64s(&k), &down(b, &dk))
            + dot(&f64s(&v), &down(b, &dv));
        assert!(
            (lhs - rhs).abs() <= 1e-5 * lhs.abs().max(1.0),
            "{what}: ⟨pack, g⟩ = {lhs}, ⟨(q, k, v), unpack g⟩ = {rhs}"
        );
    }
    let bad = Heads {
        rows: 1,
        heads: 4,
        kv_heads: 3,
        head_dim: 2,
    };
    let err = b
        .pack_qkv(
            &mut poisoned(b, 24),
            &poisoned(b, 8),
            &poisoned(b, 6),
            &poisoned(b, 6),
            bad,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("dividing the 4 query heads, got 3"), "{err}");
}

pub fn check_embedding_lookup<B: Backend>(b: &B) {
    let mut rng = Rng::new(35);
    let (vocab, c) = (11, 5);
    let table = rand(&mut rng, vocab * c, 1.0);
    let ids = [3u32, 0, 10, 3, 7, 3];
    let tokens = b.upload_u32(&ids).unwrap();
    let mut out = poisoned(b, ids.len() * c);
    b.embedding_lookup(&mut out, &tokens, &up(b, &table), ids.len(), c)
        .unwrap();
    let want: Vec<f64> = ids
        .iter()
        .flat_map(|&t| f64s(&table[t as usize * c..(t as usize + 1) * c]))
        .collect();
    assert_close("embedding lookup", &down(b, &out), &want, 0.0);
    let dout = rand(&mut rng, ids.len() * c, 1.0);
    let d0 = rand(&mut rng, vocab * c, 1.0);
    let mut dtable = up(b, &d0);
    b.embedding_lookup_backward(&mut dtable, &up(b, &dout), &tokens, ids.len(), c)
        .unwrap();
    let mut want = f64s(&d0);
    for (r, &t) in ids.iter().enumerate() {
        for j in 0..c {
            want[t as usize * c + j] += f64::from(dout[r * c + j]);
        }
    }
    assert_close("embedding lookup backward", &down(b, &dtable), &want, 1e-6);
    let err = b
        .embedding_lookup(&mut poisoned(b, 3 * c), &tokens, &up(b, &table), 3, c)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokens holds 6 elements but the op needs 3"),
        "{err}"
    );
}

/// A tiny Llama: grouped-query attention (4 heads on 2), θ = 500,000, an untied head.
pub fn tiny_llama() -> ModelConfig {
    ModelConfig {
        family: Family::Llama,
        vocab_size: 53,
        n_positions: 24,
        n_embd: 16,
        n_layer: 2,
        n_head: 4,
        n_kv_head: Some(2),
        ffn_dim: Some(24),
        rope_theta: Some(500_000.0),
        ..ModelConfig::default()
    }
}

/// Initial weights with every tensor nudged, so norm weights are not all one.
fn llama_params(cfg: &ModelConfig) -> HostTensors {
    let mut host = init_parameters(cfg, 7).unwrap();
    let mut rng = Rng::new(8);
    let names: Vec<String> = host.names().map(str::to_string).collect();
    for name in names {
        for x in &mut host.get_mut(&name).unwrap().data {
            *x += (rng.normal() * 0.2) as f32;
        }
    }
    host
}

/// Mean loss and every gradient of one forward and backward over the whole model.
fn loss_and_grads<B: Backend>(b: &B, cfg: &ModelConfig, host: &HostTensors) -> (f64, HostTensors) {
    let seq = 9;
    let mut rng = Rng::new(9);
    let ids: Vec<u32> = (0..2 * (seq + 1))
        .map(|_| rng.below(cfg.vocab_size as u64) as u32)
        .collect();
    let (inputs, targets): (Vec<u32>, Vec<u32>) = ids
        .chunks(seq + 1)
        .flat_map(|s| s[..seq].iter().copied().zip(s[1..].iter().copied()))
        .unzip();
    let mut model = StageModel::new(b, cfg, 0..cfg.n_layer + 2, host).unwrap();
    let (tok, tgt) = (
        b.upload_u32(&inputs).unwrap(),
        b.upload_u32(&targets).unwrap(),
    );
    let (out, saved) = model
        .forward(b, StageInput::Tokens(&tok), Some(&tgt), 2, seq, Keep::All)
        .unwrap();
    let StageOutput::Loss { losses } = out else {
        panic!("the head returns losses given targets")
    };
    let losses = b.download(&losses).unwrap();
    let n = losses.len();
    let loss = losses.iter().map(|&l| f64::from(l)).sum::<f64>() / n as f64;
    assert!(model
        .backward(b, saved, None, 1.0 / n as f32)
        .unwrap()
        .is_none());
    (loss, model.download_grads(b).unwrap())
}

/// The whole model's gradients are those of its loss (checked on the f64-summing reference).
#[test]
fn llama_gradients_match_finite_differences() {
    let b = ReferenceBackend::new();
    let cfg = tiny_llama();
    let host = llama_params(&cfg);
    let (_, grads) = loss_and_grads(&b, &cfg, &host);
    assert!(grads.get("lm_head.weight").is_some(), "the head is untied");
    let checked = model_finite_differences(&cfg, 10, |_| true);
    assert_eq!(checked, host.len());
}

/// Finite differences of the whole model's loss against its gradient, for each weight
/// `which` picks; returns how many were checked.
fn model_finite_differences(cfg: &ModelConfig, seed: u64, which: impl Fn(&str) -> bool) -> usize {
    let b = ReferenceBackend::new();
    let host = llama_params(cfg);
    let (_, grads) = loss_and_grads(&b, cfg, &host);
    let mut rng = Rng::new(seed);
    let mut checked = 0;
    for (name, t) in host.iter().filter(|(n, _)| which(n)) {
        let grad = f64s(&grads.get(name).unwrap().data);
        let loss = |x: &[f32]| {
            let mut h = host.clone();
            h.get_mut(name).unwrap().data = x.to_vec();
            loss_and_grads(&b, cfg, &h).0
        };
        finite_differences(name, &t.data, &grad, &mut rng, loss);
        checked += 1;
    }
    checked
}

#[test]
fn qwen2_bias_gradients_match_finite_differences() {
    let cfg = ModelConfig {
        family: Family::Qwen2,
        ..tiny_llama()
    };
    let checked = model_finite_differences(&cfg, 11, |n| n.ends_with("_proj.bias"));
    assert_eq!(checked, 3 * cfg.n_layer, "q, k and v biases in every block");
}

pub fn check_llama_matches_reference<B: Backend>(b: &B) {
    // Qwen2 is Llama with biases on q, k and v.
    for family in [Family::Llama, Family::Qwen2] {
        check_family_matches_reference(b, family);
    }
}

fn check_family_matches_reference<B: Backend>(b: &B, family: Family) {
    let cfg = ModelConfig {
        family,
        ..tiny_llama()
    };
    let host = llama_params(&cfg);
    let (loss, grads) = loss_and_grads(b, &cfg, &host);
    let (want_loss, want) = loss_and_grads(&ReferenceBackend::new(), &cfg, &host);
    assert!(
        ((loss - want_loss) / want_loss).abs() <= 1e-5,
        "loss {loss} vs reference {want_loss}"
    );
    assert_eq!(grads.len(), want.len());
    for (name, w) in want.iter() {
        let g = grads.get(name).unwrap();
        assert_close(name, &f64s(&g.data), &f64s(&w.data), 1e-3);
    }
    // Mixed precision runs the same parts with bf16 activations.
    if b.supports(DType::BF16) {
        let mut model = StageModel::new(b, &cfg, 0..cfg.n_layer + 2, &host).unwrap();
        model.set_dtype(b, DType::BF16).unwrap();
        let tok = b.upload_u32(&[1, 2, 3, 4]).unwrap();
        let (out, _) = model
            .forward(b, StageInput::Tokens(&tok), None, 1, 4, Keep::Nothing)
            .unwrap();
        let StageOutput::Logits(logits) = out else {
            panic!("without targets the head returns logits")
        };
        assert!(b.download(&logits).unwrap().iter().all(|x| x.is_finite()));
    }
}

macro_rules! fused_ops {
    ($name:ident, $make:expr) => {
        mod $name {
            use super::*;

            #[allow(clippy::redundant_closure_call)]
            fn backend() -> Option<impl Backend> {
                ($make)()
            }

            #[test]
            fn rmsnorm() {
                if let Some(b) = backend() {
                    check_rmsnorm(&b);
                }
            }
            #[test]
            fn rope() {
                if let Some(b) = backend() {
                    check_rope(&b);
                }
            }
            #[test]
            fn swiglu() {
                if let Some(b) = backend() {
                    check_swiglu(&b);
                }
            }
            #[test]
            fn pack_qkv() {
                if let Some(b) = backend() {
                    check_pack_qkv(&b);
                }
            }
            #[test]
            fn embedding_lookup() {
                if let Some(b) = backend() {
                    check_embedding_lookup(&b);
                }
            }
            #[test]
            fn llama_matches_reference() {
                if let Some(b) = backend() {
                    check_llama_matches_reference(&b);
                }
            }
        }
    };
}

fused_ops!(reference, || Some(ReferenceBackend::new()));
fused_ops!(cpu, || Some(pipit::cpu::CpuBackend::new()));
fused_ops!(wgpu, || Some(
    pipit_wgpu::WgpuBackend::new().expect("a wgpu adapter (lavapipe in CI)")
));
fused_ops!(cuda, cuda_backend);

/// The CUDA backend on device 0, or `None` with the reason on stderr where CUDA is not usable
/// (a failure instead with `PIPIT_REQUIRE_CUDA` set, as on GPU machines).
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

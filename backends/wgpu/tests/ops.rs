//! Each wgpu op against a float64 host computation, on the device's own binding limit and on
//! a tiny artificial one that forces every op to cut its work into windows.
//!
//! Run with a software device: `XDG_RUNTIME_DIR=/tmp WGPU_ADAPTER_NAME=llvmpipe cargo test -p pipit-wgpu`.

use pipit_engine::backend::{AdamW, Attention, Backend, CachedAttention, DType, Matmul};
use pipit_wgpu::{KernelProfile, Options, WgpuBackend, WgpuMark};

/// Deterministic values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
    fn below(&mut self, n: u32) -> u32 {
        ((self.next() + 1.0) * 0.5 * n as f32).min(n as f32 - 1.0) as u32
    }
}

fn backends() -> Vec<(&'static str, WgpuBackend)> {
    let open = |max_binding_bytes, profile| {
        WgpuBackend::with_options(&Options {
            max_binding_bytes,
            profile,
        })
        .expect("a wgpu adapter")
    };
    vec![
        ("gpu kernels", open(None, Some(KernelProfile::Gpu))),
        ("cpu kernels", open(None, Some(KernelProfile::Cpu))),
        ("16 KiB bindings", open(Some(16384), None)),
    ]
}

/// Max of |got − want| / (1 + |want|) must stay below `tol`; NaN fails.
fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs() / (1.0 + w.abs());
        assert!(err <= tol, "{what}[{i}]: got {g}, want {w}");
    }
}

/// A buffer of `len` NaNs, so an element the op forgets to write shows up.
fn poisoned(b: &WgpuBackend, len: usize) -> pipit_wgpu::WgpuBuffer {
    let mut buf = b.alloc(len, DType::F32).unwrap();
    b.fill(&mut buf, f32::NAN).unwrap();
    buf
}

fn host_matmul(s: Matmul, a: &[f32], bm: &[f32], bias: Option<&[f32]>, out0: &[f32]) -> Vec<f64> {
    let mut out = vec![0f64; s.m * s.n];
    for i in 0..s.m {
        for j in 0..s.n {
            let mut acc = 0f64;
            for p in 0..s.k {
                let av = if s.trans_a {
                    a[p * s.m + i]
                } else {
                    a[i * s.k + p]
                };
                let bv = if s.trans_b {
                    bm[j * s.k + p]
                } else {
                    bm[p * s.n + j]
                };
                acc += av as f64 * bv as f64;
            }
            if let Some(bias) = bias {
                acc += bias[j] as f64;
            }
            if s.accumulate {
                acc += out0[i * s.n + j] as f64;
            }
            out[i * s.n + j] = acc;
        }
    }
    out
}

#[test]
fn describe_names_the_adapter() {
    let b = WgpuBackend::new().unwrap();
    let d = b.describe();
    assert!(d.starts_with("wgpu: "), "{d}");
    assert!(d.contains(&b.adapter_info().name), "{d}");
}

/// Marks are device timestamps where the adapter writes them inside encoders (lavapipe does):
/// the times between marks add up along a chain, more work takes longer, and a mark whose
/// generation was read and closed is refused rather than compared with newer ones.
#[test]
fn marks_time_the_work_between_them() {
    let b = WgpuBackend::new().unwrap();
    let n = 192;
    let x = b.upload(&Rng(3).vec(n * n)).unwrap();
    let mut y = b.upload(&vec![0.0; n * n]).unwrap();
    // Warm up: the first dispatch of a kernel also compiles it on some drivers.
    b.matmul(&mut y, &x, &x, None, Matmul::new(n, n, n))
        .unwrap();
    b.synchronize().unwrap();
    let start = b.mark().unwrap();
    b.matmul(&mut y, &x, &x, None, Matmul::new(n, n, n))
        .unwrap();
    let one = b.mark().unwrap();
    for _ in 0..4 {
        b.matmul(&mut y, &x, &x, None, Matmul::new(n, n, n))
            .unwrap();
    }
    let five = b.mark().unwrap();
    if b.adapter_info().name.contains("llvmpipe") {
        assert!(matches!(start, WgpuMark::Device { .. }), "{start:?}");
    }
    b.synchronize().unwrap();
    let first = b.elapsed_ms(&start, &one).unwrap();
    let rest = b.elapsed_ms(&one, &five).unwrap();
    let all = b.elapsed_ms(&start, &five).unwrap();
    assert!(first > 0.0 && rest > first, "{first} ms then {rest} ms");
    assert!(
        (first + rest - all).abs() <= 1e-9 * all,
        "{first} + {rest} != {all}"
    );
    if let WgpuMark::Device { .. } = start {
        let later = b.mark().unwrap();
        assert!(b.elapsed_ms(&start, &one).is_err());
        b.synchronize().unwrap();
        assert_eq!(b.elapsed_ms(&later, &later).unwrap(), 0.0);
    }
}

#[test]
fn matmul_all_layouts() {
    let mut rng = Rng(1);
    for (name, b) in backends() {
        for (m, n, k) in [
            (1, 1, 1),
            (67, 45, 33),
            (20, 130, 70),
            (100, 90, 50),
            (3, 5, 0),
            (4, 300, 70),
        ] {
            for flags in 0..16u32 {
                let mut s = Matmul::new(m, n, k);
                s.trans_a = flags & 1 != 0;
                s.trans_b = flags & 2 != 0;
                s.accumulate = flags & 4 != 0;
                let with_bias = flags & 8 != 0;
                let a = rng.vec(m * k);
                let bm = rng.vec(k * n);
                let bias = rng.vec(n);
                let out0 = rng.vec(m * n);
                let (da, db, dbias) = (
                    b.upload(&a).unwrap(),
                    b.upload(&bm).unwrap(),
                    b.upload(&bias).unwrap(),
                );
                let mut out = if s.accumulate {
                    b.upload(&out0).unwrap()
                } else {
                    poisoned(&b, m * n)
                };
                b.matmul(&mut out, &da, &db, with_bias.then_some(&dbias), s)
                    .unwrap();
                let want = host_matmul(s, &a, &bm, with_bias.then_some(&bias[..]), &out0);
                assert_close(
                    &format!("{name} matmul {s:?} bias={with_bias}"),
                    &b.download(&out).unwrap(),
                    &want,
                    1e-5,
                );
            }
        }
    }
}

/// Products of a few rows (decoding's) run their own kernel, one invocation per element, and
/// give the bits the tiles give those rows inside a larger product.
#[test]
fn few_rows_give_the_bits_of_the_tiles() {
    let mut rng = Rng(11);
    let b = WgpuBackend::new().expect("a wgpu adapter");
    let (m, n, k, rows) = (68, 90, 200, 3);
    for flags in 0..4u32 {
        let (trans_a, trans_b) = (flags & 1 != 0, flags & 2 != 0);
        let a = rng.vec(m * k);
        let bm = b.upload(&rng.vec(k * n)).unwrap();
        // The first `rows` rows of op(a), stored the same way.
        let few: Vec<f32> = if trans_a {
            (0..k)
                .flat_map(|kk| a[kk * m..kk * m + rows].to_vec())
                .collect()
        } else {
            a[..rows * k].to_vec()
        };
        let run = |a: &[f32], m: usize| {
            let mut s = Matmul::new(m, n, k);
            (s.trans_a, s.trans_b) = (trans_a, trans_b);
            let mut out = poisoned(&b, m * n);
            b.matmul(&mut out, &b.upload(a).unwrap(), &bm, None, s)
                .unwrap();
            b.download(&out).unwrap()
        };
        let (all, some) = (run(&a, m), run(&few, rows));
        assert_eq!(
            &all[..rows * n],
            &some[..],
            "trans_a={trans_a} trans_b={trans_b}"
        );
    }
}

#[test]
fn elementwise_ops() {
    let mut rng = Rng(2);
    for (name, b) in backends() {
        let n = 10007;
        let x = rng.vec(n);
        let y = rng.vec(n);
        let (dx, dy) = (b.upload(&x).unwrap(), b.upload(&y).unwrap());
        let mut out = poisoned(&b, n);
        b.add(&mut out, &dx, &dy).unwrap();
        let sum: Vec<f64> = x
            .iter()
            .zip(&y)
            .map(|(a, c)| *a as f64 + *c as f64)
            .collect();
        assert_close(
            &format!("{name} add"),
            &b.download(&out).unwrap(),
            &sum,
            1e-6,
        );
        b.add_assign(&mut out, &dx).unwrap();
        let sum2: Vec<f64> = sum.iter().zip(&x).map(|(s, a)| s + *a as f64).collect();
        assert_close(
            &format!("{name} add_assign"),
            &b.download(&out).unwrap(),
            &sum2,
            1e-6,
        );
        b.fill(&mut out, 2.5).unwrap();
        assert!(b.download(&out).unwrap().iter().all(|&v| v == 2.5));
        b.fill(&mut out, 0.0).unwrap();
        assert!(b.download(&out).unwrap().iter().all(|&v| v == 0.0));
        b.copy(&mut out, &dx).unwrap();
        assert_eq!(b.download(&out).unwrap(), x);
        b.write(&mut out, &y).unwrap();
        assert_eq!(b.download(&out).unwrap(), y);

        let mut g = poisoned(&b, n);
        b.gelu_forward(&mut g, &dx).unwrap();
        let gelu = |x: f64| {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        };
        let want: Vec<f64> = x.iter().map(|&v| gelu(v as f64 * 4.0)).collect();
        let x4: Vec<f32> = x.iter().map(|v| v * 4.0).collect();
        let dx4 = b.upload(&x4).unwrap();
        b.gelu_forward(&mut g, &dx4).unwrap();
        assert_close(
            &format!("{name} gelu"),
            &b.download(&g).unwrap(),
            &want,
            1e-5,
        );
        let mut dg = poisoned(&b, n);
        b.gelu_backward(&mut dg, &dx4, &dy).unwrap();
        let h = 1e-4;
        let want: Vec<f64> = x4
            .iter()
            .zip(&y)
            .map(|(&v, &d)| (gelu(v as f64 + h) - gelu(v as f64 - h)) / (2.0 * h) * d as f64)
            .collect();
        assert_close(
            &format!("{name} gelu_backward"),
            &b.download(&dg).unwrap(),
            &want,
            1e-4,
        );
    }
}

#[test]
fn layernorm_forward_backward() {
    let mut rng = Rng(3);
    for (name, b) in backends() {
        for (rows, c) in [(1, 1), (5, 130), (201, 48)] {
            let x: Vec<f32> = rng.vec(rows * c).iter().map(|v| v * 3.0 + 0.5).collect();
            let w = rng.vec(c);
            let bi = rng.vec(c);
            let dout = rng.vec(rows * c);
            let dw0 = rng.vec(c);
            let db0 = rng.vec(c);
            let (dx, dwt, dbi, ddout) = (
                b.upload(&x).unwrap(),
                b.upload(&w).unwrap(),
                b.upload(&bi).unwrap(),
                b.upload(&dout).unwrap(),
            );
            let mut out = poisoned(&b, rows * c);
            let mut mean = poisoned(&b, rows);
            let mut rstd = poisoned(&b, rows);
            b.layernorm_forward(&mut out, &mut mean, &mut rstd, &dx, &dwt, &dbi, rows, c)
                .unwrap();
            let mut want_out = vec![0f64; rows * c];
            let mut want_mean = vec![0f64; rows];
            let mut want_rstd = vec![0f64; rows];
            let mut want_dx = vec![0f64; rows * c];
            let mut want_dw: Vec<f64> = dw0.iter().map(|&v| v as f64).collect();
            let mut want_db: Vec<f64> = db0.iter().map(|&v| v as f64).collect();
            for r in 0..rows {
                let row = &x[r * c..(r + 1) * c];
                let mu = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
                let var = row.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / c as f64;
                let s = 1.0 / (var + 1e-5).sqrt();
                want_mean[r] = mu;
                want_rstd[r] = s;
                let xhat: Vec<f64> = row.iter().map(|&v| (v as f64 - mu) * s).collect();
                for i in 0..c {
                    want_out[r * c + i] = xhat[i] * w[i] as f64 + bi[i] as f64;
                }
                let g = &dout[r * c..(r + 1) * c];
                let dnorm: Vec<f64> = (0..c).map(|i| w[i] as f64 * g[i] as f64).collect();
                let m1 = dnorm.iter().sum::<f64>() / c as f64;
                let m2 = (0..c).map(|i| dnorm[i] * xhat[i]).sum::<f64>() / c as f64;
                for i in 0..c {
                    want_dx[r * c + i] = s * (dnorm[i] - m1 - xhat[i] * m2);
                    want_dw[i] += g[i] as f64 * xhat[i];
                    want_db[i] += g[i] as f64;
                }
            }
            let tag = format!("{name} layernorm {rows}x{c}");
            assert_close(&tag, &b.download(&out).unwrap(), &want_out, 1e-4);
            assert_close(&tag, &b.download(&mean).unwrap(), &want_mean, 1e-5);
            assert_close(&tag, &b.download(&rstd).unwrap(), &want_rstd, 1e-4);
            let mut ddx = poisoned(&b, rows * c);
            let mut ddw = b.upload(&dw0).unwrap();
            let mut ddb = b.upload(&db0).unwrap();
            b.layernorm_backward(
                &mut ddx, &mut ddw, &mut ddb, &ddout, &dx, &dwt, &mean, &rstd, rows, c,
            )
            .unwrap();
            assert_close(&tag, &b.download(&ddx).unwrap(), &want_dx, 1e-4);
            assert_close(&tag, &b.download(&ddw).unwrap(), &want_dw, 1e-4);
            assert_close(&tag, &b.download(&ddb).unwrap(), &want_db, 1e-4);

            let mut dbias = b.upload(&db0).unwrap();
            b.bias_backward(&mut dbias, &ddout, rows, c).unwrap();
            let mut want: Vec<f64> = db0.iter().map(|&v| v as f64).collect();
            for r in 0..rows {
                for i in 0..c {
                    want[i] += dout[r * c + i] as f64;
                }
            }
            assert_close(
                &format!("{name} bias_backward"),
                &b.download(&dbias).unwrap(),
                &want,
                1e-5,
            );
        }
    }
}

fn host_attention(s: Attention, qkv: &[f32], dout: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (bn, t, c, nh) = (s.batch, s.seq, s.channels, s.heads);
    let hs = c / nh;
    let scale = 1.0 / (hs as f64).sqrt();
    let at = |b: usize, t: usize, part: usize, h: usize, d: usize| {
        qkv[(b * t_len(s) + t) * 3 * c + part * c + h * hs + d] as f64
    };
    fn t_len(s: Attention) -> usize {
        s.seq
    }
    let mut out = vec![0f64; bn * t * c];
    let mut att = vec![0f64; bn * nh * t * t];
    let mut dqkv = vec![0f64; bn * t * 3 * c];
    for b in 0..bn {
        for h in 0..nh {
            let base = (b * nh + h) * t * t;
            for i in 0..t {
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..hs)
                            .map(|d| at(b, i, 0, h, d) * at(b, j, 1, h, d))
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|s| (s - mx).exp()).sum();
                for j in 0..=i {
                    att[base + i * t + j] = (scores[j] - mx).exp() / z;
                }
                for d in 0..hs {
                    out[(b * t + i) * c + h * hs + d] = (0..=i)
                        .map(|j| att[base + i * t + j] * at(b, j, 2, h, d))
                        .sum();
                }
            }
            for i in 0..t {
                let go = |d: usize| dout[(b * t + i) * c + h * hs + d] as f64;
                let datt: Vec<f64> = (0..=i)
                    .map(|j| (0..hs).map(|d| go(d) * at(b, j, 2, h, d)).sum())
                    .collect();
                let dot: f64 = (0..=i).map(|j| att[base + i * t + j] * datt[j]).sum();
                for j in 0..=i {
                    let a = att[base + i * t + j];
                    let dpre = a * (datt[j] - dot);
                    for d in 0..hs {
                        dqkv[(b * t + i) * 3 * c + h * hs + d] += dpre * at(b, j, 1, h, d) * scale;
                        dqkv[(b * t + j) * 3 * c + c + h * hs + d] +=
                            dpre * at(b, i, 0, h, d) * scale;
                        dqkv[(b * t + j) * 3 * c + 2 * c + h * hs + d] += a * go(d);
                    }
                }
            }
        }
    }
    (out, att, dqkv)
}

#[test]
fn attention_forward_backward() {
    let mut rng = Rng(4);
    for (name, b) in backends() {
        for s in [
            Attention {
                batch: 1,
                seq: 1,
                channels: 4,
                heads: 2,
            },
            Attention {
                batch: 2,
                seq: 5,
                channels: 12,
                heads: 3,
            },
            Attention {
                batch: 1,
                seq: 60,
                channels: 16,
                heads: 2,
            },
            Attention {
                batch: 2,
                seq: 9,
                channels: 136,
                heads: 2,
            },
        ] {
            let (bn, t, c, nh) = (s.batch, s.seq, s.channels, s.heads);
            let qkv = rng.vec(bn * t * 3 * c);
            let dout = rng.vec(bn * t * c);
            let (dq, dd) = (b.upload(&qkv).unwrap(), b.upload(&dout).unwrap());
            let mut out = poisoned(&b, bn * t * c);
            let mut att = poisoned(&b, bn * nh * t * t);
            b.attention_forward(&mut out, &mut att, &dq, s).unwrap();
            let (want_out, want_att, want_dqkv) = host_attention(s, &qkv, &dout);
            let tag = format!("{name} attention {s:?}");
            assert_close(&tag, &b.download(&att).unwrap(), &want_att, 1e-5);
            assert_close(&tag, &b.download(&out).unwrap(), &want_out, 1e-5);
            let mut dqkv = poisoned(&b, bn * t * 3 * c);
            b.attention_backward(&mut dqkv, &dd, &dq, &out, &att, s)
                .unwrap();
            assert_close(&tag, &b.download(&dqkv).unwrap(), &want_dqkv, 1e-5);
        }
    }
}

/// Decoding: a prefix, then the rest, against the whole sequences' attention rows, with every
/// kernel profile (many lanes per row on GPUs, one on CPU drivers). A cache larger than one
/// storage binding is refused with one line.
#[test]
fn attention_decode_gives_the_whole_sequences_rows() {
    let mut rng = Rng(12);
    for (name, b) in backends() {
        // The last is long enough that CPU drivers get two lanes per row too.
        for (batch, seq, channels, heads, past) in
            [(2, 9, 12, 3, 8), (1, 70, 128, 2, 3), (1, 320, 64, 1, 316)]
        {
            let whole = Attention {
                batch,
                seq,
                channels,
                heads,
            };
            let qkv = rng.vec(batch * seq * 3 * channels);
            let (want, _, _) = host_attention(whole, &qkv, &vec![0.0; batch * seq * channels]);
            let capacity = seq + 1;
            let mut cache = poisoned(&b, batch * capacity * 2 * channels);
            for (from, new) in [(0, past), (past, seq - past)] {
                let shape = CachedAttention {
                    batch,
                    new,
                    past: from,
                    capacity,
                    channels,
                    heads,
                };
                let rows = |x: &[f32], w: usize| -> Vec<f32> {
                    (0..batch)
                        .flat_map(|s| x[(s * seq + from) * w..(s * seq + from + new) * w].to_vec())
                        .collect()
                };
                let mut out = poisoned(&b, batch * new * channels);
                let result = b.attention_decode(
                    &mut out,
                    &mut cache,
                    &b.upload(&rows(&qkv, 3 * channels)).unwrap(),
                    shape,
                );
                if name == "16 KiB bindings" && batch * capacity * 2 * channels * 4 > 16384 {
                    let err = result.unwrap_err().to_string();
                    assert!(err.contains("exceeds one storage binding"), "{err}");
                    break;
                }
                result.unwrap();
                let want: Vec<f64> = (0..batch)
                    .flat_map(|s| {
                        want[(s * seq + from) * channels..(s * seq + from + new) * channels]
                            .to_vec()
                    })
                    .collect();
                assert_close(
                    &format!("{name} attention_decode {shape:?}"),
                    &b.download(&out).unwrap(),
                    &want,
                    1e-5,
                );
            }
        }
    }
}

#[test]
fn embedding_forward_backward() {
    let mut rng = Rng(5);
    for (name, b) in backends() {
        let (bn, t, c, vocab, npos) = (6, 70, 24, 301, 80);
        let tokens: Vec<u32> = (0..bn * t)
            .map(|i| {
                if i % 4 == 0 {
                    5
                } else {
                    rng.below(vocab as u32)
                }
            })
            .collect();
        let wte = rng.vec(vocab * c);
        let wpe = rng.vec(npos * c);
        let dout = rng.vec(bn * t * c);
        let dwte0 = rng.vec(vocab * c);
        let dwpe0 = rng.vec(npos * c);
        let dt = b.upload_u32(&tokens).unwrap();
        let (dwte_in, dwpe_in, ddout) = (
            b.upload(&wte).unwrap(),
            b.upload(&wpe).unwrap(),
            b.upload(&dout).unwrap(),
        );
        let mut out = poisoned(&b, bn * t * c);
        b.embedding_forward(&mut out, &dt, &dwte_in, &dwpe_in, bn, t, c)
            .unwrap();
        let mut want = vec![0f64; bn * t * c];
        let mut want_dwte: Vec<f64> = dwte0.iter().map(|&v| v as f64).collect();
        let mut want_dwpe: Vec<f64> = dwpe0.iter().map(|&v| v as f64).collect();
        for i in 0..bn * t {
            let tok = tokens[i] as usize;
            for ch in 0..c {
                want[i * c + ch] = wte[tok * c + ch] as f64 + wpe[(i % t) * c + ch] as f64;
                want_dwte[tok * c + ch] += dout[i * c + ch] as f64;
                want_dwpe[(i % t) * c + ch] += dout[i * c + ch] as f64;
            }
        }
        assert_close(
            &format!("{name} embedding"),
            &b.download(&out).unwrap(),
            &want,
            1e-6,
        );
        let mut g_wte = b.upload(&dwte0).unwrap();
        let mut g_wpe = b.upload(&dwpe0).unwrap();
        b.embedding_backward(&mut g_wte, &mut g_wpe, &ddout, &dt, bn, t, c)
            .unwrap();
        assert_close(
            &format!("{name} dwte"),
            &b.download(&g_wte).unwrap(),
            &want_dwte,
            1e-5,
        );
        assert_close(
            &format!("{name} dwpe"),
            &b.download(&g_wpe).unwrap(),
            &want_dwpe,
            1e-5,
        );
    }
}

fn host_cross_entropy(
    logits: &[f32],
    targets: &[u32],
    vocab: usize,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let rows = targets.len();
    let mut losses = vec![0f64; rows];
    let mut grad = vec![0f64; rows * vocab];
    for r in 0..rows {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let mx = row.iter().map(|&v| v as f64).fold(f64::MIN, f64::max);
        let z: f64 = row.iter().map(|&v| (v as f64 - mx).exp()).sum();
        losses[r] = mx + z.ln() - row[targets[r] as usize] as f64;
        for v in 0..vocab {
            let p = (row[v] as f64 - mx).exp() / z;
            grad[r * vocab + v] = scale * (p - if v == targets[r] as usize { 1.0 } else { 0.0 });
        }
    }
    (losses, grad)
}

#[test]
fn cross_entropy_forward_backward() {
    let mut rng = Rng(6);
    for (name, b) in backends() {
        for (rows, vocab) in [(1, 3), (9, 257), (20, 1001)] {
            let logits: Vec<f32> = rng.vec(rows * vocab).iter().map(|v| v * 30.0).collect();
            let targets: Vec<u32> = (0..rows).map(|_| rng.below(vocab as u32)).collect();
            let (dl, dt) = (b.upload(&logits).unwrap(), b.upload_u32(&targets).unwrap());
            let mut losses = poisoned(&b, rows);
            b.cross_entropy_forward(&mut losses, &dl, &dt, rows, vocab)
                .unwrap();
            let (want_loss, want_grad) = host_cross_entropy(&logits, &targets, vocab, 0.25);
            let tag = format!("{name} cross-entropy {rows}x{vocab}");
            assert_close(&tag, &b.download(&losses).unwrap(), &want_loss, 1e-5);
            let mut grad = poisoned(&b, rows * vocab);
            b.cross_entropy_backward(&mut grad, &dl, &dt, 0.25, rows, vocab)
                .unwrap();
            assert_close(&tag, &b.download(&grad).unwrap(), &want_grad, 1e-6);
        }
    }
}

#[test]
fn adamw_matches_pytorch_formula() {
    let mut rng = Rng(7);
    for (name, b) in backends() {
        let n = 10007;
        let p0 = rng.vec(n);
        let g = rng.vec(n);
        let m0 = rng.vec(n).iter().map(|v| v * 0.1).collect::<Vec<_>>();
        let v0 = rng
            .vec(n)
            .iter()
            .map(|v| v.abs() * 0.01)
            .collect::<Vec<_>>();
        let hp = AdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 3,
            grad_scale: 1.0,
        };
        let (mut dp, dg, mut dm, mut dv) = (
            b.upload(&p0).unwrap(),
            b.upload(&g).unwrap(),
            b.upload(&m0).unwrap(),
            b.upload(&v0).unwrap(),
        );
        b.adamw(&mut dp, &dg, &mut dm, &mut dv, hp).unwrap();
        let (mut wp, mut wm, mut wv) = (vec![0f64; n], vec![0f64; n], vec![0f64; n]);
        for i in 0..n {
            let gi = g[i] as f64;
            wm[i] = 0.9 * m0[i] as f64 + 0.1 * gi;
            wv[i] = 0.95 * v0[i] as f64 + 0.05 * gi * gi;
            let mhat = wm[i] / (1.0 - 0.9f64.powi(3));
            let vhat = wv[i] / (1.0 - 0.95f64.powi(3));
            let p = p0[i] as f64;
            wp[i] = p - 1e-2 * (mhat / (vhat.sqrt() + 1e-8) + 0.1 * p);
        }
        assert_close(
            &format!("{name} adamw param"),
            &b.download(&dp).unwrap(),
            &wp,
            1e-5,
        );
        assert_close(
            &format!("{name} adamw m"),
            &b.download(&dm).unwrap(),
            &wm,
            1e-6,
        );
        assert_close(
            &format!("{name} adamw v"),
            &b.download(&dv).unwrap(),
            &wv,
            1e-6,
        );
    }
}

#[test]
fn memory_accounting_tracks_buffers() {
    let b = WgpuBackend::new().unwrap();
    let base = b.memory().in_use;
    let x = b.alloc(1000, DType::F32).unwrap();
    let y = b.alloc(500, DType::U32).unwrap();
    assert_eq!(b.memory().in_use, base + 6000);
    drop(x);
    assert_eq!(b.memory().in_use, base + 2000);
    assert!(b.memory().peak >= base + 6000);
    b.reset_peak_memory();
    assert_eq!(b.memory().peak, base + 2000);
    drop(y);
    assert_eq!(b.memory().in_use, base);
}

#[test]
fn size_mismatches_are_errors() {
    let b = WgpuBackend::new().unwrap();
    let x = b.alloc(10, DType::F32).unwrap();
    let mut y = b.alloc(11, DType::F32).unwrap();
    let t = b.alloc(10, DType::U32).unwrap();
    assert!(b.add_assign(&mut y, &x).is_err());
    assert!(b.write(&mut y, &[1.0; 3]).is_err());
    assert!(b.copy(&mut y, &x).is_err());
    assert!(b
        .matmul(&mut y, &x, &x, None, Matmul::new(4, 4, 2))
        .is_err());
    assert!(b.download(&t).is_err());
    let mut l = b.alloc(2, DType::F32).unwrap();
    assert!(b.cross_entropy_forward(&mut l, &x, &x, 2, 5).is_err());
    let bad = Attention {
        batch: 1,
        seq: 2,
        channels: 5,
        heads: 2,
    };
    let mut att = b.alloc(8, DType::F32).unwrap();
    assert!(b.attention_forward(&mut y, &mut att, &x, bad).is_err());
    // The device is still usable afterwards.
    b.synchronize().unwrap();
}

#[test]
fn one_device_per_rank() {
    let ranks = WgpuBackend::for_ranks(3, &Options::default()).unwrap();
    let handles: Vec<_> = ranks
        .into_iter()
        .enumerate()
        .map(|(r, b)| {
            std::thread::spawn(move || {
                let x = b.upload(&[r as f32; 100]).unwrap();
                let mut y = b.upload(&[1.0; 100]).unwrap();
                b.add_assign(&mut y, &x).unwrap();
                b.download(&y).unwrap()[0]
            })
        })
        .collect();
    let got: Vec<f32> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(got, vec![1.0, 2.0, 3.0]);
}

/// Shapes whose loops would run past lavapipe's 65535 iterations per invocation if a kernel
/// walked them in one go: long vocabulary rows, long contractions, many rows per column sum,
/// many positions per embedding gradient, long attention rows.
#[test]
fn long_loops_are_split() {
    let mut rng = Rng(8);
    // Rows this long do not fit the 16 KiB bindings of the third backend.
    for (name, b) in backends().into_iter().take(2) {
        let (rows, vocab) = (3, 50257);
        let logits = rng.vec(rows * vocab);
        let targets: Vec<u32> = (0..rows).map(|_| rng.below(vocab as u32)).collect();
        let (dl, dt) = (b.upload(&logits).unwrap(), b.upload_u32(&targets).unwrap());
        let mut losses = poisoned(&b, rows);
        b.cross_entropy_forward(&mut losses, &dl, &dt, rows, vocab)
            .unwrap();
        let mut grad = poisoned(&b, rows * vocab);
        b.cross_entropy_backward(&mut grad, &dl, &dt, 0.5, rows, vocab)
            .unwrap();
        let (want_loss, want_grad) = host_cross_entropy(&logits, &targets, vocab, 0.5);
        assert_close(
            &format!("{name} long losses"),
            &b.download(&losses).unwrap(),
            &want_loss,
            1e-5,
        );
        assert_close(
            &format!("{name} long dlogits"),
            &b.download(&grad).unwrap(),
            &want_grad,
            1e-6,
        );

        let s = Matmul::new(2, 3, 70001);
        let (x, w) = (rng.vec(2 * 70001), rng.vec(70001 * 3));
        let mut out = poisoned(&b, 6);
        b.matmul(
            &mut out,
            &b.upload(&x).unwrap(),
            &b.upload(&w).unwrap(),
            None,
            s,
        )
        .unwrap();
        assert_close(
            &format!("{name} long matmul"),
            &b.download(&out).unwrap(),
            &host_matmul(s, &x, &w, None, &[]),
            1e-4,
        );

        let (n, cols) = (70001, 2);
        let dout = rng.vec(n * cols);
        let mut dbias = b.upload(&[0.0; 2]).unwrap();
        b.bias_backward(&mut dbias, &b.upload(&dout).unwrap(), n, cols)
            .unwrap();
        let want: Vec<f64> = (0..cols)
            .map(|c| (0..n).map(|r| dout[r * cols + c] as f64).sum())
            .collect();
        assert_close(
            &format!("{name} long bias_backward"),
            &b.download(&dbias).unwrap(),
            &want,
            1e-4,
        );

        let (bn, t, c, vocab) = (10_000, 7, 1, 5);
        let tokens: Vec<u32> = (0..bn * t).map(|_| rng.below(vocab as u32)).collect();
        let dout = rng.vec(bn * t * c);
        let (mut dwte, mut dwpe) = (b.upload(&[0.0; 5]).unwrap(), b.upload(&[0.0; 7]).unwrap());
        b.embedding_backward(
            &mut dwte,
            &mut dwpe,
            &b.upload(&dout).unwrap(),
            &b.upload_u32(&tokens).unwrap(),
            bn,
            t,
            c,
        )
        .unwrap();
        let mut want = vec![0f64; vocab];
        for (i, &tok) in tokens.iter().enumerate() {
            want[tok as usize] += dout[i] as f64;
        }
        assert_close(
            &format!("{name} long dwte"),
            &b.download(&dwte).unwrap(),
            &want,
            1e-4,
        );

        let s = Attention {
            batch: 1,
            seq: 600,
            channels: 64,
            heads: 1,
        };
        let qkv = rng.vec(600 * 3 * 64);
        let g = rng.vec(600 * 64);
        let (mut o, mut att) = (poisoned(&b, 600 * 64), poisoned(&b, 600 * 600));
        let dq = b.upload(&qkv).unwrap();
        b.attention_forward(&mut o, &mut att, &dq, s).unwrap();
        let mut dqkv = poisoned(&b, 600 * 3 * 64);
        b.attention_backward(&mut dqkv, &b.upload(&g).unwrap(), &dq, &o, &att, s)
            .unwrap();
        let (want_out, _, want_dqkv) = host_attention(s, &qkv, &g);
        assert_close(
            &format!("{name} long attention"),
            &b.download(&o).unwrap(),
            &want_out,
            1e-5,
        );
        assert_close(
            &format!("{name} long attention grad"),
            &b.download(&dqkv).unwrap(),
            &want_dqkv,
            1e-5,
        );
    }
}

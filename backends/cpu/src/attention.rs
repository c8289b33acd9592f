//! Causal multi-head self-attention, forward and backward, in blocks of query rows: the
//! scores of one block against the keys before it are formed with the gemm crate, turned
//! into probabilities in place, and used at once, so no `seq × seq` matrix is ever held.
//! Forward keeps one log-sum-exp per query row; backward recomputes each block's
//! probabilities from it (as FlashAttention does).
//!
//! `qkv` is `[batch, seq, 3·C]`: a token's query, key and value side by side, each split into
//! `heads` slices of `hs = C / heads` channels. Scores are scaled by `1/√hs`; token `t`
//! attends to `0..=t`. Heads of each sequence are independent tasks on the threads.

use pipit_engine::backend::Attention;

use crate::math::{dot, exp, max, wide};
use crate::threads::{each, SharedMut};

/// Query rows per block.
const BLOCK: usize = 64;

/// One head of one sequence: where its rows start and how far apart they are.
#[derive(Clone, Copy)]
struct Head {
    seq: usize,
    hs: usize,
    /// Row stride of q, k, v (and of their gradients): `3·C`.
    qkv_rs: usize,
    /// Row stride of the output: `C`.
    out_rs: usize,
    /// Offsets of this head's query, key and value in `qkv`, of its output in `out`, and of
    /// its log-sum-exps.
    q: usize,
    k: usize,
    v: usize,
    out: usize,
    lse: usize,
    scale: f32,
}

impl Head {
    fn new(s: Attention, task: usize) -> Self {
        let (b, h) = (task / s.heads, task % s.heads);
        let (c, hs) = (s.channels, s.channels / s.heads);
        let q = b * s.seq * 3 * c + h * hs;
        Head {
            seq: s.seq,
            hs,
            qkv_rs: 3 * c,
            out_rs: c,
            q,
            k: q + c,
            v: q + 2 * c,
            out: b * s.seq * c + h * hs,
            lse: task * s.seq,
            scale: 1.0 / (hs as f32).sqrt(),
        }
    }
}

/// `dst (+)= lhs·rhs` on this thread, every operand given by its start and (row, column)
/// strides.
///
/// # Safety
/// Each pointer must address its matrix at the given strides, and `dst` must not overlap the
/// inputs.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
) {
    // SAFETY: as the caller promises.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `scores[r, j] = q(i0 + r)·k(j)` for the block's rows and keys `0..keys`.
///
/// # Safety
/// `qkv` must hold the head's rows; `scores` is `rows × keys`.
unsafe fn block_scores(hd: &Head, qkv: *const f32, i0: usize, rows: usize, scores: &mut [f32]) {
    let keys = i0 + rows;
    // SAFETY: q rows i0.., and k rows 0..keys read as kᵀ (element (p, j) at j·rs + p).
    unsafe {
        mm(
            (rows, keys, hd.hs),
            scores.as_mut_ptr(),
            keys,
            false,
            qkv.add(hd.q + i0 * hd.qkv_rs),
            (hd.qkv_rs, 1),
            qkv.add(hd.k),
            (1, hd.qkv_rs),
        )
    }
}

/// Forward: `out` and one log-sum-exp per query row in `lse` (`[batch, heads, seq]`).
pub(crate) fn forward(out: &mut [f32], lse: &mut [f32], qkv: &[f32], s: Attention) {
    let (out_p, lse_p) = (SharedMut(out.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
    let work = s.batch * s.seq * s.seq * s.channels * 2;
    each(s.batch * s.heads, work, |task| {
        let hd = Head::new(s, task);
        let mut scores = vec![0f32; BLOCK.min(hd.seq) * hd.seq];
        wide(|| {
            for i0 in (0..hd.seq).step_by(BLOCK) {
                let rows = BLOCK.min(hd.seq - i0);
                let keys = i0 + rows;
                let scores = &mut scores[..rows * keys];
                // SAFETY: the head's rows lie in `qkv`, `out` and `lse` (sizes checked by the
                // caller); this task alone writes its head's output columns and lse rows.
                unsafe {
                    block_scores(&hd, qkv.as_ptr(), i0, rows, scores);
                    for (r, row) in scores.chunks_exact_mut(keys).enumerate() {
                        let t = i0 + r;
                        let (live, masked) = row.split_at_mut(t + 1);
                        masked.fill(0.0);
                        live.iter_mut().for_each(|x| *x *= hd.scale);
                        let m = max(live);
                        live.iter_mut().for_each(|x| *x = exp(*x - m));
                        let sum = crate::math::sum(live);
                        let inv = 1.0 / sum;
                        live.iter_mut().for_each(|x| *x *= inv);
                        *lse_p.at(hd.lse + t) = m + sum.ln();
                    }
                    mm(
                        (rows, hd.hs, keys),
                        out_p.at(hd.out + i0 * hd.out_rs),
                        hd.out_rs,
                        false,
                        scores.as_ptr(),
                        (keys, 1),
                        qkv.as_ptr().add(hd.v),
                        (hd.qkv_rs, 1),
                    );
                }
            }
        })
    });
}

/// Backward: overwrite `dqkv` from `dout`, the forward's `qkv`, `out` and `lse`.
pub(crate) fn backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    s: Attention,
) {
    let dqkv_p = SharedMut(dqkv.as_mut_ptr());
    let work = s.batch * s.seq * s.seq * s.channels * 5;
    each(s.batch * s.heads, work, |task| {
        let hd = Head::new(s, task);
        let width = BLOCK.min(hd.seq) * hd.seq;
        let (mut probs, mut dscores) = (vec![0f32; width], vec![0f32; width]);
        // Σ_i dout·out per query row: the softmax backward's correction.
        let delta: Vec<f32> = (0..hd.seq)
            .map(|t| {
                let at = hd.out + t * hd.out_rs;
                dot(&dout[at..][..hd.hs], &out[at..][..hd.hs])
            })
            .collect();
        wide(|| {
            // SAFETY (all of this closure): the head's rows lie in every buffer (sizes checked
            // by the caller), and this task alone writes its head's columns of `dqkv`.
            unsafe {
                for t in 0..hd.seq {
                    for part in [hd.k, hd.v] {
                        std::slice::from_raw_parts_mut(dqkv_p.at(part + t * hd.qkv_rs), hd.hs)
                            .fill(0.0);
                    }
                }
                for i0 in (0..hd.seq).step_by(BLOCK) {
                    let rows = BLOCK.min(hd.seq - i0);
                    let keys = i0 + rows;
                    let (p, ds) = (&mut probs[..rows * keys], &mut dscores[..rows * keys]);
                    block_scores(&hd, qkv.as_ptr(), i0, rows, p);
                    // dP = dO·vᵀ.
                    mm(
                        (rows, keys, hd.hs),
                        ds.as_mut_ptr(),
                        keys,
                        false,
                        dout.as_ptr().add(hd.out + i0 * hd.out_rs),
                        (hd.out_rs, 1),
                        qkv.as_ptr().add(hd.v),
                        (1, hd.qkv_rs),
                    );
                    for (r, (p, ds)) in p
                        .chunks_exact_mut(keys)
                        .zip(ds.chunks_exact_mut(keys))
                        .enumerate()
                    {
                        let t = i0 + r;
                        let (l, d) = (lse[hd.lse + t], delta[t]);
                        // Keys up to `t` (branch-free, so it vectorises); the rest are masked.
                        let (p_live, p_masked) = p.split_at_mut(t + 1);
                        let (ds_live, ds_masked) = ds.split_at_mut(t + 1);
                        for (pj, dj) in p_live.iter_mut().zip(ds_live.iter_mut()) {
                            let e = exp(*pj * hd.scale - l);
                            *pj = e;
                            *dj = e * (*dj - d) * hd.scale;
                        }
                        p_masked.fill(0.0);
                        ds_masked.fill(0.0);
                    }
                    // dQ = dS·k, dK += dSᵀ·q, dV += Pᵀ·dO.
                    mm(
                        (rows, hd.hs, keys),
                        dqkv_p.at(hd.q + i0 * hd.qkv_rs),
                        hd.qkv_rs,
                        false,
                        ds.as_ptr(),
                        (keys, 1),
                        qkv.as_ptr().add(hd.k),
                        (hd.qkv_rs, 1),
                    );
                    mm(
                        (keys, hd.hs, rows),
                        dqkv_p.at(hd.k),
                        hd.qkv_rs,
                        true,
                        ds.as_ptr(),
                        (1, keys),
                        qkv.as_ptr().add(hd.q + i0 * hd.qkv_rs),
                        (hd.qkv_rs, 1),
                    );
                    mm(
                        (keys, hd.hs, rows),
                        dqkv_p.at(hd.v),
                        hd.qkv_rs,
                        true,
                        p.as_ptr(),
                        (1, keys),
                        dout.as_ptr().add(hd.out + i0 * hd.out_rs),
                        (hd.out_rs, 1),
                    );
                }
            }
        })
    });
}

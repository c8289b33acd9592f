//! Matrix products in the layouts the model needs, and the bias gradient.

use pipit_engine::backend::Matmul;

#[cfg(target_arch = "x86_64")]
use crate::dot::dot4_avx2;
use crate::dot::{dot_lanes, four_at_once};
use crate::simd::wide;
use crate::threads::for_row_blocks;

/// Copy `op(x)` into row-major `[rows, cols]`, whatever layout `x` is stored in, so each dot
/// product below reads two contiguous rows.
fn rows_of(x: &[f32], rows: usize, cols: usize, transposed: bool) -> Vec<f32> {
    if !transposed {
        return x.to_vec();
    }
    let mut packed = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            packed[r * cols + c] = x[c * rows + r];
        }
    }
    packed
}

/// `out (+)= op(a)·op(b) (+ bias)`, each dot product summed in f64.
pub(crate) fn forward(out: &mut [f32], a: &[f32], b: &[f32], bias: Option<&[f32]>, s: Matmul) {
    let (m, n, k) = (s.m, s.n, s.k);
    // Rows of op(a) ([m, k]) and columns of op(b) (rows of op(b)ᵀ, [n, k]).
    let a_rows = rows_of(a, m, k, s.trans_a);
    let b_cols = rows_of(b, n, k, !s.trans_b);
    let finish = |o: &mut f32, j: usize, mut sum: f64| {
        if let Some(bias) = bias {
            sum += bias[j] as f64;
        }
        *o = if s.accumulate {
            (*o as f64 + sum) as f32
        } else {
            sum as f32
        };
    };
    if n == 0 {
        return;
    }
    let col = |j: usize| &b_cols[j * k..][..k];
    // Four columns at a time where the CPU has AVX2 (the same sums, to the bit), the rest one
    // by one.
    let quads = four_at_once(n);
    // Blocks of rows on the threads this backend may use; each row is computed the same way
    // whichever block it falls in.
    for_row_blocks(&mut out[..m * n], n, n * k, |first, block| {
        wide(|| {
            for (r, row) in block.chunks_exact_mut(n).enumerate() {
                let a_row = &a_rows[(first + r) * k..][..k];
                #[cfg(target_arch = "x86_64")]
                for j in (0..quads).step_by(4) {
                    // SAFETY: `quads` is nonzero only where the CPU has AVX2.
                    let sums =
                        unsafe { dot4_avx2(a_row, [col(j), col(j + 1), col(j + 2), col(j + 3)]) };
                    for (q, sum) in sums.into_iter().enumerate() {
                        finish(&mut row[j + q], j + q, sum);
                    }
                }
                for (j, o) in row.iter_mut().enumerate().skip(quads) {
                    finish(o, j, dot_lanes(a_row, col(j)));
                }
            }
        })
    });
}

/// `dbias[j] += Σ_rows dout[row, j]`, summed in f64.
pub(crate) fn bias_backward(dbias: &mut [f32], dout: &[f32], cols: usize) {
    if cols == 0 {
        return;
    }
    let mut sum = vec![0f64; cols];
    for row in dout.chunks_exact(cols) {
        for (s, &g) in sum.iter_mut().zip(row) {
            *s += g as f64;
        }
    }
    for (d, s) in dbias.iter_mut().zip(sum) {
        *d = (*d as f64 + s) as f32;
    }
}

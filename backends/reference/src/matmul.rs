//! Matrix products in the layouts the model needs, and the bias gradient.

use pipit_engine::backend::Matmul;

use crate::dot::dot_lanes;
use crate::simd::wide;

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
    wide(|| {
        for i in 0..m {
            let a_row = &a_rows[i * k..][..k];
            for j in 0..n {
                let b_col = &b_cols[j * k..][..k];
                let mut sum = dot_lanes(a_row, b_col);
                if let Some(bias) = bias {
                    sum += bias[j] as f64;
                }
                let o = &mut out[i * n + j];
                *o = if s.accumulate {
                    (*o as f64 + sum) as f32
                } else {
                    sum as f32
                };
            }
        }
    })
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

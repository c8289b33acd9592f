//! Matrix products on the gemm crate, and the bias gradient.

use pipit_engine::backend::Matmul;

use crate::threads::{gemm_parallelism, on_pool};

/// `out (+)= op(a)·op(b) (+ bias)`, all row-major; a transposed operand is read through its
/// strides, never copied.
pub(crate) fn forward(out: &mut [f32], a: &[f32], b: &[f32], bias: Option<&[f32]>, s: Matmul) {
    let (m, n, k) = (s.m, s.n, s.k);
    if m == 0 || n == 0 {
        return;
    }
    let out = &mut out[..m * n];
    let mut read_dst = s.accumulate;
    if let Some(bias) = bias {
        for row in out.chunks_exact_mut(n) {
            if s.accumulate {
                row.iter_mut().zip(bias).for_each(|(o, &b)| *o += b);
            } else {
                row.copy_from_slice(bias);
            }
        }
        read_dst = true;
    }
    if k == 0 {
        if !read_dst {
            out.fill(0.0);
        }
        return;
    }
    // Element (i, p) of op(a) and (p, j) of op(b), as (row stride, column stride).
    let (a_rs, a_cs) = if s.trans_a { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if s.trans_b { (1, k) } else { (n, 1) };
    let (threads, parallelism) = gemm_parallelism(m * n * k);
    let dst = out.as_mut_ptr() as usize;
    on_pool(threads, || {
        // SAFETY: `out` is m×n with strides (n, 1), `a` holds op(a) (m×k) and `b` op(b) (k×n)
        // at the strides above (their lengths are checked by the caller), and `out` does not
        // overlap either input (it is borrowed mutably beside them).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst as *mut f32,
                1,
                n as isize,
                read_dst,
                a.as_ptr(),
                a_cs as isize,
                a_rs as isize,
                b.as_ptr(),
                b_cs as isize,
                b_rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        }
    });
}

/// `dbias[j] += Σ_rows dout[row, j]`, summed in fixed blocks of rows (so the same bits
/// whatever the threads).
pub(crate) fn bias_backward(dbias: &mut [f32], dout: &[f32], cols: usize) {
    if cols == 0 {
        return;
    }
    let partials = column_sums(dout.len() / cols, cols, |acc, r| {
        let row = &dout[r * cols..][..cols];
        acc.iter_mut().zip(row).for_each(|(a, &g)| *a += g)
    });
    for part in partials.chunks_exact(cols) {
        dbias.iter_mut().zip(part).for_each(|(d, &p)| *d += p);
    }
}

/// Rows per block of [`column_sums`].
const BLOCK: usize = 64;

/// Sums over `rows` rows in blocks of [`BLOCK`]: `add(acc, r)` adds row `r`'s terms into its
/// block's `acc` (`width` wide, zeroed first). The blocks' sums come back one after another,
/// to be added in order; the cut is fixed, so the sum does not depend on the threads.
pub(crate) fn column_sums(
    rows: usize,
    width: usize,
    add: impl Fn(&mut [f32], usize) + Sync + Send,
) -> Vec<f32> {
    let blocks = rows.div_ceil(BLOCK);
    let mut partials = vec![0f32; blocks * width];
    crate::threads::rows(&mut partials, width, BLOCK * width, |first, out| {
        crate::math::wide(|| {
            for (i, acc) in out.chunks_exact_mut(width).enumerate() {
                let start = (first + i) * BLOCK;
                for r in start..(start + BLOCK).min(rows) {
                    add(acc, r);
                }
            }
        })
    });
    partials
}

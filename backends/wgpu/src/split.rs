//! Cutting work into pieces whose buffer windows fit one storage binding.
//!
//! A device binds at most `max_storage_buffer_binding_size` bytes of a buffer at once (128 MiB
//! on lavapipe), while a buffer itself may be larger. Each op therefore runs over windows:
//! row ranges for row-wise ops, and sub-matrices for matrix products. The functions here only
//! do the arithmetic, so they are tested without a device.

use std::ops::Range;

use anyhow::{bail, Result};
use pipit_engine::backend::Matmul;

/// Loop iterations one kernel invocation may run in total. lavapipe (llvmpipe) silently ends
/// every loop of an invocation once 65535 iterations have run across all its loops; work is
/// cut and lanes are chosen to stay below that, with room for the short fixed loops.
pub(crate) const MAX_LOOP_ITERATIONS: usize = 60_000;

/// Splits `0..rows` into consecutive ranges of at most `max_rows` rows such that, for every
/// operand, `row_elems[i]` elements per row times the rows of a range stay within `max_elems`.
pub(crate) fn row_chunks(
    rows: usize,
    row_elems: &[usize],
    max_elems: usize,
    max_rows: usize,
) -> Result<Vec<Range<usize>>> {
    let mut per = rows.min(max_rows).max(1);
    for &e in row_elems.iter().filter(|&&e| e > 0) {
        if e > max_elems {
            bail!(
                "one row of {e} elements exceeds the device's storage binding limit of {max_elems} elements"
            );
        }
        per = per.min(max_elems / e);
    }
    Ok((0..rows)
        .step_by(per)
        .map(|r0| r0..(r0 + per).min(rows))
        .collect())
}

/// One window of a matrix product: rows `m`, columns `n` and contraction range `k` of the
/// full product. Pieces with the same `m` and `n` must run in order of `k`, all but the first
/// accumulating.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MatmulPiece {
    /// Output rows.
    pub m: Range<usize>,
    /// Output columns.
    pub n: Range<usize>,
    /// Contracted indices.
    pub k: Range<usize>,
}

/// Elements between the first and last element a strided `rows × cols` block touches.
fn span(rows: usize, ld: usize, cols: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * ld + cols
    }
}

fn halve(x: usize) -> usize {
    x.div_ceil(2)
}

/// Spans of (out, a, b) for pieces of `mc × nc × kc`.
fn spans(s: &Matmul, mc: usize, nc: usize, kc: usize) -> [usize; 3] {
    let out = span(mc, s.n, nc);
    let a = if s.trans_a {
        span(kc, s.m, mc)
    } else {
        span(mc, s.k, kc)
    };
    let b = if s.trans_b {
        span(nc, s.k, kc)
    } else {
        span(kc, s.n, nc)
    };
    [out, a, b]
}

/// Cuts a product into pieces whose `out`, `a` and `b` windows each span at most
/// `max_elems` elements, whose output is at most `max_dim` rows and columns (the dispatch
/// limit) and whose contraction is at most `max_k` long. Each step halves the dimension that
/// shrinks the offending window fastest: rows of a row-major operand, else the other
/// dimension of that operand.
pub(crate) fn matmul_pieces(
    s: &Matmul,
    max_elems: usize,
    max_dim: usize,
    max_k: usize,
) -> Vec<MatmulPiece> {
    if s.m == 0 || s.n == 0 {
        return Vec::new();
    }
    let max_elems = max_elems.max(1);
    let (mut mc, mut nc, mut kc) = (s.m.min(max_dim), s.n.min(max_dim), s.k.min(max_k.max(1)));
    loop {
        let [out, a, b] = spans(s, mc, nc, kc);
        if out > max_elems {
            if mc > 1 {
                mc = halve(mc);
            } else {
                nc = halve(nc);
            }
        } else if a > max_elems {
            // Stored k × m (transposed), whole rows of `a` are contracted indices.
            if s.trans_a {
                if kc > 1 {
                    kc = halve(kc);
                } else {
                    mc = halve(mc);
                }
            } else if mc > 1 {
                mc = halve(mc);
            } else {
                kc = halve(kc);
            }
        } else if b > max_elems {
            if s.trans_b {
                if nc > 1 {
                    nc = halve(nc);
                } else {
                    kc = halve(kc);
                }
            } else if kc > 1 {
                kc = halve(kc);
            } else {
                nc = halve(nc);
            }
        } else {
            break;
        }
    }
    let ranges = |total: usize, step: usize| -> Vec<Range<usize>> {
        if total == 0 {
            return std::iter::once(0..0).collect();
        }
        (0..total)
            .step_by(step)
            .map(|x| x..(x + step).min(total))
            .collect()
    };
    let mut pieces = Vec::new();
    for m in ranges(s.m, mc) {
        for n in ranges(s.n, nc) {
            for k in ranges(s.k, kc) {
                pieces.push(MatmulPiece {
                    m: m.clone(),
                    n: n.clone(),
                    k,
                });
            }
        }
    }
    pieces
}

/// Largest count `c ≤ total` (at least 1) for which `fits(c)` holds, by halving; an error
/// naming `what` when even one does not fit.
pub(crate) fn largest_fitting(
    total: usize,
    what: &str,
    fits: impl Fn(usize) -> bool,
) -> Result<usize> {
    let mut c = total.max(1);
    while !fits(c) {
        if c == 1 {
            bail!("one {what} exceeds the device's storage binding limit");
        }
        c = halve(c);
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_cover(s: &Matmul, max_elems: usize, max_dim: usize) {
        let pieces = matmul_pieces(s, max_elems, max_dim, usize::MAX);
        let mut covered = vec![0usize; s.m * s.n];
        for p in &pieces {
            assert!(p.m.len() <= max_dim && p.n.len() <= max_dim);
            let [o, a, b] = spans(s, p.m.len(), p.n.len(), p.k.len());
            assert!(o <= max_elems && a <= max_elems && b <= max_elems, "{p:?}");
            for r in p.m.clone() {
                for c in p.n.clone() {
                    covered[r * s.n + c] += p.k.len().max(1);
                }
            }
        }
        // Every output element sees every contracted index exactly once.
        assert!(covered.iter().all(|&c| c == s.k.max(1)), "{s:?}");
    }

    #[test]
    fn matmul_pieces_cover_every_layout() {
        for (m, n, k) in [(1, 1, 1), (7, 5, 3), (64, 65, 66), (130, 3, 200), (5, 9, 0)] {
            for ta in [false, true] {
                for tb in [false, true] {
                    let mut s = Matmul::new(m, n, k);
                    s.trans_a = ta;
                    s.trans_b = tb;
                    for max_elems in [1, 2, 7, 64, 1000, usize::MAX] {
                        check_cover(&s, max_elems, 1 << 20);
                    }
                    check_cover(&s, usize::MAX, 3);
                }
            }
        }
    }

    #[test]
    fn matmul_that_fits_is_one_piece() {
        let s = Matmul::new(100, 200, 300).trans_b();
        assert_eq!(matmul_pieces(&s, 1 << 20, 1 << 20, usize::MAX).len(), 1);
        assert_eq!(matmul_pieces(&s, 1 << 20, 1 << 20, 100).len(), 3);
    }

    #[test]
    fn row_chunks_respect_limit_and_cover() {
        let chunks = row_chunks(10, &[3, 1], 7, usize::MAX).unwrap();
        assert_eq!(chunks, vec![0..2, 2..4, 4..6, 6..8, 8..10]);
        assert!(row_chunks(0, &[3], 7, usize::MAX).unwrap().is_empty());
        assert!(row_chunks(4, &[8], 7, usize::MAX).is_err());
        assert_eq!(row_chunks(5, &[0], 7, usize::MAX).unwrap(), vec![0..5]);
        assert_eq!(row_chunks(5, &[0], 7, 2).unwrap(), vec![0..2, 2..4, 4..5]);
    }

    #[test]
    fn largest_fitting_halves_until_fit() {
        assert_eq!(largest_fitting(100, "x", |c| c <= 30).unwrap(), 25);
        assert!(largest_fitting(4, "x", |_| false).is_err());
    }
}

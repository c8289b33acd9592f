//! Grouped-query attention's head layout: queries, keys and values packed into the `qkv` rows
//! attention reads (each key/value head repeated for the query heads that share it), and the
//! gradient unpacked back (summed over those query heads, in head order).

use pipit_engine::backend::Heads;

use crate::threads::rows;

/// `qkv[r] = [q[r] | k heads repeated | v heads repeated]`.
pub(crate) fn pack(qkv: &mut [f32], q: &[f32], k: &[f32], v: &[f32], shape: Heads) {
    let d = shape.head_dim;
    let (qw, kw, group) = (
        shape.heads * d,
        shape.kv_heads * d,
        shape.heads / shape.kv_heads,
    );
    rows(qkv, 3 * qw, 3 * qw, |first, block| {
        for (i, row) in block.chunks_exact_mut(3 * qw).enumerate() {
            let r = first + i;
            let (rq, rest) = row.split_at_mut(qw);
            let (rk, rv) = rest.split_at_mut(qw);
            rq.copy_from_slice(&q[r * qw..][..qw]);
            for h in 0..shape.heads {
                let src = r * kw + (h / group) * d;
                rk[h * d..][..d].copy_from_slice(&k[src..][..d]);
                rv[h * d..][..d].copy_from_slice(&v[src..][..d]);
            }
        }
    });
}

/// Overwrite `dq`, `dk` and `dv` from `dqkv`: the query part as it is, each key/value head the
/// sum of its group's query heads' parts, in head order.
pub(crate) fn unpack_grad(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dqkv: &[f32],
    shape: Heads,
) {
    let d = shape.head_dim;
    let (qw, kw, group) = (
        shape.heads * d,
        shape.kv_heads * d,
        shape.heads / shape.kv_heads,
    );
    rows(dq, qw, qw, |first, block| {
        for (i, row) in block.chunks_exact_mut(qw).enumerate() {
            row.copy_from_slice(&dqkv[(first + i) * 3 * qw..][..qw]);
        }
    });
    for (part, out) in [(1, dk), (2, dv)] {
        rows(out, kw, 2 * qw, |first, block| {
            for (i, row) in block.chunks_exact_mut(kw).enumerate() {
                let src = &dqkv[(first + i) * 3 * qw + part * qw..][..qw];
                for (kh, dst) in row.chunks_exact_mut(d).enumerate() {
                    dst.copy_from_slice(&src[kh * group * d..][..d]);
                    for g in 1..group {
                        let add = &src[(kh * group + g) * d..][..d];
                        dst.iter_mut().zip(add).for_each(|(a, &b)| *a += b);
                    }
                }
            }
        });
    }
}

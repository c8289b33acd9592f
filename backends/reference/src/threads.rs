//! Sharing the host's cores: each reference backend alive (one per pipeline rank) takes an
//! equal share for its matrix products and attention, so one rank alone uses every core and
//! four ranks on two cores use one thread each, as before.
//!
//! The share is the host's cores, divided by the processes on this host (`LOCAL_WORLD_SIZE`,
//! as `pipit launch` and torchrun set it) and by the backends alive in this process;
//! `PIPIT_THREADS` sets it outright.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Reference backends alive in this process.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Counts one backend while it lives. Something else that keeps the cores busy beside the
/// backends (`pipit serve`'s HTTP side and scheduler) holds one too, and takes a share.
#[derive(Debug)]
pub struct CoreShare;

impl Default for CoreShare {
    fn default() -> Self {
        LIVE.fetch_add(1, Ordering::Relaxed);
        CoreShare
    }
}

impl Drop for CoreShare {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Threads a host backend may use now, at least one.
pub fn share() -> usize {
    static HOST: OnceLock<(Option<usize>, usize)> = OnceLock::new();
    let &(fixed, cores) = HOST.get_or_init(|| {
        let env = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&n| n > 0)
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let processes = env("LOCAL_WORLD_SIZE").unwrap_or(1);
        (env("PIPIT_THREADS"), (cores / processes).max(1))
    });
    fixed.unwrap_or_else(|| (cores / LIVE.load(Ordering::Relaxed).max(1)).max(1))
}

/// Multiply-adds below which a product is not worth another thread.
const WORK_PER_THREAD: usize = 1 << 20;

/// Run `f` over `rows` rows of `out` (`row_len` values each), cut into contiguous blocks, one
/// per thread this backend may use and the work (`work_per_row` multiply-adds a row) is worth.
/// `f` gets the block's first row and its values. Every output is computed by the same code
/// whatever the cut, so the result does not depend on the thread count.
pub(crate) fn for_row_blocks<F>(out: &mut [f32], row_len: usize, work_per_row: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    for_row_block_pairs(out, row_len, &mut [], 0, work_per_row, |first, block, _| {
        f(first, block)
    });
}

/// [`for_row_blocks`] over two outputs cut in step: row `r` of `a` (`a_row` values) goes with
/// row `r` of `b` (`b_row` values), as a batch's attention output goes with its probabilities.
pub(crate) fn for_row_block_pairs<F>(
    a: &mut [f32],
    a_row: usize,
    b: &mut [f32],
    b_row: usize,
    work_per_row: usize,
    f: F,
) where
    F: Fn(usize, &mut [f32], &mut [f32]) + Sync,
{
    let rows = a.len().checked_div(a_row).unwrap_or(0);
    let worth = (rows.saturating_mul(work_per_row) / WORK_PER_THREAD).max(1);
    split(a, a_row, b, b_row, share().min(worth), f);
}

/// Run `f` over the rows of `a` and `b` cut in step into at most `threads` contiguous blocks,
/// each on its own thread (the calling one when there is a single block). With `b_row = 0`,
/// `f` gets empty `b` blocks.
fn split<F>(a: &mut [f32], a_row: usize, b: &mut [f32], b_row: usize, threads: usize, f: F)
where
    F: Fn(usize, &mut [f32], &mut [f32]) + Sync,
{
    let rows = a.len().checked_div(a_row).unwrap_or(0);
    let threads = threads.min(rows).max(1);
    if threads == 1 {
        f(0, a, b);
        return;
    }
    let per = rows.div_ceil(threads);
    let b_blocks = b
        .chunks_mut((per * b_row).max(1))
        .chain(std::iter::repeat_with(|| &mut [][..]));
    std::thread::scope(|scope| {
        for (i, (a, b)) in a.chunks_mut(per * a_row).zip(b_blocks).enumerate() {
            let f = &f;
            scope.spawn(move || f(i * per, a, b));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::split;

    /// Every row is written once, by the same code, whatever the number of blocks.
    #[test]
    fn any_cut_gives_the_same_rows() {
        let (rows, row_len) = (13, 5);
        let fill = |first: usize, block: &mut [f32], _: &mut [f32]| {
            for (r, row) in block.chunks_exact_mut(row_len).enumerate() {
                for (c, x) in row.iter_mut().enumerate() {
                    *x = ((first + r) * 31 + c) as f32 / 7.0;
                }
            }
        };
        let mut want = vec![f32::NAN; rows * row_len];
        split(&mut want, row_len, &mut [], 0, 1, fill);
        for threads in [2, 3, 4, 13, 64] {
            let mut got = vec![f32::NAN; rows * row_len];
            split(&mut got, row_len, &mut [], 0, threads, fill);
            assert_eq!(got, want, "{threads} threads");
        }
        split(&mut [], row_len, &mut [], 0, 4, |_, block, _| {
            assert!(block.is_empty())
        });
        // Two outputs cut in step: each block of `b` holds its rows' values.
        let (mut a, mut b) = (vec![0f32; rows * row_len], vec![0f32; rows * 2]);
        split(&mut a, row_len, &mut b, 2, 3, |first, a, b| {
            assert_eq!(a.len() / row_len, b.len() / 2);
            b.fill(first as f32);
        });
        assert_eq!(b[2 * 12], 10.0);
    }
}

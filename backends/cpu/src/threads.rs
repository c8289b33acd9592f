//! Threads: one rayon pool for the process, sized to the host's cores (`PIPIT_THREADS` sets
//! it), of which each backend uses its share ([`pipit_reference::core_share`]: all of them for
//! one rank, divided among the ranks that share the cores). A backend whose share is one
//! thread runs every op on its caller's thread and never touches the pool.

use std::sync::OnceLock;

use rayon::prelude::*;

/// Work (multiply-adds, or elements of a row kernel times its cost) below which an op is not
/// worth a second thread.
const WORK_PER_THREAD: usize = 1 << 16;

/// The process's pool.
fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::env::var("PIPIT_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        rayon::ThreadPoolBuilder::new()
            .num_threads(cores)
            .thread_name(|i| format!("pipit-cpu-{i}"))
            .build()
            .expect("a thread pool for the CPU backend")
    })
}

/// Threads an op of `work` units may use: this backend's share, fewer when the work is small.
pub(crate) fn threads_for(work: usize) -> usize {
    pipit_reference::core_share()
        .min(work / WORK_PER_THREAD)
        .max(1)
}

/// Run `f` on the pool when it uses more than one thread, else right here.
pub(crate) fn on_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    if threads > 1 {
        pool().install(f)
    } else {
        f()
    }
}

/// How the gemm crate may spread a product of `work` multiply-adds.
pub(crate) fn gemm_parallelism(work: usize) -> (usize, gemm::Parallelism) {
    match threads_for(work) {
        1 => (1, gemm::Parallelism::None),
        n => (n, gemm::Parallelism::Rayon(n)),
    }
}

/// Run `f(first_row, block)` over `out` (rows of `row_len`) cut into contiguous blocks of rows,
/// one per thread the work (`work_per_row` units a row) is worth. Each row is computed by the
/// same code whichever block it falls in, so the result does not depend on the cut.
pub(crate) fn rows<F>(out: &mut [f32], row_len: usize, work_per_row: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    let rows = out.len().checked_div(row_len).unwrap_or(0);
    let threads = threads_for(rows.saturating_mul(work_per_row)).min(rows.max(1));
    if threads == 1 {
        f(0, out);
        return;
    }
    let per = rows.div_ceil(threads);
    on_pool(threads, || {
        out.par_chunks_mut(per * row_len)
            .enumerate()
            .for_each(|(i, block)| f(i * per, block))
    });
}

/// Run `f(i)` for every `i < tasks`, spread over the threads `work` (all tasks together) is
/// worth. The tasks must write disjoint memory.
pub(crate) fn each<F>(tasks: usize, work: usize, f: F)
where
    F: Fn(usize) + Sync + Send,
{
    let threads = threads_for(work).min(tasks.max(1));
    if threads == 1 {
        (0..tasks).for_each(f);
        return;
    }
    // At most `threads` pieces, so a share smaller than the pool stays within its share.
    let per = tasks.div_ceil(threads);
    on_pool(threads, || {
        (0..tasks).into_par_iter().with_min_len(per).for_each(f)
    });
}

/// A buffer's start, shared with the threads that write disjoint parts of it.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);

// SAFETY: only ever used to write disjoint ranges from different threads (see each use).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The element at offset `i`.
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        // SAFETY (of the callers): `i` is within the buffer.
        self.0.wrapping_add(i)
    }
}

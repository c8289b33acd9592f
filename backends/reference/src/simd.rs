//! Running a loop with the CPU's 256-bit vector unit, without changing its result: the same
//! operations in the same order, compiled for wider registers (no fused multiply-adds, which
//! Rust never forms on its own). AVX-512 measured slower here (32.6 and 38.6 s of CPU time
//! against 22.5 and 23.5 s for 60 steps of the default run), so it is not used.

/// Run `f` compiled for AVX2 where the CPU has it, else as it is. The compiler normally inlines
/// `f`'s body, and the `#[inline(always)]` helpers it calls (such as
/// [`crate::dot::dot_lanes`]), into the AVX2 function (it does in the release build, checked in
/// the disassembly), so a hot loop pays for the dispatch once, not per dot product. Either
/// way the result is the same.
#[inline(always)]
pub(crate) fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, the only requirement of `avx2`.
        return unsafe { avx2(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

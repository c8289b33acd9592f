//! Is CUDA usable here? Checked before any CUDA call, because cudarc (loading the libraries
//! at run time) panics instead of returning an error when one is missing.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};

use anyhow::{anyhow, bail, Result};
use cudarc::driver::CudaContext;

/// A shared library the backend loads: what to say when it is missing, cudarc's check that
/// finds it, and how to provide it.
type Library = (&'static str, unsafe fn() -> bool, &'static str);

/// Every library the backend loads.
const LIBRARIES: [Library; 3] = [
    (
        "no CUDA driver found (libcuda.so)",
        cudarc::driver::sys::is_culib_present,
        "install the NVIDIA driver, or add the folder holding libcuda.so.1 to LD_LIBRARY_PATH",
    ),
    (
        "no CUDA runtime compiler found (libnvrtc.so.13)",
        cudarc::nvrtc::sys::is_culib_present,
        "install the CUDA 13 toolkit, or add its lib64 folder to LD_LIBRARY_PATH",
    ),
    (
        "no cuBLAS found (libcublas.so.13)",
        cudarc::cublas::sys::is_culib_present,
        "install the CUDA 13 toolkit, or add its lib64 folder to LD_LIBRARY_PATH",
    ),
];

/// `Ok(number of CUDA devices)` when the driver, NVRTC and cuBLAS load and at least one device
/// answers; otherwise one line saying what is missing and how to provide it.
///
/// A failure here means CUDA is not available on this machine (an environment matter, as
/// opposed to an error of a backend that did open).
pub fn probe() -> Result<usize> {
    for (missing, present, advice) in LIBRARIES {
        // SAFETY: the check only tries to open the library by its usual names and closes it.
        if !unsafe { present() } {
            bail!("{missing}: {advice}");
        }
    }
    let count = guarded("counting CUDA devices", CudaContext::device_count)?
        .map_err(|e| anyhow!("no CUDA device found: {e}"))?;
    if count <= 0 {
        bail!("no CUDA device found: the driver reports {count} devices");
    }
    Ok(count as usize)
}

/// Run `f`, turning a panic (cudarc's reaction to a missing library or symbol) into an error
/// that names `what`.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    panic::catch_unwind(AssertUnwindSafe(f))
        .map_err(|payload| anyhow!("{what} failed: {}", panic_message(payload.as_ref())))
}

/// The text of a panic payload.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_errors_that_name_the_step() {
        let err = guarded("opening the device", || -> u32 {
            panic!("libcuda.so not found")
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "opening the device failed: libcuda.so not found"
        );
        assert_eq!(guarded("adding", || 2 + 2).unwrap(), 4);
    }

    #[test]
    fn probe_answers_without_panicking() {
        // On a machine without CUDA this is one line naming the missing library; with CUDA it
        // counts the devices. Either way it returns.
        match probe() {
            Ok(n) => assert!(n >= 1),
            Err(e) => {
                let line = e.to_string();
                assert!(!line.contains('\n'), "one line: {line}");
                assert!(line.starts_with("no "), "{line}");
            }
        }
    }
}

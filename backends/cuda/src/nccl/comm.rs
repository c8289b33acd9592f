//! The NCCL communicator underneath [`super::NcclTransport`]: finding the library, making
//! the communicator without waiting forever for ranks that never come, aborting it at most
//! once (also from the watchdog's thread), and the raw send and receive calls.

use std::ffi::{c_int, c_void};
use std::mem::MaybeUninit;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::nccl::result::{self as nccl, NcclError};
use cudarc::nccl::sys;
use pipit_engine::dist::PeerProbe;

use crate::context::CudaBackend;
use crate::probe::guarded;
use crate::watchdog::seconds;

/// Bytes of NCCL's unique id.
const ID_BYTES: usize = 128;
/// How often a rank waiting for the communicator looks at its peers.
const SETUP_POLL: Duration = Duration::from_millis(20);
/// How long the watchdog waits for the host to leave an NCCL call before aborting.
const ABORT_GRACE: Duration = Duration::from_secs(5);

/// `Ok` when the NCCL library loads; otherwise one line saying how to provide it. Checked
/// before any NCCL call, because cudarc panics when the library is missing.
pub fn nccl_probe() -> Result<()> {
    // SAFETY: the check only tries to open the library by its usual names and closes it.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        bail!("no NCCL found (libnccl.so): install NCCL, or add the folder holding libnccl.so to LD_LIBRARY_PATH (with only libnccl.so.2 there, add a libnccl.so link to it)")
    }
}

/// One line for an NCCL error code.
pub(super) fn nccl_error(e: NcclError) -> anyhow::Error {
    let hint = if e.0 == sys::ncclResult_t::ncclInvalidUsage {
        " (NCCL reports this for two ranks on one GPU, among other misuses: give every rank its own GPU, or move tensors over TCP)"
    } else {
        ""
    };
    anyhow!("NCCL failed: {:?}{hint}", e.0)
}

/// NCCL's unique id from the bytes rank 0 shared.
pub(super) fn unique_id(bytes: &[u8]) -> Result<sys::ncclUniqueId> {
    if bytes.len() != ID_BYTES {
        bail!(
            "rank 0 shared an NCCL id of {} bytes, not {ID_BYTES}: do all ranks run the same pipit with --transport nccl?",
            bytes.len()
        );
    }
    let mut id = sys::ncclUniqueId {
        internal: [0; ID_BYTES],
    };
    for (dst, &src) in id.internal.iter_mut().zip(bytes) {
        *dst = src as std::ffi::c_char;
    }
    Ok(id)
}

/// An NCCL communicator, aborted at most once.
pub(super) struct Comm {
    pub(super) raw: sys::ncclComm_t,
    pub(super) live: bool,
}

// SAFETY: NCCL lets any thread use a communicator, one call at a time; every use goes through
// the mutex around it.
unsafe impl Send for Comm {}

impl Comm {
    /// Abort the communicator: NCCL kernels waiting on peers exit and its resources are freed.
    pub(super) fn abort(&mut self) {
        if !self.live {
            return;
        }
        self.live = false;
        let raw = self.raw;
        // SAFETY: `raw` came from ncclCommInitRank and, being live until now, was not aborted.
        match guarded("aborting the NCCL communicator", || unsafe {
            nccl::comm_abort(raw)
        }) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => log::warn!("aborting the NCCL communicator: {:?}", e.0),
            Err(e) => log::warn!("{e:#}"),
        }
    }

    /// An error NCCL recorded on its own (a network failure), if any.
    pub(super) fn async_error(&self) -> Option<String> {
        if !self.live {
            return None;
        }
        let raw = self.raw;
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator and a valid place for the result.
        let asked = guarded("asking NCCL for errors", || unsafe {
            sys::ncclCommGetAsyncError(raw, &mut state)
        });
        match asked {
            Err(e) => Some(format!("{e:#}")),
            Ok(code) if code != sys::ncclResult_t::ncclSuccess => {
                Some(format!("NCCL could not report its state: {code:?}"))
            }
            Ok(_) => match state.result() {
                Ok(_) => None,
                Err(e) => Some(format!("NCCL reported {:?}", e.0)),
            },
        }
    }
}

pub(super) fn lock(comm: &Mutex<Comm>) -> MutexGuard<'_, Comm> {
    comm.lock().unwrap_or_else(|e| e.into_inner())
}

/// The watchdog's way to abort: at once unless the host is inside an NCCL call; a call that
/// has not returned after [`ABORT_GRACE`] (a peer that never connects) cannot be interrupted
/// safely, so then the process stops with the failure as its one error line.
pub(super) fn abort_for_watchdog(comm: &Mutex<Comm>, why: &str) {
    let until = Instant::now() + ABORT_GRACE;
    loop {
        match comm.try_lock() {
            Ok(mut c) => return c.abort(),
            Err(TryLockError::Poisoned(p)) => return p.into_inner().abort(),
            Err(TryLockError::WouldBlock) if Instant::now() < until => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(TryLockError::WouldBlock) => {
                eprintln!("error: {why}; an NCCL call on this rank did not return, so it stops");
                std::process::exit(1);
            }
        }
    }
}

/// Make `rank`'s end of a communicator of `world` ranks on `backend`'s device, waiting at most
/// `timeout` for the others and giving up as soon as `peers` reports a failure.
pub(super) fn init_comm(
    backend: &CudaBackend,
    rank: usize,
    world: usize,
    id: sys::ncclUniqueId,
    timeout: Duration,
    peers: &PeerProbe,
) -> Result<Comm> {
    let (n, r) = (
        c_int::try_from(world).context("the world size")?,
        c_int::try_from(rank).context("the rank")?,
    );
    let ctx = Arc::clone(&backend.ctx);
    let (tx, rx) = mpsc::channel();
    // ncclCommInitRank blocks until every rank has joined; waiting on another thread lets this
    // one give up on time.
    thread::Builder::new()
        .name("pipit-nccl-setup".into())
        .spawn(move || {
            let made = (|| -> Result<Comm> {
                ctx.bind_to_thread()
                    .context("making the CUDA context current")?;
                let mut raw = MaybeUninit::uninit();
                // SAFETY: a valid place for the handle, and an id made by ncclGetUniqueId.
                guarded("setting up the NCCL communicator", || unsafe {
                    nccl::comm_init_rank(raw.as_mut_ptr(), n, id, r)
                })?
                .map_err(nccl_error)?;
                Ok(Comm {
                    // SAFETY: ncclCommInitRank succeeded, so it wrote the handle.
                    raw: unsafe { raw.assume_init() },
                    live: true,
                })
            })();
            if let Err(mpsc::SendError(Ok(mut late))) = tx.send(made) {
                // The waiting rank gave up; free what came too late.
                late.abort();
            }
        })
        .context("starting the NCCL setup thread")?;
    let deadline = Instant::now() + timeout;
    loop {
        match rx.recv_timeout(SETUP_POLL) {
            Ok(made) => return made,
            Err(RecvTimeoutError::Disconnected) => {
                bail!("the NCCL setup thread stopped without an answer")
            }
            Err(RecvTimeoutError::Timeout) => {
                if let Some(f) = peers() {
                    bail!("{f}; rank {rank} stopped while setting up NCCL");
                }
                if Instant::now() >= deadline {
                    bail!(
                        "the NCCL communicator of {world} ranks was not complete after {}: a rank did not join (see the other ranks' output; raise --peer-timeout if they are only slow)",
                        seconds(timeout)
                    );
                }
            }
        }
    }
}

/// `ncclSend` of `count` elements of `dtype` at `ptr`.
///
/// # Safety
/// `ptr` holds `count` elements, alive until the transfer completes; `comm` is live.
pub(super) unsafe fn send_raw(
    ptr: u64,
    count: usize,
    dtype: sys::ncclDataType_t,
    peer: usize,
    comm: sys::ncclComm_t,
    stream: sys::cudaStream_t,
) -> Result<(), NcclError> {
    nccl::send(
        ptr as *const c_void,
        count,
        dtype,
        peer as c_int,
        comm,
        stream,
    )
    .map(drop)
}

/// `ncclRecv` of `count` elements of `dtype` into `ptr`.
///
/// # Safety
/// As [`send_raw`].
pub(super) unsafe fn recv_raw(
    ptr: u64,
    count: usize,
    dtype: sys::ncclDataType_t,
    peer: usize,
    comm: sys::ncclComm_t,
    stream: sys::cudaStream_t,
) -> Result<(), NcclError> {
    nccl::recv(
        ptr as *mut c_void,
        count,
        dtype,
        peer as c_int,
        comm,
        stream,
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_have_nccls_size() {
        let bytes: Vec<u8> = (0..128u8).collect();
        let id = unique_id(&bytes).unwrap();
        assert_eq!(id.internal[0], 0);
        assert_eq!(id.internal[127] as u8, 127);
        let err = unique_id(&bytes[..16]).unwrap_err().to_string();
        assert!(err.contains("16 bytes, not 128"), "{err}");
    }

    #[test]
    fn the_probe_answers_without_panicking() {
        // With NCCL installed it passes; without, it is one line naming the library.
        if let Err(e) = nccl_probe() {
            let line = e.to_string();
            assert!(line.starts_with("no NCCL found (libnccl.so)"), "{line}");
            assert!(!line.contains('\n'));
        }
    }

    #[test]
    fn nccl_errors_are_one_line_with_a_hint_for_shared_gpus() {
        let e = nccl_error(NcclError(sys::ncclResult_t::ncclInvalidUsage)).to_string();
        assert!(
            e.starts_with(
                "NCCL failed: ncclInvalidUsage (NCCL reports this for two ranks on one GPU"
            ),
            "{e}"
        );
        let e = nccl_error(NcclError(sys::ncclResult_t::ncclSystemError)).to_string();
        assert_eq!(e, "NCCL failed: ncclSystemError");
    }
}

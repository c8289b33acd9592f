//! Ctrl-C during `pipit train`: the first one ends training after the step in progress, and
//! the run then saves its checkpoint as at its last step; a second one ends the process at
//! once (a checkpoint being written is left unfinished beside the last good one, which stays).

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Take over Ctrl-C (SIGINT) for this process. Only for a run that is one process: the ranks
/// of a launched run keep the default, so they stop together with their launcher.
pub fn catch() {
    #[cfg(unix)]
    {
        extern "C" fn on_interrupt(_: libc::c_int) {
            if REQUESTED.swap(true, Ordering::SeqCst) {
                // SAFETY: _exit is async-signal-safe; 130 is a shell's status for SIGINT.
                unsafe { libc::_exit(130) };
            }
        }
        let handler = on_interrupt as extern "C" fn(libc::c_int);
        // SAFETY: the handler only touches an atomic and calls _exit.
        unsafe { libc::signal(libc::SIGINT, handler as libc::sighandler_t) };
    }
}

/// Whether Ctrl-C was pressed since [`catch`].
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// How a run stopped by Ctrl-C ends: with this message and exit status 130, as a shell
/// reports a process ended by SIGINT.
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Interrupted {}

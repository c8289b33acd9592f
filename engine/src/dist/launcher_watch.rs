//! Ranks started by `pipit launch` never outlive it.
//!
//! The launcher names itself in [`LAUNCHER_PID_ENV`] on every process it starts. A process
//! that finds the variable watches its parent on a background thread: once the parent is no
//! longer the launcher (it died, however, and the process was handed to another parent), the
//! process exits with one line saying so. Its peers see its connections close and stop as
//! after any other failed rank. Processes started by torchrun, srun or by hand have no such
//! variable and are not watched.

use std::time::Duration;

use anyhow::Result;

use crate::invalid_input;

/// Environment variable `pipit launch` sets on every rank: the launcher's process id.
pub const LAUNCHER_PID_ENV: &str = "PIPIT_LAUNCHER_PID";

/// How often a watched process looks at its parent: a killed launcher's ranks are gone
/// within about this long.
pub const POLL: Duration = Duration::from_millis(250);

/// Exit status of a rank whose launcher is gone.
pub const EXIT_STATUS: i32 = 1;

/// The launcher's process id from [`LAUNCHER_PID_ENV`] as `get` reads it; `None` when unset.
pub fn launcher_pid(get: impl Fn(&str) -> Option<String>) -> Result<Option<u32>> {
    match get(LAUNCHER_PID_ENV) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| {
            invalid_input!(
                "{LAUNCHER_PID_ENV} must be a process id (set by pipit launch), got {v:?}"
            )
        }),
    }
}

/// Where this process was started by `pipit launch`, exit it (status [`EXIT_STATUS`], one line
/// on stderr) as soon as the launcher is gone; elsewhere do nothing. Returns at once: the
/// watching happens on a background thread.
pub fn watch_launcher() -> Result<()> {
    let Some(launcher) = launcher_pid(|name| std::env::var(name).ok())? else {
        return Ok(());
    };
    watch(launcher)
}

#[cfg(unix)]
fn watch(launcher: u32) -> Result<()> {
    use anyhow::Context;
    use std::io::Write;
    use std::os::unix::process::parent_id;

    std::thread::Builder::new()
        .name("pipit-launcher-watch".into())
        .spawn(move || loop {
            // The first look comes before any sleep: a launcher that died while this process
            // started is caught at once.
            if parent_id() != launcher {
                // Nobody may read stderr any more (it was a pipe to the launcher).
                let _ = writeln!(
                    std::io::stderr(),
                    "error: pipit launch (process {launcher}) exited; this rank stops with it"
                );
                std::process::exit(EXIT_STATUS);
            }
            std::thread::sleep(POLL);
        })
        .context("starting the launcher watch")?;
    Ok(())
}

#[cfg(not(unix))]
fn watch(_launcher: u32) -> Result<()> {
    // `pipit launch` kills its ranks when it stops normally; a parent process id to watch
    // after a hard kill exists only on Unix.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_launcher_pid_is_read_or_refused() {
        let read = |v: Option<&str>| launcher_pid(|_| v.map(str::to_string));
        assert_eq!(read(None).unwrap(), None);
        assert_eq!(read(Some("4321")).unwrap(), Some(4321));
        let err = read(Some("launcher")).unwrap_err();
        assert!(crate::is_invalid_input(&err));
        assert!(err.to_string().contains(LAUNCHER_PID_ENV), "{err}");
    }
}

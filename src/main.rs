//! The `pipit` command line.

use std::process::ExitCode;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // Mesa's Vulkan drivers complain on stderr when probed without a runtime directory (as on
    // servers and in CI); pipit never opens a window, so any writable directory will do.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    pipit::cli::main()
}

//! Log output: `tracing` lines on stderr, filtered by `HOST_LOG` (default `info`; e.g.
//! `HOST_LOG=debug` or `HOST_LOG=host=debug,plugin=info`). Workers inherit the master's stderr,
//! so one terminal shows every process; worker lines carry service, pid and plugin version.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_env("HOST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

//! The `host` executable: parse the command line, run the role it names, pick the exit code.
//! Everything else lives in the library (`host::cli` and below).

use std::process::ExitCode;

fn main() -> ExitCode {
    host::cli::main()
}

//! `host start --daemon` (`-d`, as in Workerman): run the master in the background, and return
//! only once it is ready, with its pid, or with the reason it is not.
//!
//! The command starts itself again (without `-d`) in a new session (setsid, so no terminal's
//! signals reach it), stdin from /dev/null, stdout and stderr to the log file (`--log-file`,
//! default `host.log` in the state directory), and a pipe at fd 3 on which the master says
//! `ready PID` or `failed REASON` (the fd is named in `HOST_DAEMON_READY_FD`). The command
//! prints that and exits 0 or 1. Nothing forks without exec: the master is a fresh process.

use std::{
    ffi::OsString,
    fs::File,
    io::Write,
    os::{fd::OwnedFd, unix::fs::DirBuilderExt},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use command_fds::{CommandFdExt, FdMapping};

use crate::{
    inherit::{adopt, Kind},
    state_dir::StateDir,
};

/// Names the readiness pipe's fd in the master a daemon start runs.
const READY_ENV: &str = "HOST_DAEMON_READY_FD";
const READY_FD: i32 = 3;

/// Whether this process is the master of a daemon start (it must not start yet another).
pub fn is_daemon_child() -> bool {
    std::env::var_os(READY_ENV).is_some()
}

/// The log file of a daemon: `--log-file`, or `host.log` in the state directory.
pub fn log_path(state: &StateDir, log_file: Option<PathBuf>) -> PathBuf {
    log_file.unwrap_or_else(|| state.root.join("host.log"))
}

/// Opens a log file for appending (created 0640), never through a symlink.
pub fn open_log(path: &Path) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            format!(
                "could not open log file {}: {e} (it must be a file, not a symlink, in a \
                 directory that exists)",
                path.display()
            )
        })
}

/// Points this process's stderr, where every log line goes, at the log file (workers and
/// upgraded masters inherit it). Stdout keeps the one line `host: ready ...` for whoever
/// started the master (a daemon's is the log file already).
pub fn log_to(path: &Path) -> Result<(), String> {
    let file = open_log(path)?;
    nix::unistd::dup2_stderr(&file).map_err(|e| format!("could not log to {}: {e}", path.display()))
}

/// The command side: starts the master in the background and waits for its word.
pub fn start(state: &StateDir, log: &Path) -> ExitCode {
    match start_inner(state, log) {
        Ok(pid) => {
            println!(
                "host: started in the background: master pid {pid}; log: {}",
                log.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("host: {e}");
            ExitCode::FAILURE
        }
    }
}

fn start_inner(state: &StateDir, log: &Path) -> Result<u32, String> {
    // The default log lives in the state directory, which must exist (and pass its checks)
    // before the log can be opened; the master checks it again.
    if log.starts_with(&state.root) && !state.root.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&state.root)
            .map_err(|e| {
                format!(
                    "could not create state directory {}: {e}",
                    state.root.display()
                )
            })?;
    }
    if log.starts_with(&state.root) {
        crate::trust::check_state_dir(&state.root, nix::unistd::geteuid())?;
    }
    let file = open_log(log)?;
    // Close-on-exec: the master must hold no copy of the write end but the one at fd 3, or
    // this command would never see the pipe end.
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| format!("could not make a pipe: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| format!("could not find this program: {e}"))?;
    // The same arguments, without --daemon, and with the log file spelled out.
    let mut args: Vec<OsString> = Vec::new();
    let mut given = std::env::args_os().skip(1);
    while let Some(arg) = given.next() {
        if arg == "--log-file" {
            given.next();
        } else if !(arg == "-d"
            || arg == "--daemon"
            || arg.to_string_lossy().starts_with("--log-file="))
        {
            args.push(arg);
        }
    }
    args.push("--log-file".into());
    args.push(log.into());
    let mut command = Command::new(exe);
    command
        .args(args)
        .env(READY_ENV, READY_FD.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::from(file.try_clone().map_err(|e| e.to_string())?))
        .stderr(Stdio::from(file))
        .fd_mappings(vec![FdMapping {
            parent_fd: write,
            child_fd: READY_FD,
        }])
        .map_err(|e| format!("could not pass the readiness pipe: {e}"))?;
    let child = command
        .spawn()
        .map_err(|e| format!("could not start the master: {e}"))?;
    // Our copy of the write end goes with `command`: the pipe ends when the master closes it.
    drop(command);
    // One line: `ready PID` or `failed REASON`; nothing if the master died first.
    let mut word = String::new();
    let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(File::from(read)), &mut word);
    let word = word.trim();
    if let Some(pid) = word.strip_prefix("ready ") {
        // The master runs on; it is not this process's to wait for.
        drop(child);
        return pid
            .trim()
            .parse()
            .map_err(|_| format!("the master said {word:?}"));
    }
    match word.strip_prefix("failed ") {
        Some(reason) => Err(reason.to_string()),
        None => Err(format!(
            "the master exited before it was ready; its log is {}",
            log.display()
        )),
    }
}

/// The master side of a daemon start: where to say ready or failed.
pub struct Readiness(File);

impl Readiness {
    /// The readiness pipe, when this process is the master of a daemon start. The variable is
    /// taken out of the environment so that workers and upgraded masters do not see it.
    pub fn from_env() -> Option<Readiness> {
        std::env::var_os(READY_ENV)?;
        std::env::remove_var(READY_ENV);
        // A session of its own: no terminal's signal reaches a daemon.
        let _ = nix::unistd::setsid();
        adopt(READY_FD, Kind::Pipe).map(|fd: OwnedFd| Readiness(File::from(fd)))
    }

    pub fn ready(mut self) {
        let _ = writeln!(self.0, "ready {}", std::process::id());
    }

    pub fn failed(mut self, reason: &str) {
        let _ = writeln!(self.0, "failed {reason}");
    }
}

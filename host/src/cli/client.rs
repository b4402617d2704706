//! The client side of the control socket: what `host reload`, `stop`, `upgrade`, `rollback`,
//! `reopen-logs` and `status` send to the running master, and how they read its answers. It
//! checks who answers before it trusts the answer (the socket's peer credentials against the
//! pid file).

use std::{
    io::{BufRead, BufReader, Write},
    os::{fd::OwnedFd, unix::net::UnixStream},
    time::{Duration, Instant},
};

use rustix::{
    event::{poll, PollFd, PollFlags, Timespec},
    io::Errno,
    process::{pidfd_open, Pid, PidfdFlags},
};

use super::{EXIT_FAILED, EXIT_NO_MASTER};
use crate::{
    protocol::{ControlReply, ControlRequest},
    state_dir::StateDir,
};

/// How long `host stop` waits, after the master said it stopped, for its process to end (it
/// writes its history, closes the admin server and removes its socket and pid file first).
const EXIT_PATIENCE: Duration = Duration::from_secs(10);

/// Sends `request` and yields the replies until the final one.
pub fn converse(
    state: &StateDir,
    request: &ControlRequest,
    on_reply: impl FnMut(ControlReply),
) -> Result<(), (u8, String)> {
    converse_with(state, request, |_| {}, on_reply)
}

/// [`converse`], telling `on_connect` the pid of the master that answered (checked by its
/// socket's peer credentials) before the request is sent.
fn converse_with(
    state: &StateDir,
    request: &ControlRequest,
    on_connect: impl FnOnce(u32),
    mut on_reply: impl FnMut(ControlReply),
) -> Result<(), (u8, String)> {
    let socket = state.socket();
    let pid_file_pid = state.check_for_client().map_err(|e| (EXIT_FAILED, e))?;
    let mut stream = UnixStream::connect(&socket).map_err(|e| {
        (
            EXIT_NO_MASTER,
            format!(
                "no host master is running with state directory {} ({e}); start one with \
                 `host start`, or pass the --state-dir (or HOST_STATE_DIR) it was started with",
                state.root.display()
            ),
        )
    })?;
    on_connect(check_master(&stream, state, pid_file_pid)?);
    stream
        .write_all(&crate::protocol::encode(request))
        .map_err(|e| (EXIT_FAILED, format!("could not talk to the master: {e}")))?;
    for line in BufReader::new(stream).lines() {
        let line = line.map_err(|e| {
            (
                EXIT_FAILED,
                format!("lost the connection to the master: {e}"),
            )
        })?;
        let reply: ControlReply = serde_json::from_str(&line).map_err(|e| {
            (
                EXIT_FAILED,
                format!(
                    "unreadable answer from the master ({e}); is it the same version as this CLI?"
                ),
            )
        })?;
        let last = matches!(
            reply,
            ControlReply::Done { .. } | ControlReply::Error(_) | ControlReply::Status(_)
        );
        on_reply(reply);
        if last {
            return Ok(());
        }
    }
    Err((
        EXIT_FAILED,
        "the master closed the connection before it answered".into(),
    ))
}

/// Checks who answers on the control socket before trusting it: a process of this user (or
/// root), and the master the pid file names. Returns its pid.
fn check_master(
    stream: &UnixStream,
    state: &StateDir,
    mut pid_file: Option<u32>,
) -> Result<u32, (u8, String)> {
    let me = nix::unistd::geteuid().as_raw();
    let peer = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| {
            (
                EXIT_FAILED,
                format!("could not check who runs the master: {e}"),
            )
        })?;
    if peer.uid() != me && peer.uid() != 0 {
        return Err((
            EXIT_FAILED,
            format!(
                "the process answering on the control socket runs as uid {}, not as you (uid \
                 {me}) or root; it is not a master this CLI trusts. Stop it and remove the socket.",
                peer.uid()
            ),
        ));
    }
    // A master taking over in an upgrade puts its socket in place a moment before its pid
    // file (each an atomic rename): a CLI that read the old pid file in between looks again.
    let deadline = Instant::now() + Duration::from_millis(500);
    while pid_file.is_some_and(|pid| pid != peer.pid() as u32) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        pid_file = state.check_for_client().map_err(|e| (EXIT_FAILED, e))?;
    }
    if let Some(pid) = pid_file.filter(|pid| *pid != peer.pid() as u32) {
        return Err((
            EXIT_FAILED,
            format!(
                "the process answering on the control socket (pid {}) is not the master the pid \
                 file names (pid {pid}); something else is listening there. Stop it and remove \
                 the socket.",
                peer.pid()
            ),
        ));
    }
    Ok(peer.pid() as u32)
}

/// Reload, upgrade, rollback, reopen-logs: print progress lines as they come; fail if the
/// master says it failed.
pub fn stream(state: &StateDir, request: &ControlRequest) -> Result<(), (u8, String)> {
    stream_with(state, request, |_| {}).0
}

/// [`stream`], with `on_connect` as in [`converse_with`]; also says whether the master took
/// the request on (it answered with progress or an outcome, not with an error).
fn stream_with(
    state: &StateDir,
    request: &ControlRequest,
    on_connect: impl FnOnce(u32),
) -> (Result<(), (u8, String)>, bool) {
    let (mut outcome, mut taken) = (Ok(()), false);
    let talked = converse_with(state, request, on_connect, |reply| match reply {
        ControlReply::Line(line) => {
            taken = true;
            println!("{line}")
        }
        ControlReply::Done { ok: true, summary } => {
            taken = true;
            println!("{summary}")
        }
        ControlReply::Done { ok: false, summary } => {
            taken = true;
            outcome = Err((EXIT_FAILED, summary))
        }
        ControlReply::Error(e) => outcome = Err((EXIT_FAILED, e)),
        ControlReply::Status(_) => {}
    });
    (talked.and(outcome), taken)
}

/// `host stop`: as [`stream`], then waits until the master's process has ended, so that
/// what runs next (`host start`, a deploy script, systemd) finds its pid file, control socket
/// and ports free. The master says "stopped" a moment before it exits.
pub fn stop(state: &StateDir) -> Result<(), (u8, String)> {
    let mut master = None;
    // The process is pinned by a pidfd before the stop is sent: a pid alone could be taken by
    // another process once the master is gone.
    let (outcome, taken) = stream_with(state, &ControlRequest::Stop, |pid| {
        master = Some((pid, pidfd(pid)))
    });
    match master {
        // Also when the stop failed once under way (workers killed before they drained, the
        // connection lost): the master exits all the same, and the stop's own error is the
        // one to tell. Not when the master refused it: then it goes on running.
        Some((pid, fd)) if taken => outcome.and(wait_for_exit(pid, fd)),
        _ => outcome,
    }
}

/// A pidfd of `pid`; `None` when the process is gone already.
fn pidfd(pid: u32) -> Result<Option<OwnedFd>, Errno> {
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return Ok(None);
    };
    match pidfd_open(pid, PidfdFlags::empty()) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::SRCH) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Waits until the master's process ends, at most [`EXIT_PATIENCE`]: on its pidfd (readable
/// from then on), or, where there is none (a kernel before 5.3, a seccomp profile that refuses
/// the call), by looking at /proc every 20 ms.
fn wait_for_exit(pid: u32, fd: Result<Option<OwnedFd>, Errno>) -> Result<(), (u8, String)> {
    let deadline = Instant::now() + EXIT_PATIENCE;
    let waited = match fd {
        Ok(None) => Ok(true),
        Ok(Some(fd)) => poll_pidfd(&fd, deadline),
        Err(_) => {
            while !gone(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(gone(pid))
        }
    };
    match waited {
        Ok(true) => Ok(()),
        Ok(false) => Err((
            EXIT_FAILED,
            format!(
                "the master (pid {pid}) said it stopped, but its process has not ended {} s \
                 later; see its log for what it is doing, and `kill {pid}` if it hangs",
                EXIT_PATIENCE.as_secs()
            ),
        )),
        Err(e) => Err((
            EXIT_FAILED,
            format!("could not wait for the master (pid {pid}) to exit: {e}"),
        )),
    }
}

/// Whether the pidfd's process ended before `deadline`.
fn poll_pidfd(fd: &OwnedFd, deadline: Instant) -> Result<bool, Errno> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = Timespec {
            tv_sec: left.as_secs() as _,
            tv_nsec: left.subsec_nanos() as _,
        };
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        match poll(&mut fds, Some(&timeout)) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Whether `pid` has ended: no longer in /proc, or a zombie its parent has not reaped yet.
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fallback without pidfds: a process that ended is gone even before its parent reaps
    /// it (a master whose parent never waits stays a zombie).
    #[test]
    fn a_zombie_counts_as_gone() {
        assert!(!gone(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !gone(child.id()) {
            assert!(Instant::now() < deadline, "`true` never ended");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Not reaped yet: /proc still has it, as a zombie.
        assert!(std::path::Path::new(&format!("/proc/{}", child.id())).exists());
        child.wait().unwrap();
        assert!(gone(child.id()));
    }
}

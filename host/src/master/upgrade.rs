//! `host upgrade [--exe PATH]` and SIGUSR2: replace the master itself (a new host binary, a
//! re-read config) without refusing a connection, as nginx does on SIGUSR2 and GoFrame's
//! `Restart(newExeFilePath)`.
//!
//! The old master starts the new one from PATH (default: the executable it was started from,
//! recorded at start, because `/proc/self/exe` names a deleted file once cargo rebuilt it), with
//! its original arguments and working directory. The new master *inherits* every listening
//! socket and the state directory's lock as open fds, named in the `HOST_UPGRADE` environment
//! variable (as nginx and gunicorn pass theirs), plus a socketpair to talk to the old one.
//! Inheritance rather than SCM_RIGHTS over the control socket (Envoy, Pingora): the sockets
//! never leave either process, nothing has to be accepted from a socket that another user could
//! have connected to, and the same code path serves systemd's `LISTEN_FDS`.
//!
//! The new master reads the config file again, starts its workers with the canary rules (the
//! first worker of each service serves through its canary probation before the others start),
//! and reports READY. Only then does the old master tell it to take over: the new master renames
//! its control socket over `host.sock` and writes the pid file (each an atomic rename, so the
//! CLI always finds one master), tells systemd its pid (`MAINPID=`), and confirms; the old
//! master closes its listeners (the sockets live on in the new master), drains its workers (a
//! request in flight gets its whole answer) and exits.
//!
//! Any failure before READY (the executable is missing or not executable, exits, crashes, never
//! reports ready within `upgrade_timeout`, a bad config, a plugin that does not start) leaves
//! the old master serving, untouched: the new one and everything it started are killed.

use std::{
    ffi::OsString,
    fs::File,
    io::{BufRead, BufReader, Write},
    os::{
        fd::OwnedFd,
        unix::{fs::PermissionsExt, net::UnixStream as StdUnixStream},
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use command_fds::{CommandFdExt, FdMapping};
use nix::{
    sys::signal::{kill, killpg, Signal},
    unistd::Pid,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use super::{jobs::Progress, listeners::Handed, supervise::describe_exit, Master};
use crate::{
    inherit::{adopt, Kind},
    protocol::{encode, UpgradeMessage},
};

/// The environment variable that carries the handover to a new master.
const HANDOVER_ENV: &str = "HOST_UPGRADE";
/// The first fd the handover uses in the new master (0-2 are stdio).
const FIRST_HANDOVER_FD: i32 = 3;
/// The successor's pid once it was reaped, until its upgrade's reply is written: a second
/// signal must not kill a pid that may be another process's by then (`kill_master_tree`
/// leaves 0 alone).
const REAPED: u32 = 0;
/// How long the new master may take to confirm the takeover once told.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

/// How this master was started, recorded at start: what `host upgrade` starts by default.
#[derive(Debug, Clone)]
pub struct Origin {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
    pub cwd: PathBuf,
    /// The first 12 hex digits of the executable's SHA-256.
    pub build_id: String,
}

impl Origin {
    pub fn here() -> Origin {
        let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
        Origin {
            build_id: build_id(&exe).unwrap_or_else(|| "unknown".into()),
            exe,
            args: std::env::args_os().collect(),
            cwd: std::env::current_dir().unwrap_or_else(|_| "/".into()),
        }
    }
}

/// The first 12 hex digits of a file's SHA-256.
fn build_id(exe: &Path) -> Option<String> {
    let mut file = File::open(exe).ok()?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).ok()?;
    Some(format!("{:x}", hasher.finalize())[..12].to_string())
}

/// What `HOST_UPGRADE` says: which fd is what.
#[derive(Debug, Serialize, Deserialize)]
struct HandoverEnv {
    listeners: Vec<Handed>,
    lock_fd: i32,
    channel_fd: i32,
    old_pid: u32,
}

/// The new master's side of an upgrade: what it inherited.
pub struct Handover {
    pub listeners: Vec<Handed>,
    pub lock: File,
    pub old_pid: u32,
    channel: StdUnixStream,
    /// What the old master said, once [`Handover::listen`] runs.
    told: Option<tokio::sync::watch::Receiver<Option<Told>>>,
}

impl Handover {
    /// The handover this process was started with, if it is a new master in an upgrade. Takes
    /// the variable out of the environment (workers must not see it). Call before any thread
    /// starts.
    pub fn from_env() -> Result<Option<Handover>, String> {
        let Some(text) = std::env::var_os(HANDOVER_ENV) else {
            return Ok(None);
        };
        std::env::remove_var(HANDOVER_ENV);
        let env: HandoverEnv = serde_json::from_str(&text.to_string_lossy()).map_err(|e| {
            format!(
                "{HANDOVER_ENV} is not readable ({e}); it is set by `host upgrade`, not by hand"
            )
        })?;
        let lock = adopt(env.lock_fd, Kind::File)
            .ok_or("the state directory's lock was not passed in the upgrade")?;
        let channel = adopt(env.channel_fd, Kind::Socket)
            .ok_or("the channel to the old master was not passed in the upgrade")?;
        Ok(Some(Handover {
            listeners: env.listeners,
            lock: File::from(lock),
            old_pid: env.old_pid,
            channel: StdUnixStream::from(channel),
            told: None,
        }))
    }

    /// Tells the old master something (best effort: it may be gone).
    pub fn tell(&mut self, message: &UpgradeMessage) {
        let _ = self.channel.write_all(&encode(message));
    }

    /// Starts listening to the old master, on a thread of its own (the channel is a blocking
    /// socket): from then on [`Handover::abandoned`] and [`Handover::told`] say what it said.
    /// Listening from the start of this master's own start, not only once it is ready, lets a
    /// stop of the old master end this start at its next step, not after all of it.
    pub fn listen(&mut self) -> Result<(), String> {
        let channel = self
            .channel
            .try_clone()
            .map(Waiter)
            .map_err(|e| format!("could not use the channel to the old master: {e}"))?;
        let (tx, rx) = tokio::sync::watch::channel(None);
        std::thread::Builder::new()
            .name("upgrade-channel".into())
            .spawn(move || {
                let _ = tx.send(Some(channel.wait_for_takeover()));
            })
            .map_err(|e| format!("could not listen to the old master: {e}"))?;
        self.told = Some(rx);
        Ok(())
    }

    /// The old master has told this one to stop (see [`Handover::listen`]).
    pub fn abandoned(&self) -> bool {
        self.told
            .as_ref()
            .is_some_and(|rx| *rx.borrow() == Some(Told::Abandon))
    }

    /// Returns once the old master has told this one to stop; never without [`Handover::listen`].
    pub async fn until_abandoned(&mut self) {
        match self.told.as_mut() {
            // The channel closed without an Abandon (the old master crashed): never. Its
            // workers die with it, and this master must go on to take over.
            Some(rx) => {
                if rx.wait_for(|t| *t == Some(Told::Abandon)).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }

    /// What the old master said: `TakeOver`, `Abandon`, or nothing (gone).
    pub async fn told(&mut self) -> Told {
        let Some(rx) = self.told.as_mut() else {
            return Told::Gone;
        };
        match rx.wait_for(Option::is_some).await {
            Ok(told) => told.unwrap_or(Told::Gone),
            Err(_) => Told::Gone,
        }
    }
}

/// Waits on the channel to the old master.
struct Waiter(StdUnixStream);

/// What the old master said once the new one was ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Told {
    TakeOver,
    /// It was told to stop: the host stops, this master too.
    Abandon,
    /// It went away without a word (it crashed, or was killed).
    Gone,
}

impl Waiter {
    /// Waits until the old master says `TakeOver` or `Abandon`, or goes away. Blocking: called
    /// on a blocking thread.
    fn wait_for_takeover(self) -> Told {
        for line in BufReader::new(self.0).lines() {
            match line.map(|l| serde_json::from_str::<UpgradeMessage>(&l)) {
                Ok(Ok(UpgradeMessage::TakeOver)) => return Told::TakeOver,
                Ok(Ok(UpgradeMessage::Abandon)) => return Told::Abandon,
                Ok(_) => continue,
                Err(_) => return Told::Gone,
            }
        }
        Told::Gone
    }
}

/// Tells the master being upgraded (if this process is the new master of an upgrade) why it
/// cannot start: for failures before `master::main` runs (a bad config).
pub fn refuse(reason: &str) {
    if let Ok(Some(mut handover)) = Handover::from_env() {
        handover.tell(&UpgradeMessage::Failed(reason.to_string()));
    }
}

impl Master {
    /// The old master's side of `host upgrade` (see the module comment). Runs as a job, so no
    /// reload runs meanwhile.
    pub(super) async fn upgrade(
        self: &Arc<Self>,
        exe: Option<PathBuf>,
        progress: &Progress,
    ) -> (bool, String) {
        let started = Instant::now();
        if self.dev_mode {
            return (
                false,
                "`host dev` does not upgrade itself: stop it and run it again".into(),
            );
        }
        if *self.stopping.borrow() {
            return (false, "the host is stopping; no upgrade".into());
        }
        let exe = exe.unwrap_or_else(|| self.origin.exe.clone());
        if let Err(e) = check_executable(&exe) {
            return (
                false,
                format!("upgrade refused: {e}; this master keeps serving"),
            );
        }
        let timeout = self.upgrade_timeout;
        progress.line(format!(
            "upgrade: starting a new master from {} (build {}); it has {} to get every service \
             ready",
            exe.display(),
            build_id(&exe).unwrap_or_else(|| "unknown".into()),
            humantime::format_duration(timeout)
        ));
        // The new master reads the history from the disk: what this one saved last (a
        // rollback a moment ago, say) must be there, not still on its writer thread.
        self.save_history();
        let store = self.clone();
        let _ = tokio::task::spawn_blocking(move || store.store.flush_history()).await;
        let (mut child, channel) = match self.spawn_successor(&exe) {
            Ok(spawned) => spawned,
            Err(e) => {
                return (
                    false,
                    format!(
                        "upgrade failed: could not start {}: {e}; this master keeps serving",
                        exe.display()
                    ),
                )
            }
        };
        let new_pid = child.id().unwrap_or(0);
        // Until the job has told its outcome (`run_jobs`): a stop waits for that.
        self.successor.send_replace(Some(new_pid));
        let mut stopping = self.stopping.subscribe();
        let (read, mut write) = channel.into_split();
        let mut lines = tokio::io::BufReader::new(read).lines();
        let deadline = tokio::time::Instant::now() + timeout;
        // What the new master's config gives its workers to drain (it says so first).
        let mut its_drain = None;
        let failure = loop {
            tokio::select! {
                // SIGTERM or SIGINT: the host stops, the new master too (not a takeover that
                // would leave it serving after the operator stopped the host).
                true = async { stopping.wait_for(|s| *s).await.is_ok() } => {
                    // Its DrainTimeout may be read already, not yet parsed.
                    while let Ok(Ok(Some(line))) =
                        tokio::time::timeout(Duration::ZERO, lines.next_line()).await
                    {
                        if let Ok(UpgradeMessage::DrainTimeout(drain)) = serde_json::from_str(&line) {
                            its_drain = Some(drain);
                        }
                    }
                    return self.abandon(child, &mut write, new_pid, deadline, its_drain).await;
                }
                line = lines.next_line() => match line {
                    Ok(Some(line)) => match serde_json::from_str::<UpgradeMessage>(&line) {
                        Ok(UpgradeMessage::Progress(text)) => progress.line(format!("new master {new_pid}: {text}")),
                        Ok(UpgradeMessage::DrainTimeout(drain)) => its_drain = Some(drain),
                        Ok(UpgradeMessage::Ready) => break None,
                        Ok(UpgradeMessage::Failed(reason)) => break Some(reason),
                        _ => {}
                    },
                    // The channel closed: the new master is gone (or going).
                    _ => {
                        let exit = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
                        break Some(match exit {
                            Ok(status) => format!("it {} before it was ready", describe_exit(status)),
                            Err(_) => "it closed its channel before it was ready".into(),
                        });
                    }
                },
                status = child.wait() => {
                    // It may have said why just before it exited: that is the better reason.
                    let mut said = None;
                    while let Ok(Ok(Some(line))) =
                        tokio::time::timeout(Duration::from_millis(200), lines.next_line()).await
                    {
                        if let Ok(UpgradeMessage::Failed(reason)) = serde_json::from_str(&line) {
                            said = Some(reason);
                        }
                    }
                    break Some(said.unwrap_or_else(|| {
                        format!("it {} before it was ready", describe_exit(status))
                    }));
                }
                _ = tokio::time::sleep_until(deadline) => break Some(format!(
                    "it did not report ready within upgrade_timeout ({})",
                    humantime::format_duration(timeout)
                )),
            }
        };
        if let Some(reason) = failure {
            kill_master_tree(new_pid);
            let _ = child.wait().await;
            self.successor.send_replace(Some(REAPED));
            return (
                false,
                format!(
                    "upgrade failed: the new master (pid {new_pid}, {}): {reason}. It and its \
                     workers were stopped; this master (pid {}) keeps serving, untouched.",
                    exe.display(),
                    std::process::id()
                ),
            );
        }
        // Ready: hand over, unless this master was told to stop meanwhile.
        if *self.stopping.borrow() {
            return self
                .abandon(child, &mut write, new_pid, deadline, its_drain)
                .await;
        }
        // The history is the new master's from the takeover on: what this one saved before is
        // on the disk first, and nothing it saves later can land after the new master's save.
        self.history_handed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let store = self.clone();
        let _ = tokio::task::spawn_blocking(move || store.store.flush_history()).await;
        let _ = write.write_all(&encode(&UpgradeMessage::TakeOver)).await;
        let took_over = tokio::time::timeout(TAKEOVER_WAIT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if matches!(
                    serde_json::from_str::<UpgradeMessage>(&line),
                    Ok(UpgradeMessage::TookOver)
                ) {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        if !took_over {
            kill_master_tree(new_pid);
            let _ = child.wait().await;
            self.successor.send_replace(Some(REAPED));
            self.history_handed
                .store(false, std::sync::atomic::Ordering::Relaxed);
            self.save_history();
            return (
                false,
                format!(
                    "upgrade failed: the new master (pid {new_pid}) was ready but did not take \
                     over; it was stopped and this master keeps serving"
                ),
            );
        }
        // From here the new master serves: this one lets it have the sockets, drains and exits.
        // The child is not waited for: it outlives this process.
        drop(child);
        self.hand_over(new_pid);
        if *self.stopping.borrow() {
            // Told to stop while the new master was taking over: it stops too, with a drain.
            tracing::warn!(
                "told to stop during the takeover: stopping the new master {new_pid} too"
            );
            let _ = kill(Pid::from_raw(new_pid as i32), Signal::SIGTERM);
        }
        (
            true,
            format!(
                "upgraded in {} ms: master {} -> {new_pid} (build {} -> {}); the old master \
                 drains its workers and exits",
                started.elapsed().as_millis(),
                std::process::id(),
                self.origin.build_id,
                build_id(&exe).unwrap_or_else(|| "unknown".into())
            ),
        )
    }

    /// The old master was told to stop before the takeover: tells the new one so, and waits
    /// until it has drained its workers (they may be serving on the shared sockets) and
    /// exited, as long as its start (`deadline`) and a drain (`its_drain`, the longest
    /// `drain_timeout` of its config, as it said; else this master's) can take; then kills it.
    async fn abandon(
        &self,
        mut child: tokio::process::Child,
        channel: &mut tokio::net::unix::OwnedWriteHalf,
        new_pid: u32,
        deadline: tokio::time::Instant,
        its_drain: Option<Duration>,
    ) -> (bool, String) {
        let _ = channel.write_all(&encode(&UpgradeMessage::Abandon)).await;
        tracing::warn!(
            "told to stop during an upgrade: the new master (pid {new_pid}) does not take over; \
             it drains its workers and exits"
        );
        let drain = its_drain.unwrap_or_else(|| {
            self.services()
                .iter()
                .map(|s| s.config().drain_timeout)
                .max()
                .unwrap_or_default()
        });
        let bound = deadline + drain + Duration::from_secs(5);
        let end = match tokio::time::timeout_at(bound, child.wait()).await {
            Ok(status) => format!("it {}", describe_exit(status)),
            Err(_) => {
                kill_master_tree(new_pid);
                let _ = child.wait().await;
                "it had not exited in time, and was killed with its workers".into()
            }
        };
        self.successor.send_replace(Some(REAPED));
        (
            false,
            format!(
                "upgrade abandoned: this master was told to stop (SIGTERM or SIGINT) before the \
                 new master (pid {new_pid}) took over, so the host stops; {end}"
            ),
        )
    }

    /// Starts the new master with the handover fds and its half of the channel.
    fn spawn_successor(
        &self,
        exe: &Path,
    ) -> std::io::Result<(tokio::process::Child, tokio::net::UnixStream)> {
        let (ours, theirs) = StdUnixStream::pair()?;
        let mut mappings = Vec::new();
        let mut next = FIRST_HANDOVER_FD;
        let mut map = |fd: OwnedFd| {
            mappings.push(FdMapping {
                parent_fd: fd,
                child_fd: next,
            });
            next += 1;
            next - 1
        };
        let channel_fd = map(OwnedFd::from(theirs));
        let lock_fd = map(OwnedFd::from(self.home.lock_file()?));
        let mut listeners = Vec::new();
        for svc in self.services() {
            for l in svc.listeners().iter() {
                let fd = map(OwnedFd::from(l.socket.try_clone()?));
                listeners.push(Handed {
                    service: svc.name().to_string(),
                    listen: l.configured,
                    fd,
                });
            }
        }
        if let Some(admin) = &self.admin {
            let fd = map(OwnedFd::from(admin.socket().try_clone()?));
            listeners.push(Handed {
                service: crate::admin::LISTENER_NAME.to_string(),
                listen: admin.configured(),
                fd,
            });
        }
        let env = HandoverEnv {
            listeners,
            lock_fd,
            channel_fd,
            old_pid: std::process::id(),
        };
        let mut command = tokio::process::Command::new(exe);
        command
            .args(self.origin.args.iter().skip(1))
            .current_dir(&self.origin.cwd)
            .env(
                HANDOVER_ENV,
                serde_json::to_string(&env).expect("serializes"),
            )
            // systemd's sockets are this master's, passed on as listeners above.
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(std::process::Stdio::null())
            .fd_mappings(mappings)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let child = command.spawn()?;
        drop(command);
        ours.set_nonblocking(true)?;
        Ok((child, tokio::net::UnixStream::from_std(ours)?))
    }
}

/// Why `exe` cannot be started, if it cannot.
fn check_executable(exe: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(exe).map_err(|e| {
        format!(
            "{} cannot be used ({e}); build it, or name another with --exe",
            exe.display()
        )
    })?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(format!(
            "{} is not an executable file; build it, or name another with --exe",
            exe.display()
        ));
    }
    Ok(())
}

/// Stops a new master that failed, with every worker it started: the master is stopped first
/// (so it starts no more), each child's process group is killed, then the master.
pub(super) fn kill_master_tree(pid: u32) {
    if pid == 0 {
        return;
    }
    let master = Pid::from_raw(pid as i32);
    let _ = kill(master, Signal::SIGSTOP);
    for child in children(pid) {
        let _ = killpg(Pid::from_raw(child as i32), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(child as i32), Signal::SIGKILL);
    }
    let _ = kill(master, Signal::SIGKILL);
}

/// The pids whose parent is `pid`, from /proc.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

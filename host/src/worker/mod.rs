//! The worker role: `host worker`, started by the master from its own executable.
//!
//! In order: ask the kernel to signal us when the master dies (PR_SET_PDEATHSIG), read the
//! [`WorkerSpec`] from the channel the master passed at fd 3, start the watchdog thread, load
//! and start the plugin (the on-start hook: this is the code a reload replaces), take the
//! listeners inherited at fds 4.., report READY, serve and send heartbeats. Drain on the
//! master's `Drain`, on SIGTERM, or when the channel closes (the master is gone); then call the
//! plugin's `on_stop` and exit 0.
//!
//! Each worker leads its own process group (the master starts it so), which lets the master
//! kill a worker with everything its plugin started. Ctrl-C in a terminal reaches only the
//! master's group; the master turns it into an orderly drain. SIGINT is ignored here all the
//! same, in case someone sends it to a worker's group.

mod access_log;
#[cfg(test)]
mod alloc_count;
mod body;
mod conn;
mod exchange;
mod http;
mod kv;
pub(crate) mod link;
mod liveness;
pub(crate) use liveness::rss_bytes;
pub mod plugin;
mod plugin_v01;
mod request_id;
mod respond;
mod stats;
mod ws;

use std::{
    io::Read,
    net::TcpListener as StdTcpListener,
    os::unix::net::UnixStream as StdUnixStream,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, AtomicU64},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::getppid};
use tokio::{
    net::UnixStream,
    signal::unix::{signal, SignalKind},
    sync::{oneshot, watch},
};
use tracing::Instrument;

use self::{link::Link, plugin::Plugin};
use crate::inherit::{self, Kind};
use crate::protocol::{
    monotonic_ns, FromWorker, StartTimings, ToWorker, WorkerSpec, CHANNEL_FD, FIRST_LISTENER_FD,
    PLUGIN_FD,
};

static WORKER_SPAN: OnceLock<tracing::Span> = OnceLock::new();

/// How long a stopping worker waits for the plugin's `on_stop` and then its background tasks.
const STOP_DEADLINE: Duration = Duration::from_secs(5);
/// How long a worker waits for its access log writer to switch files at `host reopen-logs`
/// (the master waits a little longer for every worker's answer).
const REOPEN_PATIENCE: Duration = Duration::from_secs(3);

/// Runs `f` inside the worker's span, so that the line it logs carries service, pid and plugin
/// version (threads of the blocking pool and the plugin's log callback have no span of their own).
pub(crate) fn in_worker_span<R>(f: impl FnOnce() -> R) -> R {
    match WORKER_SPAN.get() {
        Some(span) => span.in_scope(f),
        None => f(),
    }
}

/// The `host worker` entry point.
pub fn main(master_pid: u32) -> ExitCode {
    let mut timings = StartTimings {
        entered: monotonic_ns(),
        ..StartTimings::default()
    };
    // First, before anything can block: die (drain, in fact) with the master. The check after it
    // closes the race where the master died before the prctl.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM) {
        eprintln!("host worker: could not set the parent-death signal: {e}");
        return ExitCode::FAILURE;
    }
    if getppid().as_raw() as u32 != master_pid {
        eprintln!("host worker: the master (pid {master_pid}) is gone; exiting");
        return ExitCode::FAILURE;
    }
    let channel = match inherited_channel() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("host worker: {e}");
            return ExitCode::from(2);
        }
    };
    let spec = match read_spec(&channel) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("host worker: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some((uid, gid)) = spec.run_as {
        if let Err(e) = drop_privileges(uid, gid, master_pid) {
            let reason = format!("could not run as uid {uid}, gid {gid}: {e}");
            eprintln!("host worker: {reason}");
            let _ = std::io::Write::write_all(
                &mut &channel,
                &crate::protocol::encode(&FromWorker::Failed { reason }),
            );
            return ExitCode::FAILURE;
        }
    }
    let link = match channel.try_clone() {
        Ok(writer) => Link::install(writer),
        Err(e) => {
            eprintln!("host worker: could not use the channel to the master: {e}");
            return ExitCode::FAILURE;
        }
    };
    liveness::spawn_watchdog(master_pid, Duration::from_millis(spec.drain_timeout_ms));
    let span = tracing::info_span!(
        "worker",
        service = %spec.service,
        pid = std::process::id(),
        plugin = %spec.plugin_version
    );
    let _ = WORKER_SPAN.set(span.clone());
    let _entered = span.enter();
    match spec.role {
        crate::protocol::Role::Http => {}
        crate::protocol::Role::Gateway { .. } => return crate::gateway::run(spec, channel, link),
        crate::protocol::Role::Business { .. } => return ws::run(spec, channel, link, timings),
    }
    // The certificate before the plugin: a certificate that cannot be used fails the start
    // (in a reload, the canary) with the reason, as a plugin that cannot load does.
    let tls = spec
        .tls
        .as_ref()
        .map(|pem| crate::tls::acceptor(pem, &[b"h2", b"http/1.1"]))
        .transpose();
    let tls = match tls {
        Ok(tls) => tls,
        Err(reason) => return link.start_failed(reason),
    };

    // The on-start hook: everything from here to READY is what a reload re-runs with new code.
    let started = Instant::now();
    let plugin = match inherited_plugin()
        .and_then(|path| Plugin::load_and_start(&spec, &path, || timings.loaded = monotonic_ns()))
    {
        Ok(p) => p,
        Err(reason) => return link.start_failed(reason),
    };
    timings.started = monotonic_ns();
    if spec.check_only {
        if let Err(e) = plugin.stop(STOP_DEADLINE) {
            tracing::warn!("plugin stop: {e}");
        }
        link.send(&ready(&plugin, timings));
        return ExitCode::SUCCESS;
    }
    tracing::debug!(
        "plugin {} {} started in {:?}",
        plugin.name(),
        plugin.crate_version(),
        started.elapsed()
    );

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return link.start_failed(format!("could not start the async runtime: {e}")),
    };
    let code =
        runtime.block_on(serve(spec, plugin, tls, channel, link, timings).instrument(span.clone()));
    // Do not wait for blocking threads a stuck handler may still hold past the drain.
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

fn ready(plugin: &Plugin, timings: StartTimings) -> FromWorker {
    FromWorker::Ready {
        plugin_name: plugin.name().to_string(),
        plugin_crate_version: plugin.crate_version().to_string(),
        timings,
    }
}

async fn serve(
    spec: WorkerSpec,
    plugin: Plugin,
    tls: Option<tokio_rustls::TlsAcceptor>,
    channel: StdUnixStream,
    link: Arc<Link>,
    mut timings: StartTimings,
) -> ExitCode {
    let drain_timeout = Duration::from_millis(spec.drain_timeout_ms);
    let heartbeat = Duration::from_millis(spec.heartbeat_ms);
    let listeners = match inherited_listeners(&spec) {
        Ok(l) => l,
        Err(reason) => return link.start_failed(reason),
    };
    let access_log = match spec.access_log {
        None => None,
        Some(format) => {
            let fd = FIRST_LISTENER_FD + spec.listen.len() as i32;
            match inherit::adopt(fd, Kind::Output) {
                Some(file) => Some(access_log::AccessLog::start(file.into(), format)),
                None => {
                    return link
                        .start_failed(format!("the access log file was not passed at fd {fd}"))
                }
            }
        }
    };
    let balance = spec.balance_fd.and_then(balance_place);
    let (draining, _) = watch::channel(false);
    let (close_idle, _) = watch::channel(false);
    let max_connections = spec
        .max_connections
        .min(tokio::sync::Semaphore::MAX_PERMITS);
    let shared = Arc::new(http::Shared {
        plugin,
        spec,
        toward_max_requests: AtomicU64::new(0),
        connections: AtomicU64::new(0),
        connection_slots: Arc::new(tokio::sync::Semaphore::new(max_connections)),
        draining,
        draining_now: AtomicBool::new(false),
        close_idle,
        started: Instant::now(),
        warned_inline: AtomicBool::new(false),
        replacement_asked: AtomicBool::new(false),
        link: link.clone(),
        tls,
        stats: Default::default(),
        access_log,
        balance,
    });
    let (stopped_tx, stopped_rx) = oneshot::channel();
    let server = tokio::spawn(http::serve(listeners, shared.clone(), stopped_tx).in_current_span());

    let (mut sigterm, _sigint) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        _ => return ExitCode::FAILURE,
    };
    let channel = match channel
        .set_nonblocking(true)
        .and_then(|()| UnixStream::from_std(channel))
    {
        Ok(c) => c,
        Err(_) => return ExitCode::FAILURE,
    };
    timings.serving = monotonic_ns();
    if !link.send(&ready(&plugin, timings)) {
        return ExitCode::FAILURE;
    }
    tokio::spawn(liveness::heartbeat(shared.clone(), link.clone(), heartbeat).in_current_span());
    tracing::info!(
        "ready: plugin {} {} on {}",
        plugin.name(),
        plugin.crate_version(),
        shared.spec.listen.join(", ")
    );

    let channel_task =
        tokio::spawn(talk_to_master(channel, shared.clone(), link, stopped_rx).in_current_span());
    let mut drain_requested = shared.draining.subscribe();
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: draining"),
        _ = http::until_draining(&mut drain_requested) => {}
    }
    shared.drain();
    // The plugin's drain notice: SSE streams and background loops end now, so the in-flight
    // requests below can finish.
    plugin.drain();
    if tokio::time::timeout(drain_timeout, server).await.is_err() {
        tracing::warn!("drain timeout ({drain_timeout:?}) reached with requests still in flight");
    }
    // on_stop, then the plugin's background tasks, on a thread that may block.
    let stop = tokio::task::spawn_blocking(move || plugin.stop(STOP_DEADLINE));
    match tokio::time::timeout(STOP_DEADLINE + Duration::from_secs(1), stop).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!("plugin stop: {e}"),
        Ok(Err(e)) => tracing::warn!("plugin stop failed: {e}"),
        Err(_) => tracing::warn!("the plugin's on_stop did not return in time"),
    }
    liveness::send_heartbeat(&shared, &shared.link);
    if let Some(log) = &shared.access_log {
        // Every request served is in the log before the worker exits (the writer takes its
        // buffer only every moment).
        log.finish(Duration::from_secs(2));
    }
    tracing::info!(
        "drained after {} requests, exiting",
        shared.stats.requests()
    );
    channel_task.abort();
    ExitCode::SUCCESS
}

/// Answers the master until it says `Drain` or goes away; either starts the drain.
/// Also tells the master when the worker has stopped accepting (`stopped_accepting`), which a
/// reload waits for before it calls a slot replaced.
async fn talk_to_master(
    channel: UnixStream,
    shared: Arc<http::Shared>,
    link: Arc<Link>,
    stopped_accepting: oneshot::Receiver<()>,
) {
    let mut messages = MasterMessages::new(channel, link.clone());
    let mut stopped_accepting = Some(stopped_accepting);
    loop {
        let next = tokio::select! {
            next = messages.next() => next,
            stopped = async { stopped_accepting.as_mut().expect("guarded").await },
                if stopped_accepting.is_some() =>
            {
                stopped_accepting = None;
                if stopped.is_ok() {
                    link.send(&FromWorker::StoppedAccepting);
                }
                continue;
            }
        };
        let Some((message, mut fds)) = next else {
            shared.drain();
            return;
        };
        match message {
            ToWorker::Drain => {
                tracing::info!("draining on the master's request");
                shared.drain();
            }
            ToWorker::Stats => {
                let requests = shared.stats.requests();
                link.send(&FromWorker::Stats { requests });
            }
            ToWorker::CloseIdle => {
                tracing::info!(
                    "closing idle connections now (the slot has newer draining workers)"
                );
                shared.close_idle.send_replace(true);
            }
            ToWorker::ReopenAccessLog { id } => {
                // In a task of its own: the other messages (a drain, the store's answers) do
                // not wait for the writer.
                let (shared, link, file) = (shared.clone(), link.clone(), fds.pop());
                tokio::spawn(async move {
                    let error = reopen_access_log(shared, file).await.err();
                    if let Some(e) = &error {
                        tracing::warn!("reopening the access log: {e}");
                    }
                    link.send(&FromWorker::Reopened { id, error });
                });
            }
            other => tracing::warn!("an HTTP worker ignores {other:?}"),
        }
    }
}

/// Hands the access log its new file and waits until its writer thread has switched (off the
/// runtime's threads: it may be writing a batch to a slow disk).
async fn reopen_access_log(
    shared: Arc<http::Shared>,
    file: Option<std::os::fd::OwnedFd>,
) -> Result<(), String> {
    let (Some(file), true) = (file, shared.access_log.is_some()) else {
        return Err("it has no access log, or no file came with the message".into());
    };
    let switched = tokio::task::spawn_blocking(move || {
        let log = shared.access_log.as_ref().expect("checked above");
        log.reopen(file.into(), REOPEN_PATIENCE)
    })
    .await;
    match switched {
        Ok(true) => {
            tracing::info!("access log reopened");
            Ok(())
        }
        Ok(false) => Err(format!(
            "its access log writer did not switch to the new file within {} s (a slow \
             disk?); it will when it gets there",
            REOPEN_PATIENCE.as_secs()
        )),
        Err(e) => Err(format!("the access log's reopen failed: {e}")),
    }
}

/// What a worker, gateway or business worker hears from the master, one message at a time;
/// `None` once the master is gone (each then drains). What every role does the same way
/// (`ReopenLogs`: log to the file that came with it) is done here.
pub(crate) struct MasterMessages {
    lines: crate::fdpass::LineReader,
    /// Where `ReopenLogs` is answered.
    link: Arc<Link>,
}

impl MasterMessages {
    pub fn new(channel: UnixStream, link: Arc<Link>) -> MasterMessages {
        MasterMessages {
            lines: crate::fdpass::LineReader::new(channel),
            link,
        }
    }

    /// After a drain, for a role that no longer acts on the master's messages: goes on
    /// reading them, so that what every role answers (`ReopenLogs`, the store's replies) is
    /// answered until the process exits.
    pub fn keep_reading(mut self) {
        tokio::spawn(async move { while self.next().await.is_some() {} });
    }

    pub async fn next(&mut self) -> Option<(ToWorker, Vec<std::os::fd::OwnedFd>)> {
        loop {
            let (line, mut fds) = match self.lines.next_line().await {
                Ok(Some(line)) => line,
                Ok(None) | Err(_) => {
                    // A plugin waiting for the store's answer gets an error, not a hang.
                    kv::fail_all();
                    tracing::warn!("the master is gone: draining");
                    return None;
                }
            };
            match serde_json::from_str::<ToWorker>(&line) {
                // Everything this process logs goes to stderr: point it at the reopened file.
                Ok(ToWorker::ReopenLogs { id }) => {
                    let error = match fds.pop() {
                        Some(file) => match nix::unistd::dup2_stderr(&file) {
                            Ok(()) => {
                                tracing::info!("log file reopened");
                                None
                            }
                            Err(e) => Some(format!("could not switch to the new log file: {e}")),
                        },
                        None => Some("no file came with the message".into()),
                    };
                    if let Some(e) = &error {
                        tracing::warn!("reopening the log file: {e}");
                    }
                    self.link.send(&FromWorker::Reopened { id, error });
                }
                // Every role's plugin may call the key/value store.
                Ok(ToWorker::KvReply { id, result }) => kv::answer(id, result),
                Ok(message) => return Some((message, fds)),
                Err(e) => tracing::warn!("ignoring an unreadable message from the master: {e}"),
            }
        }
    }
}

fn inherited_channel() -> Result<StdUnixStream, String> {
    inherit::adopt(CHANNEL_FD, Kind::Socket)
        .map(StdUnixStream::from)
        .ok_or_else(|| {
            "fd 3 is not the master's channel; `host worker` is started by `host start`, not by \
             hand"
                .into()
        })
}

/// Drops from root to the service's user, for good, before any plugin code is loaded:
/// supplementary groups, then the group, then the user (in that order: once the user changed,
/// the rest is no longer allowed). The parent-death signal is cleared by the change of
/// credentials, so it is set again.
fn drop_privileges(uid: u32, gid: u32, master_pid: u32) -> Result<(), String> {
    use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    setgroups(&[gid]).map_err(|e| format!("setgroups: {e}"))?;
    setgid(gid).map_err(|e| format!("setgid: {e}"))?;
    setuid(uid).map_err(|e| format!("setuid: {e}"))?;
    if setuid(Uid::from_raw(0)).is_ok() && !uid.is_root() {
        return Err("could get root back after dropping it".into());
    }
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)
        .map_err(|e| format!("could not set the parent-death signal again: {e}"))?;
    if getppid().as_raw() as u32 != master_pid {
        return Err("the master is gone".into());
    }
    Ok(())
}

/// The path the worker loads its plugin from: the verified copy the master passed at
/// `PLUGIN_FD`, through `/proc/self/fd`, so that it loads exactly the bytes the master checked
/// (and needs no access to the state directory). The fd stays open for the life of the worker.
pub(crate) fn inherited_plugin() -> Result<std::path::PathBuf, String> {
    let fd = inherit::adopt(PLUGIN_FD, Kind::File).ok_or_else(|| {
        format!(
            "fd {PLUGIN_FD} is not the plugin copy the master passes; `host worker` is started \
             by `host start`, not by hand"
        )
    })?;
    // Kept open for good (ownership released): the loader maps the library through this path.
    let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
    Ok(format!("/proc/self/fd/{raw}").into())
}

/// This worker's seat in the service's accept-balancing table passed at `fd`; None (logged) if
/// the table is not usable or full: the worker then accepts unbalanced, which loses nothing.
fn balance_place(fd: i32) -> Option<crate::balance::Place> {
    let table = inherit::adopt(fd, Kind::File)
        .ok_or_else(|| format!("no table was passed at fd {fd}"))
        .and_then(|fd| crate::balance::Table::adopt(&fd));
    let place = table.and_then(|table| {
        table
            .sit(std::process::id())
            .ok_or_else(|| "every seat is taken".to_string())
    });
    place
        .inspect_err(|e| {
            tracing::warn!(
                "accepting unbalanced: this worker cannot use the service's accept-balancing \
                 table ({e}); other workers may take fewer new connections than it"
            )
        })
        .ok()
}

pub(crate) fn inherited_listeners(
    spec: &WorkerSpec,
) -> Result<Vec<tokio::net::TcpListener>, String> {
    let mut listeners = Vec::new();
    for (i, addr) in spec.listen.iter().enumerate() {
        let fd = FIRST_LISTENER_FD + i as i32;
        let std_listener = inherit::adopt(fd, Kind::Socket)
            .map(StdTcpListener::from)
            .ok_or_else(|| {
                format!("fd {fd} (listener {addr}) was not inherited from the master")
            })?;
        // tokio requires a non-blocking socket; the flag lives on the shared open file
        // description, which is fine: nobody else accepts on it in blocking mode.
        std_listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(std_listener))
            .map(|l| listeners.push(l))
            .map_err(|e| format!("could not use the inherited listener {addr}: {e}"))?;
    }
    Ok(listeners)
}

/// Reads the first line byte by byte: a buffered reader could swallow the start of the next
/// message (a `Drain` sent during start-up), which the async reader must see later.
fn read_spec(mut channel: &StdUnixStream) -> Result<WorkerSpec, String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        match channel.read(&mut byte) {
            Ok(0) => {
                return Err("the master closed the channel before sending the start message".into())
            }
            Ok(_) => line.push(byte[0]),
            Err(e) => {
                return Err(format!(
                    "could not read the start message from the master: {e}"
                ))
            }
        }
    }
    match serde_json::from_slice(&line) {
        Ok(ToWorker::Start(spec)) => Ok(*spec),
        Ok(other) => Err(format!(
            "expected a start message from the master, got {other:?}"
        )),
        Err(e) => Err(format!(
            "could not read the start message from the master: {e}"
        )),
    }
}

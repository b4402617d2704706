//! The vocabulary between processes, as JSON lines over Unix sockets.
//!
//! - CLI -> master, on the control socket: one [`ControlRequest`], then [`ControlReply`]s until
//!   a final one (`Status`, `Done` or `Error`).
//! - master -> worker, on the worker's channel (fd 3): [`ToWorker`].
//! - worker -> master, on the same channel: [`FromWorker`].
//!
//! JSON lines keep every message readable with `socat` when something goes wrong, and serde
//! keeps both ends in one definition.

use std::{path::PathBuf, time::SystemTime};

use serde::{Deserialize, Serialize};

/// A time as the messages and reports carry it: whole seconds since the Unix epoch (0 for a
/// time before it).
pub fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A command from the CLI.
#[derive(Debug, Serialize, Deserialize)]
pub enum ControlRequest {
    Status,
    /// Reload these services (all reloadable ones when empty).
    Reload {
        services: Vec<String>,
    },
    /// Roll a service back to its previous version, or to the kept one whose hash starts `to`.
    Rollback {
        service: Option<String>,
        to: Option<String>,
    },
    Stop,
    /// Replace the master with a new one from `exe` (default: the executable it started from).
    Upgrade {
        exe: Option<PathBuf>,
    },
    /// Open the log file again (after logrotate moved it).
    ReopenLogs,
}

/// Between a master and the new master it starts for an upgrade, on their own socketpair.
#[derive(Debug, Serialize, Deserialize)]
pub enum UpgradeMessage {
    /// New -> old: a line for the user.
    Progress(String),
    /// New -> old, first: the longest `drain_timeout` of the new master's config, which an
    /// abandoned upgrade waits for (the old master's own config may have a shorter one).
    DrainTimeout(std::time::Duration),
    /// New -> old: every service has all its workers ready and its canary probation passed.
    Ready,
    /// New -> old: the new master cannot serve; it exits after this.
    Failed(String),
    /// Old -> new: take the control socket and the pid file; the old master then drains.
    TakeOver,
    /// New -> old: done; the control socket and pid file are the new master's.
    TookOver,
    /// Old -> new: the old master was told to stop (SIGTERM, SIGINT) before the takeover, so
    /// the host stops: do not take over; drain the workers and exit.
    Abandon,
}

/// An answer from the master.
#[derive(Debug, Serialize, Deserialize)]
pub enum ControlReply {
    Status(StatusReport),
    /// A progress line for the user (reload and stop print these as they come).
    Line(String),
    /// The end of a reload or stop.
    Done {
        ok: bool,
        summary: String,
    },
    Error(String),
}

/// What `host status` shows.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub master_pid: u32,
    pub uptime_ms: u64,
    pub host_version: String,
    /// The first 12 hex digits of the SHA-256 of the master's executable: tells two builds of
    /// the same version apart.
    pub build_id: String,
    /// The executable `host upgrade` starts by default.
    pub executable: PathBuf,
    /// The admin listener's URL, if there is one.
    #[serde(default)]
    pub admin: Option<String>,
    pub services: Vec<ServiceStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub listen: Vec<String>,
    pub plugin: PathBuf,
    pub reloadable: bool,
    /// Short hash of the version new workers load.
    pub version: String,
    /// Whether the live version has passed its probation (or is the only one there is).
    pub version_healthy: bool,
    /// Milliseconds left of the live version's probation, when it is on trial.
    pub probation_left_ms: Option<u64>,
    /// What a failure during the probation rolls back to.
    pub probation_fallback: Option<String>,
    /// Crashes of this service's workers in the last minute.
    pub crashes_last_minute: usize,
    /// Set when the master started the live version instead of the plugin file, which held a
    /// version that was set aside: what it said, until the next reload or rollback.
    #[serde(default)]
    pub held_back: Option<String>,
    /// Versions that were live before, newest first (what `host rollback` can return to).
    pub previous: Vec<VersionInfo>,
    pub slots: Vec<SlotStatus>,
    pub workers: Vec<WorkerStatus>,
    /// The last reloads and rollbacks, newest first.
    pub recent: Vec<RolloutEvent>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: String,
    pub size: u64,
    /// Seconds since the Unix epoch.
    pub first_loaded: u64,
    pub source: PathBuf,
    /// It served through a whole probation.
    pub healthy: bool,
    /// It was rejected or rolled back, and why.
    pub failed: Option<String>,
    /// An operator rolled back from it, and when.
    #[serde(default)]
    pub set_aside: Option<String>,
}

/// One slot of a service: what happened to the workers that held it.
#[derive(Debug, Serialize, Deserialize)]
pub struct SlotStatus {
    pub slot: usize,
    /// How its last worker ended, and how long ago (ms), if one ended unexpectedly.
    pub last_exit: Option<String>,
    pub last_exit_ago_ms: Option<u64>,
    /// Young deaths in a row, which the restart backoff grows with.
    pub crashes_in_a_row: u32,
    /// When the slot is empty and waiting out its backoff: milliseconds until the next start.
    pub next_retry_in_ms: Option<u64>,
}

/// A reload or rollback as the history keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutEvent {
    /// Seconds since the Unix epoch.
    pub at: u64,
    pub service: String,
    /// `reload`, `rollback` (asked for) or `automatic rollback`.
    pub kind: String,
    pub from: String,
    pub to: String,
    /// `done`, `rejected`, `rolled back` or `failed`.
    pub outcome: String,
    pub duration_ms: u64,
    /// The reason, for anything but `done`.
    pub detail: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// `worker`, or `gateway` (a websocket service's connection holder; `slot` is its index).
    #[serde(default)]
    pub role: String,
    pub slot: usize,
    pub pid: u32,
    pub state: String,
    pub version: String,
    pub uptime_ms: u64,
    /// `None` when the worker did not answer in time.
    pub requests: Option<u64>,
    /// Resident memory at the last heartbeat.
    pub rss_bytes: u64,
    /// Open connections at the last heartbeat.
    pub connections: u64,
    /// Milliseconds since the last heartbeat (`None` before the first).
    pub heartbeat_age_ms: Option<u64>,
}

/// What a process started as `host worker` is.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub enum Role {
    /// An HTTP worker: accepts on the listeners, calls the plugin per request.
    #[default]
    Http,
    /// A websocket service's business worker: runs the plugin on the events of the gateways
    /// whose links it got at the fds after the listeners (gateway index of each, in order).
    Business {
        gateways: Vec<u32>,
        max_message_bytes: usize,
    },
    /// A websocket service's gateway: accepts on the listeners, holds the connections, runs no
    /// plugin code. `links`: the business workers (slot, pid) whose links are at the fds after
    /// the listeners; `holders`: which of them serves each slot.
    Gateway {
        index: u32,
        workers: usize,
        links: Vec<(usize, u32)>,
        holders: Vec<(usize, u32)>,
        max_message_bytes: usize,
    },
}

/// Everything a worker needs to start, sent as the first message on its channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    #[serde(default)]
    pub role: Role,
    pub service: String,
    pub slot: usize,
    /// The shadow copy, for messages; the worker loads the verified open copy at
    /// [`PLUGIN_FD`].
    pub plugin_path: PathBuf,
    /// The library the user built, for error messages.
    pub plugin_source: PathBuf,
    pub plugin_version: String,
    /// Addresses of the inherited listeners, at fds 4, 5, ... in this order.
    pub listen: Vec<String>,
    pub config_toml: String,
    pub config: Vec<(String, String)>,
    pub max_body_bytes: usize,
    /// The cap on a request body an async plugin reads as a stream.
    #[serde(default = "default_max_stream_bytes")]
    pub max_stream_bytes: u64,
    pub idle_grace_ms: u64,
    pub drain_timeout_ms: u64,
    /// How often the worker proves it is alive ([`FromWorker::Heartbeat`]).
    pub heartbeat_ms: u64,
    /// A handler call longer than this gets a 503 and the worker asks to be replaced.
    pub handler_timeout_ms: u64,
    /// After this many requests the worker asks to be replaced (0: never): the service's
    /// `max_requests` plus this worker's jitter.
    pub max_requests: u64,
    /// How long a client may take to send a request's headers.
    pub header_timeout_ms: u64,
    /// How long a client may pause within a request body.
    pub body_timeout_ms: u64,
    /// How long an idle keep-alive connection stays open.
    pub keepalive_timeout_ms: u64,
    /// Connections held at most; beyond, the worker stops accepting until one closes.
    pub max_connections: usize,
    /// The user and group (uid, gid) the worker drops to before it loads the plugin.
    pub run_as: Option<(u32, u32)>,
    /// HTTPS on every listener, with this certificate and key (`worker::tls`).
    pub tls: Option<TlsPem>,
    /// Answer `/__host/...` on the service's listeners.
    pub host_routes: bool,
    /// Log every request in this format to the file passed at the fd after the listeners.
    pub access_log: Option<crate::config::AccessLogFormat>,
    /// The fd of the service's accept-balancing table (`balance`), when it has one.
    #[serde(default)]
    pub balance_fd: Option<i32>,
    pub master_pid: u32,
    /// Load the plugin, start and stop it, report, exit: `host check`.
    pub check_only: bool,
}

/// A certificate and its key, as the master read them from their files.
#[derive(Clone, Serialize, Deserialize)]
pub struct TlsPem {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub cert: String,
    pub key: String,
}

impl From<&crate::config::Tls> for TlsPem {
    fn from(t: &crate::config::Tls) -> TlsPem {
        TlsPem {
            cert_file: t.cert.clone(),
            key_file: t.key.clone(),
            cert: t.cert_pem.to_string(),
            key: t.key_pem.to_string(),
        }
    }
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself, not even in a debug line.
        f.debug_struct("TlsPem")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ToWorker {
    Start(Box<WorkerSpec>),
    /// Stop accepting, finish what is in flight, exit.
    Drain,
    /// Answer with [`FromWorker::Stats`].
    Stats,
    /// Draining: close idle keep-alive connections now instead of after the idle grace (the
    /// slot has more draining workers than it keeps).
    CloseIdle,
    /// Log to the file that comes with this message (SCM_RIGHTS) from now on: the master
    /// reopened its log file (`host reopen-logs`). Answered with [`FromWorker::Reopened`] with
    /// the same id.
    ReopenLogs {
        id: u64,
    },
    /// The same, for the access log.
    ReopenAccessLog {
        id: u64,
    },
    /// To a business worker: a link to gateway `gateway` comes with this message.
    GatewayLink {
        gateway: u32,
    },
    /// To a gateway: a link to the business worker `pid` of `slot` comes with this message.
    BusinessLink {
        slot: usize,
        pid: u32,
    },
    /// To a gateway: `pid` serves `slot` from now on; its clients move to it.
    SlotHolder {
        slot: usize,
        pid: u32,
    },
    /// The answer to [`FromWorker::Kv`] `id`.
    KvReply {
        id: u64,
        result: Result<KvValue, String>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum FromWorker {
    /// Plugin loaded and started, accepting connections.
    Ready {
        plugin_name: String,
        plugin_crate_version: String,
        timings: StartTimings,
    },
    /// The start failed; the worker exits after sending this.
    Failed {
        reason: String,
    },
    Stats {
        requests: u64,
    },
    /// Draining, and its listener fds are closed: it accepts no more connections.
    StoppedAccepting,
    /// Sent from the runtime that serves requests, so that it stops when that runtime stalls
    /// (and once more, with the final counts, when the worker exits).
    Heartbeat {
        requests: u64,
        rss_bytes: u64,
        connections: u64,
        stats: RequestStats,
    },
    /// The worker still serves but should be replaced gracefully: it reached its
    /// `max_requests`, or lost a thread to a handler that overran `handler_timeout`.
    ReplaceMe {
        reason: String,
    },
    /// The plugin panicked (logged by its panic hook). Sent at once, because an abort may
    /// follow: the master quotes it if the worker dies.
    Panicked {
        message: String,
    },
    /// An operation on the host's key/value store (`crate::kv`); answered with
    /// [`ToWorker::KvReply`] with the same id.
    Kv {
        id: u64,
        op: KvOp,
    },
    /// The answer to a [`ToWorker::ReopenLogs`] or [`ToWorker::ReopenAccessLog`] of the same
    /// id: nothing more goes to the old file (`error`: why the worker could not switch).
    Reopened {
        id: u64,
        error: Option<String>,
    },
}

/// The upper bounds (seconds) of the request-duration histogram buckets; the last bucket is
/// everything longer.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A worker's requests since it started: by status class, and by duration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestStats {
    /// Responses by status class: 1xx, 2xx, 3xx, 4xx, 5xx.
    pub by_class: [u64; 5],
    /// Requests per duration bucket ([`DURATION_BUCKETS`], then one for longer).
    pub buckets: Vec<u64>,
    pub duration_sum_ns: u64,
}

fn default_max_stream_bytes() -> u64 {
    crate::config::DEFAULT_MAX_STREAM
}

/// An operation on the host's key/value store (see `crate::kv`). Values are bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum KvOp {
    Get {
        key: String,
    },
    /// Sets the value, with a time to live when `ttl_ms` is given.
    Set {
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    },
    Delete {
        key: String,
    },
    /// Adds `by` to the whole number the key holds (0 when it is missing); keeps its expiry.
    Increment {
        key: String,
        by: i64,
    },
    /// Sets `new` (`None`: deletes) only if the value is `expected` (`None`: missing).
    CompareAndSwap {
        key: String,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
        ttl_ms: Option<u64>,
    },
    /// Gives the key a time to live (`None`: none).
    Expire {
        key: String,
        ttl_ms: Option<u64>,
    },
}

impl KvOp {
    pub fn key(&self) -> &str {
        match self {
            KvOp::Get { key }
            | KvOp::Set { key, .. }
            | KvOp::Delete { key }
            | KvOp::Increment { key, .. }
            | KvOp::CompareAndSwap { key, .. }
            | KvOp::Expire { key, .. } => key,
        }
    }
}

/// What a key/value operation gives back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum KvValue {
    /// `Get`: the value, if the key is there.
    Value(Option<Vec<u8>>),
    /// `Increment`: the new number.
    Number(i64),
    /// `Set`, `Delete`, `CompareAndSwap`, `Expire`: whether it changed something.
    Done(bool),
}

/// One message as it goes on the wire: JSON, then a newline.
pub fn encode(message: &impl Serialize) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).expect("protocol messages serialize");
    line.push(b'\n');
    line
}

/// When a worker passed each step of its start, in CLOCK_MONOTONIC nanoseconds: the clock is
/// the same in every process, so the master can subtract its own spawn time.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct StartTimings {
    /// `main` was entered (exec and dynamic linking are done).
    pub entered: u64,
    /// The plugin library was loaded and checked.
    pub loaded: u64,
    /// The plugin's `on_start` returned.
    pub started: u64,
    /// Listeners and runtime are up; READY is being sent.
    pub serving: u64,
}

/// Now, on the clock [`StartTimings`] uses; also what a request's duration is measured on.
pub fn monotonic_ns() -> u64 {
    clock_ns(rustix::time::ClockId::Monotonic)
}

/// The monotonic clock as of the kernel's last tick (up to one tick behind: 1 to 10 ms by the
/// kernel's HZ, `clock_getres`): cheaper to read than [`monotonic_ns`], for the per-request
/// timestamps whose limits are at least 100 ms (header, idle, keep-alive and handler
/// timeouts; the config refuses shorter ones). Compare it only with itself.
pub fn coarse_ns() -> u64 {
    clock_ns(rustix::time::ClockId::MonotonicCoarse)
}

/// By rustix, which reads the vDSO directly: through nix and libc, each of the few reads a
/// request makes cost about 30 ns more (perf, on the request path).
fn clock_ns(clock: rustix::time::ClockId) -> u64 {
    let t = rustix::time::clock_gettime(clock);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The fd a worker finds its channel to the master on.
pub const CHANNEL_FD: i32 = 3;
/// The fd of the verified plugin copy the worker loads (through `/proc/self/fd`).
pub const PLUGIN_FD: i32 = 4;
/// The fd of a worker's first inherited listener; the others follow.
pub const FIRST_LISTENER_FD: i32 = 5;

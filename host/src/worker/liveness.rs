//! How a worker proves it is alive, and how it dies when it must, whatever its runtime does.
//!
//! - **Heartbeat**: a task on the runtime that serves requests sends [`FromWorker::Heartbeat`]
//!   every `heartbeat_ms`. When that runtime stalls (every thread stuck in a handler, a
//!   deadlock, SIGSTOP) the heartbeats stop and the master kills the worker after its
//!   `liveness_timeout`. The heartbeat carries the request count, resident memory and open
//!   connections (recycling and status use them). An async plugin runs on a runtime of its
//!   own, so the heartbeat also needs a task of that runtime to run first (the plugin's
//!   `ping`): a plugin whose runtime threads are all stuck stops the heartbeats too.
//! - **Handler timeout**: a handler that runs longer than `handler_timeout` has taken a thread
//!   for good. A blocking handler's client gets a 503 (`worker::http`); an inline handler's
//!   client cannot (its connection lives on the stuck thread), but the heartbeat task sees the
//!   call's age in [`InlineCalls`] (an async handler's poll that blocks is such a call).
//!   Either way the worker asks the master to replace it
//!   gracefully ([`FromWorker::ReplaceMe`]), once.
//! - **Watchdog**: a plain thread that notices the master's death. The parent-death signal
//!   (SIGTERM) starts a graceful drain, but a wedged runtime never runs it; so the watchdog
//!   kills the worker's process group after the drain timeout plus half a second, whatever the
//!   runtime is doing.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use nix::{
    sys::signal::{killpg, Signal},
    unistd::{getpgrp, getppid},
};

use super::{http::Shared, link::Link};
use crate::protocol::{coarse_ns, FromWorker};

/// How often the watchdog looks for its master.
const WATCHDOG_TICK: Duration = Duration::from_millis(100);
/// Beyond the drain timeout, how long the watchdog waits before it kills the worker.
const WATCHDOG_GRACE: Duration = Duration::from_millis(500);

/// Start times of the inline handler calls in progress, one slot per runtime thread (an
/// inline call never yields, so a thread runs at most one at a time). A poll of an async
/// handler's future is one too: plugin-api polls the handler on the host's thread.
pub struct InlineCalls {
    slots: Mutex<Vec<&'static AtomicU64>>,
}

thread_local! {
    /// This thread's slot: 0 when idle, else the call's start ([`coarse_ns`]).
    static SLOT: &'static AtomicU64 = INLINE_CALLS.register();
}

pub static INLINE_CALLS: InlineCalls = InlineCalls {
    slots: Mutex::new(Vec::new()),
};

impl InlineCalls {
    fn register(&self) -> &'static AtomicU64 {
        /// A slot on a cache line of its own: two threads' slots side by side would make each
        /// thread's two writes a call wait for the line to come over from the other's core.
        #[repr(align(128))]
        struct Slot(AtomicU64);
        // One small leak per runtime thread, for the life of the process.
        let slot: &'static Slot = Box::leak(Box::new(Slot(AtomicU64::new(0))));
        self.slots.lock().unwrap().push(&slot.0);
        &slot.0
    }

    /// Marks an inline call in progress on this thread until the guard drops.
    pub fn begin(&self) -> InlineCall {
        let slot = SLOT.with(|s| *s);
        let started = coarse_ns().max(1);
        slot.store(started, Ordering::Relaxed);
        InlineCall { slot, started }
    }

    /// How long the oldest inline call in progress has run.
    pub fn oldest(&self) -> Option<Duration> {
        let now = coarse_ns();
        self.slots
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|&started| started != 0)
            .map(|started| Duration::from_nanos(now.saturating_sub(started)))
            .max()
    }
}

pub struct InlineCall {
    slot: &'static AtomicU64,
    started: u64,
}

impl InlineCall {
    /// How long the call has run, to the coarse clock's tick (a few ms): enough for a warning
    /// at 100 ms, and one cheap clock read where two precise ones were.
    pub fn took(&self) -> Duration {
        Duration::from_nanos(coarse_ns().saturating_sub(self.started))
    }
}

impl Drop for InlineCall {
    fn drop(&mut self) {
        self.slot.store(0, Ordering::Relaxed);
    }
}

/// Asks the master, once per worker, to replace this worker gracefully (it lost a thread to
/// a handler, or reached its max_requests).
pub fn ask_for_replacement(link: &Link, asked: &AtomicBool, reason: String) {
    if !asked.swap(true, Ordering::SeqCst) {
        tracing::warn!("{reason}; asking the master for a replacement");
        link.send(&FromWorker::ReplaceMe { reason });
    }
}

/// The heartbeat task; runs until the process exits.
pub async fn heartbeat(shared: Arc<Shared>, link: Arc<Link>, every: Duration) {
    let handler_timeout = Duration::from_millis(shared.spec.handler_timeout_ms);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut plugin_stuck = false;
    loop {
        tick.tick().await;
        if let Some(ping) = shared.plugin.ping() {
            let patience = every * 2;
            if tokio::time::timeout(patience, ping).await.is_err() {
                if !plugin_stuck {
                    tracing::warn!(
                        "the plugin's runtime has not run a task for {} ms: its threads are \
                         stuck (an async handler that blocks?); no heartbeat until it recovers",
                        patience.as_millis()
                    );
                }
                plugin_stuck = true;
                continue;
            }
            plugin_stuck = false;
        }
        if let Some(age) = INLINE_CALLS.oldest().filter(|age| *age > handler_timeout) {
            ask_for_replacement(
                &link,
                &shared.replacement_asked,
                format!(
                    "a handler call on an async thread (a sync handler with BLOCKING = false, \
                     or one poll of an async handler) has run for {} ms, longer than \
                     handler_timeout ({}): its thread is lost",
                    age.as_millis(),
                    humantime::format_duration(handler_timeout)
                ),
            );
        }
        send_heartbeat(&shared, &link);
    }
}

/// One heartbeat: also sent once more when the worker exits, so the master counts every request
/// it served.
pub fn send_heartbeat(shared: &Shared, link: &Link) {
    link.send(&FromWorker::Heartbeat {
        requests: shared.stats.requests(),
        rss_bytes: rss_bytes(),
        connections: shared.connections.load(Ordering::Relaxed),
        stats: shared.stats.snapshot(),
    });
}

/// This process's resident memory, from /proc/self/statm (0 if unreadable).
pub(crate) fn rss_bytes() -> u64 {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page)
}

/// Starts the watchdog thread (see the module comment).
pub fn spawn_watchdog(master_pid: u32, drain_timeout: Duration) {
    let spawned = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || loop {
            std::thread::sleep(WATCHDOG_TICK);
            if getppid().as_raw() as u32 != master_pid {
                std::thread::sleep(drain_timeout + WATCHDOG_GRACE);
                // Still here: the graceful drain did not finish. The worker leads its own
                // process group, so this ends it and whatever its plugin started.
                let _ = killpg(getpgrp(), Signal::SIGKILL);
                std::process::abort();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("could not start the watchdog thread: {e}");
    }
}

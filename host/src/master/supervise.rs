//! Supervision: one task per worker that relays its messages, kills it when asked, reaps it and
//! decides what its exit means; the liveness check that kills workers whose heartbeat stopped;
//! respawning an empty slot with backoff; and graceful replacement of a worker that asks for it
//! or outgrew its limits (max_requests, max_rss, a handler thread lost to handler_timeout).
//!
//! A worker's death is judged in [`Master::on_exit`]: a drained worker exiting is normal; a
//! slot holder dying is a crash, which either fails the trial of a new version (and rolls the
//! service back, `master::rollout`), or counts toward a crash loop, or is simply replaced.

use std::{
    os::fd::AsFd,
    process::ExitStatus,
    sync::Arc,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{killpg, Signal},
    unistd::Pid,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
    process::Child,
    sync::{mpsc, oneshot, Notify},
};

use super::{
    pool::{EntryRole, Outgoing, WorkerState},
    service::Service,
    Master,
};
use crate::protocol::{encode, monotonic_ns, FromWorker};

/// A worker that lived less than this before it died counts as dying young: its replacement
/// waits (100 ms, doubling, at most [`MAX_BACKOFF`]) so that a crash loop cannot spin.
const STABLE_AFTER: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A panic this recent when a worker dies is quoted as a likely cause.
const PANIC_RELEVANCE: Duration = Duration::from_secs(2);
/// How often the liveness check looks at heartbeats, at most.
const LIVENESS_TICK: Duration = Duration::from_millis(100);
/// A liveness tick this much later than due means the master was not running: see
/// `check_liveness`.
const MASTER_STALL: Duration = Duration::from_millis(250);
/// Named in the reason of a worker the liveness check killed.
const LIVENESS_KILL: &str = "liveness_timeout";

impl Master {
    /// The one task per worker: relay its messages, kill it on request, reap it, and react to
    /// its exit.
    pub(super) async fn watch_worker(
        self: Arc<Self>,
        pid: u32,
        mut child: Child,
        channel: UnixStream,
        mut from_master: mpsc::UnboundedReceiver<Outgoing>,
        ready_tx: oneshot::Sender<Result<(), String>>,
        kill: Arc<Notify>,
    ) {
        let (read, mut write) = channel.into_split();
        let writer = tokio::spawn(async move {
            while let Some(Outgoing(message, file)) = from_master.recv().await {
                let line = encode(&message);
                let sent = match file {
                    Some(file) => {
                        crate::fdpass::send_with_fd(write.as_ref(), &line, file.as_fd()).await
                    }
                    None => write.write_all(&line).await,
                };
                if sent.is_err() {
                    break;
                }
            }
        });
        let mut lines = BufReader::new(read).lines();
        let mut ready_tx = Some(ready_tx);
        let mut failure = None;
        let mut channel_open = true;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                _ = kill.notified() => {
                    // The worker's whole process group: whatever the plugin started goes too.
                    // The worker is not reaped yet, so its pid (the group's id) is not reused.
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    let _ = child.start_kill();
                }
                line = lines.next_line(), if channel_open => match line {
                    Ok(Some(line)) => self.on_message(pid, &line, &mut ready_tx, &mut failure),
                    _ => channel_open = false,
                },
            }
        };
        // Whatever the worker started and left behind goes with it. (Its pid stays reserved
        // while any process of its group lives, so this cannot reach an unrelated process.)
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        // A start failure (or a panic message) is sent just before the worker exits: read
        // what is left.
        while channel_open {
            match tokio::time::timeout(Duration::from_millis(200), lines.next_line()).await {
                Ok(Ok(Some(line))) => self.on_message(pid, &line, &mut ready_tx, &mut failure),
                _ => channel_open = false,
            }
        }
        writer.abort();
        let exit = self.describe_worker_exit(pid, status);
        if let Some(tx) = ready_tx.take() {
            let reason = failure.unwrap_or_else(|| {
                format!("worker {pid} {exit} before it was ready (a crash while loading or starting the plugin)")
            });
            let _ = tx.send(Err(reason));
        }
        self.on_exit(pid, &exit);
    }

    /// "was killed by signal 6 (SIGABRT)", with the master's reason if it killed the worker and
    /// the plugin's last panic message if it had one.
    fn describe_worker_exit(&self, pid: u32, status: std::io::Result<ExitStatus>) -> String {
        let reg = self.registry.lock().unwrap();
        let w = reg.workers.get(&pid);
        let mut exit = match w.and_then(|w| w.kill_reason.as_deref()) {
            Some(why) => format!("was killed by the master: {why}"),
            None => describe_exit(status),
        };
        // A panic just before the death is likely its cause (an abort after a panic that could
        // not unwind); an older one was caught and answered with a 500.
        if let Some((panic, _)) = w
            .and_then(|w| w.last_panic.as_ref())
            .filter(|(_, at)| at.elapsed() < PANIC_RELEVANCE)
        {
            exit += &format!(" (just before, the plugin {panic})");
        }
        exit
    }

    fn on_message(
        self: &Arc<Self>,
        pid: u32,
        line: &str,
        ready_tx: &mut Option<oneshot::Sender<Result<(), String>>>,
        failure: &mut Option<String>,
    ) {
        let message = match serde_json::from_str::<FromWorker>(line) {
            Ok(m) => m,
            Err(e) => return tracing::warn!("worker {pid} sent an unreadable message: {e}"),
        };
        let mut reg = self.registry.lock().unwrap();
        let Some(w) = reg.workers.get_mut(&pid) else {
            return;
        };
        match message {
            FromWorker::Ready { timings: t, .. } => {
                let ms = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1e6;
                // Where a start's time goes; `bench/` reads this line (HOST_LOG=host=debug).
                tracing::debug!(
                    "worker {pid} start phases (ms): exec {:.2}, plugin load {:.2}, on_start {:.2}, serve setup {:.2}, ready report {:.2}, total {:.2}",
                    ms(w.spawned_ns, t.entered),
                    ms(t.entered, t.loaded),
                    ms(t.loaded, t.started),
                    ms(t.started, t.serving),
                    ms(t.serving, monotonic_ns()),
                    ms(w.spawned_ns, monotonic_ns()),
                );
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(Ok(()));
                }
            }
            FromWorker::Failed { reason } => *failure = Some(reason),
            FromWorker::StoppedAccepting => {
                if let Some(tx) = w.stopped_accepting.take() {
                    let _ = tx.send(());
                }
            }
            FromWorker::Stats { requests } => {
                if !w.stats_waiters.is_empty() {
                    let _ = w.stats_waiters.remove(0).send(requests);
                }
            }
            FromWorker::Reopened { id, error } => {
                if let Some(waiter) = w.reopen_waiters.remove(&id) {
                    let _ = waiter.send(error);
                }
            }
            FromWorker::Heartbeat {
                requests,
                rss_bytes,
                connections,
                stats,
            } => {
                self.metrics
                    .worker_totals(pid, w.service.name(), w.version.short(), &stats);
                w.last_heartbeat = Some(Instant::now());
                (w.requests, w.rss_bytes, w.connections) = (requests, rss_bytes, connections);
                let max_rss = w.config.max_rss;
                if max_rss > 0 && rss_bytes > max_rss {
                    let why = format!(
                        "it uses {} of memory (max_rss = {})",
                        bytesize::ByteSize(rss_bytes).display().iec(),
                        bytesize::ByteSize(max_rss).display().iec()
                    );
                    drop(reg);
                    self.replace_gracefully(pid, &why);
                }
            }
            FromWorker::ReplaceMe { reason } => {
                drop(reg);
                self.replace_gracefully(pid, &reason);
            }
            FromWorker::Panicked { message } => w.last_panic = Some((message, Instant::now())),
            // The host's key/value store (crate::kv), answered on the worker's own channel.
            FromWorker::Kv { id, op } => {
                let result = crate::kv::store().apply(w.service.name(), op);
                w.tell(crate::protocol::ToWorker::KvReply { id, result });
            }
        }
    }

    /// Replaces a worker that still serves but should not go on (recycling, a lost thread): a
    /// new worker on the live version takes its slot first, then it drains. Once per worker.
    fn replace_gracefully(self: &Arc<Self>, pid: u32, why: &str) {
        let svc = {
            let mut reg = self.registry.lock().unwrap();
            let Some(w) = reg.workers.get_mut(&pid) else {
                return;
            };
            if w.replacing || w.state != WorkerState::Ready {
                return;
            }
            w.replacing = true;
            w.service.clone()
        };
        tracing::info!(service = %svc.name(), "worker {pid} will be replaced: {why}");
        let master = self.clone();
        tokio::spawn(async move {
            let _turn = svc.lock.lock().await;
            let slot = {
                let reg = master.registry.lock().unwrap();
                let Some(w) = reg.workers.get(&pid) else {
                    return;
                };
                if reg.holder(svc.name(), w.slot) != Some(pid) || *master.stopping.borrow() {
                    return; // a reload or a stop got there first
                }
                w.slot
            };
            match master.replace_slot(&svc, slot, &svc.release()).await {
                Ok(change) => tracing::info!(
                    service = %svc.name(),
                    "worker {pid} replaced by {} (slot {slot}; ready in {} ms)",
                    change.new,
                    change.ready_ms
                ),
                Err(e) => tracing::error!(
                    service = %svc.name(),
                    "could not replace worker {pid} (slot {slot}), which keeps serving: {e}"
                ),
            }
        });
    }

    fn on_exit(self: &Arc<Self>, pid: u32, exit: &str) {
        let crashed = {
            let mut reg = self.registry.lock().unwrap();
            let Some(w) = reg.workers.remove(&pid) else {
                return;
            };
            self.metrics
                .worker_exit(pid, w.service.name(), exit_reason(&w));
            if let EntryRole::Gateway(index) = w.role {
                drop(reg);
                self.worker_count.send_modify(|n| *n = n.saturating_sub(1));
                let drained = w.state == WorkerState::Draining;
                let lived = w.started.elapsed();
                self.gateway_exited(w.service, index, pid, exit, drained, lived);
                return;
            }
            w.service.balance_seat_free(pid);
            let slot = reg.slot(w.service.name(), w.slot);
            slot.draining.retain(|p| *p != pid);
            let held_slot = slot.pid == Some(pid);
            if held_slot {
                slot.pid = None;
            }
            let stopping = *self.stopping.borrow();
            match (w.state, held_slot, stopping) {
                (WorkerState::Draining, _, _) => {
                    tracing::info!(
                        service = %w.service.name(),
                        "worker {pid} {exit} after draining for {} ms",
                        w.drain_started.map_or(0, |t| t.elapsed().as_millis())
                    );
                    None
                }
                (_, true, false) => {
                    let lived = w.started.elapsed();
                    if slot.crashed_version.as_deref() != Some(w.version.hash.as_str()) {
                        slot.crashes = 0;
                        slot.crashed_version = Some(w.version.hash.clone());
                    }
                    slot.crashes = if lived < STABLE_AFTER {
                        slot.crashes + 1
                    } else {
                        0
                    };
                    let what = format!(
                        "worker {pid} (slot {}, plugin {}) {exit} {} after it started",
                        w.slot,
                        w.version,
                        short_duration(lived)
                    );
                    slot.last_exit = Some((what.clone(), Instant::now()));
                    slot.respawning = true;
                    let release = w.release();
                    Some((w.service, w.slot, release, what))
                }
                _ => None,
            }
        };
        self.worker_count.send_modify(|n| *n = n.saturating_sub(1));
        if let Some((svc, slot, release, what)) = crashed {
            tracing::error!(service = %svc.name(), "{what}; starting a replacement");
            // Judge first: a failed trial switches the live release back, so the replacement
            // below already starts the release that served before.
            self.judge_crash(&svc, &release, &what);
            tokio::spawn(self.clone().respawn(svc, slot));
        }
    }

    /// Fills an empty slot again, backing off while the slot's workers keep dying young.
    pub(super) async fn respawn(self: Arc<Self>, svc: Arc<Service>, slot: usize) {
        let name = svc.name().to_string();
        loop {
            let crashes = {
                let mut reg = self.registry.lock().unwrap();
                let state = reg.slot(&name, slot);
                // A crash of another version than the one the slot will start now (a rollback
                // switched it) does not make the next start wait.
                let next = svc.live();
                if state.crashed_version.as_deref() != Some(next.hash.as_str()) {
                    state.crashes = 0;
                }
                let crashes = state.crashes;
                if crashes > 0 {
                    state.next_retry = Some(Instant::now() + backoff(crashes));
                }
                crashes
            };
            if crashes > 0 {
                let delay = backoff(crashes);
                tracing::warn!(service = %name, "slot {slot}: waiting {delay:?} before the next start ({crashes} short-lived workers in a row)");
                tokio::time::sleep(delay).await;
            }
            if *self.stopping.borrow() || svc.is_removed() || slot >= svc.config().workers {
                self.registry.lock().unwrap().slot(&name, slot).respawning = false;
                return;
            }
            let release = svc.release();
            let version = &release.version;
            match self.start_worker(&svc, slot, &release).await {
                Ok(pid) => {
                    let mut reg = self.registry.lock().unwrap();
                    let state = reg.slot(&name, slot);
                    if *self.stopping.borrow() || state.pid.is_some() {
                        // A reload or a stop got there first: this worker is not needed.
                        drop(reg);
                        self.drain_worker(pid);
                    } else {
                        state.pid = Some(pid);
                        state.respawning = false;
                        state.next_retry = None;
                        drop(reg);
                        self.slot_filled(&svc, slot, pid);
                        tracing::info!(service = %name, "slot {slot}: replacement worker {pid} is ready (plugin {version})");
                    }
                    return;
                }
                Err(reason) => {
                    tracing::error!(service = %name, "slot {slot}: replacement failed: {reason}");
                    let mut reg = self.registry.lock().unwrap();
                    let state = reg.slot(&name, slot);
                    if state.pid.is_some() {
                        state.respawning = false;
                        return;
                    }
                    state.crashes += 1;
                    state.crashed_version = Some(version.hash.clone());
                    state.last_exit = Some((reason, Instant::now()));
                }
            }
        }
    }

    /// Kills workers whose heartbeat stopped: a wedged runtime, a SIGSTOP, a deadlock. Runs for
    /// the life of the master.
    pub(super) async fn check_liveness(self: Arc<Self>) {
        let tick = self
            .services()
            .iter()
            .map(|s| s.config().liveness_timeout / 4)
            .min()
            .unwrap_or(LIVENESS_TICK)
            .clamp(Duration::from_millis(5), LIVENESS_TICK);
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_tick = Instant::now();
        loop {
            interval.tick().await;
            let gap = last_tick.elapsed();
            last_tick = Instant::now();
            if gap > tick + MASTER_STALL {
                // The master itself did not run for a while (a stalled disk, a starved CPU):
                // the heartbeats that arrived meanwhile are still unread in the channels. The
                // stall is the master's, not the workers': start their clocks again.
                tracing::warn!(
                    "the master did not run for {} ms; liveness is judged afresh from now",
                    gap.as_millis()
                );
                for w in self.registry.lock().unwrap().workers.values_mut() {
                    if w.last_heartbeat.is_some() {
                        w.last_heartbeat = Some(Instant::now());
                    }
                }
                continue;
            }
            let stale: Vec<(u32, Duration)> = {
                let reg = self.registry.lock().unwrap();
                reg.workers
                    .iter()
                    .filter(|(_, w)| w.kill_reason.is_none())
                    .filter_map(|(pid, w)| {
                        let timeout = w.config.liveness_timeout;
                        let age = w.last_heartbeat?.elapsed();
                        (age > timeout).then_some((*pid, timeout))
                    })
                    .collect()
            };
            for (pid, timeout) in stale {
                let why = format!(
                    "it stopped answering (no heartbeat for {}, {LIVENESS_KILL})",
                    humantime::format_duration(timeout)
                );
                tracing::error!("worker {pid} {why}; killing it");
                self.kill_worker(pid, &why);
            }
        }
    }
}

/// Why a worker ended, as `host_worker_exits_total` labels it.
fn exit_reason(w: &super::pool::WorkerEntry) -> &'static str {
    match (&w.kill_reason, w.state) {
        (Some(why), _) if why.contains(LIVENESS_KILL) => "liveness",
        (Some(_), _) => "killed",
        (None, WorkerState::Starting) => "start_failed",
        (None, WorkerState::Draining) => "drained",
        (None, _) => "crash",
    }
}

fn backoff(crashes: u32) -> Duration {
    let exp = crashes.saturating_sub(1).min(16);
    (Duration::from_millis(100) * 2u32.pow(exp)).min(MAX_BACKOFF)
}

/// "40 ms", "2.4 s", "12 s", "3 min": how long a worker lived, for messages.
pub fn short_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 1.0 {
        format!("{} ms", d.as_millis())
    } else if secs < 10.0 {
        format!("{secs:.1} s")
    } else if secs < 120.0 {
        format!("{secs:.0} s")
    } else {
        format!("{:.0} min", secs / 60.0)
    }
}

/// How a process ended, in words: "exited with status 1", "was killed by signal 6 (SIGABRT)".
pub fn describe_exit(status: std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => {
                let name = nix::sys::signal::Signal::try_from(sig)
                    .map(|s| s.as_str())
                    .unwrap_or("?");
                format!("was killed by signal {sig} ({name})")
            }
            _ => "exited".to_string(),
        },
        Err(e) => format!("could not be waited for ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(short_duration(Duration::from_millis(420)), "420 ms");
        assert_eq!(short_duration(Duration::from_millis(2420)), "2.4 s");
        assert_eq!(short_duration(Duration::from_secs(42)), "42 s");
        assert_eq!(short_duration(Duration::from_secs(600)), "10 min");
    }
}

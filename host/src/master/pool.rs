//! The worker pool: the registry of live workers and of each service's slots, and the
//! operations on them: start a worker and wait for READY, put it in a slot, drain it, kill it,
//! and replace the worker of one slot by surge-and-drain (used by reloads, rollbacks and
//! recycling alike). What happens when a worker dies is `master::supervise`.
//!
//! `slots` says which worker currently serves each (service, slot): only that worker is
//! replaced when it dies. A worker that was told to drain has left its slot.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use std::os::fd::OwnedFd;

use tokio::sync::{mpsc, oneshot, Notify};

use super::{
    process,
    service::{Release, Service},
    spec::worker_spec,
    Master,
};
use crate::{
    config::{Kind, ServiceConfig},
    protocol::{monotonic_ns, Role, ToWorker, WorkerSpec},
    shadow::PluginVersion,
};

/// How long a replacement waits for an old worker to confirm it stopped accepting.
const STOP_ACCEPTING_WAIT: Duration = Duration::from_secs(2);

/// Draining workers a slot keeps with their idle keep-alive connections open; older ones are
/// told to close theirs at once, so that rapid reloads do not pile up idle processes.
const DRAINING_GENERATIONS: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Starting,
    Ready,
    Draining,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Draining => "draining",
        }
    }
}

/// What a process of a service is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryRole {
    /// A worker that runs the plugin (HTTP, or a websocket service's business worker).
    Worker,
    /// A websocket service's gateway, by index.
    Gateway(u32),
}

/// What the master knows of one live worker process.
pub struct WorkerEntry {
    pub service: Arc<Service>,
    /// Its slot (a gateway: its index).
    pub slot: usize,
    pub role: EntryRole,
    pub state: WorkerState,
    pub version: PluginVersion,
    /// The configuration it was started with.
    pub config: Arc<ServiceConfig>,
    pub started: Instant,
    /// When the master spawned it, on the clock of `StartTimings`.
    pub spawned_ns: u64,
    pub drain_started: Option<Instant>,
    pub to_worker: mpsc::UnboundedSender<Outgoing>,
    pub kill: Arc<Notify>,
    /// Why the master killed it, for the exit message.
    pub kill_reason: Option<String>,
    pub stats_waiters: Vec<oneshot::Sender<u64>>,
    /// `host reopen-logs` waiting for the worker's answers ([`FromWorker::Reopened`]), by the
    /// id each file was sent with.
    ///
    /// [`FromWorker::Reopened`]: crate::protocol::FromWorker::Reopened
    pub reopen_waiters: std::collections::HashMap<u64, oneshot::Sender<Option<String>>>,
    /// Fired when the worker reports it stopped accepting (see [`Master::drain_worker`]).
    pub stopped_accepting: Option<oneshot::Sender<()>>,
    /// The last heartbeat (or READY); `None` while starting.
    pub last_heartbeat: Option<Instant>,
    pub requests: u64,
    pub rss_bytes: u64,
    pub connections: u64,
    /// A graceful replacement was asked for already (recycling, a lost handler thread).
    pub replacing: bool,
    /// The plugin's last panic message and when it came, quoted if the worker dies soon after.
    pub last_panic: Option<(String, Instant)>,
}

/// A message to a worker, with a file to pass along (`fdpass`) for the ones that need one.
pub struct Outgoing(pub ToWorker, pub Option<Arc<std::fs::File>>);

impl WorkerEntry {
    /// Sends a message (dropped if the worker is gone).
    pub fn tell(&self, message: ToWorker) {
        let _ = self.to_worker.send(Outgoing(message, None));
    }

    pub fn release(&self) -> Release {
        Release {
            version: self.version.clone(),
            config: self.config.clone(),
        }
    }
}

/// How a slot's workers have fared.
#[derive(Default)]
pub struct SlotState {
    /// The worker serving this slot.
    pub pid: Option<u32>,
    /// Consecutive young deaths, and of which version (a new version starts counting anew).
    pub crashes: u32,
    pub crashed_version: Option<String>,
    /// How the last worker of this slot ended unexpectedly, and when.
    pub last_exit: Option<(String, Instant)>,
    /// When a respawn waits out its backoff: when it starts.
    pub next_retry: Option<Instant>,
    /// A respawn task is filling this slot.
    pub respawning: bool,
    /// Workers that left this slot and are draining, oldest first.
    pub draining: VecDeque<u32>,
}

/// Live workers by pid, and the slots of every service.
#[derive(Default)]
pub struct Registry {
    pub workers: HashMap<u32, WorkerEntry>,
    /// By (service name, slot).
    pub slots: HashMap<(String, usize), SlotState>,
}

impl Registry {
    pub fn slot(&mut self, service: &str, slot: usize) -> &mut SlotState {
        self.slots.entry((service.to_string(), slot)).or_default()
    }

    /// The pid serving a slot, if any.
    pub fn holder(&self, service: &str, slot: usize) -> Option<u32> {
        self.slots
            .get(&(service.to_string(), slot))
            .and_then(|s| s.pid)
    }
}

/// One slot replaced: which worker left and which took over.
pub struct SlotChange {
    pub old: Option<u32>,
    pub new: u32,
    pub ready_ms: u128,
}

impl Master {
    /// Starts a worker for `(service, slot)` running `release` and waits until it is READY.
    /// On failure the process is gone (killed if it had to be) and the error says why.
    pub async fn start_worker(
        self: &Arc<Self>,
        svc: &Arc<Service>,
        slot: usize,
        release: &Release,
    ) -> Result<u32, String> {
        let (version, config) = (&release.version, &release.config);
        let websocket = matches!(config.kind, Kind::WebSocket { .. });
        // A websocket service's business workers take no connections: its gateways do.
        let sockets = if websocket {
            Vec::new()
        } else {
            svc.sockets_for(config)?
        };
        if (!websocket && sockets.is_empty()) || *self.stopping.borrow() {
            return Err("the service's listeners are closed (the host is stopping)".into());
        }
        let (addrs, listeners): (Vec<String>, Vec<_>) = sockets.into_iter().unzip();
        let mut spec = worker_spec(config, slot, version, addrs);
        let plugin = self.store.open_verified(version)?;
        let mut extra = Vec::new();
        // A business worker's links: one socketpair per gateway, the other end for the gateway.
        let mut gateway_ends = Vec::new();
        if let Role::Business { gateways, .. } = &mut spec.role {
            for (index, gateway) in self.gateways_of(svc) {
                let (ours, theirs) = std::os::unix::net::UnixStream::pair()
                    .map_err(|e| format!("could not make a link to gateway {index}: {e}"))?;
                extra.push(OwnedFd::from(ours));
                gateways.push(index);
                gateway_ends.push((gateway, theirs));
            }
        } else {
            if let Some(log) = &config.access_log {
                // Opened here, not in the worker: the worker may run as a user who cannot open it.
                extra.push(OwnedFd::from(log.open()?));
            }
            if config.balance_accepts {
                match svc.balance_fd() {
                    Some(Ok(fd)) => {
                        spec.balance_fd = Some(process::extra_fd(listeners.len(), extra.len()));
                        extra.push(fd);
                    }
                    // The worker accepts unbalanced, which loses nothing.
                    Some(Err(e)) => tracing::warn!(
                        service = %svc.name(),
                        "could not pass the accept-balancing table to a new worker ({e}): it \
                         will accept new connections unbalanced"
                    ),
                    None => {}
                }
            }
        }
        let spawned = process::spawn(&spec, Some(&plugin), listeners, extra)
            .map_err(|e| format!("could not start a worker process: {e}"))?;
        let pid = spawned.child.id().unwrap_or(0);
        for (gateway, end) in gateway_ends {
            self.tell_with_file(
                gateway,
                ToWorker::BusinessLink { slot, pid },
                std::fs::File::from(OwnedFd::from(end)),
            );
        }
        self.launched(svc, spec, spawned, EntryRole::Worker, release)
            .await
    }

    /// Registers a started process, supervises it, and waits until it is READY (a worker or a
    /// gateway alike).
    pub(super) async fn launched(
        self: &Arc<Self>,
        svc: &Arc<Service>,
        spec: WorkerSpec,
        spawned: process::Spawned,
        role: EntryRole,
        release: &Release,
    ) -> Result<u32, String> {
        let (version, config) = (&release.version, &release.config);
        let pid = spawned.child.id().unwrap_or(0);
        let (to_worker, from_master) = mpsc::unbounded_channel();
        let _ = to_worker.send(Outgoing(ToWorker::Start(Box::new(spec.clone())), None));
        let (ready_tx, ready_rx) = oneshot::channel();
        let kill = Arc::new(Notify::new());
        self.registry.lock().unwrap().workers.insert(
            pid,
            WorkerEntry {
                service: svc.clone(),
                slot: spec.slot,
                role,
                state: WorkerState::Starting,
                version: version.clone(),
                config: config.clone(),
                started: Instant::now(),
                spawned_ns: monotonic_ns(),
                drain_started: None,
                to_worker,
                kill: kill.clone(),
                kill_reason: None,
                stats_waiters: Vec::new(),
                reopen_waiters: Default::default(),
                stopped_accepting: None,
                last_heartbeat: None,
                requests: 0,
                rss_bytes: 0,
                connections: 0,
                replacing: false,
                last_panic: None,
            },
        );
        self.worker_count.send_modify(|n| *n += 1);
        tokio::spawn(self.clone().watch_worker(
            pid,
            spawned.child,
            spawned.channel,
            from_master,
            ready_tx,
            kill.clone(),
        ));

        let timeout = config.ready_timeout;
        match tokio::time::timeout(timeout, ready_rx).await {
            Ok(Ok(Ok(()))) => {
                if let Some(w) = self.registry.lock().unwrap().workers.get_mut(&pid) {
                    // A stop may have told it to drain while it was starting: keep that.
                    if w.state == WorkerState::Starting {
                        w.state = WorkerState::Ready;
                    }
                    w.last_heartbeat = Some(Instant::now());
                }
                if *self.stopping.borrow() {
                    self.drain_worker(pid);
                    return Err("the host is stopping".into());
                }
                Ok(pid)
            }
            Ok(Ok(Err(reason))) => Err(reason),
            Ok(Err(_)) => Err(format!("worker {pid} vanished before it was ready")),
            Err(_) => {
                self.kill_worker(pid, "it did not report ready within the ready timeout");
                Err(format!(
                    "worker {pid} did not report ready within the ready timeout ({}), so it was \
                     killed. The plugin's on_start is probably blocked; make it return, or raise \
                     ready_timeout for this service.",
                    humantime::format_duration(timeout)
                ))
            }
        }
    }

    /// Sends a message with a file (SCM_RIGHTS) to a live process.
    pub(super) fn tell_with_file(&self, pid: u32, message: ToWorker, file: std::fs::File) {
        if let Some(w) = self.registry.lock().unwrap().workers.get(&pid) {
            let _ = w.to_worker.send(Outgoing(message, Some(Arc::new(file))));
        }
    }

    /// Makes `pid` the worker of `(service, slot)`; returns the worker it displaced, which the
    /// caller drains.
    pub fn install(&self, svc: &Service, slot: usize, pid: u32) -> Option<u32> {
        let mut reg = self.registry.lock().unwrap();
        let state = reg.slot(svc.name(), slot);
        state.respawning = false;
        state.next_retry = None;
        // A worker placed by a reload or a rollback is a fresh start: crashes of the slot's
        // earlier workers (maybe days ago, on the same version) no longer make it wait.
        state.crashes = 0;
        let displaced = state.pid.replace(pid);
        drop(reg);
        self.slot_filled(svc, slot, pid);
        displaced
    }

    /// Replaces the worker of one slot by surge-and-drain: a new worker on `version` first,
    /// READY, in the slot; then the old one drains, and this returns once it stopped accepting
    /// (so that from then on every new connection reaches the new worker). An empty slot is
    /// simply filled. The caller holds the service's lock.
    pub async fn replace_slot(
        self: &Arc<Self>,
        svc: &Arc<Service>,
        slot: usize,
        release: &Release,
    ) -> Result<SlotChange, String> {
        let t = Instant::now();
        let new = self.start_worker(svc, slot, release).await?;
        let ready_ms = t.elapsed().as_millis();
        // The service may have switched away while the worker started (a trial failed, and
        // the service went back to the release it came from): a worker of the release it left
        // must not serve.
        let live = svc.release();
        if !live.same_as(release) {
            self.drain_worker(new);
            return Err(format!(
                "the service switched to {live} while worker {new} was starting"
            ));
        }
        let old = self.install(svc, slot, new);
        if let Some(old) = old {
            self.drain_and_wait(svc, old).await;
        }
        Ok(SlotChange { old, new, ready_ms })
    }

    /// Tells `pid` to drain and waits (a little) until it stopped accepting.
    pub async fn drain_and_wait(&self, svc: &Service, pid: u32) {
        let stopped = self.drain_worker(pid);
        if tokio::time::timeout(STOP_ACCEPTING_WAIT, stopped)
            .await
            .is_err()
        {
            tracing::warn!(
                service = %svc.name(),
                "worker {pid} did not confirm within {STOP_ACCEPTING_WAIT:?} that it stopped \
                 accepting; going on"
            );
        }
    }

    /// Tells a worker to drain: it leaves its slot at once and is killed if it is still running
    /// after the service's drain timeout. The receiver resolves once the worker has closed its
    /// listeners (with an error if it exits first, or was draining already): from then on no
    /// new connection reaches the old code.
    pub fn drain_worker(&self, pid: u32) -> oneshot::Receiver<()> {
        let (stopped_tx, stopped_rx) = oneshot::channel();
        let mut reg = self.registry.lock().unwrap();
        let Some(w) = reg.workers.get_mut(&pid) else {
            return stopped_rx;
        };
        if w.state == WorkerState::Draining {
            return stopped_rx;
        }
        w.stopped_accepting = Some(stopped_tx);
        w.state = WorkerState::Draining;
        w.service.balance_seat_stop(pid);
        w.drain_started = Some(Instant::now());
        w.tell(ToWorker::Drain);
        let (svc, slot, kill) = (w.service.clone(), w.slot, w.kill.clone());
        let state = reg.slot(svc.name(), slot);
        if state.pid == Some(pid) {
            state.pid = None;
        }
        state.draining.push_back(pid);
        let excess = state.draining.len().saturating_sub(DRAINING_GENERATIONS);
        let oldest: Vec<u32> = state.draining.iter().take(excess).copied().collect();
        for old in oldest {
            if let Some(w) = reg.workers.get(&old) {
                w.tell(ToWorker::CloseIdle);
            }
        }
        let timeout = svc.config().drain_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            // Notifying the Notify of a worker that already exited does nothing, so there is no
            // pid to reuse by mistake here.
            kill.notify_one();
        });
        stopped_rx
    }

    /// Kills a worker and everything it started (its process group), saying why in its exit
    /// line.
    pub fn kill_worker(&self, pid: u32, why: &str) {
        if let Some(w) = self.registry.lock().unwrap().workers.get_mut(&pid) {
            w.kill_reason.get_or_insert_with(|| why.to_string());
            w.kill.notify_one();
        }
    }

    /// Asks every worker in `pids` for its request count, waiting at most `deadline` in all.
    pub async fn request_counts(&self, pids: &[u32], deadline: Duration) -> HashMap<u32, u64> {
        let mut pending = Vec::new();
        {
            let mut reg = self.registry.lock().unwrap();
            for pid in pids {
                if let Some(w) = reg.workers.get_mut(pid) {
                    let (tx, rx) = oneshot::channel();
                    w.stats_waiters.push(tx);
                    w.tell(ToWorker::Stats);
                    pending.push((*pid, rx));
                }
            }
        }
        let until = tokio::time::Instant::now() + deadline;
        let mut counts = HashMap::new();
        for (pid, rx) in pending {
            if let Ok(Ok(n)) = tokio::time::timeout_at(until, rx).await {
                counts.insert(pid, n);
            }
        }
        counts
    }

    /// Pids of every live worker process, whatever its state.
    pub fn live_pids(&self) -> Vec<u32> {
        self.registry
            .lock()
            .unwrap()
            .workers
            .keys()
            .copied()
            .collect()
    }

    /// The slot holders of a service, with what they run: `None` for an empty slot.
    pub fn holders(&self, svc: &Service) -> Vec<Option<(u32, Release)>> {
        let reg = self.registry.lock().unwrap();
        (0..svc.config().workers)
            .map(|slot| {
                reg.holder(svc.name(), slot)
                    .and_then(|pid| reg.workers.get(&pid).map(|w| (pid, w.release())))
            })
            .collect()
    }
}

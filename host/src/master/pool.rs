//! The worker pool: starting workers, watching them, draining them, replacing crashed ones.
//!
//! Each worker has one task ([`Master::watch_worker`]) that owns its process and its channel:
//! it relays messages (READY, a start failure, stats), kills the process when asked, reaps it,
//! and decides what its exit means. The registry (`Master::registry`) is the shared picture
//! `host status` shows; `slots` says which worker currently serves each (service, slot): only
//! that worker is respawned when it dies. A worker that was told to drain has left its slot.

use std::{
    collections::HashMap,
    process::ExitStatus,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
    process::Child,
    sync::{mpsc, oneshot, Notify},
};

use super::{process, Master};
use crate::{
    config::ServiceConfig,
    protocol::{encode, monotonic_ns, FromWorker, ToWorker, WorkerSpec},
    shadow::PluginVersion,
};

/// A worker that lived less than this before it died counts as crash-looping: its replacement
/// waits (100 ms, doubling, at most [`MAX_BACKOFF`]) so that a crash loop cannot spin.
const STABLE_AFTER: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

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

/// What the master knows of one live worker process.
pub struct WorkerEntry {
    pub service: usize,
    pub slot: usize,
    pub state: WorkerState,
    pub version: PluginVersion,
    pub started: Instant,
    /// When the master spawned it, on the clock of [`StartTimings`].
    spawned_ns: u64,
    drain_started: Option<Instant>,
    to_worker: mpsc::UnboundedSender<ToWorker>,
    kill: Arc<Notify>,
    stats_waiters: Vec<oneshot::Sender<u64>>,
    /// Fired when the worker reports it stopped accepting (see [`Master::drain_worker`]).
    stopped_accepting: Option<oneshot::Sender<()>>,
}

/// Live workers by pid, and which pid serves each (service, slot).
#[derive(Default)]
pub struct Registry {
    pub workers: HashMap<u32, WorkerEntry>,
    pub slots: HashMap<(usize, usize), u32>,
    /// Consecutive short-lived deaths per slot, for the respawn backoff.
    crashes: HashMap<(usize, usize), u32>,
}

impl Master {
    /// Starts a worker for `(service, slot)` running `version` and waits until it is READY.
    /// On failure the process is gone (killed if it had to be) and the error says why.
    /// The caller decides whether the worker takes over the slot.
    pub async fn start_worker(
        self: &Arc<Self>,
        service: usize,
        slot: usize,
        version: &PluginVersion,
    ) -> Result<u32, String> {
        if *self.stopping.borrow() {
            return Err("the host is stopping".into());
        }
        let svc = &self.services[service];
        let spec = worker_spec(&svc.config, slot, version, svc.listen_addrs());
        let spawned_ns = monotonic_ns();
        let spawned = process::spawn(&spec, &svc.listeners)
            .map_err(|e| format!("could not start a worker process: {e}"))?;
        let pid = spawned.child.id().unwrap_or(0);
        let (to_worker, from_master) = mpsc::unbounded_channel();
        let _ = to_worker.send(ToWorker::Start(Box::new(spec)));
        let kill = Arc::new(Notify::new());
        let (ready_tx, ready_rx) = oneshot::channel();
        self.registry.lock().unwrap().workers.insert(
            pid,
            WorkerEntry {
                service,
                slot,
                state: WorkerState::Starting,
                version: version.clone(),
                started: Instant::now(),
                spawned_ns,
                drain_started: None,
                to_worker,
                kill: kill.clone(),
                stats_waiters: Vec::new(),
                stopped_accepting: None,
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

        let timeout = svc.config.ready_timeout;
        match tokio::time::timeout(timeout, ready_rx).await {
            Ok(Ok(Ok(()))) => {
                if let Some(w) = self.registry.lock().unwrap().workers.get_mut(&pid) {
                    // A stop may have told it to drain while it was starting: keep that.
                    if w.state == WorkerState::Starting {
                        w.state = WorkerState::Ready;
                    }
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
                kill.notify_one();
                Err(format!(
                    "worker {pid} did not report ready within the ready timeout ({}), so it was \
                     killed. The plugin's on_start is probably blocked; make it return, or raise \
                     ready_timeout for this service.",
                    humantime::format_duration(timeout)
                ))
            }
        }
    }

    /// Tells a worker to drain: it leaves its slot at once and is killed if it is still running
    /// after the service's drain timeout. The receiver resolves once the worker has closed its
    /// listeners (with an error if it exits first, or was draining already): from then on no
    /// new connection reaches the old code.
    pub fn drain_worker(self: &Arc<Self>, pid: u32) -> oneshot::Receiver<()> {
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
        w.drain_started = Some(Instant::now());
        let _ = w.to_worker.send(ToWorker::Drain);
        let (key, kill) = ((w.service, w.slot), w.kill.clone());
        let timeout = self.services[w.service].config.drain_timeout;
        if reg.slots.get(&key) == Some(&pid) {
            reg.slots.remove(&key);
        }
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            // Notifying the Notify of a worker that already exited does nothing, so there is no
            // pid to reuse by mistake here.
            kill.notify_one();
        });
        stopped_rx
    }

    /// Kills a worker at once (fast stop, or a second Ctrl-C).
    pub fn kill_worker(&self, pid: u32) {
        if let Some(w) = self.registry.lock().unwrap().workers.get(&pid) {
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
                    let _ = w.to_worker.send(ToWorker::Stats);
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

    /// The one task per worker: relay its messages, kill it on request, reap it, and react to
    /// its exit.
    async fn watch_worker(
        self: Arc<Self>,
        pid: u32,
        mut child: Child,
        channel: UnixStream,
        mut from_master: mpsc::UnboundedReceiver<ToWorker>,
        ready_tx: oneshot::Sender<Result<(), String>>,
        kill: Arc<Notify>,
    ) {
        let (read, mut write) = channel.into_split();
        let writer = tokio::spawn(async move {
            while let Some(message) = from_master.recv().await {
                if write.write_all(&encode(&message)).await.is_err() {
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
                    let _ = child.start_kill();
                }
                line = lines.next_line(), if channel_open => match line {
                    Ok(Some(line)) => self.on_message(pid, &line, &mut ready_tx, &mut failure),
                    _ => channel_open = false,
                },
            }
        };
        // A start failure is sent just before the worker exits: read what is left.
        while channel_open {
            match tokio::time::timeout(Duration::from_millis(200), lines.next_line()).await {
                Ok(Ok(Some(line))) => self.on_message(pid, &line, &mut ready_tx, &mut failure),
                _ => channel_open = false,
            }
        }
        writer.abort();
        let exit = describe_exit(status);
        if let Some(tx) = ready_tx.take() {
            let reason = failure.unwrap_or_else(|| {
                format!("worker {pid} {exit} before it was ready (a crash while loading or starting the plugin)")
            });
            let _ = tx.send(Err(reason));
        }
        self.on_exit(pid, &exit);
    }

    fn on_message(
        &self,
        pid: u32,
        line: &str,
        ready_tx: &mut Option<oneshot::Sender<Result<(), String>>>,
        failure: &mut Option<String>,
    ) {
        match serde_json::from_str::<FromWorker>(line) {
            Ok(FromWorker::Ready { timings: t, .. }) => {
                let spawned = self
                    .registry
                    .lock()
                    .unwrap()
                    .workers
                    .get(&pid)
                    .map_or(0, |w| w.spawned_ns);
                let ms = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1e6;
                // Where a start's time goes; `bench/` reads this line (HOST_LOG=host=debug).
                tracing::debug!(
                    "worker {pid} start phases (ms): exec {:.2}, plugin load {:.2}, on_start {:.2}, serve setup {:.2}, ready report {:.2}, total {:.2}",
                    ms(spawned, t.entered),
                    ms(t.entered, t.loaded),
                    ms(t.loaded, t.started),
                    ms(t.started, t.serving),
                    ms(t.serving, monotonic_ns()),
                    ms(spawned, monotonic_ns()),
                );
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(Ok(()));
                }
            }
            Ok(FromWorker::Failed { reason }) => *failure = Some(reason),
            Ok(FromWorker::StoppedAccepting) => {
                let mut reg = self.registry.lock().unwrap();
                if let Some(tx) = reg
                    .workers
                    .get_mut(&pid)
                    .and_then(|w| w.stopped_accepting.take())
                {
                    let _ = tx.send(());
                }
            }
            Ok(FromWorker::Stats { requests }) => {
                let mut reg = self.registry.lock().unwrap();
                if let Some(w) = reg.workers.get_mut(&pid) {
                    if !w.stats_waiters.is_empty() {
                        let _ = w.stats_waiters.remove(0).send(requests);
                    }
                }
            }
            Err(e) => tracing::warn!("worker {pid} sent an unreadable message: {e}"),
        }
    }

    fn on_exit(self: &Arc<Self>, pid: u32, exit: &str) {
        let respawn = {
            let mut reg = self.registry.lock().unwrap();
            let Some(w) = reg.workers.remove(&pid) else {
                return;
            };
            let key = (w.service, w.slot);
            let held_slot = reg.slots.get(&key) == Some(&pid);
            if held_slot {
                reg.slots.remove(&key);
            }
            let stopping = *self.stopping.borrow();
            match (w.state, held_slot, stopping) {
                (WorkerState::Draining, _, _) => {
                    tracing::info!(service = %self.services[w.service].config.name, "worker {pid} {exit} after draining for {} ms", w.drain_started.map_or(0, |t| t.elapsed().as_millis()));
                    None
                }
                (_, true, false) => {
                    let crashes = reg.crashes.entry(key).or_default();
                    *crashes = if w.started.elapsed() < STABLE_AFTER {
                        *crashes + 1
                    } else {
                        0
                    };
                    tracing::error!(
                        service = %self.services[w.service].config.name,
                        "worker {pid} (slot {}) {exit} unexpectedly; starting a replacement", w.slot
                    );
                    Some(key)
                }
                _ => None,
            }
        };
        self.worker_count.send_modify(|n| *n = n.saturating_sub(1));
        if let Some((service, slot)) = respawn {
            tokio::spawn(self.clone().respawn(service, slot));
        }
    }

    /// Fills an empty slot again, backing off while the slot's workers keep dying young.
    async fn respawn(self: Arc<Self>, service: usize, slot: usize) {
        let name = self.services[service].config.name.clone();
        loop {
            let crashes = self
                .registry
                .lock()
                .unwrap()
                .crashes
                .get(&(service, slot))
                .copied()
                .unwrap_or(0);
            if crashes > 0 {
                let delay = backoff(crashes);
                tracing::warn!(service = %name, "slot {slot}: waiting {delay:?} before the next start ({crashes} short-lived workers in a row)");
                tokio::time::sleep(delay).await;
            }
            if *self.stopping.borrow() {
                return;
            }
            let version = self.services[service].current();
            match self.start_worker(service, slot, &version).await {
                Ok(pid) => {
                    let mut reg = self.registry.lock().unwrap();
                    if *self.stopping.borrow() || reg.slots.contains_key(&(service, slot)) {
                        // A reload or a stop got there first: this worker is not needed.
                        drop(reg);
                        self.drain_worker(pid);
                    } else {
                        reg.slots.insert((service, slot), pid);
                        tracing::info!(service = %name, "slot {slot}: replacement worker {pid} is ready");
                    }
                    return;
                }
                Err(reason) => {
                    tracing::error!(service = %name, "slot {slot}: replacement failed: {reason}");
                    *self
                        .registry
                        .lock()
                        .unwrap()
                        .crashes
                        .entry((service, slot))
                        .or_default() += 1;
                }
            }
        }
    }
}

fn backoff(crashes: u32) -> Duration {
    let exp = crashes.saturating_sub(1).min(16);
    (Duration::from_millis(100) * 2u32.pow(exp)).min(MAX_BACKOFF)
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

/// What a worker of `config` in `slot` needs to start on `version`, listening on `listen`.
pub fn worker_spec(
    config: &ServiceConfig,
    slot: usize,
    version: &PluginVersion,
    listen: Vec<String>,
) -> WorkerSpec {
    WorkerSpec {
        service: config.name.clone(),
        slot,
        plugin_path: version.path.clone(),
        plugin_source: version.source.clone(),
        plugin_version: version.short().to_string(),
        listen,
        config_toml: toml::to_string(&config.plugin_config).unwrap_or_default(),
        config: flatten(&config.plugin_config),
        max_body_bytes: config.max_body_bytes,
        idle_grace_ms: config.idle_grace.as_millis() as u64,
        drain_timeout_ms: config.drain_timeout.as_millis() as u64,
        master_pid: std::process::id(),
        check_only: false,
    }
}

/// The `[service.config]` table as key/value strings for `Context::config`.
fn flatten(table: &toml::Table) -> Vec<(String, String)> {
    table
        .iter()
        .map(|(k, v)| {
            let value = match v {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), value)
        })
        .collect()
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
    fn config_values_are_flattened() {
        let t: toml::Table = toml::from_str("a = 'x'\nb = 3\nc = [1, 2]").unwrap();
        let mut flat = flatten(&t);
        flat.sort();
        assert_eq!(
            flat,
            vec![
                ("a".into(), "x".into()),
                ("b".into(), "3".into()),
                ("c".into(), "[1, 2]".into())
            ]
        );
    }
}

//! The master role: `host start`.
//!
//! It binds every listener once (workers inherit them, so the accept queue outlives any worker),
//! copies plugins into the shadow store, starts and supervises workers, answers the control
//! socket and signals, and never loads a plugin itself. Signals: SIGHUP and SIGUSR1 reload,
//! SIGTERM and SIGINT stop gracefully (a second one kills the workers at once).
//!
//! It runs on a current-thread runtime on the main thread: PR_SET_PDEATHSIG fires when the
//! *thread* that forked a worker exits, so every fork must come from a thread that lives as long
//! as the master.

mod config_reload;
mod control;
mod gateways;
mod home;
mod jobs;
mod listeners;
mod pool;
mod process;
mod reopen;
mod rollout;
mod run;
mod service;
mod spec;
mod status;
mod supervise;
mod systemd;
mod upgrade;
mod watcher;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, RwLock},
    time::{Instant, SystemTime},
};

use tokio::{sync::watch, task::JoinSet};

pub use self::jobs::Op;
pub use self::process::{spawn as spawn_worker_process, Spawned};
pub use self::supervise::describe_exit;
use self::{jobs::Jobs, pool::Registry, service::Service};
pub use self::{
    pool::WorkerState,
    spec::{heartbeat_interval, worker_spec},
};
use crate::{
    config::Source,
    protocol::RolloutEvent,
    shadow::{History, PluginVersion, SavedService, ShadowStore},
};

/// Everything the master's tasks share.
pub struct Master {
    pub started: Instant,
    services: RwLock<Vec<Arc<Service>>>,
    pub store: ShadowStore,
    pub registry: Mutex<Registry>,
    /// Number of live worker processes, to wait for zero on stop.
    pub worker_count: watch::Sender<usize>,
    pub stopping: watch::Sender<bool>,
    jobs: Jobs,
    /// Reloads and rollbacks, oldest first (saved with the version history).
    events: Mutex<Vec<RolloutEvent>>,
    /// The saved history of services this master's config does not have (another config run
    /// in the same state directory, or a service a config reload removed): saved again with
    /// every save, and their copies kept, so a config that names them again can still roll
    /// back.
    dormant: Mutex<HashMap<String, SavedService>>,
    /// The state directory, its lock and the control socket (`master::home`).
    home: home::Home,
    /// A stop cut requests short (a second signal killed workers that still had connections).
    cut_short: std::sync::atomic::AtomicBool,
    /// Where the configuration came from, to read again on reload.
    source: Source,
    /// How this master was started: what `host upgrade` starts by default.
    origin: upgrade::Origin,
    upgrade_timeout: std::time::Duration,
    /// `host dev` (which does not upgrade itself).
    dev_mode: bool,
    /// Fires once this master handed over to a new one (`master::upgrade`).
    handed_over: tokio::sync::Notify,
    /// The new master of an upgrade under way, until it took over or is gone: a stop waits for
    /// it (`upgrade::abandon` stops it too), and a second signal kills it.
    successor: watch::Sender<Option<u32>>,
    /// A new master of an upgrade until it took over: its listening sockets are the old
    /// master's, which serves on them; a stop must not close them to new connections.
    borrows_listeners: std::sync::atomic::AtomicBool,
    /// Set when this master tells its successor to take over: the history file is the new
    /// master's from then on (cleared again if the takeover fails).
    history_handed: std::sync::atomic::AtomicBool,
    /// The log file stdout and stderr point to, if any (`host reopen-logs`).
    log_file: Option<std::path::PathBuf>,
    /// Counters fed by the workers' heartbeats and by rollouts (`/metrics`, the admin page).
    pub metrics: crate::admin::Metrics,
    /// The admin listener, if configured.
    admin: Option<Arc<crate::admin::Admin>>,
}

/// Someone waiting for a stop to finish (`host stop`, `POST /api/stop`): progress and the
/// outcome go here, and the master waits, briefly, until the receiver is gone (the outcome
/// written) before it exits.
pub type StopWaiter = tokio::sync::mpsc::UnboundedSender<crate::protocol::ControlReply>;

/// Work that runs beside the master once it serves (`host dev`'s rebuild loop).
pub type Sidecar = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

pub use self::run::{main, Options};
pub use self::upgrade::refuse as refuse_upgrade;

impl Master {
    /// Starts every slot of every service and waits until all are READY.
    async fn start_all(self: &Arc<Self>) -> Result<(), String> {
        // A websocket service's gateways first: its workers link to them as they start.
        for svc in self.services() {
            self.start_gateways(&svc)
                .await
                .map_err(|e| format!("service {} could not start: {e}", svc.name()))?;
        }
        let mut starting = JoinSet::new();
        for svc in self.services() {
            let release = svc.release();
            for slot in 0..release.config.workers {
                let (master, release, svc) = (self.clone(), release.clone(), svc.clone());
                starting.spawn(async move {
                    let started = master.start_worker(&svc, slot, &release).await;
                    (svc, slot, started)
                });
            }
        }
        let mut first_error = None;
        while let Some(joined) = starting.join_next().await {
            let Ok((svc, slot, started)) = joined else {
                continue;
            };
            match started {
                Ok(pid) => {
                    self.install(&svc, slot, pid);
                }
                Err(e) => {
                    first_error.get_or_insert_with(|| {
                        format!("service {} could not start: {e}", svc.name())
                    });
                }
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Marks this master as replaced by `new_pid` (an upgrade's takeover happened): it stops
    /// taking requests and drains, and leaves the state directory's files to the new master.
    fn hand_over(&self, new_pid: u32) {
        self.home.hand_over(new_pid);
        // The new master answers on the admin socket from now on.
        if let Some(admin) = &self.admin {
            admin.stop_accepting();
        }
        self.handed_over.notify_one();
    }

    pub fn is_handed_over(&self) -> bool {
        self.home.handed_over_to().is_some()
    }

    /// `host stop` and `POST /api/stop`: the run loop stops the host, then tells `waiter`.
    /// Refused (an error, so `host stop` does not wait for an exit) while an upgrade of the
    /// master is waiting or under way, or after this master handed over: it would stop this
    /// master and leave the new one serving.
    pub fn request_stop(&self, waiter: StopWaiter) {
        if let Some(refusal) = self.refused_for_upgrade() {
            tracing::warn!("stop refused: {refusal}");
            let _ = waiter.send(crate::protocol::ControlReply::Error(refusal));
            return;
        }
        let n = *self.worker_count.borrow();
        let _ = waiter.send(crate::protocol::ControlReply::Line(format!(
            "stopping: draining {}",
            workers(n)
        )));
        let _ = self.home.stops.send(waiter);
    }

    /// Starts (or restarts, on a new path) the watcher of a service's plugin file.
    fn watch(self: &Arc<Self>, svc: &Arc<Service>) {
        if let Err(e) = watcher::spawn(self.clone(), svc.clone()) {
            tracing::error!(service = %svc.name(), "{e}; reload it by hand");
        }
    }

    /// The services, in config order.
    pub fn services(&self) -> Vec<Arc<Service>> {
        self.services.read().unwrap().clone()
    }

    pub fn service(&self, name: &str) -> Option<Arc<Service>> {
        self.services
            .read()
            .unwrap()
            .iter()
            .find(|s| s.name() == name)
            .cloned()
    }

    fn describe_listeners(&self) -> String {
        self.services()
            .iter()
            .map(|s| {
                let config = s.config();
                let websocket = matches!(config.kind, crate::config::Kind::WebSocket { .. });
                let scheme = match (websocket, config.tls.is_some()) {
                    (false, false) => "http",
                    (false, true) => "https",
                    (true, false) => "ws",
                    (true, true) => "wss",
                };
                let urls: Vec<_> = s
                    .listen_addrs()
                    .iter()
                    .map(|a| format!("{scheme}://{a}"))
                    .collect();
                format!("{} on {}", config.name, urls.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Drains every worker (`graceful`) or kills them, and waits until none is left. The
    /// master's listeners close first: from then on new connections are refused (not queued for
    /// workers that will never accept them), and each worker accepts what is queued before it
    /// closes its own copies.
    async fn stop(self: &Arc<Self>, graceful: bool) {
        self.stopping.send_replace(true);
        let borrowed = self
            .borrows_listeners
            .load(std::sync::atomic::Ordering::SeqCst);
        let handed_over = self.is_handed_over();
        for svc in self.services() {
            // A socket that lives on in another master only loses this master's copy: every one
            // after a handover (the new master's now), and before a takeover the inherited ones
            // (the old master's, which serves on them).
            svc.close_listeners_sparing(|l| handed_over || (borrowed && l.handed));
        }
        if graceful {
            for pid in self.live_pids() {
                self.drain_worker(pid);
            }
        } else {
            self.kill_all("stopping without a drain");
        }
        let mut count = self.worker_count.subscribe();
        let _ = count.wait_for(|n| *n == 0).await;
        let _ = self.successor.subscribe().wait_for(Option::is_none).await;
    }

    /// Kills every worker now. Any still running had not finished its drain: whatever it was
    /// serving is cut, and the stop says so (and the master exits non-zero).
    fn kill_all(self: &Arc<Self>, why: &str) {
        let pids = self.live_pids();
        if !pids.is_empty() {
            self.cut_short
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        tracing::warn!(
            "{why}: stopping now; killing {} that had not finished draining",
            workers(pids.len())
        );
        for pid in pids {
            self.kill_worker(pid, why);
        }
        if let Some(pid) = *self.successor.borrow() {
            tracing::warn!("{why}: killing the new master of the upgrade (pid {pid}) too");
            upgrade::kill_master_tree(pid);
        }
    }

    /// Stores a service's plugin in the shadow store (trust checks, hash, copy) on the blocking
    /// pool: a large build takes a while to hash and write, and the master's one thread must
    /// go on reading heartbeats meanwhile.
    async fn store_plugin(
        self: &Arc<Self>,
        config: &crate::config::ServiceConfig,
    ) -> Result<PluginVersion, String> {
        let (master, config) = (self.clone(), config.clone());
        tokio::task::spawn_blocking(move || master.store.store_plugin(&config))
            .await
            .map_err(|e| format!("storing the plugin failed: {e}"))?
    }

    /// Writes every service's versions and the rollout events to the store's history file.
    fn save_history(&self) {
        // From the takeover on, the history is the new master's (a probation of this one that
        // ends while it drains must not write over it; `upgrade` flushed what came before).
        if self
            .history_handed
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let mut services = self.dormant.lock().unwrap().clone();
        services.extend(
            self.services()
                .iter()
                .map(|s| (s.name().to_string(), s.saved())),
        );
        let history = History {
            services,
            events: self.events.lock().unwrap().clone(),
        };
        self.store.save_history(&history);
    }

    /// Every version something still uses: live, kept for rollback, on trial (and what it
    /// would roll back to), or run by a live worker.
    fn versions_in_use(&self) -> Vec<PluginVersion> {
        let mut used = Vec::new();
        for svc in self.services() {
            let st = svc.state();
            used.push(st.live.clone());
            used.extend(st.previous.iter().cloned());
            if let Some(trial) = &st.trial {
                used.push(trial.from.version.clone());
                used.push(trial.to.version.clone());
            }
        }
        for saved in self.dormant.lock().unwrap().values() {
            used.extend(saved.live.iter().chain(&saved.previous).cloned());
        }
        used.extend(
            self.registry
                .lock()
                .unwrap()
                .workers
                .values()
                .map(|w| w.version.clone()),
        );
        used
    }

    /// Keeps the history of a service this master no longer runs (see `dormant`).
    fn keep_dormant(&self, name: &str, saved: SavedService) {
        let mut dormant = self.dormant.lock().unwrap();
        dormant.insert(name.to_string(), saved);
        forget_long_gone(&mut dormant);
    }

    /// Removes shadow copies that nothing uses any more. Not while a new master of an upgrade
    /// starts, nor after it took over: it stores copies this one does not know.
    fn prune_store(&self) {
        if self.is_handed_over() || self.successor.borrow().is_some() {
            return;
        }
        let keep: HashSet<String> = self.versions_in_use().into_iter().map(|v| v.hash).collect();
        self.store.prune(&keep);
    }
}

/// How many services of other configs (or removed from this one) the history keeps.
const DORMANT_KEPT: usize = 16;

/// Past [`DORMANT_KEPT`], forgets the services that last ran longest ago (their copies go at the
/// next pruning): a state directory that saw many configs does not keep every one's plugins.
fn forget_long_gone(dormant: &mut HashMap<String, SavedService>) {
    while dormant.len() > DORMANT_KEPT {
        let Some(oldest) = dormant
            .iter()
            .min_by_key(|(name, saved)| (last_ran(saved), name.as_str()))
            .map(|(name, _)| name.clone())
        else {
            break;
        };
        tracing::info!(
            "forgetting the version history of service {oldest}, which no config has run for \
             the longest (the history keeps {DORMANT_KEPT} services that are not running)"
        );
        dormant.remove(&oldest);
    }
}

/// When a service this master does not run last ran: when a master saved it, or, in a history
/// saved before that was recorded, when its newest version was stored.
fn last_ran(saved: &SavedService) -> Option<SystemTime> {
    saved.last_ran.or_else(|| {
        (saved.live.iter().chain(&saved.previous))
            .map(|v| v.stored_at)
            .max()
    })
}

/// "1 worker", "2 workers": the count for the master's progress and log lines.
pub(crate) fn workers(n: usize) -> String {
    match n {
        1 => "1 worker".to_string(),
        n => format!("{n} workers"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The services that last ran longest ago go first; one never saved with a time (an older
    /// history file) counts as the oldest.
    #[test]
    fn dormant_services_past_the_bound_go_longest_gone_first() {
        let at = |secs| SavedService {
            last_ran: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)),
            ..SavedService::default()
        };
        let mut dormant: HashMap<String, SavedService> = (0..DORMANT_KEPT as u64 + 3)
            .map(|i| (format!("s{i}"), at(1000 + i)))
            .collect();
        dormant.insert("untimed".into(), SavedService::default());
        forget_long_gone(&mut dormant);
        assert_eq!(dormant.len(), DORMANT_KEPT);
        for gone in ["untimed", "s0", "s1", "s2"] {
            assert!(!dormant.contains_key(gone), "{gone}");
        }
        assert!(
            dormant.contains_key("s3") && dormant.contains_key(&format!("s{}", DORMANT_KEPT + 2))
        );
    }
}

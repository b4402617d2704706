//! One configured service as the master holds it: its listeners, its versions (the live one,
//! the previous ones, which proved healthy and which failed), and the trial a new version is
//! on while it proves itself (`master::rollout` runs the trial).
//!
//! Locks: [`Service::state`] is a short-held std mutex for the facts above; [`Service::lock`]
//! is an async mutex held for as long as something changes the service's workers (a reload, a
//! rollback, a recycled worker), so that only one such change runs at a time per service.

use std::{
    collections::{HashSet, VecDeque},
    net::{SocketAddr, TcpListener},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, RwLock,
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

use crate::{
    config::ServiceConfig,
    shadow::{Marks, PluginVersion, SavedService},
};

/// What a service's workers run: a plugin version with a configuration. A reload rolls out a
/// new release (a rebuilt plugin, a changed config, or both); a rollback returns to an old one.
#[derive(Debug, Clone)]
pub struct Release {
    pub version: PluginVersion,
    pub config: Arc<ServiceConfig>,
}

impl Release {
    pub fn same_as(&self, other: &Release) -> bool {
        self.version.hash == other.version.hash
            && (Arc::ptr_eq(&self.config, &other.config) || self.config == other.config)
    }
}

impl std::fmt::Display for Release {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.version.fmt(f)
    }
}

/// A new release on trial: from its canary's READY until its probation ends.
#[derive(Debug, Clone)]
pub struct Trial {
    /// Tells this trial from a later one (timers check it before they act).
    pub id: u64,
    /// What a failure rolls back to.
    pub from: Release,
    /// Whether a failure rolls back to `from`: not in the probation of an operator's rollback,
    /// whose `from` is the version the operator left.
    pub fallback: bool,
    pub to: Release,
    pub phase: TrialPhase,
    /// The first failure, in words (which worker, what happened, when).
    pub failure: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrialPhase {
    /// A rollout task is replacing workers; it handles a failure itself.
    Rolling,
    /// Every worker runs the new version; a failure before `until` starts a rollback.
    Probation { until: Instant },
}

/// What the master knows of a service's versions and health.
pub struct ServiceState {
    /// The version new workers load.
    pub live: PluginVersion,
    /// Versions that were live before, oldest first, at most `keep_versions - 1`; their shadow
    /// copies are kept for `host rollback`.
    pub previous: Vec<PluginVersion>,
    /// Hashes of versions that served through a whole probation.
    pub healthy: HashSet<String>,
    /// Hashes of versions that were rejected or rolled back, with the reason; the watcher does
    /// not reload them again.
    pub failed: Marks,
    /// Hashes of versions an operator rolled back from, with when (see [`starting_version`]).
    pub set_aside: Marks,
    pub trial: Option<Trial>,
    /// Crashes of workers of the live version, newest last, for crash-loop detection.
    pub crashes: VecDeque<Instant>,
    /// Every crash of a slot holder in the last minute, whatever its version (for status).
    pub recent_crashes: VecDeque<Instant>,
    /// Why the master started the live version instead of the plugin file, which held a
    /// set-aside version ([`starting_version`]); shown by status until the next rollout.
    pub held_back: Option<String>,
}

/// One listening socket of a service, held by the master and inherited by its workers.
pub struct Listener {
    /// The address as configured (port 0 stays 0 here).
    pub configured: SocketAddr,
    /// The address it is bound to (with the real port).
    pub bound: String,
    pub socket: TcpListener,
    /// Inherited from the old master in an upgrade: until the takeover, its socket too.
    pub handed: bool,
}

/// One configured service and what the master holds for it.
pub struct Service {
    name: String,
    /// The configuration new workers start with; a config reload or a rollback replaces it.
    config: RwLock<Arc<ServiceConfig>>,
    /// The master's listeners; closed (emptied) when the host stops, so that new connections
    /// are refused at once rather than queued for nobody.
    listeners: Mutex<Vec<Listener>>,
    state: Mutex<ServiceState>,
    /// Held while the service's workers change (see the module comment).
    pub lock: tokio::sync::Mutex<()>,
    /// Wakes a running rollout when its trial fails.
    pub trial_failed: Notify,
    /// The watcher task (`--watch`), if one runs.
    pub watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Removed from the configuration: its workers drain, nothing restarts them.
    removed: std::sync::atomic::AtomicBool,
    /// The table its HTTP workers share new connections by (`crate::balance`), and the memfd
    /// passed to each; None if it could not be made (logged; the workers accept unbalanced).
    balance: Option<(crate::balance::Table, std::os::fd::OwnedFd)>,
}

static TRIAL_IDS: AtomicU64 = AtomicU64::new(1);

/// The version a service starts with (a start, a restart, an upgrade of the master): the plugin
/// file as it is, unless its version was set aside (rolled back, by hand or by the host, or
/// rejected) while another version of the same file was live when the history was last saved.
/// Then that live version goes on, and the second value says why: a restart or an upgrade must
/// not undo a rollback behind the operator's back, nor bring back a build that already failed.
/// A rebuilt file (another version) goes live as before, and `host reload` tries the set-aside
/// one again.
fn starting_version(
    name: &str,
    saved: &SavedService,
    on_disk: PluginVersion,
) -> (PluginVersion, Option<String>) {
    let Some(reason) = saved
        .failed
        .get(&on_disk.hash)
        .or_else(|| saved.set_aside.get(&on_disk.hash))
    else {
        return (on_disk, None);
    };
    match &saved.live {
        Some(live) if live.hash != on_disk.hash && live.source == on_disk.source => {
            let notice = format!(
                "{} holds plugin {on_disk}, which was set aside ({reason}); starting {live} \
                 instead, the version that was live when this service last ran. Run `host \
                 reload {name}` to try {on_disk} again, or build another version.",
                on_disk.source.display()
            );
            (live.clone(), Some(notice))
        }
        _ => (on_disk, None),
    }
}

impl Service {
    /// A service starting on the plugin file's version `on_disk` (or on the version that was
    /// live, when the history set `on_disk` aside: [`starting_version`], and `held_back` says
    /// why), with what the saved history remembers of it.
    pub fn new(
        config: ServiceConfig,
        listeners: Vec<Listener>,
        on_disk: PluginVersion,
        saved: SavedService,
    ) -> Service {
        let (mut version, held_back) = starting_version(&config.name, &saved, on_disk);
        // A version the history knows keeps the time it was first loaded: the store copied it
        // again at this start, which is not when it first went live.
        if let Some(known) = saved
            .live
            .iter()
            .chain(&saved.previous)
            .find(|v| v.hash == version.hash)
        {
            version.stored_at = known.stored_at;
        }
        let mut state = ServiceState {
            live: version,
            previous: saved.previous,
            healthy: saved.healthy.into_iter().collect(),
            failed: saved.failed,
            set_aside: saved.set_aside,
            trial: None,
            crashes: VecDeque::new(),
            recent_crashes: VecDeque::new(),
            held_back,
        };
        // The version that was live when the master last stopped heads the history, so that
        // `host rollback` after a restart goes back to it.
        if let Some(last) = saved.live {
            if last.hash != state.live.hash {
                state.previous.retain(|v| v.hash != last.hash);
                state.previous.push(last);
            }
        }
        state.previous.retain(|v| v.hash != state.live.hash);
        let excess = (state.previous.len() + 1).saturating_sub(config.keep_versions);
        state.previous.drain(..excess);
        // HTTP services only: a websocket service's connections are held by its gateways. Made
        // even with `balance_accepts = false`, which a config reload may turn on.
        let balance = match config.kind {
            crate::config::Kind::Http => crate::balance::Table::create()
                .inspect_err(|e| {
                    tracing::warn!(
                        service = %config.name,
                        "could not make the accept-balancing table ({e}): the workers will \
                         accept new connections unbalanced, as the kernel wakes them"
                    )
                })
                .ok(),
            crate::config::Kind::WebSocket { .. } => None,
        };
        Service {
            name: config.name.clone(),
            config: RwLock::new(Arc::new(config)),
            listeners: Mutex::new(listeners),
            state: Mutex::new(state),
            lock: tokio::sync::Mutex::new(()),
            trial_failed: Notify::new(),
            watcher: Mutex::new(None),
            removed: Default::default(),
            balance,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A copy of the accept-balancing table's fd, for a new HTTP worker.
    pub fn balance_fd(&self) -> Option<std::io::Result<std::os::fd::OwnedFd>> {
        self.balance.as_ref().map(|(_, fd)| fd.try_clone())
    }

    /// Frees the balancing seat of a worker that has exited.
    pub fn balance_seat_free(&self, pid: u32) {
        if let Some((table, _)) = &self.balance {
            table.clear(pid);
        }
    }

    /// Marks a worker told to drain as not accepting (it would say so itself, unless wedged).
    pub fn balance_seat_stop(&self, pid: u32) {
        if let Some((table, _)) = &self.balance {
            table.stop_accepting(pid);
        }
    }

    /// The configuration new workers start with.
    pub fn config(&self) -> Arc<ServiceConfig> {
        self.config.read().unwrap().clone()
    }

    pub fn set_config(&self, config: Arc<ServiceConfig>) {
        *self.config.write().unwrap() = config;
    }

    /// The release new workers start: the live version with the current configuration.
    pub fn release(&self) -> Release {
        Release {
            version: self.live(),
            config: self.config(),
        }
    }

    /// Makes `release` the one new workers start (its version heads the history).
    pub fn go_live(&self, release: &Release) {
        let mut st = self.state();
        st.went_live(release.version.clone(), release.config.keep_versions);
        // What the start held back is no longer the question: another version was chosen.
        st.held_back = None;
        drop(st);
        self.set_config(release.config.clone());
    }

    pub fn state(&self) -> MutexGuard<'_, ServiceState> {
        self.state.lock().unwrap()
    }

    /// The version new workers load.
    pub fn live(&self) -> PluginVersion {
        self.state().live.clone()
    }

    /// The bound addresses (with the real port when the config said port 0).
    pub fn listen_addrs(&self) -> Vec<String> {
        self.listeners().iter().map(|l| l.bound.clone()).collect()
    }

    /// The master's listeners (empty once closed).
    pub fn listeners(&self) -> MutexGuard<'_, Vec<Listener>> {
        self.listeners.lock().unwrap()
    }

    /// What a new worker started with `config` inherits: the bound address and a dup of the
    /// socket of each of its listen addresses, in the config's order. An address the master no
    /// longer holds (a rollback to a configuration with an address a reload removed) is bound
    /// again. Empty once the listeners are closed by a stop.
    pub fn sockets_for(
        &self,
        config: &ServiceConfig,
    ) -> Result<Vec<(String, TcpListener)>, String> {
        let mut listeners = self.listeners();
        if listeners.is_empty() {
            return Ok(Vec::new());
        }
        let mut sockets = Vec::new();
        for addr in &config.listen {
            if !listeners.iter().any(|l| l.configured == *addr) {
                listeners.push(super::listeners::Given::default().open(&self.name, *addr)?);
            }
            let l = listeners
                .iter()
                .find(|l| l.configured == *addr)
                .expect("just added");
            let dup = l
                .socket
                .try_clone()
                .map_err(|e| format!("could not pass the listener {} to a worker: {e}", l.bound))?;
            sockets.push((l.bound.clone(), dup));
        }
        Ok(sockets)
    }

    /// Closes the master's copies of the listeners `config` does not use (a reload removed
    /// their addresses). Done just before the last worker that accepts on them drains: that
    /// worker takes what is queued, then closes the last copy, so nothing queued is reset.
    pub fn close_listeners_not_in(&self, config: &ServiceConfig) {
        self.listeners().retain(|l| {
            let keep = config.listen.contains(&l.configured);
            if !keep {
                super::listeners::stop_new_connections(&l.socket);
            }
            keep
        });
    }

    /// Marks the service as removed from the configuration.
    pub fn mark_removed(&self) {
        self.removed.store(true, Ordering::SeqCst);
        if let Some(watcher) = self.watcher.lock().unwrap().take() {
            watcher.abort();
        }
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::SeqCst)
    }

    /// Closes the master's copies of the listeners (see the field), after telling the sockets
    /// to take no new connections (`listeners::stop_new_connections`).
    pub fn close_listeners(&self) {
        self.close_listeners_sparing(|_| false);
    }

    /// Like [`Service::close_listeners`], but a listener `shared` says another master serves
    /// on is only dropped: new connections must still reach that master.
    pub fn close_listeners_sparing(&self, shared: impl Fn(&Listener) -> bool) {
        let mut listeners = self.listeners.lock().unwrap();
        for l in listeners.iter().filter(|l| !shared(l)) {
            super::listeners::stop_new_connections(&l.socket);
        }
        listeners.clear();
    }

    /// What the history file keeps of this service.
    pub fn saved(&self) -> SavedService {
        let st = self.state();
        SavedService {
            live: Some(st.live.clone()),
            previous: st.previous.clone(),
            healthy: st.healthy.iter().cloned().collect(),
            failed: st.failed.clone(),
            set_aside: st.set_aside.clone(),
            last_ran: Some(std::time::SystemTime::now()),
        }
    }

    /// Starts a trial of `to` (replacing any trial still running: a newer release supersedes
    /// an older one on probation).
    pub fn begin_trial(&self, from: Release, to: Release, phase: TrialPhase) -> u64 {
        let id = TRIAL_IDS.fetch_add(1, Ordering::Relaxed);
        self.state().trial = Some(Trial {
            id,
            from,
            to,
            fallback: true,
            phase,
            failure: None,
        });
        id
    }
}

/// How many versions a service keeps marked failed, or set aside, before it forgets the oldest
/// marks of versions not in its history: a mark matters while the plugin file may still hold
/// that version, not for every build rejected over months.
const MARKS_KEPT: usize = 32;

/// Marks `hash` as the newest of `marks`; past [`MARKS_KEPT`], forgets the oldest marks of
/// versions that are neither live nor kept.
fn mark(marks: &mut Marks, hash: &str, why: String, live: &PluginVersion, kept: &[PluginVersion]) {
    marks.shift_remove(hash);
    marks.insert(hash.to_string(), why);
    let in_history = |h: &str| h == live.hash || kept.iter().any(|v| v.hash == h);
    while marks.len() > MARKS_KEPT {
        match marks.keys().position(|h| h != hash && !in_history(h)) {
            Some(oldest) => drop(marks.shift_remove_index(oldest)),
            None => break,
        }
    }
}

impl ServiceState {
    /// Marks a version rejected or rolled back, with why: the watcher does not reload it, and a
    /// restart does not start it (see [`starting_version`]).
    pub fn mark_failed(&mut self, hash: &str, reason: String) {
        mark(&mut self.failed, hash, reason, &self.live, &self.previous);
    }

    /// Marks a version an operator rolled back from, with when.
    pub fn mark_set_aside(&mut self, hash: &str, when: String) {
        mark(&mut self.set_aside, hash, when, &self.live, &self.previous);
    }

    /// Makes `version` the live one; the one it replaces heads the history.
    pub fn went_live(&mut self, version: PluginVersion, keep_versions: usize) {
        if self.live.hash == version.hash {
            return;
        }
        // A version that comes back (a rollback, or a rebuild to identical bytes) keeps the time
        // it was first loaded, and moves to the end of the history.
        let version = match self.previous.iter().position(|v| v.hash == version.hash) {
            Some(i) => PluginVersion {
                stored_at: self.previous.remove(i).stored_at,
                ..version
            },
            None => version,
        };
        let old = std::mem::replace(&mut self.live, version);
        self.previous.push(old);
        let excess = (self.previous.len() + 1).saturating_sub(keep_versions);
        self.previous.drain(..excess);
        // Health matters for the versions a service can go back to (kept, or what a trial
        // under way falls back to, even past `keep_versions`), not for every build.
        let (live, previous, trial) = (&self.live, &self.previous, &self.trial);
        self.healthy.retain(|h| {
            *h == live.hash
                || previous.iter().any(|v| v.hash == *h)
                || trial.as_ref().is_some_and(|t| t.from.version.hash == *h)
        });
        self.crashes.clear();
    }

    /// The newest previous version that served healthily, to leave a crash-looping live
    /// version for: not one that failed since, nor one an operator rolled back from.
    pub fn last_healthy(&self) -> Option<PluginVersion> {
        self.newest_healthy(|v| !self.set_aside.contains_key(&v.hash))
    }

    /// The newest previous version that served healthily but an operator rolled back from:
    /// no fallback, but one an operator may go back to on purpose.
    pub fn last_healthy_set_aside(&self) -> Option<PluginVersion> {
        self.newest_healthy(|v| self.set_aside.contains_key(&v.hash))
    }

    fn newest_healthy(&self, and: impl Fn(&PluginVersion) -> bool) -> Option<PluginVersion> {
        self.previous
            .iter()
            .rev()
            .find(|v| {
                self.healthy.contains(&v.hash)
                    && !self.failed.contains_key(&v.hash)
                    && v.hash != self.live.hash
                    && and(v)
            })
            .cloned()
    }

    /// Records a crash of a live-version worker; returns how many fell within `window`.
    pub fn record_crash(&mut self, window: Duration) -> usize {
        let now = Instant::now();
        self.crashes.push_back(now);
        while self
            .crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.crashes.pop_front();
        }
        self.crashes.len()
    }

    /// Crashes of the live version within the last `window`.
    pub fn crashes_within(&self, window: Duration) -> usize {
        self.crashes
            .iter()
            .filter(|t| t.elapsed() <= window)
            .count()
    }

    /// Notes a crash of any version, for the count `host status` shows.
    pub fn note_crash(&mut self) {
        let now = Instant::now();
        self.recent_crashes.push_back(now);
        while self
            .recent_crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            self.recent_crashes.pop_front();
        }
    }

    /// Crashes of any version in the last minute.
    pub fn crashes_last_minute(&self) -> usize {
        self.recent_crashes
            .iter()
            .filter(|t| t.elapsed() <= Duration::from_secs(60))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(hash: &str) -> PluginVersion {
        PluginVersion {
            hash: format!("{hash:0>64}"),
            source: "plugin.so".into(),
            path: "copy.so".into(),
            size: 1,
            stored_at: std::time::SystemTime::UNIX_EPOCH,
        }
    }

    /// The marks stay bounded however many builds fail; the oldest go first, never those of the
    /// versions the history keeps, nor the newest.
    #[test]
    fn failed_marks_are_bounded_and_keep_those_of_the_history() {
        let mut st = ServiceState {
            live: version("1"),
            previous: vec![version("2")],
            healthy: HashSet::new(),
            failed: Marks::new(),
            set_aside: Marks::new(),
            trial: None,
            crashes: VecDeque::new(),
            recent_crashes: VecDeque::new(),
            held_back: None,
        };
        st.mark_failed(&version("2").hash, "kept".into());
        st.mark_set_aside(&version("2").hash, "kept".into());
        for i in 100..1100 {
            let hash = version(&i.to_string()).hash;
            st.mark_failed(&hash, "rejected".into());
            assert!(st.failed.contains_key(&hash));
            assert!(st.failed.len() <= MARKS_KEPT);
            // The marks of the builds just before it are still there.
            if i >= 130 {
                assert!(st.failed.contains_key(&version(&(i - 30).to_string()).hash));
            }
        }
        // One map's marks do not push out the other's.
        assert_eq!(st.set_aside.len(), 1);
        assert_eq!(st.failed[&version("2").hash], "kept");
        assert_eq!(st.set_aside[&version("2").hash], "kept");
    }
}

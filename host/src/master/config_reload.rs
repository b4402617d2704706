//! `host reload` (SIGHUP, SIGUSR1): read the config file again and apply it, service by
//! service, with the same rollout as a plugin reload.
//!
//! The whole file is checked first: an invalid file changes nothing, and the error says where.
//! Then, for each service:
//! - a new one is started (its listeners bound, its first worker before the others);
//! - a removed one drains its workers and closes its listeners;
//! - one whose plugin path, `[service.config]` table, limits or user changed rolls out a new
//!   release (its plugin, rebuilt or not, with the new configuration): canary, probation, and
//!   a rollback restores the old configuration too;
//! - one whose worker count alone changed gets workers added or drained;
//! - a new listen address is bound by the master first (a failure to bind refuses that
//!   service's change); a removed one is closed once no worker holds it any more, so the
//!   connections already queued on it are accepted and served (each draining worker takes what
//!   is queued before it closes its copy);
//! - an unchanged one reloads its plugin, as when the master runs from flags (no file).
//!
//! `host reload` prints what changed per service. Services with `reloadable = false` are left
//! alone; a change to one says to restart it or use `host upgrade`.

use std::{sync::Arc, time::Instant};

use super::{
    jobs::{summary, Progress},
    listeners,
    rollout::{Kind, Outcome},
    service::{Release, Service},
    Master,
};
use crate::config::{Config, ServiceConfig};

/// What a reload does to one service.
enum Step {
    Add(ServiceConfig),
    Remove(Arc<Service>),
    /// The service, its new configuration, and the changes in words (empty: only the plugin
    /// is reloaded).
    Update(Arc<Service>, ServiceConfig, Vec<String>),
}

impl Master {
    /// Reloads the named services (every reloadable one when `names` is empty), reading the
    /// config file again first if there is one. Returns whether all succeeded, and a summary.
    pub(super) async fn reload(
        self: &Arc<Self>,
        names: &[String],
        progress: &Progress,
    ) -> (bool, String) {
        let started = Instant::now();
        let config = match self.source.file.is_some().then(|| self.source.load()) {
            None => None,
            Some(Ok(config)) => Some(config),
            Some(Err(e)) => {
                return (
                    false,
                    format!("{e}\nnothing changed: fix the config file and reload again"),
                )
            }
        };
        if let Some(admin) = &self.admin {
            match &config {
                Some(config) => admin.reconfigure(config.admin.as_ref()),
                None => admin.reread(),
            }
        }
        let steps = match self.plan(config, names) {
            Ok(steps) => steps,
            Err(e) => return (false, e),
        };
        let mut failed = Vec::new();
        for step in steps {
            let (name, problem) = match step {
                Step::Add(config) => (
                    config.name.clone(),
                    self.add_service(config, progress).await,
                ),
                Step::Remove(svc) => {
                    self.remove_service(&svc, progress).await;
                    (svc.name().to_string(), None)
                }
                Step::Update(svc, config, changes) => {
                    let problem = self.update_service(&svc, config, changes, progress).await;
                    (svc.name().to_string(), problem)
                }
            };
            if let Some(problem) = problem {
                progress.line(problem);
                failed.push(name);
            }
        }
        self.save_history();
        self.prune_store();
        summary("reload", started, &failed)
    }

    /// What a reload does, service by service; errors for names that cannot be reloaded.
    fn plan(&self, config: Option<Config>, names: &[String]) -> Result<Vec<Step>, String> {
        for name in names {
            self.reloadable_service(name)?;
        }
        let targeted = |name: &str| names.is_empty() || names.iter().any(|n| n == name);
        let mut steps = Vec::new();
        let current = self.services();
        for svc in &current {
            if !targeted(svc.name()) {
                continue;
            }
            let old = svc.config();
            let new = match &config {
                // No file: the same settings, with the certificate files read again.
                None => {
                    let mut same = (*old).clone();
                    same.reread_tls()
                        .map_err(|e| format!("{}: tls: {e}; nothing changed", svc.name()))?;
                    same
                }
                Some(config) => match config.services.iter().find(|s| s.name == svc.name()) {
                    Some(new) => new.clone(),
                    None => {
                        steps.push(Step::Remove(svc.clone()));
                        continue;
                    }
                },
            };
            let changes = describe_changes(&old, &new);
            steps.push(Step::Update(svc.clone(), new, changes));
        }
        if let Some(config) = config {
            for new in config.services {
                if targeted(&new.name) && !current.iter().any(|s| s.name() == new.name) {
                    steps.push(Step::Add(new));
                }
            }
        }
        Ok(steps)
    }

    /// Starts a service the config file gained: its listeners, then its first worker, then
    /// the others. If the first cannot start, the service is not added.
    async fn add_service(
        self: &Arc<Self>,
        config: ServiceConfig,
        progress: &Progress,
    ) -> Option<String> {
        let name = config.name.clone();
        let mut bound = Vec::new();
        for addr in &config.listen {
            match listeners::Given::default().open(&name, *addr) {
                Ok(l) => bound.push(l),
                Err(e) => return Some(format!("{name}: not added: {e}")),
            }
        }
        let version = match self.store_plugin(&config).await {
            Ok(v) => v,
            Err(e) => return Some(format!("{name}: not added: {e}")),
        };
        // A service this state directory ran before comes back with its history (which stays
        // among the dormant ones until the service is added: a failed add loses nothing).
        let saved = self.dormant.lock().unwrap().get(&name).cloned();
        let saved = saved.unwrap_or_default();
        let lived_before = saved.live.clone();
        let workers = config.workers;
        let svc = Arc::new(Service::new(config, bound, version, saved));
        if let Some(held_back) = &svc.state().held_back {
            progress.line(format!("{name}: {held_back}"));
        }
        // Not added after all: out of the service list, its sockets closed.
        let give_up = |svc: &Arc<Service>| {
            self.services
                .write()
                .unwrap()
                .retain(|s| !Arc::ptr_eq(s, svc));
            svc.close_listeners();
        };
        let _turn = svc.lock.lock().await;
        progress.line(format!(
            "{name}: new service on {}, starting {} on plugin {}",
            svc.listen_addrs().join(", "),
            super::workers(workers),
            svc.live()
        ));
        self.services.write().unwrap().push(svc.clone());
        if let Err(e) = self.start_gateways(&svc).await {
            give_up(&svc);
            return Some(format!("{name}: not added: {e}"));
        }
        let release = svc.release();
        for slot in 0..workers {
            let t = Instant::now();
            match self.start_worker(&svc, slot, &release).await {
                Ok(pid) => {
                    self.install(&svc, slot, pid);
                    progress.line(format!(
                        "{name}: worker {slot}: {pid} (plugin {release}, ready in {} ms)",
                        t.elapsed().as_millis()
                    ));
                }
                Err(e) if slot == 0 => {
                    give_up(&svc);
                    for (_, gateway) in self.gateways_of(&svc) {
                        self.drain_worker(gateway);
                    }
                    return Some(format!("{name}: not added: its first worker failed: {e}"));
                }
                // Later slots are refilled like any crashed one.
                Err(e) => {
                    progress.line(format!("{name}: worker {slot} failed to start: {e}"));
                    self.registry.lock().unwrap().slot(&name, slot).respawning = true;
                    tokio::spawn(self.clone().respawn(svc.clone(), slot));
                }
            }
        }
        self.dormant.lock().unwrap().remove(&name);
        // As at a start: a version new since the service last ran is on probation.
        self.probation_at_start(&svc, lived_before);
        if svc.config().watch {
            self.watch(&svc);
        }
        None
    }

    /// Drains a service the config file lost and closes its listeners.
    async fn remove_service(&self, svc: &Arc<Service>, progress: &Progress) {
        let _turn = svc.lock.lock().await;
        svc.mark_removed();
        self.services
            .write()
            .unwrap()
            .retain(|s| !Arc::ptr_eq(s, svc));
        // Kept: a config that adds it back can still roll back.
        self.keep_dormant(svc.name(), svc.saved());
        let pids: Vec<u32> = self
            .registry
            .lock()
            .unwrap()
            .workers
            .iter()
            .filter(|(_, w)| Arc::ptr_eq(&w.service, svc))
            .map(|(pid, _)| *pid)
            .collect();
        progress.line(format!(
            "{}: removed from the config: draining its {} and closing {}",
            svc.name(),
            super::workers(pids.len()),
            svc.listen_addrs().join(", ")
        ));
        svc.close_listeners();
        for pid in pids {
            self.drain_worker(pid);
        }
    }

    /// Applies a service's new configuration (see the module comment).
    async fn update_service(
        self: &Arc<Self>,
        svc: &Arc<Service>,
        config: ServiceConfig,
        changes: Vec<String>,
        progress: &Progress,
    ) -> Option<String> {
        let name = svc.name().to_string();
        let old = svc.config();
        if !old.reloadable {
            progress.line(format!("{name}: kept as it is (reloadable = false)"));
            if !changes.is_empty() {
                progress.line(format!(
                    "{name}: its configuration changed ({}), but reload leaves a service with \
                     reloadable = false alone: restart the host or run `host upgrade` to apply it",
                    changes.join("; ")
                ));
            }
            return None;
        }
        // A websocket service's gateways hold its clients for the life of the master: what
        // they were started with (kind, gateways, message size, and the slots clients are
        // spread over) changes only with a new master.
        let websocket = matches!(old.kind, crate::config::Kind::WebSocket { .. });
        if old.kind != config.kind || (websocket && old.workers != config.workers) {
            return Some(format!(
                "{name}: kind, gateways, max_message_bytes and (for a websocket service) workers \
                 change only with a restart or `host upgrade`; this service's change is refused, \
                 it keeps its old configuration"
            ));
        }
        let _turn = svc.lock.lock().await;
        if !changes.is_empty() {
            progress.line(format!("{name}: {}", changes.join("; ")));
        }
        // New addresses first: a failure to bind refuses this service's change.
        let added: Vec<_> = config
            .listen
            .iter()
            .filter(|a| !old.listen.contains(a))
            .copied()
            .collect();
        for addr in &added {
            match listeners::Given::default().open(&name, *addr) {
                Ok(l) => svc.listeners().push(l),
                Err(e) => {
                    svc.listeners().retain(|l| !added.contains(&l.configured));
                    return Some(format!(
                        "{name}: {e}; this service's change is refused, it keeps its old \
                         configuration"
                    ));
                }
            }
        }
        let only_workers = changes.len() == 1 && {
            let mut same = config.clone();
            same.workers = old.workers;
            same == *old
        };
        let outcome = if only_workers {
            self.scale(svc, Arc::new(config.clone()), progress).await;
            Outcome::Done
        } else {
            match self.store_plugin(&config).await {
                Ok(version) => {
                    let release = Release {
                        version,
                        config: Arc::new(config.clone()),
                    };
                    self.roll_out(svc, release, Kind::Reload, progress).await
                }
                Err(e) => Outcome::Failed(format!(
                    "{name}: reload failed: {e}\n{name}: nothing changed; still serving {}",
                    svc.live()
                )),
            }
        };
        // The addresses of the configuration that serves now are kept; the master's copies of
        // the others close (the workers that still hold them take what is queued first).
        let serving = svc.config();
        svc.close_listeners_not_in(&serving);
        if serving.watch && (!old.watch || serving.plugin != old.plugin) {
            self.watch(svc);
        } else if !serving.watch {
            if let Some(watcher) = svc.watcher.lock().unwrap().take() {
                watcher.abort();
            }
        }
        outcome.problem()
    }

    /// Changes only the number of workers: new slots are filled, extra ones drained.
    async fn scale(
        self: &Arc<Self>,
        svc: &Arc<Service>,
        config: Arc<ServiceConfig>,
        progress: &Progress,
    ) {
        let name = svc.name();
        let (before, after) = (svc.config().workers, config.workers);
        svc.set_config(config);
        let release = svc.release();
        for slot in before..after {
            let t = Instant::now();
            match self.replace_slot(svc, slot, &release).await {
                Ok(c) => progress.line(format!(
                    "{name}: worker {slot}: {} (plugin {release}, ready in {} ms)",
                    c.new,
                    t.elapsed().as_millis()
                )),
                Err(e) => {
                    progress.line(format!(
                        "{name}: worker {slot} failed to start: {e}; retrying with backoff"
                    ));
                    self.registry.lock().unwrap().slot(name, slot).respawning = true;
                    tokio::spawn(self.clone().respawn(svc.clone(), slot));
                }
            }
        }
        if after < before {
            progress.line(format!("{name}: draining workers {after}..{before}"));
            self.trim_slots(svc, after).await;
        }
    }
}

/// The differences between two configurations of one service, in words.
fn describe_changes(old: &ServiceConfig, new: &ServiceConfig) -> Vec<String> {
    let mut changes = Vec::new();
    if old.workers != new.workers {
        changes.push(format!("workers {} -> {}", old.workers, new.workers));
    }
    let added: Vec<_> = new
        .listen
        .iter()
        .filter(|a| !old.listen.contains(a))
        .collect();
    let removed: Vec<_> = old
        .listen
        .iter()
        .filter(|a| !new.listen.contains(a))
        .collect();
    if !added.is_empty() || !removed.is_empty() {
        let mut text = "listen".to_string();
        for a in added {
            text += &format!(" +{a}");
        }
        for a in removed {
            text += &format!(" -{a}");
        }
        changes.push(text);
    }
    if old.plugin != new.plugin {
        changes.push(format!(
            "plugin {} -> {}",
            old.plugin.display(),
            new.plugin.display()
        ));
    }
    if old.plugin_config != new.plugin_config {
        changes.push("[service.config] changed".into());
    }
    if old.run_as != new.run_as {
        changes.push("user changed".into());
    }
    if old.tls != new.tls {
        changes.push("TLS certificate or key changed".into());
    }
    // Everything else (limits, timeouts, probations) in one word.
    let mut rest = new.clone();
    rest.workers = old.workers;
    rest.listen = old.listen.clone();
    rest.plugin = old.plugin.clone();
    rest.plugin_config = old.plugin_config.clone();
    rest.run_as = old.run_as.clone();
    rest.tls = old.tls.clone();
    if rest != *old {
        changes.push("settings changed".into());
    }
    changes
}

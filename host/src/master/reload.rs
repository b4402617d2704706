//! The rolling reload: surge, never dip.
//!
//! For each slot of a service: start one new worker on the new plugin version, wait for its
//! READY, and only then tell the old worker of that slot to drain. The number of workers
//! accepting connections never falls below the configured count. The first new worker is the
//! canary: if it fails (not loadable, ABI mismatch, on_start error or panic, crash, ready
//! timeout), the reload stops there and every old worker keeps serving. Reloads run one at a
//! time; one asked for while another runs waits its turn.
//!
//! `host reload` rolls to the plugin file as it is now; `host rollback` rolls to a version kept
//! in the service's history; the watcher (`master::watcher`) rolls to a rebuilt file. All three
//! end in [`Master::replace_workers`].

use std::{sync::Arc, time::Instant};

use tokio::sync::{mpsc, MutexGuard};

use super::Master;
use crate::{protocol::ControlReply, shadow::PluginVersion};

/// Where progress lines go: the CLI that asked (if any), and always the master's log.
pub struct Progress(pub Option<mpsc::UnboundedSender<ControlReply>>);

impl Progress {
    pub fn line(&self, line: String) {
        tracing::info!("{line}");
        if let Some(tx) = &self.0 {
            let _ = tx.send(ControlReply::Line(line));
        }
    }
}

/// How long a reload waits for an old worker to confirm it stopped accepting.
const STOP_ACCEPTING_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Master {
    /// Waits for this reload's turn: reloads, rollbacks and watcher reloads run one at a time.
    pub async fn reload_turn(&self, progress: &Progress) -> MutexGuard<'_, ()> {
        match self.reload_lock.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                progress.line("another reload is running; this one waits for it to finish".into());
                self.reload_lock.lock().await
            }
        }
    }

    /// Reloads the named services (every reloadable one when `names` is empty) from their
    /// plugin files. Returns whether all succeeded, and a one-line summary.
    pub async fn reload(self: &Arc<Self>, names: &[String], progress: &Progress) -> (bool, String) {
        let targets = match self.reload_targets(names) {
            Ok(t) => t,
            Err(e) => return (false, e),
        };
        let _turn = self.reload_turn(progress).await;
        let started = Instant::now();
        let mut failed = Vec::new();
        for (i, svc) in self.services.iter().enumerate() {
            if !targets.contains(&i) {
                if !svc.config.reloadable {
                    progress.line(format!(
                        "{}: kept as it is (reloadable = false)",
                        svc.config.name
                    ));
                }
                continue;
            }
            let name = &svc.config.name;
            let rolled = match self.store.store(&svc.config.plugin) {
                Ok(new) => self.replace_workers(i, new, progress).await,
                Err(e) => Err(format!(
                    "{name}: reload failed: {e}; still serving {}",
                    svc.current()
                )),
            };
            if let Err(e) = rolled {
                progress.line(e);
                failed.push(name.clone());
            }
        }
        self.prune_store();
        summary("reload", started, &failed)
    }

    /// Rolls a service back to its previous version, or to the kept version whose hash starts
    /// with `to`.
    pub async fn rollback(
        self: &Arc<Self>,
        name: Option<&str>,
        to: Option<&str>,
        progress: &Progress,
    ) -> (bool, String) {
        let started = Instant::now();
        let service = match self.rollback_target(name) {
            Ok(s) => s,
            Err(e) => return (false, e),
        };
        let _turn = self.reload_turn(progress).await;
        let svc = &self.services[service];
        let target = {
            let previous = svc.previous.lock().unwrap();
            match to {
                Some(prefix) => previous
                    .iter()
                    .rev()
                    .find(|v| v.hash.starts_with(prefix))
                    .cloned()
                    .ok_or_else(|| {
                        let kept: Vec<_> = previous.iter().map(|v| v.short().to_string()).collect();
                        format!(
                        "{}: no kept version starts with {prefix:?}; the previous versions are: {}",
                        svc.config.name,
                        if kept.is_empty() { "(none)".to_string() } else { kept.join(", ") }
                    )
                    }),
                None => previous.last().cloned().ok_or_else(|| {
                    format!(
                        "{}: there is no previous version to roll back to (only {} has been live)",
                        svc.config.name,
                        svc.current()
                    )
                }),
            }
        };
        let failed = match target {
            Ok(version) if version.hash == svc.current().hash => {
                return (
                    false,
                    format!("{}: {version} is already live", svc.config.name),
                )
            }
            Ok(version) => match self.replace_workers(service, version, progress).await {
                Ok(()) => vec![],
                Err(e) => {
                    progress.line(e);
                    vec![svc.config.name.clone()]
                }
            },
            Err(e) => return (false, e),
        };
        self.prune_store();
        summary("rollback", started, &failed)
    }

    fn reload_targets(&self, names: &[String]) -> Result<Vec<usize>, String> {
        if names.is_empty() {
            return Ok((0..self.services.len())
                .filter(|&i| self.services[i].config.reloadable)
                .collect());
        }
        names
            .iter()
            .map(|name| self.reloadable_service(name))
            .collect()
    }

    fn rollback_target(&self, name: Option<&str>) -> Result<usize, String> {
        match name {
            Some(name) => self.reloadable_service(name),
            None if self.services.len() == 1 => {
                self.reloadable_service(&self.services[0].config.name)
            }
            None => Err(format!(
                "there are several services; name the one to roll back: {}",
                self.service_names()
            )),
        }
    }

    fn reloadable_service(&self, name: &str) -> Result<usize, String> {
        match self.services.iter().position(|s| s.config.name == name) {
            Some(i) if self.services[i].config.reloadable => Ok(i),
            Some(_) => Err(format!(
                "service {name} has reloadable = false, so reload leaves it alone; restart the \
                 host to change its code"
            )),
            None => Err(format!(
                "there is no service {name}; the services are: {}",
                self.service_names()
            )),
        }
    }

    fn service_names(&self) -> String {
        self.services
            .iter()
            .map(|s| s.config.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Replaces the service's workers, one slot at a time, with workers on `new`. The caller
    /// holds the reload turn.
    pub async fn replace_workers(
        self: &Arc<Self>,
        service: usize,
        new: PluginVersion,
        progress: &Progress,
    ) -> Result<(), String> {
        if *self.stopping.borrow() {
            return Err("the host is stopping; nothing was reloaded".into());
        }
        let svc = &self.services[service];
        let name = &svc.config.name;
        let old = svc.current();
        let started = Instant::now();
        let workers = svc.config.workers;
        progress.line(format!(
            "{name}: reloading {workers} workers, plugin {old} -> {new}"
        ));
        for slot in 0..workers {
            let t = Instant::now();
            let pid = match self.start_worker(service, slot, &new).await {
                Ok(pid) => pid,
                Err(reason) if slot == 0 => {
                    return Err(format!(
                        "{name}: reload rejected, the first new worker failed: {reason}\n\
                         {name}: nothing changed; still serving {old} with all {workers} workers"
                    ))
                }
                Err(reason) => {
                    return Err(format!(
                        "{name}: reload stopped at slot {slot}: {reason}\n{name}: slots 0..{slot} \
                         run {new}, the others still run {old}"
                    ))
                }
            };
            if slot == 0 {
                // The canary passed: from now on, a crashed worker is replaced by the new version.
                svc.went_live(new.clone());
                self.save_history();
            }
            let old_pid = self
                .registry
                .lock()
                .unwrap()
                .slots
                .insert((service, slot), pid);
            if let Some(old_pid) = old_pid {
                // The slot counts as replaced once the old worker takes no new connections, so
                // that "done" means every new connection reaches the new code.
                let stopped = self.drain_worker(old_pid);
                if tokio::time::timeout(STOP_ACCEPTING_WAIT, stopped)
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        "{name}: worker {old_pid} did not confirm within {STOP_ACCEPTING_WAIT:?} \
                         that it stopped accepting; going on"
                    );
                }
            }
            let old_pid = old_pid.map_or_else(|| "(empty)".to_string(), |p| p.to_string());
            progress.line(format!(
                "{name}: worker {slot}: {old_pid} -> {pid} (plugin {new}, ready in {} ms)",
                t.elapsed().as_millis()
            ));
        }
        progress.line(format!(
            "{name}: done in {} ms, all {workers} workers on {new} (old workers drain in the background)",
            started.elapsed().as_millis()
        ));
        Ok(())
    }
}

fn summary(what: &str, started: Instant, failed: &[String]) -> (bool, String) {
    let ms = started.elapsed().as_millis();
    if failed.is_empty() {
        (true, format!("{what} done in {ms} ms"))
    } else {
        (
            false,
            format!(
                "{what} failed for {} (after {ms} ms); see above",
                failed.join(", ")
            ),
        )
    }
}

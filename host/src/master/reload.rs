//! The rolling reload: surge, never dip.
//!
//! For each slot of a service: start one new worker on the new plugin version, wait for its
//! READY, and only then tell the old worker of that slot to drain. The number of workers
//! accepting connections never falls below the configured count. The first new worker is the
//! canary: if it fails (not loadable, ABI mismatch, on_start error or panic, crash, ready
//! timeout), the reload stops there and every old worker keeps serving. Reloads run one at a
//! time; one asked for while another runs waits its turn.

use std::{sync::Arc, time::Instant};

use tokio::sync::mpsc;

use super::Master;
use crate::protocol::ControlReply;

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

impl Master {
    /// Reloads the named services (every reloadable one when `names` is empty).
    /// Returns whether all succeeded, and a one-line summary.
    pub async fn reload(self: &Arc<Self>, names: &[String], progress: &Progress) -> (bool, String) {
        let targets = match self.reload_targets(names) {
            Ok(t) => t,
            Err(e) => return (false, e),
        };
        let _turn = match self.reload_lock.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                progress.line("another reload is running; this one waits for it to finish".into());
                self.reload_lock.lock().await
            }
        };
        if *self.stopping.borrow() {
            return (false, "the host is stopping; nothing was reloaded".into());
        }
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
            if let Err(e) = self.reload_service(i, progress).await {
                progress.line(e);
                failed.push(svc.config.name.clone());
            }
        }
        self.prune_store();
        let ms = started.elapsed().as_millis();
        if failed.is_empty() {
            (true, format!("reload done in {ms} ms"))
        } else {
            (
                false,
                format!(
                    "reload failed for {} (after {ms} ms); see above",
                    failed.join(", ")
                ),
            )
        }
    }

    fn reload_targets(&self, names: &[String]) -> Result<Vec<usize>, String> {
        if names.is_empty() {
            return Ok((0..self.services.len())
                .filter(|&i| self.services[i].config.reloadable)
                .collect());
        }
        let mut targets = Vec::new();
        for name in names {
            match self.services.iter().position(|s| &s.config.name == name) {
                Some(i) if self.services[i].config.reloadable => targets.push(i),
                Some(_) => {
                    return Err(format!(
                        "service {name} has reloadable = false, so reload leaves it alone; \
                         restart the host to change its code"
                    ))
                }
                None => {
                    let known: Vec<_> = self
                        .services
                        .iter()
                        .map(|s| s.config.name.as_str())
                        .collect();
                    return Err(format!(
                        "there is no service {name}; the services are: {}",
                        known.join(", ")
                    ));
                }
            }
        }
        Ok(targets)
    }

    async fn reload_service(
        self: &Arc<Self>,
        service: usize,
        progress: &Progress,
    ) -> Result<(), String> {
        let svc = &self.services[service];
        let name = &svc.config.name;
        let old = svc.current.lock().unwrap().clone();
        let new = self
            .store
            .store(&svc.config.plugin)
            .map_err(|e| format!("{name}: reload failed: {e}; still serving {old}"))?;
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
                *svc.current.lock().unwrap() = new.clone();
            }
            let old_pid = self
                .registry
                .lock()
                .unwrap()
                .slots
                .insert((service, slot), pid);
            if let Some(old_pid) = old_pid {
                self.drain_worker(old_pid);
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

//! The picture `host status` shows: the master, and per service its versions, its trial,
//! its slots' recent trouble and its workers; and what the admin listener reads: the version
//! history, readiness, and the gauges of the metrics.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::{pool::EntryRole, Master, WorkerState};
use crate::{
    admin::metrics::{View, SAMPLE_EVERY},
    protocol::{
        epoch_secs, RolloutEvent, ServiceStatus, SlotStatus, StatusReport, VersionInfo,
        WorkerStatus,
    },
    shadow::{Marks, PluginVersion, SavedService},
};

/// `GET /api/history`: every service's versions, the services whose history is kept though
/// this master does not run them, and the reloads and rollbacks kept.
#[derive(Serialize)]
pub struct HistoryReport {
    pub services: Vec<ServiceHistory>,
    /// Services of another config run on the same state directory, or removed by a config
    /// reload (`Master::dormant`), the most recently run first: what a config that names them
    /// again starts from.
    pub not_running: Vec<DormantHistory>,
    pub events: Vec<RolloutEvent>,
}

#[derive(Serialize)]
pub struct ServiceHistory {
    pub name: String,
    pub live: VersionInfo,
    /// Versions kept for a rollback, newest first.
    pub previous: Vec<VersionInfo>,
}

#[derive(Serialize)]
pub struct DormantHistory {
    pub name: String,
    /// Seconds since the Unix epoch when a master last ran it; in a history saved before that
    /// was recorded, when its newest version was stored (null if it has none).
    pub last_ran: Option<u64>,
    /// The version that was live when it last ran.
    pub live: Option<VersionInfo>,
    /// Versions kept for a rollback, newest first.
    pub previous: Vec<VersionInfo>,
}

/// How many recent reloads and rollbacks `host status` shows per service.
const RECENT_EVENTS: usize = 5;

impl Master {
    pub async fn status(&self) -> StatusReport {
        let pids = self.live_pids();
        let counts = self.request_counts(&pids, Duration::from_millis(500)).await;
        let events = self.events.lock().unwrap().clone();
        let reg = self.registry.lock().unwrap();
        let services = self
            .services()
            .iter()
            .map(|svc| {
                let name = svc.name();
                let mut workers: Vec<WorkerStatus> = reg
                    .workers
                    .iter()
                    .filter(|(_, w)| w.service.name() == name)
                    .map(|(pid, w)| WorkerStatus {
                        role: match w.role {
                            EntryRole::Worker => "worker".into(),
                            EntryRole::Gateway(_) => "gateway".into(),
                        },
                        slot: w.slot,
                        pid: *pid,
                        state: w.state.as_str().to_string(),
                        version: w.version.short().to_string(),
                        uptime_ms: w.started.elapsed().as_millis() as u64,
                        requests: counts.get(pid).copied(),
                        rss_bytes: w.rss_bytes,
                        connections: w.connections,
                        heartbeat_age_ms: w.last_heartbeat.map(|t| t.elapsed().as_millis() as u64),
                    })
                    .collect();
                workers.sort_by_key(|w| (w.slot, w.uptime_ms));
                let slots = (0..svc.config().workers)
                    .map(|slot| {
                        let s = reg.slots.get(&(name.to_string(), slot));
                        SlotStatus {
                            slot,
                            last_exit: s.and_then(|s| s.last_exit.as_ref()).map(|e| e.0.clone()),
                            last_exit_ago_ms: s
                                .and_then(|s| s.last_exit.as_ref())
                                .map(|e| e.1.elapsed().as_millis() as u64),
                            crashes_in_a_row: s.map_or(0, |s| s.crashes),
                            next_retry_in_ms: s.and_then(|s| s.next_retry).and_then(|t| {
                                t.checked_duration_since(Instant::now())
                                    .map(|d| d.as_millis() as u64)
                            }),
                        }
                    })
                    .collect();
                let st = svc.state();
                let info = |v: &PluginVersion| version_info(v, &st);
                let probation_left_ms = st.trial.as_ref().and_then(|t| match t.phase {
                    super::service::TrialPhase::Probation { until } => until
                        .checked_duration_since(Instant::now())
                        .map(|d| d.as_millis() as u64),
                    super::service::TrialPhase::Rolling => None,
                });
                ServiceStatus {
                    name: name.to_string(),
                    listen: svc.listen_addrs(),
                    plugin: svc.config().plugin.clone(),
                    reloadable: svc.config().reloadable,
                    version: st.live.short().to_string(),
                    version_healthy: st.healthy.contains(&st.live.hash),
                    probation_left_ms,
                    probation_fallback: st
                        .trial
                        .as_ref()
                        .filter(|t| t.fallback)
                        .map(|t| t.from.version.short().to_string()),
                    crashes_last_minute: st.crashes_last_minute(),
                    held_back: st.held_back.clone(),
                    previous: st.previous.iter().rev().map(info).collect(),
                    slots,
                    workers,
                    recent: events
                        .iter()
                        .rev()
                        .filter(|e| e.service == name)
                        .take(RECENT_EVENTS)
                        .cloned()
                        .collect(),
                }
            })
            .collect();
        StatusReport {
            master_pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            host_version: env!("CARGO_PKG_VERSION").to_string(),
            build_id: self.origin.build_id.clone(),
            executable: self.origin.exe.clone(),
            admin: self.admin.as_ref().map(|a| a.url()),
            services,
        }
    }
}

fn version_info(v: &PluginVersion, st: &super::service::ServiceState) -> VersionInfo {
    version_with_marks(v, st.healthy.contains(&v.hash), &st.failed, &st.set_aside)
}

/// A version as the reports show it, with what its service's history marks it with.
fn version_with_marks(
    v: &PluginVersion,
    healthy: bool,
    failed: &Marks,
    set_aside: &Marks,
) -> VersionInfo {
    VersionInfo {
        version: v.short().to_string(),
        size: v.size,
        first_loaded: epoch_secs(v.stored_at),
        source: v.source.clone(),
        healthy,
        failed: failed.get(&v.hash).cloned(),
        set_aside: set_aside.get(&v.hash).cloned(),
    }
}

/// A service this master keeps the history of but does not run, as `/api/history` shows it.
fn dormant_history(name: &str, saved: &SavedService) -> DormantHistory {
    let info = |v: &PluginVersion| {
        version_with_marks(
            v,
            saved.healthy.contains(&v.hash),
            &saved.failed,
            &saved.set_aside,
        )
    };
    DormantHistory {
        name: name.to_string(),
        last_ran: super::last_ran(saved).map(epoch_secs),
        live: saved.live.as_ref().map(info),
        previous: saved.previous.iter().rev().map(info).collect(),
    }
}

impl Master {
    pub fn history_report(&self) -> HistoryReport {
        let services = self.services();
        HistoryReport {
            services: services
                .iter()
                .map(|svc| {
                    let st = svc.state();
                    let info = |v: &PluginVersion| version_info(v, &st);
                    ServiceHistory {
                        name: svc.name().to_string(),
                        live: info(&st.live),
                        previous: st.previous.iter().rev().map(info).collect(),
                    }
                })
                .collect(),
            not_running: {
                let dormant = self.dormant.lock().unwrap();
                // A service a config reload is adding is running already, though it leaves
                // `dormant` only once its workers have started.
                let mut list: Vec<DormantHistory> = dormant
                    .iter()
                    .filter(|(name, _)| !services.iter().any(|s| s.name() == name.as_str()))
                    .map(|(name, saved)| dormant_history(name, saved))
                    .collect();
                list.sort_by(|a, b| b.last_ran.cmp(&a.last_ran).then(a.name.cmp(&b.name)));
                list
            },
            events: self.rollout_events(),
        }
    }

    /// The reloads and rollbacks kept, oldest first.
    pub fn rollout_events(&self) -> Vec<RolloutEvent> {
        self.events.lock().unwrap().clone()
    }

    /// `GET /readyz`: ready while every service has a worker that serves and the host is not
    /// stopping; otherwise why not.
    pub fn readiness(&self) -> Result<(), String> {
        if *self.stopping.borrow() {
            return Err("the host is stopping".into());
        }
        let reg = self.registry.lock().unwrap();
        for svc in self.services() {
            let ready = |role: fn(&EntryRole) -> bool| {
                reg.workers.values().any(|w| {
                    w.state == WorkerState::Ready && w.service.name() == svc.name() && role(&w.role)
                })
            };
            if !ready(|r| *r == EntryRole::Worker) {
                return Err(format!("service {} has no ready worker", svc.name()));
            }
            let websocket = matches!(svc.config().kind, crate::config::Kind::WebSocket { .. });
            if websocket && !ready(|r| matches!(r, EntryRole::Gateway(_))) {
                return Err(format!("service {} has no ready gateway", svc.name()));
            }
        }
        Ok(())
    }

    /// The gauges of `/metrics`, as they are now.
    pub fn metrics_view(&self) -> View {
        let mut view = View::default();
        let reg = self.registry.lock().unwrap();
        for svc in self.services() {
            let name = svc.name();
            let workers = || reg.workers.values().filter(|w| w.service.name() == name);
            for state in [
                WorkerState::Starting,
                WorkerState::Ready,
                WorkerState::Draining,
            ] {
                let n = workers()
                    .filter(|w| w.state == state && w.role == EntryRole::Worker)
                    .count();
                view.workers
                    .push((name.to_string(), state.as_str().to_string(), n as i64));
            }
            let connections: u64 = workers().map(|w| w.connections).sum();
            view.connections
                .push((name.to_string(), connections as i64));
            view.versions
                .push((name.to_string(), svc.live().short().to_string()));
        }
        view
    }

    /// Samples the metrics for the admin page's chart, for the life of the master.
    pub(super) async fn sample_metrics(self: std::sync::Arc<Self>) {
        let mut every = tokio::time::interval(SAMPLE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.metrics.sample();
        }
    }
}

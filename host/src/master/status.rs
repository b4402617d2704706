//! The picture `host status` shows: the master, and per service its versions, its trial,
//! its slots' recent trouble and its workers.

use std::time::{Duration, Instant, SystemTime};

use super::Master;
use crate::{
    protocol::{ServiceStatus, SlotStatus, StatusReport, VersionInfo, WorkerStatus},
    shadow::PluginVersion,
};

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
                let info = |v: &PluginVersion| version_info(v, &st.healthy, &st.failed);
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
                        .map(|t| t.from.version.short().to_string()),
                    crashes_last_minute: st.crashes_last_minute(),
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
            services,
        }
    }
}

fn version_info(
    v: &PluginVersion,
    healthy: &std::collections::HashSet<String>,
    failed: &std::collections::HashMap<String, String>,
) -> VersionInfo {
    VersionInfo {
        version: v.short().to_string(),
        size: v.size,
        first_loaded: v
            .stored_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        source: v.source.clone(),
        healthy: healthy.contains(&v.hash),
        failed: failed.get(&v.hash).cloned(),
    }
}

//! A websocket service's gateways, as the master runs them (`crate::gateway` is the process
//! itself): started before the business workers, linked to every one of them by socketpairs
//! the master makes, told which worker serves each slot, and restarted when one dies (its
//! clients are disconnected, and reconnect). A reload never touches them; a stop drains them
//! with everything else, and they close their clients with 1001.

use std::{os::fd::OwnedFd, sync::Arc, time::Duration, time::Instant};

use super::{
    pool::{EntryRole, WorkerState},
    process,
    service::Service,
    spec::worker_spec,
    Master,
};
use crate::{
    config::Kind,
    protocol::{Role, ToWorker},
};

/// A gateway that dies within this of its start counts as dying young: its restart waits.
const STABLE_AFTER: Duration = Duration::from_secs(10);

impl Master {
    /// Starts every gateway of a websocket service (nothing for an HTTP service).
    pub(super) async fn start_gateways(self: &Arc<Self>, svc: &Arc<Service>) -> Result<(), String> {
        let Kind::WebSocket { gateways, .. } = svc.config().kind else {
            return Ok(());
        };
        for index in 0..gateways as u32 {
            self.start_gateway(svc, index)
                .await
                .map_err(|e| format!("gateway {index} could not start: {e}"))?;
        }
        Ok(())
    }

    /// Starts gateway `index` of `svc`, linked to the service's workers that run now.
    async fn start_gateway(
        self: &Arc<Self>,
        svc: &Arc<Service>,
        index: u32,
    ) -> Result<u32, String> {
        let release = svc.release();
        let config = &release.config;
        let Kind::WebSocket {
            max_message_bytes, ..
        } = config.kind
        else {
            return Err("not a websocket service".into());
        };
        let sockets = svc.sockets_for(config)?;
        if sockets.is_empty() || *self.stopping.borrow() {
            return Err("the service's listeners are closed (the host is stopping)".into());
        }
        let (addrs, listeners): (Vec<String>, Vec<_>) = sockets.into_iter().unzip();
        let (workers, holders) = {
            let reg = self.registry.lock().unwrap();
            let workers: Vec<(usize, u32)> = reg
                .workers
                .iter()
                .filter(|(_, w)| {
                    Arc::ptr_eq(&w.service, svc)
                        && w.role == EntryRole::Worker
                        && w.state != WorkerState::Draining
                })
                .map(|(pid, w)| (w.slot, *pid))
                .collect();
            let holders: Vec<(usize, u32)> = (0..config.workers)
                .filter_map(|slot| reg.holder(svc.name(), slot).map(|pid| (slot, pid)))
                .collect();
            (workers, holders)
        };
        let mut extra = Vec::new();
        let mut worker_ends = Vec::new();
        for (_, pid) in &workers {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair()
                .map_err(|e| format!("could not make a link to worker {pid}: {e}"))?;
            extra.push(OwnedFd::from(ours));
            worker_ends.push((*pid, theirs));
        }
        let mut spec = worker_spec(config, index as usize, &release.version, addrs);
        spec.role = Role::Gateway {
            index,
            workers: config.workers,
            links: workers,
            holders,
            max_message_bytes,
        };
        spec.access_log = None;
        let spawned = process::spawn(&spec, None, listeners, extra)
            .map_err(|e| format!("could not start a gateway process: {e}"))?;
        for (pid, end) in worker_ends {
            self.tell_with_file(
                pid,
                ToWorker::GatewayLink { gateway: index },
                std::fs::File::from(OwnedFd::from(end)),
            );
        }
        self.launched(svc, spec, spawned, EntryRole::Gateway(index), &release)
            .await
    }

    /// The gateways of `svc` that run (not draining): (index, pid).
    pub(super) fn gateways_of(&self, svc: &Service) -> Vec<(u32, u32)> {
        let mut gateways = self.gateways_in(&self.registry.lock().unwrap(), svc);
        gateways.sort();
        gateways
    }

    /// `pid` serves `slot` of `svc` from now on: a websocket service's gateways move the
    /// slot's clients to it.
    pub(super) fn slot_filled(&self, svc: &Service, slot: usize, pid: u32) {
        if !matches!(svc.config().kind, Kind::WebSocket { .. }) {
            return;
        }
        let reg = self.registry.lock().unwrap();
        for (_, gateway) in self.gateways_in(&reg, svc) {
            if let Some(w) = reg.workers.get(&gateway) {
                w.tell(ToWorker::SlotHolder { slot, pid });
            }
        }
    }

    fn gateways_in(&self, reg: &super::pool::Registry, svc: &Service) -> Vec<(u32, u32)> {
        reg.workers
            .iter()
            .filter(|(_, w)| w.service.name() == svc.name() && w.state != WorkerState::Draining)
            .filter_map(|(pid, w)| match w.role {
                EntryRole::Gateway(index) => Some((index, *pid)),
                EntryRole::Worker => None,
            })
            .collect()
    }

    /// A gateway exited: unless it was drained (or the host stops), its clients are gone
    /// and a new gateway takes its place (after a pause if it died young).
    pub(super) fn gateway_exited(
        self: &Arc<Self>,
        svc: Arc<Service>,
        index: u32,
        pid: u32,
        exit: &str,
        drained: bool,
        lived: Duration,
    ) {
        if drained || *self.stopping.borrow() || svc.is_removed() {
            tracing::info!(service = %svc.name(), "gateway {index} ({pid}) {exit}");
            return;
        }
        tracing::error!(
            service = %svc.name(),
            "gateway {index} ({pid}) {exit} {} after it started; its clients were \
             disconnected; starting a new gateway {index}",
            super::supervise::short_duration(lived)
        );
        let master = self.clone();
        tokio::spawn(async move {
            let mut delay = if lived < STABLE_AFTER {
                Duration::from_millis(100)
            } else {
                Duration::ZERO
            };
            loop {
                tokio::time::sleep(delay).await;
                if *master.stopping.borrow() || svc.is_removed() {
                    return;
                }
                let t = Instant::now();
                match master.start_gateway(&svc, index).await {
                    Ok(new) => {
                        return tracing::info!(
                            service = %svc.name(),
                            "gateway {index}: {new} is ready in {} ms",
                            t.elapsed().as_millis()
                        )
                    }
                    Err(e) => {
                        delay =
                            (delay * 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
                        tracing::error!(
                            service = %svc.name(),
                            "gateway {index} could not start: {e}; trying again in {delay:?}"
                        );
                    }
                }
            }
        });
    }
}

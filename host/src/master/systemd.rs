//! Telling systemd what the master does (`Type=notify`): READY=1 once every service is ready,
//! RELOADING=1 (with MONOTONIC_USEC) when a reload starts and READY=1 when it ends, STOPPING=1,
//! a one-line STATUS=, and MAINPID= when an upgraded master takes over (with
//! `NotifyAccess=all`, so that systemd accepts it from the new process and does not kill it
//! when the old one exits). Without `NOTIFY_SOCKET` (not under systemd) these do nothing.

use sd_notify::NotifyState;

use super::Master;

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("could not notify systemd: {e}");
    }
}

/// "2 services: web 3879408 (2 workers), api c18ae74 (4 workers)".
fn summary(master: &Master) -> String {
    let services = master.services();
    let parts: Vec<String> = services
        .iter()
        .map(|s| {
            format!(
                "{} {} ({})",
                s.name(),
                s.live(),
                super::workers(s.config().workers)
            )
        })
        .collect();
    format!("{} services: {}", services.len(), parts.join(", "))
}

pub fn ready(master: &Master) {
    let status = summary(master);
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(e) => tracing::warn!("could not read the monotonic clock for systemd: {e}"),
    }
}

pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// After an upgrade's takeover: this process is the service's main process now.
pub fn main_pid() {
    notify(&[NotifyState::MainPid(std::process::id())]);
}

//! `host start`, from the first line to the exit code: take the state directory (or, in an
//! upgrade, inherit it), open the listeners, store the plugins, start the workers, say ready
//! (on stdout, to systemd, or to the master being upgraded), then serve signals and the
//! control socket until a stop, and drain.

use std::{
    collections::HashSet,
    process::ExitCode,
    sync::{atomic::Ordering, Arc, Mutex, RwLock},
    time::Instant,
};

use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
};

use super::{
    home, jobs::Jobs, listeners, service::Service, systemd, upgrade, Master, Op, Sidecar,
    StopWaiter,
};
use crate::admin::{self, Admin};
use crate::daemon;
use crate::{
    config::{Config, Source},
    protocol::{ControlReply, UpgradeMessage},
    shadow::ShadowStore,
    state_dir::{MasterLock, StateDir},
};

/// What `host start` needs beside the configuration.
#[derive(Default)]
pub struct Options {
    /// The log file stdout and stderr point to, which `host reopen-logs` opens again.
    pub log_file: Option<std::path::PathBuf>,
    /// Work beside the master (`host dev`'s rebuild loop).
    pub sidecar: Option<Sidecar>,
}

/// Who waits to hear whether this master started: the master being upgraded, the command of a
/// daemon start.
#[derive(Default)]
struct Watchers {
    handover: Option<upgrade::Handover>,
    daemon: Option<daemon::Readiness>,
}

impl Watchers {
    fn failed(&mut self, reason: &str) {
        if let Some(h) = self.handover.as_mut() {
            h.tell(&UpgradeMessage::Failed(reason.to_string()));
        }
        if let Some(d) = self.daemon.take() {
            d.failed(reason);
        }
    }
}

/// The `host start` entry point.
pub fn main(config: Config, source: Source, state: StateDir, options: Options) -> ExitCode {
    // First, before any thread exists: who waits for this start comes in the environment.
    let mut watchers = Watchers {
        handover: match upgrade::Handover::from_env() {
            Ok(h) => h,
            Err(e) => return fail(&e),
        },
        daemon: daemon::Readiness::from_env(),
    };
    let started = match start_checks(&config, &state, watchers.handover.as_mut()) {
        Ok(lock) => lock,
        Err(e) => {
            watchers.failed(&e);
            return fail(&e);
        }
    };
    if let Some(h) = watchers.handover.as_mut() {
        let drain = config.services.iter().map(|s| s.drain_timeout).max();
        h.tell(&UpgradeMessage::DrainTimeout(drain.unwrap_or_default()));
    }
    raise_fd_limit();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("could not start the async runtime: {e}")),
    };
    let (code, owns_socket) = runtime.block_on(run(
        config,
        source,
        state.clone(),
        started,
        watchers,
        options,
    ));
    // Not after a handover (the socket is the new master's now), nor when a new master of an
    // upgrade failed (the socket is still the old master's).
    if owns_socket {
        let _ = std::fs::remove_file(state.socket());
    }
    code
}

/// The checks that come before anything starts, and the state directory's lock.
fn start_checks(
    config: &Config,
    state: &StateDir,
    handover: Option<&mut upgrade::Handover>,
) -> Result<MasterLock, String> {
    check_user(config)?;
    match handover {
        Some(h) => state.adopt_lock(
            h.lock
                .try_clone()
                .map_err(|e| format!("could not use the inherited lock: {e}"))?,
        ),
        None => state.lock_for_master(),
    }
}

/// Workers run as another user only under a root master; a root master without one says that
/// plugin code runs as root.
fn check_user(config: &Config) -> Result<(), String> {
    let me = nix::unistd::geteuid();
    for svc in &config.services {
        match &svc.run_as {
            Some(run_as) if !me.is_root() && run_as.uid != me.as_raw() => {
                return Err(format!(
                    "service {}: only a master running as root can start workers as user {} \
                     (this one runs as uid {me}). Start the host as root, or leave user out.",
                    svc.name, run_as.user
                ))
            }
            None if me.is_root() => tracing::warn!(
                service = %svc.name,
                "the host runs as root and no user is set, so plugin code runs as root; set \
                 user = \"NAME\" (or --user) to run workers as an unprivileged user"
            ),
            _ => {}
        }
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit: every connection is a file, and the
/// usual soft limit (1024) is far below what a server holds.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                Ok(()) => tracing::debug!("raised the open-file limit from {soft} to {hard}"),
                Err(e) => tracing::warn!("could not raise the open-file limit from {soft}: {e}"),
            }
        }
    }
}

/// Prints why the master cannot run, once, with the program's name (as the CLI's errors are).
fn fail(message: &str) -> ExitCode {
    eprintln!("host: {message}");
    ExitCode::FAILURE
}

/// Runs the master; returns its exit code and whether the control socket at the usual path is
/// its own to remove.
async fn run(
    config: Config,
    source: Source,
    state: StateDir,
    lock: MasterLock,
    mut watchers: Watchers,
    options: Options,
) -> (ExitCode, bool) {
    // Until the master is ready, a failure is also told to whoever waits for the start.
    let upgrading = watchers.handover.is_some();
    macro_rules! fail_start {
        ($message:expr) => {{
            let message: String = $message;
            watchers.failed(&message);
            return (fail(&message), !upgrading);
        }};
    }
    let store = match ShadowStore::open(lock.dir()) {
        Ok(store) => store,
        Err(e) => fail_start!(e),
    };
    let mut history = store.load_history();
    let mut services = Vec::new();
    let mut stored_now = Vec::new();
    let mut lived_before = Vec::new();
    let handed = watchers
        .handover
        .as_ref()
        .map_or(&[][..], |h| &h.listeners[..]);
    let mut given = match listeners::Given::collect(handed) {
        Ok(given) => given,
        Err(e) => fail_start!(e),
    };
    // Every version the history keeps, of any service (of this config or another): a failed
    // start removes only the copies it stored that none of them uses.
    let known: HashSet<String> = history
        .services
        .values()
        .flat_map(|s| s.live.iter().chain(&s.previous))
        .map(|v| v.hash.clone())
        .collect();
    for svc in config.services {
        let mut listeners = Vec::new();
        for addr in &svc.listen {
            match given.open(&svc.name, *addr) {
                Ok(l) => listeners.push(l),
                Err(e) => fail_start!(e),
            }
        }
        let version = match store.store_plugin(&svc) {
            Ok(v) => v,
            Err(e) => fail_start!(format!("service {}: {e}", svc.name)),
        };
        if !known.contains(&version.hash) {
            stored_now.push(version.clone());
        }
        let saved = history.services.remove(&svc.name).unwrap_or_default();
        lived_before.push(saved.live.clone());
        let svc = Service::new(svc, listeners, version, saved);
        if let Some(held_back) = &svc.state().held_back {
            tracing::warn!("service {}: {held_back}", svc.name());
        }
        services.push(Arc::new(svc));
    }
    let admin = match config.admin {
        None => None,
        Some(cfg) => match given
            .open(admin::LISTENER_NAME, cfg.listen)
            .and_then(|l| Admin::new(cfg, l.socket))
        {
            Ok(admin) => Some(Arc::new(admin)),
            Err(e) => fail_start!(e),
        },
    };
    for addr in given.unclaimed() {
        tracing::warn!(
            "systemd passed a socket for {addr}, but no service listens there; closing it"
        );
    }
    let (stop_tx, mut stop_rx) = mpsc::unbounded_channel::<StopWaiter>();
    let Options { log_file, sidecar } = options;
    let master = Arc::new(Master {
        started: Instant::now(),
        services: RwLock::new(services),
        store,
        registry: Mutex::default(),
        worker_count: watch::Sender::new(0),
        stopping: watch::Sender::new(false),
        jobs: Jobs::default(),
        events: Mutex::new(history.events),
        // What is left: the services of other configs.
        dormant: Mutex::new({
            let mut dormant = history.services;
            super::forget_long_gone(&mut dormant);
            dormant
        }),
        home: home::Home::new(state, lock, stop_tx),
        cut_short: Default::default(),
        source,
        origin: upgrade::Origin::here(),
        upgrade_timeout: config.upgrade_timeout,
        dev_mode: sidecar.is_some(),
        handed_over: Default::default(),
        successor: watch::Sender::new(None),
        borrows_listeners: std::sync::atomic::AtomicBool::new(upgrading),
        history_handed: Default::default(),
        log_file,
        metrics: Default::default(),
        admin,
    });
    // In an upgrade the socket is published (renamed into place) only at the takeover.
    if let Err(e) = master.serve_control(watchers.handover.is_none()) {
        fail_start!(e);
    }
    let (mut hup, mut usr1, mut usr2, mut term, mut int) = match (
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined1()),
        signal(SignalKind::user_defined2()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(a), Ok(b), Ok(c), Ok(d), Ok(e)) => (a, b, c, d, e),
        _ => fail_start!("could not install signal handlers".into()),
    };
    tokio::spawn(master.clone().check_liveness());

    let started = match watchers.handover.as_mut() {
        Some(h) => match h.listen() {
            Ok(()) => master.start_with_canaries(h).await,
            Err(e) => Err(e),
        },
        None => master.start_all().await,
    };
    if let Err(e) = started {
        master.stop_failed_start(watchers.handover.as_ref()).await;
        // A start that failed leaves no copy behind that nothing else uses.
        for version in stored_now {
            master.store.remove(&version);
        }
        fail_start!(e);
    }
    // The probations first: a trial keeps the copy of the version it would fall back to,
    // which the pruning below must not remove.
    for (svc, before) in master.services().iter().zip(lived_before) {
        master.probation_at_start(svc, before);
    }
    if let Some(mut h) = watchers.handover.take() {
        if let Err(e) = master.take_over(&mut h).await {
            master.stop_failed_start(Some(&h)).await;
            watchers.handover = Some(h);
            fail_start!(e);
        }
    }
    master.save_history();
    master.prune_store();
    tokio::spawn(master.clone().guard_home());
    tokio::spawn(master.clone().run_jobs());
    tokio::spawn(master.clone().sample_metrics());
    if let Some(admin) = &master.admin {
        if let Err(e) = admin.start(master.clone()) {
            master.stop(false).await;
            fail_start!(e);
        }
    }
    for svc in master.services() {
        if svc.config().watch {
            master.watch(&svc);
        }
    }
    if let Some(sidecar) = sidecar {
        tokio::spawn(sidecar);
    }
    systemd::ready(&master);
    let admin_url = master
        .admin
        .as_ref()
        .map_or(String::new(), |a| format!("; admin on {}", a.url()));
    println!(
        "host: ready (master pid {}): {}{admin_url}",
        std::process::id(),
        master.describe_listeners()
    );
    if let Some(daemon) = watchers.daemon.take() {
        daemon.ready();
    }

    let mut stop_replies = Vec::new();
    loop {
        tokio::select! {
            _ = hup.recv() => master.submit(Op::Reload(vec![]), "SIGHUP", None),
            _ = usr1.recv() => master.submit(Op::Reload(vec![]), "SIGUSR1", None),
            _ = usr2.recv() => master.submit(Op::Upgrade(None), "SIGUSR2", None),
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break }
            _ = master.handed_over.notified() => {
                tracing::info!("handed over to the new master: draining and exiting");
                break
            }
            Some(reply) = stop_rx.recv() => { stop_replies.push(reply); break }
        }
    }
    let handed_over = master.is_handed_over();
    if !handed_over {
        systemd::stopping();
    }
    // Stop: drain everything; a second signal (or Ctrl-C) kills what is left. Workers run in
    // their own process groups, so a Ctrl-C in the terminal reaches only the master, which
    // passes it on as this orderly drain.
    let stopping = master.stop(true);
    tokio::pin!(stopping);
    loop {
        tokio::select! {
            _ = &mut stopping => break,
            Some(reply) = stop_rx.recv() => stop_replies.push(reply),
            _ = term.recv() => master.kill_all("second SIGTERM"),
            _ = int.recv() => master.kill_all("second SIGINT"),
        }
    }
    // A takeover that was already under way when the stop came ends during it (the new master
    // is then told to stop too): the socket, the pid file and the history are the new master's.
    let handed_over = master.is_handed_over();
    if !handed_over {
        master.save_history();
    }
    master.store.flush_history();
    let cut = master.cut_short.load(Ordering::SeqCst);
    let summary = if cut {
        "stopped at once: workers were killed before they finished draining"
    } else {
        "stopped: every worker exited"
    };
    tracing::info!("{summary}");
    for waiter in &stop_replies {
        let _ = waiter.send(ControlReply::Done {
            ok: !cut,
            summary: summary.into(),
        });
    }
    // Until each has its outcome written (the receiver goes once it is), or a moment passed.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        for waiter in &stop_replies {
            waiter.closed().await;
        }
    })
    .await;
    if let Some(admin) = &master.admin {
        admin.shut_down().await;
    }
    let code = if cut {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    };
    (code, !handed_over)
}

impl Master {
    /// A new master's start in an upgrade: each service's first worker, its canary probation
    /// (the old master's workers serve beside it), then the others. Progress goes to the old
    /// master, which shows it to whoever asked for the upgrade.
    async fn start_with_canaries(
        self: &Arc<Self>,
        handover: &mut upgrade::Handover,
    ) -> Result<(), String> {
        for svc in self.services() {
            self.start_gateways(&svc)
                .await
                .map_err(|e| format!("service {} could not start: {e}", svc.name()))?;
            let release = svc.release();
            let name = svc.name().to_string();
            for slot in 0..release.config.workers {
                if handover.abandoned() {
                    return Err(abandoned(handover.old_pid));
                }
                let t = Instant::now();
                let pid = self
                    .start_worker(&svc, slot, &release)
                    .await
                    .map_err(|e| format!("service {name} could not start: {e}"))?;
                self.install(&svc, slot, pid);
                handover.tell(&UpgradeMessage::Progress(format!(
                    "{name}: worker {slot}: {pid} ready in {} ms (plugin {release})",
                    t.elapsed().as_millis()
                )));
                let probation = release.config.canary_probation;
                if slot == 0 && !probation.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(probation) => {}
                        _ = handover.until_abandoned() => return Err(abandoned(handover.old_pid)),
                    }
                    if self.holders(&svc).first().is_none_or(|h| h.is_none()) {
                        let why = self
                            .registry
                            .lock()
                            .unwrap()
                            .slot(&name, 0)
                            .last_exit
                            .clone()
                            .map_or_else(|| "it exited".to_string(), |e| e.0);
                        return Err(format!(
                            "service {name}: the first worker failed during its canary \
                             probation: {why}"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Stops what a failed start started, before `fail_start!` tells why: at once; or, when the
    /// old master of an upgrade told this one to stop, with a drain, since the workers may have
    /// served on the shared sockets (the old master waits for that).
    async fn stop_failed_start(self: &Arc<Self>, handover: Option<&upgrade::Handover>) {
        self.stop(handover.is_some_and(upgrade::Handover::abandoned))
            .await;
    }

    /// Tells the old master this one is ready, waits for its go, and takes the control socket
    /// and the pid file.
    async fn take_over(self: &Arc<Self>, handover: &mut upgrade::Handover) -> Result<(), String> {
        handover.tell(&UpgradeMessage::Ready);
        match handover.told().await {
            upgrade::Told::TakeOver => {}
            // A crash of the old master must not take the service down with it.
            upgrade::Told::Gone => tracing::warn!(
                "the old master (pid {}) went away before the takeover; taking over anyway",
                handover.old_pid
            ),
            upgrade::Told::Abandon => return Err(abandoned(handover.old_pid)),
        }
        self.publish_home()?;
        self.borrows_listeners.store(false, Ordering::SeqCst);
        systemd::main_pid();
        handover.tell(&UpgradeMessage::TookOver);
        tracing::info!(
            "took over from master {}: this master now serves",
            handover.old_pid
        );
        Ok(())
    }
}

/// Why a new master stops when the old one was told to stop during the upgrade.
fn abandoned(old_pid: u32) -> String {
    format!(
        "the old master (pid {old_pid}) was told to stop during the upgrade, so the host stops: \
         this master does not take over"
    )
}

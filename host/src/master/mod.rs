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
mod home;
mod jobs;
mod listeners;
mod pool;
mod process;
mod rollout;
mod service;
mod status;
mod supervise;
mod watcher;

use std::{
    collections::HashSet,
    process::ExitCode,
    sync::{Arc, Mutex, RwLock},
    time::Instant,
};

use tokio::{
    net::unix::OwnedWriteHalf,
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
    task::JoinSet,
};

pub use self::jobs::Op;
pub use self::pool::{heartbeat_interval, worker_spec, WorkerState};
pub use self::process::{spawn as spawn_worker_process, Spawned};
pub use self::supervise::describe_exit;
use self::{jobs::Jobs, pool::Registry, service::Service};
use crate::{
    config::{Config, Source},
    protocol::{ControlReply, RolloutEvent},
    shadow::{History, PluginVersion, ShadowStore},
    state_dir::{MasterLock, StateDir},
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
    /// The state directory, its lock and the control socket (`master::home`).
    home: home::Home,
    /// A stop cut requests short (a second signal killed workers that still had connections).
    cut_short: std::sync::atomic::AtomicBool,
    /// Where the configuration came from, to read again on reload.
    source: Source,
}

/// Work that runs beside the master once it serves (`host dev`'s rebuild loop).
pub type Sidecar = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The `host start` entry point.
pub fn main(config: Config, source: Source, state: StateDir, sidecar: Option<Sidecar>) -> ExitCode {
    if let Err(e) = check_user(&config) {
        return fail(&e);
    }
    let lock = match state.lock_for_master() {
        Ok(lock) => lock,
        Err(e) => return fail(&e),
    };
    raise_fd_limit();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("could not start the async runtime: {e}")),
    };
    let code = runtime.block_on(run(config, source, state.clone(), lock, sidecar));
    let _ = std::fs::remove_file(state.socket());
    code
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

async fn run(
    config: Config,
    source: Source,
    state: StateDir,
    lock: MasterLock,
    sidecar: Option<Sidecar>,
) -> ExitCode {
    let store = match ShadowStore::open(lock.dir()) {
        Ok(store) => store,
        Err(e) => return fail(&e),
    };
    let mut history = store.load_history();
    let mut services = Vec::new();
    let mut stored_now = Vec::new();
    let mut lived_before = Vec::new();
    let mut given = match listeners::Given::collect(&[]) {
        Ok(given) => given,
        Err(e) => return fail(&e),
    };
    for svc in config.services {
        let mut listeners = Vec::new();
        for addr in &svc.listen {
            match given.open(&svc.name, *addr) {
                Ok(l) => listeners.push(l),
                Err(e) => return fail(&e),
            }
        }
        let version = match store.store_plugin(&svc) {
            Ok(v) => v,
            Err(e) => return fail(&format!("service {}: {e}", svc.name)),
        };
        let saved = history.services.remove(&svc.name).unwrap_or_default();
        let known = |hash: &str| {
            saved
                .live
                .iter()
                .chain(&saved.previous)
                .any(|v| v.hash == hash)
        };
        if !known(&version.hash) {
            stored_now.push(version.clone());
        }
        lived_before.push(saved.live.clone());
        services.push(Arc::new(Service::new(svc, listeners, version, saved)));
    }
    for addr in given.unclaimed() {
        tracing::warn!(
            "systemd passed a socket for {addr}, but no service listens there; closing it"
        );
    }
    let (stop_tx, mut stop_rx) = mpsc::unbounded_channel::<OwnedWriteHalf>();
    let home = match home::Home::new(state, lock, stop_tx) {
        Ok(home) => home,
        Err(e) => return fail(&e),
    };
    let master = Arc::new(Master {
        started: Instant::now(),
        services: RwLock::new(services),
        store,
        registry: Mutex::default(),
        worker_count: watch::Sender::new(0),
        stopping: watch::Sender::new(false),
        jobs: Jobs::default(),
        events: Mutex::new(history.events),
        home,
        cut_short: Default::default(),
        source,
    });
    if let Err(e) = master.serve_control() {
        return fail(&e);
    }
    tokio::spawn(master.clone().guard_home());

    let (mut hup, mut usr1, mut term, mut int) = match (
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined1()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(a), Ok(b), Ok(c), Ok(d)) => (a, b, c, d),
        _ => return fail("could not install signal handlers"),
    };

    if let Err(e) = master.start_all().await {
        master.stop(false).await;
        // A start that failed leaves no copy behind that nothing else uses.
        for version in stored_now {
            master.store.remove(&version);
        }
        return fail(&e);
    }
    // The probations first: a trial keeps the copy of the version it would fall back to,
    // which the pruning below must not remove.
    for (svc, before) in master.services().iter().zip(lived_before) {
        master.probation_at_start(svc, before);
    }
    master.save_history();
    master.prune_store();
    tokio::spawn(master.clone().run_jobs());
    tokio::spawn(master.clone().check_liveness());
    for svc in master.services() {
        if svc.config().watch {
            master.watch(&svc);
        }
    }
    if let Some(sidecar) = sidecar {
        tokio::spawn(sidecar);
    }
    println!(
        "host: ready (master pid {}): {}",
        std::process::id(),
        master.describe_listeners()
    );

    let mut stop_replies = Vec::new();
    loop {
        tokio::select! {
            _ = hup.recv() => master.submit(Op::Reload(vec![]), "SIGHUP", None),
            _ = usr1.recv() => master.submit(Op::Reload(vec![]), "SIGUSR1", None),
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break }
            Some(reply) = stop_rx.recv() => { stop_replies.push(reply); break }
        }
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
    master.save_history();
    let cut = master.cut_short.load(std::sync::atomic::Ordering::SeqCst);
    let summary = if cut {
        "stopped at once: workers were killed before they finished draining"
    } else {
        "stopped: every worker exited"
    };
    tracing::info!("{summary}");
    let done = ControlReply::Done {
        ok: !cut,
        summary: summary.into(),
    };
    for mut reply in stop_replies {
        let _ = control::send(&mut reply, &done).await;
    }
    if cut {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

impl Master {
    /// Starts every slot of every service and waits until all are READY.
    async fn start_all(self: &Arc<Self>) -> Result<(), String> {
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
                let urls: Vec<_> = s
                    .listen_addrs()
                    .iter()
                    .map(|a| format!("http://{a}"))
                    .collect();
                format!("{} on {}", s.config().name, urls.join(", "))
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
        for svc in self.services() {
            svc.close_listeners();
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
            "{why}: stopping now; killing {} workers that had not finished draining",
            pids.len()
        );
        for pid in pids {
            self.kill_worker(pid, why);
        }
    }

    /// Writes every service's versions and the rollout events to the store's history file.
    fn save_history(&self) {
        let history = History {
            services: self
                .services()
                .iter()
                .map(|s| (s.name().to_string(), s.saved()))
                .collect(),
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

    /// Removes shadow copies that nothing uses any more.
    fn prune_store(&self) {
        let keep: HashSet<String> = self.versions_in_use().into_iter().map(|v| v.hash).collect();
        self.store.prune(&keep);
    }
}

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

mod control;
mod jobs;
mod pool;
mod process;
mod rollout;
mod service;
mod status;
mod supervise;
mod watcher;

use std::{
    collections::HashSet,
    net::{SocketAddr, TcpListener},
    os::unix::fs::PermissionsExt,
    process::ExitCode,
    sync::{Arc, Mutex, RwLock},
    time::Instant,
};

use socket2::{Domain, Socket, Type};
use tokio::{
    net::{unix::OwnedWriteHalf, UnixListener},
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
    config::Config,
    protocol::{ControlReply, RolloutEvent},
    shadow::{History, ShadowStore},
    state_dir::StateDir,
};

/// The listen backlog: connections wait here while workers are replaced.
const BACKLOG: i32 = 1024;

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
}

/// Work that runs beside the master once it serves (`host dev`'s rebuild loop).
pub type Sidecar = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The `host start` entry point.
pub fn main(config: Config, state: StateDir, sidecar: Option<Sidecar>) -> ExitCode {
    let _lock = match state.lock_for_master() {
        Ok(lock) => lock,
        Err(e) => return fail(&e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("could not start the async runtime: {e}")),
    };
    let code = runtime.block_on(run(config, state.clone(), sidecar));
    let _ = std::fs::remove_file(state.socket());
    code
}

/// Prints why the master cannot run, once, with the program's name (as the CLI's errors are).
fn fail(message: &str) -> ExitCode {
    eprintln!("host: {message}");
    ExitCode::FAILURE
}

async fn run(config: Config, state: StateDir, sidecar: Option<Sidecar>) -> ExitCode {
    let store = ShadowStore::new(state.plugins());
    let mut history = store.load_history();
    let mut services = Vec::new();
    let mut stored_now = Vec::new();
    let mut lived_before = Vec::new();
    for svc in config.services {
        let mut listeners = Vec::new();
        for addr in &svc.listen {
            match bind(*addr) {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    return fail(&format!(
                        "could not listen on {addr} for service {}: {e}. Is another server using \
                         this address? Change `listen`, or stop the other server.",
                        svc.name
                    ))
                }
            }
        }
        let version = match store.store(&svc.plugin) {
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
    // Only the user who runs the master may reload or stop it: 0600 on the socket, inside the
    // state directory's 0700.
    let control = match UnixListener::bind(state.socket()).and_then(|l| {
        std::fs::set_permissions(state.socket(), std::fs::Permissions::from_mode(0o600))?;
        Ok(l)
    }) {
        Ok(l) => l,
        Err(e) => {
            return fail(&format!(
                "could not create control socket {}: {e}",
                state.socket().display()
            ))
        }
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
    });
    let (stop_tx, mut stop_rx) = mpsc::unbounded_channel::<OwnedWriteHalf>();
    tokio::spawn(control::serve(master.clone(), control, stop_tx));

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
        if svc.config.watch {
            if let Err(e) = watcher::spawn(master.clone(), svc.clone()) {
                tracing::error!(service = %svc.name(), "{e}; reload it by hand");
            }
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
    tracing::info!("stopped");
    let done = ControlReply::Done {
        ok: true,
        summary: "stopped: every worker exited".into(),
    };
    for mut reply in stop_replies {
        let _ = control::send(&mut reply, &done).await;
    }
    ExitCode::SUCCESS
}

/// Binds a listener the way every worker will share it: no SO_REUSEPORT (with one socket per
/// worker, connections queued on a closing worker's socket would be reset), a deep backlog.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

impl Master {
    /// Starts every slot of every service and waits until all are READY.
    async fn start_all(self: &Arc<Self>) -> Result<(), String> {
        let mut starting = JoinSet::new();
        for svc in self.services() {
            let version = svc.live();
            for slot in 0..svc.config.workers {
                let (master, version, svc) = (self.clone(), version.clone(), svc.clone());
                starting.spawn(async move {
                    let started = master.start_worker(&svc, slot, &version).await;
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
                format!("{} on {}", s.config.name, urls.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Drains every worker (`graceful`) or kills them, and waits until none is left.
    async fn stop(self: &Arc<Self>, graceful: bool) {
        self.stopping.send_replace(true);
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

    fn kill_all(self: &Arc<Self>, why: &str) {
        tracing::warn!("{why}: killing every worker now");
        for pid in self.live_pids() {
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

    /// Removes shadow copies that no live worker, no service's history and no trial (the
    /// version a probation would roll back to) uses any more.
    fn prune_store(&self) {
        let mut keep: HashSet<_> = HashSet::new();
        for svc in self.services() {
            let st = svc.state();
            keep.insert(st.live.path.clone());
            keep.extend(st.previous.iter().map(|v| v.path.clone()));
            if let Some(trial) = &st.trial {
                keep.insert(trial.from.path.clone());
                keep.insert(trial.to.path.clone());
            }
        }
        keep.extend(
            self.registry
                .lock()
                .unwrap()
                .workers
                .values()
                .map(|w| w.version.path.clone()),
        );
        self.store.prune(&keep);
    }
}

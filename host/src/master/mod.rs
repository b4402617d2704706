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
mod pool;
mod process;
mod reload;
mod watcher;

use std::{
    collections::HashSet,
    net::{SocketAddr, TcpListener},
    os::unix::fs::PermissionsExt,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};
use tokio::{
    net::{unix::OwnedWriteHalf, UnixListener},
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
    task::JoinSet,
};

pub use self::pool::{describe_exit, worker_spec, WorkerState};
pub use self::process::{spawn as spawn_worker_process, Spawned};
use self::{pool::Registry, reload::Progress};
use crate::{
    config::{Config, ServiceConfig},
    protocol::{ControlReply, ServiceStatus, StatusReport, VersionInfo, WorkerStatus},
    shadow::{PluginVersion, ShadowStore},
    state_dir::StateDir,
};

/// The listen backlog: connections wait here while workers are replaced.
const BACKLOG: i32 = 1024;

/// One configured service and what the master holds for it.
pub struct Service {
    pub config: ServiceConfig,
    pub listeners: Vec<TcpListener>,
    /// The plugin version new workers of this service load.
    current: Mutex<PluginVersion>,
    /// Versions that were live before, oldest first, at most `keep_versions - 1`; their shadow
    /// copies are kept for `host rollback`.
    pub previous: Mutex<Vec<PluginVersion>>,
}

impl Service {
    /// A service serving `version`, with the `previous` versions a saved history remembers.
    fn new(
        config: ServiceConfig,
        listeners: Vec<TcpListener>,
        version: PluginVersion,
        mut previous: Vec<PluginVersion>,
    ) -> Service {
        previous.retain(|v| v.hash != version.hash);
        let excess = (previous.len() + 1).saturating_sub(config.keep_versions);
        previous.drain(..excess);
        Service {
            config,
            listeners,
            current: Mutex::new(version),
            previous: Mutex::new(previous),
        }
    }

    /// The version new workers load.
    pub fn current(&self) -> PluginVersion {
        self.current.lock().unwrap().clone()
    }

    /// Makes `version` the live one; the one it replaces heads the history.
    pub fn went_live(&self, version: PluginVersion) {
        let mut current = self.current.lock().unwrap();
        if current.hash == version.hash {
            return;
        }
        let mut previous = self.previous.lock().unwrap();
        // A version that comes back (a rollback, or a rebuild to identical bytes) keeps the time
        // it was first loaded, and moves to the end of the history.
        let version = match previous.iter().position(|v| v.hash == version.hash) {
            Some(i) => PluginVersion {
                stored_at: previous.remove(i).stored_at,
                ..version
            },
            None => version,
        };
        previous.push(std::mem::replace(&mut *current, version));
        let excess = (previous.len() + 1).saturating_sub(self.config.keep_versions);
        previous.drain(..excess);
    }

    /// The bound addresses (with the real port when the config said port 0).
    pub fn listen_addrs(&self) -> Vec<String> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .map(|a| a.to_string())
            .collect()
    }
}

/// Everything the master's tasks share.
pub struct Master {
    pub started: Instant,
    pub services: Vec<Service>,
    pub store: ShadowStore,
    pub registry: Mutex<Registry>,
    /// Number of live worker processes, to wait for zero on stop.
    pub worker_count: watch::Sender<usize>,
    pub stopping: watch::Sender<bool>,
    pub reload_lock: tokio::sync::Mutex<()>,
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
        let previous = history.remove(&svc.name).unwrap_or_default();
        services.push(Service::new(svc, listeners, version, previous));
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
        services,
        store,
        registry: Mutex::default(),
        worker_count: watch::Sender::new(0),
        stopping: watch::Sender::new(false),
        reload_lock: tokio::sync::Mutex::new(()),
    });
    master.prune_store();
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
        return fail(&e);
    }
    for (i, svc) in master.services.iter().enumerate() {
        if svc.config.watch {
            if let Err(e) = watcher::spawn(master.clone(), i) {
                tracing::error!(service = %svc.config.name, "{e}; reload it by hand");
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
            _ = hup.recv() => master.spawn_reload("SIGHUP"),
            _ = usr1.recv() => master.spawn_reload("SIGUSR1"),
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break }
            Some(reply) = stop_rx.recv() => { stop_replies.push(reply); break }
        }
    }
    // Stop: drain everything; a second signal (or Ctrl-C) kills what is left.
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

fn version_info(v: &PluginVersion) -> VersionInfo {
    VersionInfo {
        version: v.short().to_string(),
        size: v.size,
        first_loaded: v
            .stored_at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        source: v.source.clone(),
    }
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
        for (service, svc) in self.services.iter().enumerate() {
            let version = svc.current();
            for slot in 0..svc.config.workers {
                let (master, version) = (self.clone(), version.clone());
                starting.spawn(async move {
                    let started = master.start_worker(service, slot, &version).await;
                    (service, slot, started)
                });
            }
        }
        let mut first_error = None;
        while let Some(joined) = starting.join_next().await {
            let Ok((service, slot, started)) = joined else {
                continue;
            };
            match started {
                Ok(pid) => {
                    self.registry
                        .lock()
                        .unwrap()
                        .slots
                        .insert((service, slot), pid);
                }
                Err(e) => {
                    first_error.get_or_insert_with(|| {
                        format!(
                            "service {} could not start: {e}",
                            self.services[service].config.name
                        )
                    });
                }
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    fn describe_listeners(&self) -> String {
        self.services
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

    fn spawn_reload(self: &Arc<Self>, why: &'static str) {
        tracing::info!("{why}: reloading every reloadable service");
        let master = self.clone();
        tokio::spawn(async move {
            let (ok, summary) = master.reload(&[], &Progress(None)).await;
            if ok {
                tracing::info!("{summary}");
            } else {
                tracing::error!("{summary}");
            }
        });
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

    /// Pids of every live worker process, whatever its state.
    fn live_pids(&self) -> Vec<u32> {
        self.registry
            .lock()
            .unwrap()
            .workers
            .keys()
            .copied()
            .collect()
    }

    fn kill_all(self: &Arc<Self>, why: &str) {
        tracing::warn!("{why}: killing every worker now");
        let pids = self.live_pids();
        for pid in pids {
            self.kill_worker(pid);
        }
    }

    /// Writes every service's previous versions to the store's history file.
    fn save_history(&self) {
        let history = self
            .services
            .iter()
            .map(|s| (s.config.name.clone(), s.previous.lock().unwrap().clone()))
            .collect();
        self.store.save_history(&history);
    }

    /// Removes shadow copies no live worker and no service uses any more.
    fn prune_store(&self) {
        let mut keep: HashSet<_> = HashSet::new();
        for svc in &self.services {
            keep.insert(svc.current().path);
            keep.extend(svc.previous.lock().unwrap().iter().map(|v| v.path.clone()));
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

    /// The picture `host status` shows.
    async fn status(&self) -> StatusReport {
        let pids = self.live_pids();
        let counts = self.request_counts(&pids, Duration::from_millis(500)).await;
        let reg = self.registry.lock().unwrap();
        let services = self
            .services
            .iter()
            .enumerate()
            .map(|(i, svc)| {
                let mut workers: Vec<WorkerStatus> = reg
                    .workers
                    .iter()
                    .filter(|(_, w)| w.service == i)
                    .map(|(pid, w)| WorkerStatus {
                        slot: w.slot,
                        pid: *pid,
                        state: w.state.as_str().to_string(),
                        version: w.version.short().to_string(),
                        uptime_ms: w.started.elapsed().as_millis() as u64,
                        requests: counts.get(pid).copied(),
                    })
                    .collect();
                workers.sort_by_key(|w| (w.slot, w.uptime_ms));
                ServiceStatus {
                    name: svc.config.name.clone(),
                    listen: svc.listen_addrs(),
                    plugin: svc.config.plugin.clone(),
                    reloadable: svc.config.reloadable,
                    version: svc.current().short().to_string(),
                    previous: svc
                        .previous
                        .lock()
                        .unwrap()
                        .iter()
                        .rev()
                        .map(version_info)
                        .collect(),
                    workers,
                }
            })
            .collect();
        StatusReport {
            master_pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            host_version: env!("CARGO_PKG_VERSION").to_string(),
            services,
        }
    }
}

//! The plugin's own async runtime, and the tasks and signals that belong to its worker.
//!
//! A plugin links its own copy of tokio. That copy has no reactor in the host's process
//! (tokio #1964, #5311), and handing it the host's `Handle` would be unsound (tokio #5974): the
//! two copies' types only look alike. So the plugin runs a runtime of its own, created when the
//! worker starts an async plugin (or on the first [`spawn`] of a sync one): [`spawn`]ed tasks run
//! there, and its threads drive every timer and socket of the plugin. A handler's future is
//! polled on the host's thread, but by the plugin's own code after it entered this runtime's
//! context (`Handle::enter`, the plugin's copy of tokio's thread-local: see `glue::InContext`),
//! so what it creates registers here; the host only polls the FFI-safe future around it.
//!
//! [`spawn`]ed tasks belong to the worker: [`shutdown`] tells them the worker drains, and the
//! worker's stop waits for them (up to the host's deadline) before the runtime is dropped.

use std::{
    future::Future,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use tokio::{runtime::Runtime, sync::watch};
use tokio_util::task::TaskTracker;

/// Threads of the plugin's runtime unless the service config says `runtime_threads = N`.
const DEFAULT_THREADS: usize = 2;

struct Shared {
    runtime: Mutex<Option<Runtime>>,
    handle: tokio::runtime::Handle,
    tasks: TaskTracker,
}

static RUNTIME: OnceLock<Shared> = OnceLock::new();
static THREADS: OnceLock<usize> = OnceLock::new();

/// Fires when the worker starts draining.
fn drain_signal() -> &'static watch::Sender<bool> {
    static DRAIN: OnceLock<watch::Sender<bool>> = OnceLock::new();
    DRAIN.get_or_init(|| watch::channel(false).0)
}

/// Sets the runtime's size before it starts (from the service's `runtime_threads`).
pub(crate) fn set_threads(n: usize) {
    let _ = THREADS.set(n.clamp(1, 64));
}

fn shared() -> &'static Shared {
    RUNTIME.get_or_init(|| {
        let threads = *THREADS.get().unwrap_or(&DEFAULT_THREADS);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("plugin-rt")
            .enable_all()
            .build()
            .expect("could not start the plugin's async runtime");
        Shared {
            handle: runtime.handle().clone(),
            runtime: Mutex::new(Some(runtime)),
            tasks: TaskTracker::new(),
        }
    })
}

/// The plugin's runtime, started on first use.
pub(crate) fn handle() -> &'static tokio::runtime::Handle {
    &shared().handle
}

/// Runs a future to completion on the plugin's runtime, from a thread outside it (the worker's
/// start and stop).
pub(crate) fn block_on<F: Future>(future: F) -> F::Output {
    handle().block_on(future)
}

/// Starts a background task on the plugin's runtime that belongs to this worker: it runs until
/// it finishes, and the worker's stop waits for it (after [`crate::Plugin::on_stop`]), up to
/// the host's deadline, after which it is dropped. A task that loops should end when
/// [`shutdown`] resolves.
///
/// ```no_run
/// use std::time::Duration;
///
/// plugin_api::spawn(async {
///     let mut tick = tokio::time::interval(Duration::from_secs(10));
///     loop {
///         tokio::select! {
///             _ = tick.tick() => plugin_api::info!("still here"),
///             _ = plugin_api::shutdown() => break,
///         }
///     }
/// });
/// ```
pub fn spawn<F>(task: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let shared = shared();
    shared.handle.spawn(shared.tasks.track_future(task))
}

/// Resolves when the worker starts draining (a reload replaces it, or the host stops): stop
/// background loops, end server-sent event streams so clients reconnect to a new worker.
pub async fn shutdown() {
    let mut rx = drain_signal().subscribe();
    let _ = rx.wait_for(|draining| *draining).await;
}

/// Whether the worker is draining (see [`shutdown`]).
pub fn draining() -> bool {
    *drain_signal().borrow()
}

pub(crate) fn start_draining() {
    drain_signal().send_replace(true);
}

/// Whether the runtime was started (a sync plugin may never need it).
pub(crate) fn started() -> bool {
    RUNTIME.get().is_some()
}

/// Waits for the worker's tasks, then drops the runtime (whatever is left is cancelled).
/// `Err` names how many tasks were still running at the deadline.
pub(crate) fn stop(deadline: Duration) -> Result<(), String> {
    let Some(shared) = RUNTIME.get() else {
        return Ok(());
    };
    start_draining();
    shared.tasks.close();
    let waited = shared
        .handle
        .block_on(async { tokio::time::timeout(deadline, shared.tasks.wait()).await });
    let left = shared.tasks.len();
    if let Some(runtime) = shared.runtime.lock().unwrap().take() {
        runtime.shutdown_timeout(Duration::from_millis(100));
    }
    match waited {
        Ok(()) => Ok(()),
        Err(_) => Err(format!(
            "{left} background task(s) were still running {} ms after on_stop; they were \
             cancelled",
            deadline.as_millis()
        )),
    }
}

//! The worker's server: accept on the inherited listeners (at most `max_connections` at a time,
//! failures backed off and logged once a second), hand each connection to `worker::conn`, and
//! drain without resetting a request.
//!
//! Draining, in order:
//! 1. each accept loop takes what is already queued on its listener, then stops and drops the
//!    listener fd; while the master still holds the socket (a reload), connections that arrive
//!    wait in the shared accept queue for another worker; on stop the master has told the
//!    socket to take no new connections, so once the last worker's copy is closed new
//!    connections are refused;
//! 2. every connection finishes what is in flight and closes as `worker::conn` says (HTTP/1.1:
//!    `Connection: close` on the next response, idle ones after `idle_grace`; HTTP/2: GOAWAY);
//! 3. [`serve`] returns when the last connection is gone.

use std::{
    io,
    sync::{
        atomic::{AtomicBool, AtomicU64},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{unix::AsyncFd, Interest},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore},
};
use tracing::Instrument;

use super::{link::Link, plugin::Plugin};
use crate::{balance, protocol::WorkerSpec};

pub type Response = hyper::Response<super::body::Body>;

/// Failed accepts are logged at most this often (with how many there were).
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(1);

/// State every connection of the worker shares.
pub struct Shared {
    pub plugin: Plugin,
    pub spec: WorkerSpec,
    /// Requests counted toward `max_requests`, when it is set (the count of all requests is
    /// `stats`'s, apart per thread: one count every thread adds to is slow).
    pub toward_max_requests: AtomicU64,
    /// Connections open now.
    pub connections: AtomicU64,
    /// One permit per connection the worker may hold (`max_connections`).
    pub connection_slots: Arc<Semaphore>,
    /// Written only through [`Shared::drain`], which keeps `draining_now` equal to it.
    pub draining: watch::Sender<bool>,
    /// `draining`'s value as an atomic, for the request path: the watch's `borrow` takes a
    /// lock that every thread's requests would share (see [`Shared::drain`]).
    pub draining_now: AtomicBool,
    /// Draining idle connections close now, not after the idle grace.
    pub close_idle: watch::Sender<bool>,
    pub started: Instant,
    /// The slow-inline-call warning was logged (see `respond::call_plugin`).
    pub warned_inline: AtomicBool,
    /// The worker asked to be replaced (see `liveness::ask_for_replacement`).
    pub replacement_asked: AtomicBool,
    pub link: Arc<Link>,
    /// The service's TLS (`worker::tls`), when it has a certificate.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Requests by status class and duration, for the master's metrics.
    pub stats: super::stats::Stats,
    pub access_log: Option<super::access_log::AccessLog>,
    /// The worker's seat in the service's accept-balancing table (`crate::balance`).
    pub balance: Option<crate::balance::Place>,
}

impl Shared {
    /// Starts the worker's drain (again is harmless).
    pub fn drain(&self) {
        self.draining_now
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.draining.send_replace(true);
    }

    /// Whether the worker drains, read cheaply.
    pub fn is_draining(&self) -> bool {
        self.draining_now.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Serves until the worker drains and its last connection has closed. `stopped_accepting` fires
/// once every accept loop has ended and closed its listener fd.
pub async fn serve(
    listeners: Vec<TcpListener>,
    shared: Arc<Shared>,
    stopped_accepting: oneshot::Sender<()>,
) {
    // Every connection task holds a clone of `done_tx`; `recv` returns `None` once all are gone.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let mut accept_loops = Vec::new();
    for listener in listeners {
        accept_loops.push(tokio::spawn(
            accept_loop(listener, shared.clone(), done_tx.clone()).in_current_span(),
        ));
    }
    drop(done_tx);
    for task in accept_loops {
        let _ = task.await;
    }
    let _ = stopped_accepting.send(());
    let _ = done_rx.recv().await;
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, done: mpsc::Sender<()>) {
    // Readiness and the accept apart (tokio's listener only offers both at once), so that a
    // worker over its share can leave a connection to the others (`accept`).
    let listener = match listener.into_std().and_then(readiness) {
        Ok(listener) => listener,
        Err(e) => {
            // Not counted as accepting: the other workers would wait for it in vain.
            if let Some(place) = &shared.balance {
                place.stop_accepting();
            }
            return tracing::error!("cannot accept on an inherited listener: {e}");
        }
    };
    let mut draining = shared.draining.subscribe();
    let mut failures = AcceptFailures::default();
    let mut stalls = Stalls::default();
    loop {
        // At max_connections, wait for one to close before accepting: new connections wait in
        // the shared queue, where another worker may take them.
        let permit = tokio::select! {
            permit = shared.connection_slots.clone().acquire_owned() => permit.ok(),
            _ = until_draining(&mut draining) => break,
        };
        tokio::select! {
            accepted = accept(&listener, shared.balance.as_ref(), &mut stalls) => match accepted {
                Ok(stream) => {
                    failures.succeeded();
                    start_connection(stream, &shared, &done, permit);
                }
                // Out of fds, or a connection reset before it was accepted: wait a little,
                // longer while it goes on, and say so once a second, not once per failure.
                Err(e) => tokio::time::sleep(failures.failed(e)).await,
            },
            _ = until_draining(&mut draining) => break,
        }
    }
    if let Some(place) = &shared.balance {
        place.stop_accepting();
    }
    // What is queued already was meant for this worker's accept: serve it rather than leave it
    // to be reset when the last copy of the listener closes. Plain accept(2) calls until the
    // queue is empty: waiting for the reactor to report readiness first could miss
    // connections that arrived since it last looked.
    let listener = std::net::TcpListener::from(listener.into_inner());
    while let Ok((stream, _)) = listener.accept() {
        let stream = stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream));
        if let Ok(stream) = stream {
            start_connection(stream, &shared, &done, None);
        }
    }
}

/// A listener whose readiness can be waited for apart from its accept.
fn readiness(listener: std::net::TcpListener) -> io::Result<AsyncFd<mio::net::TcpListener>> {
    let listener = mio::net::TcpListener::from_std(listener);
    // SAFETY: the mio listener owns its fd, which stays open and the same until the `AsyncFd`
    // gives it back (`into_inner`) or is dropped.
    unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }
        .map_err(io::Error::from)
}

/// The next connection. A worker holding more than its share of the service's connections
/// first leaves it to the others for [`balance::yield_time`] (the connection woke every worker
/// of the service), then looks again (`crate::balance`). A wait in which no other worker
/// accepted anything is a stall: the others are busy, or wedged, or were waiting too (two
/// workers can both think themselves over their share for a moment, each having read the
/// table before the other's last accepts). After [`STALLS`] stalls in a row it stops waiting
/// until another worker accepts again, so that a worker that wrongly thinks itself over its
/// share is slowed by a few waits, not held to one accept per wait.
async fn accept(
    listener: &AsyncFd<mio::net::TcpListener>,
    place: Option<&balance::Place>,
    stalls: &mut Stalls,
) -> io::Result<TcpStream> {
    loop {
        let mut ready = listener.readable().await?;
        // The others' accepts are read only when they matter: most accepts are not over a share.
        if let Some(place) = place.filter(|p| p.over_share()) {
            let others = place.others_accepted();
            if others != stalls.others {
                *stalls = Stalls { others, count: 0 };
            }
            if stalls.count < STALLS {
                tokio::time::sleep(balance::yield_time()).await;
                if place.others_accepted() != others {
                    // Another worker is taking them: look again (the readiness is still set).
                    continue;
                }
                stalls.count += 1;
            }
        }
        // Taken by another worker meanwhile: `try_io` clears the readiness, and this waits again.
        if let Ok(accepted) = ready.try_io(|l| l.get_ref().accept()) {
            return accepted.and_then(|(stream, _)| TcpStream::from_std(stream.into()));
        }
    }
}

/// Waits in a row in which no other worker accepted (see [`accept`]), and the others' count of
/// accepts then.
#[derive(Default)]
struct Stalls {
    others: u32,
    count: u32,
}

/// Stalls in a row after which a worker over its share stops waiting: enough that a machine
/// too busy to run the other worker within a few waits does not end the balancing (3 let one
/// run in 7 of figure 17 end at a 0.78 share), few enough that a wedged worker costs the others
/// a handful of milliseconds once.
const STALLS: u32 = 8;

fn start_connection(
    stream: TcpStream,
    shared: &Arc<Shared>,
    done: &mpsc::Sender<()>,
    permit: Option<OwnedSemaphorePermit>,
) {
    let _ = stream.set_nodelay(true);
    // Not instrumented with the worker span: entering a span on every poll of every connection
    // costs ~1 µs per request; the few lines logged from a connection enter it themselves
    // (`in_worker_span`).
    let open = super::conn::Open::new(shared);
    tokio::spawn(super::conn::connection(stream, open, done.clone(), permit));
}

/// Failed accepts: the backoff, and the once-a-second log line.
#[derive(Default)]
struct AcceptFailures {
    in_a_row: u32,
    since_log: u64,
    last_log: Option<Instant>,
}

impl AcceptFailures {
    fn succeeded(&mut self) {
        self.in_a_row = 0;
    }

    fn failed(&mut self, e: std::io::Error) -> Duration {
        self.in_a_row += 1;
        self.since_log += 1;
        if self
            .last_log
            .is_none_or(|t| t.elapsed() >= ACCEPT_LOG_EVERY)
        {
            tracing::warn!(
                "accept failed {} time(s) since the last report: {e}{}",
                self.since_log,
                if e.raw_os_error() == Some(nix::libc::EMFILE) {
                    " (out of file descriptors: raise the open-file limit, or lower \
                     max_connections)"
                } else {
                    ""
                }
            );
            self.since_log = 0;
            self.last_log = Some(Instant::now());
        }
        Duration::from_millis(10 * 2u64.pow(self.in_a_row.min(7))).min(Duration::from_secs(1))
    }
}

/// Resolves once the worker drains. (Wrapping `wait_for` drops its borrow guard here, which
/// keeps the callers' futures `Send`.)
pub async fn until_draining(draining: &mut watch::Receiver<bool>) {
    let _ = draining.wait_for(|d| *d).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker over its share next to one that never accepts (wedged, or a seat a plugin
    /// wrote): it waits at most `STALLS` times, then accepts without waiting; when the other
    /// accepts again, it waits again.
    #[test]
    fn a_worker_over_its_share_stops_waiting_for_one_that_never_accepts() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let (table, _fd) = balance::Table::create().expect("a table");
            let me = table.sit(1).expect("a seat");
            let wedged = table.sit(2).expect("a seat");
            for _ in 0..5 {
                me.opened();
            }
            let std = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            std.set_nonblocking(true).expect("nonblocking");
            let addr = std.local_addr().expect("addr");
            let listener = readiness(std).expect("registered");
            let _clients: Vec<_> = (0..STALLS + 3)
                .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
                .collect();
            let mut stalls = Stalls::default();
            for n in 1..=STALLS + 2 {
                accept(&listener, Some(&me), &mut stalls)
                    .await
                    .expect("accepted");
                assert_eq!(stalls.count, n.min(STALLS), "after accept {n}");
            }
            wedged.opened();
            accept(&listener, Some(&me), &mut stalls)
                .await
                .expect("accepted");
            assert_eq!(stalls.count, 1, "the other accepted: waiting again");
        });
    }
}

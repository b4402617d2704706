//! The worker's HTTP/1.1 server: accept on the inherited listeners, keep each connection within
//! its limits, hand requests to `worker::respond`, and drain without resetting a request.
//!
//! Limits per connection, enforced by a small supervisor around hyper's connection (hyper's own
//! header timeout also runs between keep-alive requests, so it cannot tell a slow request head
//! from an idle connection): the head of a request must arrive within `header_timeout` of its
//! first byte (or of the accept); an idle keep-alive connection is closed after
//! `keepalive_timeout`; a worker holds at most `max_connections` and stops accepting beyond.
//!
//! Draining, in order:
//! 1. each accept loop takes what is already queued on its listener, then stops and drops the
//!    listener fd; while the master still holds the socket (a reload), connections that arrive
//!    wait in the shared accept queue for another worker; on stop the master has closed its
//!    copy, so once the last worker's is closed new connections are refused;
//! 2. a connection that is busy gets `Connection: close` on its next response, and hyper closes
//!    it after that response: the client knows not to reuse it, nothing is cut;
//! 3. a connection that is idle stays open: its client's next request is answered (with
//!    `Connection: close`), as HAProxy's idle-close-on-response does. Only once it has been idle
//!    for the service's `idle_grace` is it closed. Closing it at once (as hyper's
//!    `graceful_shutdown` alone does) resets a request the client may have just sent on it; a
//!    client that pauses less than `idle_grace` between requests never sees that. The master
//!    may say `CloseIdle` (its slot has newer draining workers): then idle connections close
//!    at once;
//! 4. [`serve`] returns when the last connection is gone.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, HeaderValue};
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore},
};
use tracing::Instrument;

use super::{in_worker_span, link::Link, liveness::ask_for_replacement, plugin::Plugin, respond};
use crate::protocol::{monotonic_ns, WorkerSpec};

pub type Response = hyper::Response<Full<Bytes>>;

/// Failed accepts are logged at most this often (with how many there were).
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(1);

/// State every connection of the worker shares.
pub struct Shared {
    pub plugin: Plugin,
    pub spec: WorkerSpec,
    pub requests: AtomicU64,
    /// Connections open now.
    pub connections: AtomicU64,
    /// One permit per connection the worker may hold (`max_connections`).
    pub connection_slots: Arc<Semaphore>,
    pub draining: watch::Sender<bool>,
    /// Draining idle connections close now, not after the idle grace.
    pub close_idle: watch::Sender<bool>,
    pub started: Instant,
    /// The slow-inline-call warning was logged (see `respond::call_plugin`).
    pub warned_inline: AtomicBool,
    /// The worker asked to be replaced (see `liveness::ask_for_replacement`).
    pub replacement_asked: AtomicBool,
    pub link: Arc<Link>,
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
    let mut draining = shared.draining.subscribe();
    let mut failures = AcceptFailures::default();
    loop {
        // At max_connections, wait for one to close before accepting: new connections wait in
        // the shared queue, where another worker may take them.
        let permit = tokio::select! {
            permit = shared.connection_slots.clone().acquire_owned() => permit.ok(),
            _ = until_draining(&mut draining) => break,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
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
    // What is queued already was meant for this worker's accept: serve it rather than leave it
    // to be reset when the last copy of the listener closes. Plain accept(2) calls until the
    // queue is empty: tokio's accept would wait for the reactor to report readiness first, and
    // could miss connections that arrived since it last looked.
    let Ok(listener) = listener.into_std() else {
        return;
    };
    while let Ok((stream, _)) = listener.accept() {
        let stream = stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream));
        if let Ok(stream) = stream {
            start_connection(stream, &shared, &done, None);
        }
    }
}

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
    tokio::spawn(connection(stream, shared.clone(), done.clone(), permit));
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

/// Per-connection activity, read by the connection's supervisor.
struct ConnState {
    in_flight: AtomicUsize,
    last_active: Mutex<Instant>,
    /// When the first byte of the next request head arrived (monotonic ns; 0: none yet).
    head_started: AtomicU64,
}

impl ConnState {
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(self.last_active.lock().unwrap().elapsed())
    }

    /// How long the current request head has been arriving, if one is.
    fn head_for(&self) -> Option<Duration> {
        match self.head_started.load(Ordering::Relaxed) {
            0 => None,
            t => Some(Duration::from_nanos(monotonic_ns().saturating_sub(t))),
        }
    }
}

/// Marks a request in flight on its connection for as long as it lives.
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn begin(conn: &Arc<ConnState>) -> InFlight {
        conn.in_flight.fetch_add(1, Ordering::SeqCst);
        conn.head_started.store(0, Ordering::Relaxed);
        InFlight(conn.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last_active.lock().unwrap() = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The connection's socket, noting when a new request head starts to arrive.
struct Watched {
    io: TokioIo<TcpStream>,
    state: Arc<ConnState>,
}

impl hyper::rt::Read for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let state = &this.state;
        // Only between requests does a read start a head; reads within a request are its body.
        if state.in_flight.load(Ordering::Relaxed) == 0
            && state.head_started.load(Ordering::Relaxed) == 0
        {
            let polled = Pin::new(&mut this.io).poll_read(cx, buf);
            // A read that returned data (or EOF) while idle: the head's clock starts now.
            if polled.is_ready() {
                state
                    .head_started
                    .store(monotonic_ns().max(1), Ordering::Relaxed);
            }
            return polled;
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<Result<usize, std::io::Error>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<Result<usize, std::io::Error>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// Counts a connection as open while it lives.
struct Open(Arc<Shared>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    stream: TcpStream,
    shared: Arc<Shared>,
    _done: mpsc::Sender<()>,
    _permit: Option<OwnedSemaphorePermit>,
) {
    shared.connections.fetch_add(1, Ordering::Relaxed);
    let _open = Open(shared.clone());
    let state = Arc::new(ConnState {
        in_flight: AtomicUsize::new(0),
        last_active: Mutex::new(Instant::now()),
        // The first request's head is timed from the accept.
        head_started: AtomicU64::new(monotonic_ns().max(1)),
    });
    let service = {
        let (shared, state) = (shared.clone(), state.clone());
        service_fn(move |req| {
            let (shared, state) = (shared.clone(), state.clone());
            async move {
                let _in_flight = InFlight::begin(&state);
                let mut resp = respond::respond(req, &shared).await;
                let served = shared.requests.fetch_add(1, Ordering::Relaxed) + 1;
                if served == shared.spec.max_requests {
                    ask_for_replacement(
                        &shared.link,
                        &shared.replacement_asked,
                        format!("it served {served} requests (max_requests, with its jitter)"),
                    );
                }
                if *shared.draining.borrow() {
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let io = Watched {
        io: TokioIo::new(stream),
        state: state.clone(),
    };
    let conn = http1::Builder::new().serve_connection(io, service);
    tokio::pin!(conn);
    let spec = &shared.spec;
    let header_timeout = Duration::from_millis(spec.header_timeout_ms);
    let keepalive = Duration::from_millis(spec.keepalive_timeout_ms);
    let mut draining = shared.draining.subscribe();
    let mut close_idle = shared.close_idle.subscribe();
    loop {
        let grace = if *close_idle.borrow() {
            Duration::ZERO
        } else if *draining.borrow() {
            Duration::from_millis(spec.idle_grace_ms).min(keepalive)
        } else {
            keepalive
        };
        let wait = if let Some(head) = state.head_for().filter(|_| state.idle_for().is_some()) {
            // A request head is arriving (or is awaited after the accept).
            if head >= header_timeout {
                in_worker_span(|| {
                    tracing::debug!("closing a connection: no request head within header_timeout")
                });
                return;
            }
            // The head may complete and its request end before then: wake in time for the
            // idle grace too.
            (header_timeout - head).min(grace.max(Duration::from_millis(10)))
        } else {
            match state.idle_for() {
                Some(idle) if idle >= grace => {
                    conn.as_mut().graceful_shutdown();
                    break;
                }
                // Idle: wake up before the grace ends, and often enough to notice a request
                // head that started meanwhile and is late (so a slow head is cut within 1.5 x
                // header_timeout without waking this loop on every request).
                Some(idle) => (grace - idle).min(header_timeout / 2),
                // Busy: look again later (its response will carry `Connection: close` if the
                // worker drains meanwhile).
                None => grace.clamp(Duration::from_millis(10), Duration::from_secs(1)),
            }
        };
        tokio::select! {
            res = conn.as_mut() => return log_conn_end(res),
            _ = tokio::time::sleep(wait) => {}
            _ = until_draining(&mut draining), if !*draining.borrow() => {}
            _ = close_idle.wait_for(|c| *c), if !*close_idle.borrow() => {}
        }
    }
    log_conn_end(conn.await)
}

fn log_conn_end(res: Result<(), hyper::Error>) {
    if let Err(e) = res {
        in_worker_span(|| tracing::debug!("connection ended: {e}"));
    }
}

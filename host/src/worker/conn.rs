//! One connection, from the accept to its close: the TLS handshake (`worker::tls`) when the
//! service has a certificate, the choice of HTTP/1.1 or HTTP/2 (ALPN on TLS; the client's
//! preface, "prior knowledge", on plain connections), and a small supervisor around hyper's
//! connection that enforces the limits and the drain.
//!
//! Limits: the head of an HTTP/1.1 request must arrive within `header_timeout` of its first
//! byte (or of the accept); a handshake within `header_timeout` of the accept; an idle
//! connection closes after `keepalive_timeout`. (hyper's own header timeout also runs between
//! keep-alive requests, so it cannot tell a slow head from an idle connection.)
//!
//! Draining (see `worker::http` for the whole drain): an HTTP/1.1 connection that is busy gets
//! `Connection: close` on its next response; an idle one stays open until its next request
//! (answered with `Connection: close`) or until it has been idle for `idle_grace`, or at once
//! after `CloseIdle`. An HTTP/2 connection gets GOAWAY at once: its open streams finish, and the
//! client opens a new connection (to a new worker) for the next ones, without losing any.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use futures_util::task::AtomicWaker;
use hyper::{
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    net::TcpStream,
    sync::{mpsc, OwnedSemaphorePermit},
};

use super::{
    exchange::Exchange,
    http::{until_draining, Shared},
    in_worker_span,
};
use crate::protocol::coarse_ns;

/// The start of the HTTP/2 connection preface; no HTTP/1 request starts so.
const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";

/// Serves one accepted connection until it closes.
pub async fn connection(
    stream: TcpStream,
    open: Open,
    _done: mpsc::Sender<()>,
    _permit: Option<OwnedSemaphorePermit>,
) {
    let shared = open.0.clone();
    let client = stream.peer_addr().ok();
    let header_timeout = Duration::from_millis(shared.spec.header_timeout_ms);
    match &shared.tls {
        Some(acceptor) => {
            let tls = match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return debug(&format!("TLS handshake failed: {e}")),
                Err(_) => return debug("no TLS handshake within header_timeout"),
            };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            supervise(TokioIo::new(tls), h2, client, shared).await
        }
        None => {
            let h2 = match tokio::time::timeout(header_timeout, starts_with_preface(&stream)).await
            {
                Ok(Ok(h2)) => h2,
                Ok(Err(_)) => return,
                Err(_) => return debug("no request within header_timeout"),
            };
            supervise(TokioIo::new(stream), h2, client, shared).await
        }
    }
}

/// Whether a plain connection's first bytes are HTTP/2's preface (h2c by prior knowledge):
/// waits for enough of them without consuming any.
async fn starts_with_preface(stream: &TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; H2_PREFACE_START.len()];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Ok(false);
        }
        if !H2_PREFACE_START.starts_with(&buf[..n]) {
            return Ok(false);
        }
        if n == buf.len() {
            return Ok(true);
        }
        // A prefix of the preface so far: wait for more.
        stream.readable().await?;
    }
}

fn debug(message: &str) {
    in_worker_span(|| tracing::debug!("connection closed: {message}"));
}

/// A hyper connection (HTTP/1.1 or HTTP/2) that can be told to finish gracefully.
trait Graceful: Future<Output = Result<(), hyper::Error>> {
    fn shutdown(self: Pin<&mut Self>);
}

impl<I, S> Graceful for http1::Connection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: hyper::body::Body + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

impl<I, S, E> Graceful for http2::Connection<I, S, E>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: hyper::body::Body + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

/// Serves the connection with the right protocol, under the connection's limits and drain.
async fn supervise<I>(io: I, h2: bool, client: Option<SocketAddr>, shared: Arc<Shared>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let state = Arc::new(ConnState {
        in_flight: AtomicUsize::new(0),
        last_active: AtomicU64::new(coarse_ns()),
        // The first HTTP/1.1 request's head is timed from the accept; HTTP/2 has no heads to
        // time between its streams.
        head_started: AtomicU64::new(if h2 { 0 } else { coarse_ns().max(1) }),
        h2,
        // Formatted once for the connection's requests (the plugin gets it as text).
        client_text: client.map(|c| c.to_string()).unwrap_or_default(),
        shared,
    });
    let service = {
        let state = state.clone();
        service_fn(move |req| Exchange::start(&state, client, req))
    };
    let io = Watched {
        io,
        state: state.clone(),
    };
    if h2 {
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(io, service);
        drive(conn, &state).await
    } else {
        let conn = http1::Builder::new().serve_connection(io, service);
        drive(conn, &state).await
    }
}

/// Polls the connection to its end, and stops it when its limits or the drain say so.
///
/// Why a second task ([`limits`]): polling the limits' timer and watches beside the connection
/// (a `select!`) cost each wake-up of the connection, about one per request, a poll of all four
/// (about 150 ns a request: docs/benchmarks.md). Here a wake-up polls the connection and reads
/// one atomic (and registers the waker when the limits' task took the last one); the limits'
/// task wakes only when its timer or a watch fires. It only says when to look: the verdict is
/// taken again here, in step with hyper's reads and calls, so that a request that arrived since
/// the limits' task looked is never cut by a stale one.
async fn drive<C: Graceful>(conn: C, state: &Arc<ConnState>) {
    tokio::pin!(conn);
    let look = Arc::new(Look::default());
    let _limits = AbortOnDrop(tokio::spawn(limits(state.clone(), look.clone())).abort_handle());
    let mut finishing = false;
    // The waker the limits' task holds, if it still holds one: registering it again on every
    // poll (every request) was two locked instructions for nothing.
    let mut registered: Option<std::task::Waker> = None;
    let ended = std::future::poll_fn(|cx| loop {
        if let Poll::Ready(res) = conn.as_mut().poll(cx) {
            return Poll::Ready(Some(res));
        }
        if finishing {
            return Poll::Pending;
        }
        // Registered before the flag is read: a call to look after the read wakes this.
        if look.taken.load(Ordering::Acquire)
            || registered.as_ref().is_none_or(|w| !w.will_wake(cx.waker()))
        {
            look.taken.store(false, Ordering::Relaxed);
            look.waker.register(cx.waker());
            registered = Some(cx.waker().clone());
        }
        if !look.asked.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        look.asked.store(false, Ordering::Relaxed);
        let shared = &state.shared;
        match verdict(state, shared.is_draining(), *shared.close_idle.borrow()) {
            Verdict::Finish => {
                // Graceful: hyper finishes what is in flight, then the connection ends; it
                // must be polled again to act on it.
                conn.as_mut().shutdown();
                finishing = true;
                look.finishing.store(true, Ordering::Release);
            }
            Verdict::Close => {
                debug("no request head within header_timeout");
                return Poll::Ready(None);
            }
            // Stale: a request came meanwhile. The limits' task looks again; the loop first
            // registers the waker again if the ask took it, or that look would wake nothing.
            Verdict::Wait(_) => continue,
        }
    })
    .await;
    // `None`: closed at once; dropping hyper's connection closes it.
    if let Some(res) = ended {
        log_conn_end(res)
    }
}

/// Between the limits' task and the connection's.
#[derive(Default)]
struct Look {
    /// The limits' task asks the connection's to take the verdict.
    asked: AtomicBool,
    waker: AtomicWaker,
    /// The limits' task took the registered waker (to wake it): the connection's task must
    /// register again. Set after the take and before the wake, so the poll the wake causes
    /// sees it.
    taken: AtomicBool,
    /// The connection finishes: the limits' task has nothing left to do.
    finishing: AtomicBool,
}

impl Look {
    fn ask(&self) {
        self.asked.store(true, Ordering::Release);
        if let Some(waker) = self.waker.take() {
            self.taken.store(true, Ordering::Release);
            waker.wake();
        }
    }
}

/// Aborts the limits' task when the connection ends first.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a connection's limits and the drain say now.
enum Verdict {
    /// Go on, and look again within this long.
    Wait(Duration),
    /// Finish gracefully: HTTP/1.1 closes once idle, HTTP/2 sends GOAWAY.
    Finish,
    /// Close now: a request head overran `header_timeout`.
    Close,
}

fn verdict(state: &ConnState, draining: bool, close_idle: bool) -> Verdict {
    let spec = &state.shared.spec;
    let header_timeout = Duration::from_millis(spec.header_timeout_ms);
    let keepalive = Duration::from_millis(spec.keepalive_timeout_ms);
    // HTTP/2: GOAWAY as soon as the worker drains; open streams finish.
    if state.h2 && draining {
        return Verdict::Finish;
    }
    let grace = if close_idle {
        Duration::ZERO
    } else if draining {
        Duration::from_millis(spec.idle_grace_ms).min(keepalive)
    } else {
        keepalive
    };
    if let Some(head) = state.head_for().filter(|_| state.idle_for().is_some()) {
        // A request head is arriving (or is awaited after the accept).
        if head >= header_timeout {
            return Verdict::Close;
        }
        // The head may complete and its request end before then: wake in time for the idle
        // grace too.
        return Verdict::Wait((header_timeout - head).min(grace.max(Duration::from_millis(10))));
    }
    match state.idle_for() {
        Some(idle) if idle >= grace => Verdict::Finish,
        // Idle: wake up before the grace ends, and often enough to notice a request head that
        // started meanwhile and is late (so a slow head is cut within 1.5 x header_timeout
        // without waking this loop on every request).
        Some(idle) => Verdict::Wait((grace - idle).min(header_timeout / 2)),
        // Busy: look again later (its response will carry `Connection: close` if the worker
        // drains meanwhile).
        None => Verdict::Wait(grace.clamp(Duration::from_millis(10), Duration::from_secs(1))),
    }
}

/// How soon the limits' task looks again after asking the connection's task to take a verdict
/// it did not act on (a request came meanwhile).
const LOOK_AGAIN: Duration = Duration::from_millis(10);

/// The connection's timeouts and drain: wakes when its timer or a watch fires, and when the
/// verdict is to finish or close, asks [`drive`] to take it (again, in step with the
/// connection). Ends once the connection finishes, or is aborted when it ends.
async fn limits(state: Arc<ConnState>, look: Arc<Look>) {
    let mut draining = state.shared.draining.subscribe();
    let mut close_idle = state.shared.close_idle.subscribe();
    loop {
        if look.finishing.load(Ordering::Acquire) {
            return;
        }
        let wait = match verdict(&state, *draining.borrow(), *close_idle.borrow()) {
            Verdict::Wait(wait) => wait,
            Verdict::Finish | Verdict::Close => {
                look.ask();
                LOOK_AGAIN
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = until_draining(&mut draining), if !*draining.borrow() => {}
            _ = close_idle.wait_for(|c| *c), if !*close_idle.borrow() => {}
        }
    }
}

fn log_conn_end(res: Result<(), hyper::Error>) {
    if let Err(e) = res {
        debug(&e.to_string());
    }
}

/// Per-connection activity, read by the connection's limits (and kept by its requests:
/// `worker::exchange`).
pub(super) struct ConnState {
    /// Requests (HTTP/2: streams) in progress.
    pub(super) in_flight: AtomicUsize,
    /// When the last request ended ([`coarse_ns`]).
    pub(super) last_active: AtomicU64,
    /// When the first byte of the next HTTP/1.1 request head arrived ([`coarse_ns`]; 0: none).
    pub(super) head_started: AtomicU64,
    pub(super) h2: bool,
    pub(super) client_text: String,
    pub(super) shared: Arc<Shared>,
}

impl ConnState {
    fn idle_for(&self) -> Option<Duration> {
        // Acquire: pairs with the release of `InFlight`'s drop, which stored the time first.
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = self.last_active.load(Ordering::Relaxed);
        Some(Duration::from_nanos(coarse_ns().saturating_sub(since)))
    }

    /// How long the current request head has been arriving, if one is.
    fn head_for(&self) -> Option<Duration> {
        match self.head_started.load(Ordering::Relaxed) {
            0 => None,
            t => Some(Duration::from_nanos(coarse_ns().saturating_sub(t))),
        }
    }
}

/// The connection's transport, noting when a new HTTP/1.1 request head starts to arrive.
struct Watched<I> {
    io: I,
    state: Arc<ConnState>,
}

impl<I: hyper::rt::Read + Unpin> hyper::rt::Read for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let state = &this.state;
        // Only between requests does a read start a head; reads within a request are its body.
        if !state.h2
            && state.in_flight.load(Ordering::Relaxed) == 0
            && state.head_started.load(Ordering::Relaxed) == 0
        {
            let polled = Pin::new(&mut this.io).poll_read(cx, buf);
            // A read that returned data (or EOF) while idle: the head's clock starts now.
            if polled.is_ready() {
                state
                    .head_started
                    .store(coarse_ns().max(1), Ordering::Relaxed);
            }
            return polled;
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: hyper::rt::Write + Unpin> hyper::rt::Write for Watched<I> {
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

/// Counts a connection as open (in the worker's count and in its accept-balancing seat) from
/// its accept to its close. Counted at the accept, not when the connection's task first runs:
/// a worker accepting a burst must see each connection it took before it decides on the next.
pub struct Open(Arc<Shared>);

impl Open {
    pub fn new(shared: &Arc<Shared>) -> Open {
        shared.connections.fetch_add(1, Ordering::Relaxed);
        if let Some(place) = &shared.balance {
            place.opened();
        }
        Open(shared.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
        if let Some(place) = &self.0.balance {
            place.closed();
        }
    }
}

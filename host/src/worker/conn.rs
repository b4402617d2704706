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
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{header, HeaderValue};
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
    access_log,
    http::{until_draining, Shared},
    in_worker_span,
    liveness::ask_for_replacement,
    respond,
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
    });
    let service = {
        let (shared, state) = (shared.clone(), state.clone());
        service_fn(move |req| {
            let (shared, state) = (shared.clone(), state.clone());
            async move {
                let _in_flight = InFlight::begin(&state);
                let started = Instant::now();
                // What the access log needs, taken before the request is consumed (only when
                // there is one: this is the request path).
                let logged = shared.access_log.as_ref().map(|_| {
                    let header = |name| {
                        req.headers()
                            .get(name)
                            .and_then(|v: &HeaderValue| v.to_str().ok())
                            .map(str::to_string)
                    };
                    (
                        req.method().clone(),
                        req.uri().clone(),
                        req.version(),
                        header(header::REFERER),
                        header(header::USER_AGENT),
                    )
                });
                let mut resp = respond::respond(req, &shared, &state.client_text).await;
                let took = started.elapsed();
                shared.stats.record(resp.status().as_u16(), took);
                if let (Some(log), Some((method, uri, version, referer, agent))) =
                    (&shared.access_log, &logged)
                {
                    log.log(&access_log::Request {
                        client,
                        method: method.as_str(),
                        target: uri.path_and_query().map_or(uri.path(), |p| p.as_str()),
                        version: *version,
                        status: resp.status().as_u16(),
                        bytes: hyper::body::Body::size_hint(resp.body())
                            .exact()
                            .unwrap_or(0),
                        took,
                        referer: referer.as_deref(),
                        user_agent: agent.as_deref(),
                        plugin_version: &shared.spec.plugin_version,
                    });
                }
                let served = shared.requests.fetch_add(1, Ordering::Relaxed) + 1;
                if served == shared.spec.max_requests {
                    ask_for_replacement(
                        &shared.link,
                        &shared.replacement_asked,
                        format!("it served {served} requests (max_requests, with its jitter)"),
                    );
                }
                // HTTP/2 has no Connection header: a draining worker sends GOAWAY instead.
                if !state.h2 && *shared.draining.borrow() {
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let io = Watched {
        io,
        state: state.clone(),
    };
    if h2 {
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(io, service);
        drive(conn, &state, &shared).await
    } else {
        let conn = http1::Builder::new().serve_connection(io, service);
        drive(conn, &state, &shared).await
    }
}

/// Polls the connection to its end while applying the timeouts and the drain.
async fn drive<C: Graceful>(conn: C, state: &ConnState, shared: &Shared) {
    tokio::pin!(conn);
    let spec = &shared.spec;
    let header_timeout = Duration::from_millis(spec.header_timeout_ms);
    let keepalive = Duration::from_millis(spec.keepalive_timeout_ms);
    let mut draining = shared.draining.subscribe();
    let mut close_idle = shared.close_idle.subscribe();
    loop {
        // HTTP/2: GOAWAY as soon as the worker drains; open streams finish.
        if state.h2 && *draining.borrow() {
            conn.as_mut().shutdown();
            break;
        }
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
                return debug("no request head within header_timeout");
            }
            // The head may complete and its request end before then: wake in time for the
            // idle grace too.
            (header_timeout - head).min(grace.max(Duration::from_millis(10)))
        } else {
            match state.idle_for() {
                Some(idle) if idle >= grace => {
                    conn.as_mut().shutdown();
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
        debug(&e.to_string());
    }
}

/// Per-connection activity, read by the connection's supervisor.
struct ConnState {
    /// Requests (HTTP/2: streams) in progress.
    in_flight: AtomicUsize,
    /// When the last request ended ([`coarse_ns`]).
    last_active: AtomicU64,
    /// When the first byte of the next HTTP/1.1 request head arrived ([`coarse_ns`]; 0: none).
    head_started: AtomicU64,
    h2: bool,
    client_text: String,
}

impl ConnState {
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let since = self.last_active.load(Ordering::SeqCst);
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
        self.0.last_active.store(coarse_ns(), Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
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

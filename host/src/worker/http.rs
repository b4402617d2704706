//! The worker's HTTP/1.1 server: accept on the inherited listeners, call the plugin on the
//! blocking pool, and drain without resetting a request.
//!
//! Draining, in order:
//! 1. the accept loops stop and drop their listener fds; the master still holds the sockets, so
//!    connections that arrive now wait in the shared accept queue for another worker;
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
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use plugin_api::ffi::{FfiHeader, FfiRequest, FfiResponse};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, watch},
};
use tracing::Instrument;

use super::{
    in_worker_span,
    link::Link,
    liveness::{ask_for_replacement, INLINE_CALLS},
    plugin::Plugin,
};
use crate::protocol::WorkerSpec;

type Response = hyper::Response<Full<Bytes>>;

/// How long a client may take to send a request's headers (slowloris protection).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// State every connection of the worker shares.
pub struct Shared {
    pub plugin: Plugin,
    pub spec: WorkerSpec,
    pub requests: AtomicU64,
    /// Connections open now.
    pub connections: AtomicU64,
    pub draining: watch::Sender<bool>,
    /// Draining idle connections close now, not after the idle grace.
    pub close_idle: watch::Sender<bool>,
    pub started: Instant,
    /// The slow-inline-call warning was logged (see `call_plugin`).
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
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    // Not instrumented with the worker span: entering a span on every poll of
                    // every connection costs ~1 µs per request; the few lines logged from a
                    // connection enter it themselves (`in_worker_span`).
                    tokio::spawn(connection(stream, shared.clone(), done.clone()));
                }
                // Out of fds or a connection reset before accept: log, pause, go on.
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = until_draining(&mut draining) => return,
        }
    }
}

/// Resolves once the worker drains. (Wrapping `wait_for` drops its borrow guard here, which
/// keeps the callers' futures `Send`.)
pub async fn until_draining(draining: &mut watch::Receiver<bool>) {
    let _ = draining.wait_for(|d| *d).await;
}

/// Per-connection activity, read by the drain logic.
struct ConnState {
    in_flight: AtomicUsize,
    last_active: Mutex<Instant>,
}

impl ConnState {
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(self.last_active.lock().unwrap().elapsed())
    }
}

/// Marks a request in flight on its connection for as long as it lives.
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn begin(conn: &Arc<ConnState>) -> InFlight {
        conn.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(conn.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last_active.lock().unwrap() = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a connection as open while it lives.
struct Open(Arc<Shared>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(stream: TcpStream, shared: Arc<Shared>, _done: mpsc::Sender<()>) {
    shared.connections.fetch_add(1, Ordering::Relaxed);
    let _open = Open(shared.clone());
    let state = Arc::new(ConnState {
        in_flight: AtomicUsize::new(0),
        last_active: Mutex::new(Instant::now()),
    });
    let service = {
        let (shared, state) = (shared.clone(), state.clone());
        service_fn(move |req| {
            let (shared, state) = (shared.clone(), state.clone());
            async move {
                let _in_flight = InFlight::begin(&state);
                let mut resp = respond(req, &shared).await;
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
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut draining = shared.draining.subscribe();
    tokio::select! {
        res = conn.as_mut() => return log_conn_end(res),
        _ = until_draining(&mut draining) => {}
    }
    let mut close_idle = shared.close_idle.subscribe();
    loop {
        let grace = if *close_idle.borrow() {
            Duration::ZERO
        } else {
            Duration::from_millis(shared.spec.idle_grace_ms)
        };
        let wait = match state.idle_for() {
            Some(idle) if idle >= grace => {
                conn.as_mut().graceful_shutdown();
                break;
            }
            Some(idle) => grace - idle,
            // Busy: its response will carry `Connection: close`; look again soon.
            None => grace.clamp(Duration::from_millis(10), Duration::from_millis(500)),
        };
        tokio::select! {
            res = conn.as_mut() => return log_conn_end(res),
            _ = tokio::time::sleep(wait) => {}
            _ = close_idle.wait_for(|c| *c) => {}
        }
    }
    log_conn_end(conn.await)
}

fn log_conn_end(res: Result<(), hyper::Error>) {
    if let Err(e) = res {
        in_worker_span(|| tracing::debug!("connection ended: {e}"));
    }
}

async fn respond(req: hyper::Request<Incoming>, shared: &Shared) -> Response {
    if let Some(path) = req.uri().path().strip_prefix("/__host/") {
        return builtin(path, req.method(), shared);
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, shared.spec.max_body_bytes)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "request body is larger than this service's limit of {} bytes\n",
                    shared.spec.max_body_bytes
                ),
            )
        }
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("could not read the request body: {e}\n"),
            )
        }
    };
    let request = FfiRequest {
        method: parts.method.as_str().into(),
        path: parts.uri.path().into(),
        query: parts.uri.query().unwrap_or("").into(),
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| FfiHeader {
                name: name.as_str().into(),
                value: value.as_bytes().into(),
            })
            .collect(),
        body: body.to_vec().into(),
    };
    let result = call_plugin(shared, request, &parts).await;
    let failure = match result {
        Ok(response) => match into_hyper(response) {
            Ok(response) => return response,
            Err(e) => format!("the plugin returned an invalid response: {e}"),
        },
        Err(e) if e == TIMED_OUT => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the handler did not answer in time (handler_timeout)\n",
            )
        }
        Err(e) => e,
    };
    in_worker_span(|| tracing::error!("{} {} -> 500: {failure}", parts.method, parts.uri.path()));
    text(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the plugin failed on this request; the host's log has the details\n",
    )
}

/// What `call_plugin` returns when the handler overran `handler_timeout` (the client gets 503).
const TIMED_OUT: &str = "handler timed out";

/// An inline call that takes longer than this is reported: the plugin said it never blocks.
const INLINE_CALL_WARNING: Duration = Duration::from_millis(100);

/// Calls the handler where the plugin says it belongs. A handler that may block runs on the
/// blocking pool, so the worker's other connections keep being served; one that never blocks
/// runs right here, on the async thread, which saves the handoff to the pool and back (about
/// two thirds of the host's CPU time per request for a small handler: docs/benchmarks.md).
async fn call_plugin(
    shared: &Shared,
    request: FfiRequest,
    parts: &http::request::Parts,
) -> Result<FfiResponse, String> {
    let plugin = shared.plugin;
    if plugin.blocking() {
        let timeout = Duration::from_millis(shared.spec.handler_timeout_ms);
        let call = tokio::task::spawn_blocking(move || in_worker_span(|| plugin.handle(&request)));
        return match tokio::time::timeout(timeout, call).await {
            Ok(joined) => {
                joined.unwrap_or_else(|join| Err(format!("the handler thread failed: {join}")))
            }
            Err(_) => {
                // The thread is lost for good (a thread cannot be cancelled): answer the client,
                // and have this worker replaced before it runs out of threads.
                in_worker_span(|| {
                    ask_for_replacement(
                        &shared.link,
                        &shared.replacement_asked,
                        format!(
                            "a handler call for {} {} has run longer than handler_timeout ({}): \
                             its thread is lost",
                            parts.method,
                            parts.uri.path(),
                            humantime::format_duration(timeout)
                        ),
                    )
                });
                Err(TIMED_OUT.to_string())
            }
        };
    }
    let started = Instant::now();
    let result = {
        let _call = INLINE_CALLS.begin();
        plugin.handle(&request)
    };
    let took = started.elapsed();
    if took > INLINE_CALL_WARNING && !shared.warned_inline.swap(true, Ordering::Relaxed) {
        in_worker_span(|| {
            tracing::warn!(
            "{} {} took {} ms in plugin {}, which declares BLOCKING = false, so it held one of \
             the worker's async threads (and other requests) for that long. If its handler can \
             block, remove `const BLOCKING: bool = false` from the plugin. (Said once per worker.)",
            parts.method,
            parts.uri.path(),
            took.as_millis(),
            plugin.name()
        )
        });
    }
    result
}

fn into_hyper(ffi: FfiResponse) -> Result<Response, String> {
    let status = StatusCode::from_u16(ffi.status)
        .map_err(|_| format!("status {} is not an HTTP status", ffi.status))?;
    let mut response = hyper::Response::new(Full::new(Bytes::from(ffi.body.into_vec())));
    *response.status_mut() = status;
    for h in ffi.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| format!("header name {:?} is not valid", h.name.as_str()))?;
        let value = HeaderValue::from_bytes(&h.value)
            .map_err(|_| format!("the value of header {name} is not valid"))?;
        response.headers_mut().append(name, value);
    }
    Ok(response)
}

/// Routes the host answers from its own code, whatever the plugin. `/__host/info` comes from the
/// host binary alone and stays the same across reloads (Workerman's start script);
/// `/__host/worker` describes the worker process that answered, which a reload replaces.
fn builtin(path: &str, method: &Method, shared: &Shared) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "host routes answer GET only\n",
        );
    }
    let body = match path {
        "info" => serde_json::json!({
            "host_version": env!("CARGO_PKG_VERSION"),
            "plugin_api_version": plugin_api::API_VERSION,
            "master_pid": shared.spec.master_pid,
            "service": shared.spec.service,
        }),
        "worker" => serde_json::json!({
            "pid": std::process::id(),
            "slot": shared.spec.slot,
            "plugin": shared.plugin.name(),
            "plugin_crate_version": shared.plugin.crate_version(),
            "plugin_version": shared.spec.plugin_version,
            "blocking_handlers": shared.plugin.blocking(),
            "uptime_ms": shared.started.elapsed().as_millis() as u64,
            "requests": shared.requests.load(Ordering::Relaxed),
        }),
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "host routes: /__host/info, /__host/worker\n",
            )
        }
    };
    let mut response = hyper::Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    let mut response = hyper::Response::new(Full::new(Bytes::from(body.into())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

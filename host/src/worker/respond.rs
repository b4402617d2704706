//! One request's response: the host's own routes, reading the body within its limits, calling
//! the plugin where it belongs (inline, on the blocking pool, or polling an async handler, under
//! `handler_timeout`), and turning its answer into a response. The common request, a handler
//! called inline, or an async handler that answers in its first poll, on a request without a
//! body, is answered at once ([`now`], no future of the host's); an async handler that has not
//! answered by then is waited for ([`waiting`]); any other request is answered [`later`].
//! (`worker::exchange` does the accounting around all three.)
//!
//! Limits, each with its status: a body declared (Content-Length) or found larger than
//! `max_body_bytes` is a 413, before any of it is read when it is declared (so a client that
//! sent `Expect: 100-continue` is told at once, without a 100; any other client's body is read
//! and dropped meanwhile, so that it reads the 413 rather than a reset); a body that stalls longer than
//! `body_timeout` between two parts is a 408; a handler that overruns `handler_timeout` is a 503.

use std::{
    future::Future,
    pin::Pin,
    sync::atomic::Ordering,
    task::{Context, Poll},
    time::Duration,
};

use abi_stable::std_types::{RResult, RStr, RString};
use bytes::{Bytes, BytesMut};
use futures_util::task::noop_waker_ref;
use http::{header, HeaderName, HeaderValue, Method, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use plugin_api::ffi::{FfiBody, FfiHeaderRef, FfiRequestRef, FfiResponse};

use super::{
    body::{self, Body},
    http::{Response, Shared},
    in_worker_span,
    liveness::{ask_for_replacement, INLINE_CALLS},
    plugin::{AsyncCallFuture, Calls},
    request_id::{self, RequestId},
};

/// What a call returns when the handler overran `handler_timeout` (the client gets 503).
const TIMED_OUT: &str = "handler timed out";

/// An inline call that takes longer than this is reported: the plugin said it never blocks.
const INLINE_CALL_WARNING: Duration = Duration::from_millis(100);

/// A refused body is read and dropped up to this many bytes (see `discard`); past it the
/// connection closes, as a client that keeps sending after a 413 deserves.
const DISCARD_MAX: u64 = 64 * 1024 * 1024;

/// How [`now`] left a request.
pub enum Now {
    /// Answered.
    Done(Response),
    /// An async handler that did not answer in its first poll: [`waiting`] waits for it.
    Waiting(AsyncCall),
    /// Not started: [`later`] answers it.
    Later,
}

/// An async handler's call under way, the id its request was given, and how long its first
/// poll took (of its `handler_timeout`).
pub struct AsyncCall {
    call: AsyncCallFuture,
    id: RequestId,
    spent: Duration,
}

/// The response to `req` at once, for the common request without a body: a handler called
/// inline, an async handler that answers in its first poll, or a host route (see [`Now`]).
/// Borrows the request: moving it in and back out cost more than the call (it is 264 bytes).
pub fn now(req: &hyper::Request<Incoming>, shared: &Shared, client: &str) -> Now {
    if shared.spec.host_routes {
        if let Some(path) = req.uri().path().strip_prefix("/__host/") {
            return Now::Done(builtin(path, req.method(), shared));
        }
    }
    let calls = shared.plugin.calls();
    if calls == Calls::Blocking || !req.body().is_end_stream() {
        return Now::Later;
    }
    let id = RequestId::of(req.headers());
    let head = Head::of(req, client, shared, &id);
    let body = FfiBody::full(Default::default());
    if calls == Calls::Inline {
        let result = call_inline(shared, &head, body);
        return Now::Done(answer(result, &head));
    }
    let mut call = start_async(shared, &head, body);
    // Polled once here, where hyper asks for the response and no task context is at hand, so
    // with a waker that does nothing: most handlers answer in their first poll, and then the
    // request needs no future of the host's, no timer and no second trip through hyper. One
    // that is not done is polled again by `waiting` with its task's waker, and a future
    // registers the waker of its latest poll, so no wake-up is lost. That second poll, at
    // once, is what a handler that waits pays for this (and a clone of the new waker).
    // Timed as `poll_async` times every poll.
    let poll = INLINE_CALLS.begin();
    match Pin::new(&mut call).poll(&mut Context::from_waker(noop_waker_ref())) {
        Poll::Ready(result) => Now::Done(answer(outcome(result), &head)),
        Poll::Pending => Now::Waiting(AsyncCall {
            call,
            id,
            spent: poll.took(),
        }),
    }
}

/// The response to a request whose async handler [`now`] started, once the handler answers
/// (within `handler_timeout`).
pub async fn waiting(
    call: AsyncCall,
    req: hyper::Request<Incoming>,
    shared: &Shared,
    client: &str,
) -> Response {
    let head = Head::of(&req, client, shared, &call.id);
    let result = wait_async(shared, &head, call.call, call.spent).await;
    answer(result, &head)
}

/// The response to a request [`now`] gave back: once its body is read, or its handler (on the
/// blocking pool, or async) has answered.
pub async fn later(req: hyper::Request<Incoming>, shared: &Shared, client: &str) -> Response {
    let calls = shared.plugin.calls();
    let (parts, incoming) = req.into_parts();
    let id = RequestId::of(&parts.headers);
    let body = match calls {
        Calls::Async => stream_body(&parts, incoming, shared),
        Calls::Blocking | Calls::Inline => read_body(&parts, incoming, shared)
            .await
            .map(|bytes| FfiBody::full(bytes.to_vec().into())),
    };
    let body = match body {
        Ok(body) => body,
        Err(response) => return response,
    };
    let head = Head::of_parts(&parts, client, shared, &id);
    let result = call_plugin(shared, calls, &head, body).await;
    answer(result, &head)
}

/// The client's response to the handler's answer: its own, or a 503 (`handler_timeout`), or a
/// 500 with the reason in the log.
fn answer(result: Result<FfiResponse, String>, head: &Head<'_>) -> Response {
    let failure = match result {
        Ok(response) => match into_hyper(response, head.id) {
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
    in_worker_span(|| {
        tracing::error!(
            request_id = head.id.as_str(),
            "{} {} -> 500: {failure}",
            head.method,
            head.uri.path()
        )
    });
    text(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the plugin failed on this request; the host's log has the details\n",
    )
}

/// What the plugin is told about a request, borrowed from hyper's request (whole, or its
/// parts) and the connection.
struct Head<'a> {
    method: &'a Method,
    uri: &'a http::Uri,
    version: Version,
    headers: &'a http::HeaderMap,
    client: &'a str,
    tls: bool,
    id: &'a RequestId,
}

impl<'a> Head<'a> {
    /// The head of a request kept whole.
    fn of(
        req: &'a hyper::Request<Incoming>,
        client: &'a str,
        shared: &Shared,
        id: &'a RequestId,
    ) -> Head<'a> {
        Head {
            method: req.method(),
            uri: req.uri(),
            version: req.version(),
            headers: req.headers(),
            client,
            tls: shared.tls.is_some(),
            id,
        }
    }

    /// The head of a request taken apart (its body read on its own).
    fn of_parts(
        parts: &'a http::request::Parts,
        client: &'a str,
        shared: &Shared,
        id: &'a RequestId,
    ) -> Head<'a> {
        Head {
            method: &parts.method,
            uri: &parts.uri,
            version: parts.version,
            headers: &parts.headers,
            client,
            tls: shared.tls.is_some(),
            id,
        }
    }

    /// Calls `f` with the request's head as the plugin gets it: borrowed, not copied (the
    /// plugin copies what it keeps), the header list on the stack unless it is long.
    ///
    /// An HTTP/2 request carries its host in the `:authority` pseudo-header (in the URI here),
    /// not in a `Host` header: the plugin gets it as `host` all the same, so that a handler
    /// reads the host one way whatever the protocol.
    fn with_ffi<R>(&self, f: impl FnOnce(&FfiRequestRef<'_>) -> R) -> R {
        let mut headers: smallvec::SmallVec<[FfiHeaderRef<'_>; 16]> = self
            .headers
            .iter()
            .map(|(name, value)| FfiHeaderRef {
                name: RStr::from_str(name.as_str()),
                value: value.as_bytes().into(),
            })
            .collect();
        if let Some(authority) = self.uri.authority() {
            if !self.headers.contains_key(header::HOST) {
                headers.push(FfiHeaderRef {
                    name: RStr::from_str("host"),
                    value: authority.as_str().as_bytes().into(),
                });
            }
        }
        f(&FfiRequestRef {
            method: RStr::from_str(self.method.as_str()),
            path: RStr::from_str(self.uri.path()),
            query: RStr::from_str(self.uri.query().unwrap_or("")),
            headers: headers.as_slice().into(),
            client_addr: RStr::from_str(self.client),
            tls: self.tls,
            http_version: RStr::from_str(version_text(self.version)),
            request_id: RStr::from_str(self.id.as_str()),
        })
    }
}

fn version_text(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// An async plugin reads the body as it arrives: a body that is already complete goes whole,
/// any other is pumped to the plugin (see `worker::body`), within `max_stream_bytes`.
// The error is the response to send (as `read_body`'s is); it is made at most once a request.
#[allow(clippy::result_large_err)]
fn stream_body(
    parts: &http::request::Parts,
    incoming: Incoming,
    shared: &Shared,
) -> Result<FfiBody, Response> {
    let limit = shared.spec.max_stream_bytes;
    if declared_length(parts).is_some_and(|n| n > limit) {
        discard(parts, incoming, shared);
        return Err(text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body is larger than this service's max_stream_bytes ({limit} bytes)\n"
            ),
        ));
    }
    if incoming.is_end_stream() {
        return Ok(FfiBody::full(Default::default()));
    }
    let stall = Duration::from_millis(shared.spec.body_timeout_ms);
    Ok(FfiBody {
        bytes: Default::default(),
        rest: abi_stable::std_types::RSome(body::pump(incoming, limit, stall)),
    })
}

/// After a 413 sent before the whole body was read: read and drop what the client still sends
/// (up to `DISCARD_MAX`, each part within `body_timeout`), so that it reads the answer. Closing
/// the connection with its bytes unread would make the kernel reset it, and a reset can destroy
/// the answer before the client reads it (nginx discards such bodies for the same reason). Not
/// when the client waits for `100 Continue`: it sends no body then, and reading would ask for it.
fn discard(parts: &http::request::Parts, mut body: Incoming, shared: &Shared) {
    if parts.headers.contains_key(header::EXPECT) || body.is_end_stream() {
        return;
    }
    let stall = Duration::from_millis(shared.spec.body_timeout_ms);
    tokio::spawn(async move {
        let mut left = DISCARD_MAX;
        while let Ok(Some(Ok(frame))) = tokio::time::timeout(stall, body.frame()).await {
            let n = frame.data_ref().map_or(0, |d| d.len() as u64);
            if n >= left {
                break;
            }
            left -= n;
        }
    });
}

fn declared_length(parts: &http::request::Parts) -> Option<u64> {
    parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// The whole request body, within `max_body_bytes` and `body_timeout` (see the module comment).
async fn read_body(
    parts: &http::request::Parts,
    mut body: Incoming,
    shared: &Shared,
) -> Result<Bytes, Response> {
    let limit = shared.spec.max_body_bytes;
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than this service's limit of {limit} bytes\n"),
        )
    };
    let declared = declared_length(parts);
    if declared.is_some_and(|n| n > limit as u64) {
        discard(parts, body, shared);
        return Err(too_large());
    }
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    let stall = Duration::from_millis(shared.spec.body_timeout_ms);
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0) as usize);
    loop {
        match tokio::time::timeout(stall, body.frame()).await {
            Err(_) => {
                return Err(text(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body stalled for longer than {} (body_timeout)\n",
                        humantime::format_duration(stall)
                    ),
                ))
            }
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(e))) => {
                return Err(text(
                    StatusCode::BAD_REQUEST,
                    format!("could not read the request body: {e}\n"),
                ))
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > limit {
                        discard(parts, body, shared);
                        return Err(too_large());
                    }
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
}

/// Calls the handler where the plugin says it belongs. A sync handler that may block runs on
/// the blocking pool, so the worker's other connections keep being served; one that never
/// blocks runs right here, on the async thread, which saves the handoff to the pool and back
/// (about two thirds of the host's CPU time per request for a small handler:
/// docs/benchmarks.md). An async handler is polled here too, through its FFI-safe future (in
/// the plugin runtime's context, which drives its timers and sockets), under `handler_timeout`:
/// past it the client gets a 503 and dropping the future cancels the handler (no thread is
/// lost, so the worker is not replaced for it), unless a poll itself blocks (see below).
async fn call_plugin(
    shared: &Shared,
    calls: Calls,
    head: &Head<'_>,
    body: FfiBody,
) -> Result<FfiResponse, String> {
    let (method, path, id) = (head.method, head.uri.path(), head.id.as_str());
    let plugin = shared.plugin;
    let timeout = Duration::from_millis(shared.spec.handler_timeout_ms);
    match calls {
        Calls::Async => {
            let call = start_async(shared, head, body);
            wait_async(shared, head, call, Duration::ZERO).await
        }
        Calls::Blocking => {
            // The pool's thread outlives the borrows: the head goes to it copied.
            let request = head.with_ffi(|request| request.to_owned_request());
            let call = tokio::task::spawn_blocking(move || {
                in_worker_span(|| plugin.handle_owned(&request, body))
            });
            match tokio::time::timeout(timeout, call).await {
                Ok(joined) => {
                    joined.unwrap_or_else(|join| Err(format!("the handler thread failed: {join}")))
                }
                Err(_) => {
                    // The thread is lost for good (a thread cannot be cancelled): answer the
                    // client, and have this worker replaced before it runs out of threads.
                    in_worker_span(|| {
                        ask_for_replacement(
                            &shared.link,
                            &shared.replacement_asked,
                            format!(
                                "a handler call for {} {} (request {id}) has run longer than \
                                 handler_timeout ({}): its thread is lost",
                                method,
                                path,
                                humantime::format_duration(timeout)
                            ),
                        )
                    });
                    Err(TIMED_OUT.to_string())
                }
            }
        }
        Calls::Inline => call_inline(shared, head, body),
    }
}

/// Starts an async handler's call. The plugin copies the head before this returns; the future
/// borrows none of it.
fn start_async(shared: &Shared, head: &Head<'_>, body: FfiBody) -> AsyncCallFuture {
    head.with_ffi(|request| shared.plugin.handle_async(request, body))
}

/// One poll of an async handler's call. The plugin polls its handler's future in it
/// (plugin-api's glue), on this thread: a poll that blocks is an inline call that never ends,
/// and the heartbeat reports it as one.
fn poll_async(
    call: &mut AsyncCallFuture,
    cx: &mut Context<'_>,
) -> Poll<RResult<FfiResponse, RString>> {
    let _call = INLINE_CALLS.begin();
    Pin::new(call).poll(cx)
}

/// An async handler's answer, or a 503's error once it has run past `handler_timeout` (`spent`
/// of which went before this; dropping the call cancels the handler).
async fn wait_async(
    shared: &Shared,
    head: &Head<'_>,
    mut call: AsyncCallFuture,
    spent: Duration,
) -> Result<FfiResponse, String> {
    let timeout = Duration::from_millis(shared.spec.handler_timeout_ms);
    let call = std::future::poll_fn(move |cx| poll_async(&mut call, cx));
    match tokio::time::timeout(timeout.saturating_sub(spent), call).await {
        Ok(result) => outcome(result),
        Err(_) => {
            in_worker_span(|| {
                tracing::warn!(
                    request_id = head.id.as_str(),
                    "{} {}: the async handler has run longer than handler_timeout ({}); it \
                     was cancelled and the client got a 503",
                    head.method,
                    head.uri.path(),
                    humantime::format_duration(timeout)
                )
            });
            Err(TIMED_OUT.to_string())
        }
    }
}

/// An async handler's result as the sync ones' are.
fn outcome(result: RResult<FfiResponse, RString>) -> Result<FfiResponse, String> {
    result.into_result().map_err(String::from)
}

/// Calls a handler that never blocks right here, on the async thread, and says so (once per
/// worker) if it took long.
fn call_inline(shared: &Shared, head: &Head<'_>, body: FfiBody) -> Result<FfiResponse, String> {
    let plugin = shared.plugin;
    let (result, took) = {
        let call = INLINE_CALLS.begin();
        let result = head.with_ffi(|request| plugin.handle(request, body));
        (result, call.took())
    };
    if took > INLINE_CALL_WARNING && !shared.warned_inline.swap(true, Ordering::Relaxed) {
        in_worker_span(|| {
            tracing::warn!(
                request_id = head.id.as_str(),
                "{} {} took {} ms in plugin {}, which declares BLOCKING = false, so it \
                 held one of the worker's async threads (and other requests) for that \
                 long. If its handler can block, remove `const BLOCKING: bool = false` \
                 from the plugin, or make it an AsyncPlugin. (Said once per worker.)",
                head.method,
                head.uri.path(),
                took.as_millis(),
                plugin.name()
            )
        });
    }
    result
}

fn into_hyper(ffi: FfiResponse, id: &RequestId) -> Result<Response, String> {
    let status = StatusCode::from_u16(ffi.status)
        .map_err(|_| format!("status {} is not an HTTP status", ffi.status))?;
    let body = match ffi.body.rest.into_option() {
        None if ffi.body.bytes.is_empty() => Body::full(Bytes::new()),
        // Owned as it came: `into_vec` would copy it (the plugin's allocation is not the host's).
        None => Body::full(Bytes::from_owner(ffi.body.bytes)),
        // What the plugin put before its stream is dropped: `Response::stream` never sets it.
        Some(stream) => Body::stream(stream),
    };
    let mut response = hyper::Response::new(body);
    *response.status_mut() = status;
    for h in ffi.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| format!("header name {:?} is not valid", h.name.as_str()))?;
        let value = match common_value(&h.value) {
            Some(value) => value,
            None => HeaderValue::from_bytes(&h.value)
                .map_err(|_| format!("the value of header {name} is not valid"))?,
        };
        response.headers_mut().append(name, value);
    }
    if let Some(id) = id.header_value() {
        response
            .headers_mut()
            .insert(request_id::HEADER.clone(), id);
    }
    Ok(response)
}

/// A header value plugins send on most responses (`Response::text`, `Response::json`), as a
/// static value: a value made from bytes is a copy on the heap, one allocation and free a
/// response.
fn common_value(value: &[u8]) -> Option<HeaderValue> {
    const COMMON: [&str; 3] = [
        "text/plain; charset=utf-8",
        "application/json",
        "text/html; charset=utf-8",
    ];
    COMMON
        .into_iter()
        .find(|c| c.as_bytes() == value)
        .map(HeaderValue::from_static)
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
            "blocking_handlers": shared.plugin.calls() == Calls::Blocking,
            "handler_calls": format!("{:?}", shared.plugin.calls()).to_lowercase(),
            "plugin_api": shared.plugin.api(),
            "uptime_ms": shared.started.elapsed().as_millis() as u64,
            "requests": shared.stats.requests(),
        }),
        // A load balancer's health check on the service's own port: this worker serves, or
        // (503) it is draining and the balancer should send the next request elsewhere.
        "readyz" if shared.is_draining() => {
            return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
        "readyz" => return text(StatusCode::OK, "ready\n"),
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "host routes: /__host/info, /__host/worker, /__host/readyz\n",
            )
        }
    };
    let mut response = hyper::Response::new(Body::full(body.to_string() + "\n"));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

pub fn text(status: StatusCode, body: impl Into<String>) -> Response {
    let mut response = hyper::Response::new(Body::full(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

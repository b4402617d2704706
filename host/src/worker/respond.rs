//! One request, start to finish: the host's own routes, reading the body within its limits,
//! calling the plugin where it belongs (inline, or on the blocking pool under
//! `handler_timeout`), and turning its answer into a response.
//!
//! Limits, each with its status: a body declared (Content-Length) or found larger than
//! `max_body_bytes` is a 413, before any of it is read when it is declared (so a client that
//! sent `Expect: 100-continue` is told at once, without a 100; any other client's body is read
//! and dropped meanwhile, so that it reads the 413 rather than a reset); a body that stalls longer than
//! `body_timeout` between two parts is a 408; a handler that overruns `handler_timeout` is a 503.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use abi_stable::std_types::RStr;
use bytes::{Bytes, BytesMut};
use http::{header, HeaderName, HeaderValue, Method, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use plugin_api::ffi::{FfiBody, FfiHeaderRef, FfiRequestRef, FfiResponse};

use super::{
    body::{self, Body},
    http::{Response, Shared},
    in_worker_span,
    liveness::{ask_for_replacement, INLINE_CALLS},
    plugin::Calls,
};

/// What `call_plugin` returns when the handler overran `handler_timeout` (the client gets 503).
const TIMED_OUT: &str = "handler timed out";

/// An inline call that takes longer than this is reported: the plugin said it never blocks.
const INLINE_CALL_WARNING: Duration = Duration::from_millis(100);

/// A client's `X-Request-Id` is used as the request's id when it is at most this long and
/// printable; otherwise the worker makes one.
const MAX_CLIENT_REQUEST_ID: usize = 64;
/// A refused body is read and dropped up to this many bytes (see `discard`); past it the
/// connection closes, as a client that keeps sending after a 413 deserves.
const DISCARD_MAX: u64 = 64 * 1024 * 1024;

pub async fn respond(
    req: hyper::Request<Incoming>,
    shared: &Arc<Shared>,
    client: &str,
) -> Response {
    if shared.spec.host_routes {
        if let Some(path) = req.uri().path().strip_prefix("/__host/") {
            return builtin(path, req.method(), shared);
        }
    }
    let (parts, incoming) = req.into_parts();
    let id = request_id(&parts.headers);
    let calls = shared.plugin.calls();
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
    let id = id.as_str();
    let head = Head {
        parts: &parts,
        client,
        tls: shared.tls.is_some(),
        id,
    };
    let result = call_plugin(shared, calls, head, body).await;
    let failure = match result {
        Ok(response) => match into_hyper(response, id) {
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
            request_id = id,
            "{} {} -> 500: {failure}",
            parts.method,
            parts.uri.path()
        )
    });
    text(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the plugin failed on this request; the host's log has the details\n",
    )
}

/// The request's id: the client's `X-Request-Id` when it is short and printable, else the
/// worker's pid and a count, which no other worker of this machine repeats while it lives.
/// Made on the stack: it is copied once, into the request the plugin gets.
fn request_id(headers: &http::HeaderMap) -> RequestId {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    // Once: glibc no longer caches getpid(), which made it a syscall per request.
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let given = headers
        .get("x-request-id")
        .map(HeaderValue::as_bytes)
        .filter(|v| {
            !v.is_empty() && v.len() <= MAX_CLIENT_REQUEST_ID && v.iter().all(u8::is_ascii_graphic)
        });
    let mut id = RequestId {
        bytes: [0; MAX_CLIENT_REQUEST_ID],
        len: 0,
    };
    match given {
        Some(given) => {
            id.bytes[..given.len()].copy_from_slice(given);
            id.len = given.len();
        }
        None => {
            let pid = *PID.get_or_init(std::process::id);
            let next = NEXT.fetch_add(1, Ordering::Relaxed);
            // By hand: `write!` through core::fmt took ~80 ns a request (perf). At most
            // 8 + 1 + 16 bytes: it fits.
            id.len = push_hex(&mut id.bytes, 0, u64::from(pid));
            id.bytes[id.len] = b'-';
            id.len = push_hex(&mut id.bytes, id.len + 1, next);
        }
    }
    id
}

/// Writes `n` in lower-case hex (no leading zeros) at `at`; returns where it ended.
fn push_hex(out: &mut [u8], at: usize, n: u64) -> usize {
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
    for i in 0..digits {
        let nibble = (n >> (4 * (digits - 1 - i))) & 0xf;
        out[at + i] = b"0123456789abcdef"[nibble as usize];
    }
    at + digits
}

/// A request id of at most `MAX_CLIENT_REQUEST_ID` printable ASCII bytes.
struct RequestId {
    bytes: [u8; MAX_CLIENT_REQUEST_ID],
    len: usize,
}

impl RequestId {
    fn as_str(&self) -> &str {
        // Printable ASCII only (checked above, or written so): always UTF-8.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }
}

/// What the plugin is told about a request, borrowed from hyper's request and the connection.
struct Head<'a> {
    parts: &'a http::request::Parts,
    client: &'a str,
    tls: bool,
    id: &'a str,
}

impl Head<'_> {
    /// Calls `f` with the request's head as the plugin gets it: borrowed, not copied (the
    /// plugin copies what it keeps), the header list on the stack unless it is long.
    ///
    /// An HTTP/2 request carries its host in the `:authority` pseudo-header (in the URI here),
    /// not in a `Host` header: the plugin gets it as `host` all the same, so that a handler
    /// reads the host one way whatever the protocol.
    fn with_ffi<R>(&self, f: impl FnOnce(&FfiRequestRef<'_>) -> R) -> R {
        let parts = self.parts;
        let mut headers: smallvec::SmallVec<[FfiHeaderRef<'_>; 16]> = parts
            .headers
            .iter()
            .map(|(name, value)| FfiHeaderRef {
                name: RStr::from_str(name.as_str()),
                value: value.as_bytes().into(),
            })
            .collect();
        if let Some(authority) = parts.uri.authority() {
            if !parts.headers.contains_key(header::HOST) {
                headers.push(FfiHeaderRef {
                    name: RStr::from_str("host"),
                    value: authority.as_str().as_bytes().into(),
                });
            }
        }
        f(&FfiRequestRef {
            method: RStr::from_str(parts.method.as_str()),
            path: RStr::from_str(parts.uri.path()),
            query: RStr::from_str(parts.uri.query().unwrap_or("")),
            headers: headers.as_slice().into(),
            client_addr: RStr::from_str(self.client),
            tls: self.tls,
            http_version: RStr::from_str(version_text(parts.version)),
            request_id: RStr::from_str(self.id),
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
    head: Head<'_>,
    body: FfiBody,
) -> Result<FfiResponse, String> {
    let (parts, id) = (head.parts, head.id);
    let plugin = shared.plugin;
    let timeout = Duration::from_millis(shared.spec.handler_timeout_ms);
    match calls {
        Calls::Async => {
            // The plugin copies the head before this returns; the future borrows none of it.
            let mut call = head.with_ffi(|request| plugin.handle_async(request, body));
            // The plugin polls its handler's future in each of these polls (plugin-api's glue),
            // on this thread: a poll that blocks is an inline call that never ends, and the
            // heartbeat reports it as one.
            let call = std::future::poll_fn(move |cx| {
                let _call = INLINE_CALLS.begin();
                std::future::Future::poll(std::pin::Pin::new(&mut call), cx)
            });
            match tokio::time::timeout(timeout, call).await {
                Ok(result) => result.into_result().map_err(String::from),
                Err(_) => {
                    in_worker_span(|| {
                        tracing::warn!(
                            request_id = id,
                            "{} {}: the async handler has run longer than handler_timeout ({}); \
                             it was cancelled and the client got a 503",
                            parts.method,
                            parts.uri.path(),
                            humantime::format_duration(timeout)
                        )
                    });
                    Err(TIMED_OUT.to_string())
                }
            }
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
                                parts.method,
                                parts.uri.path(),
                                humantime::format_duration(timeout)
                            ),
                        )
                    });
                    Err(TIMED_OUT.to_string())
                }
            }
        }
        Calls::Inline => {
            let started = Instant::now();
            let result = {
                let _call = INLINE_CALLS.begin();
                head.with_ffi(|request| plugin.handle(request, body))
            };
            let took = started.elapsed();
            if took > INLINE_CALL_WARNING && !shared.warned_inline.swap(true, Ordering::Relaxed) {
                in_worker_span(|| {
                    tracing::warn!(
                        request_id = id,
                        "{} {} took {} ms in plugin {}, which declares BLOCKING = false, so it \
                         held one of the worker's async threads (and other requests) for that \
                         long. If its handler can block, remove `const BLOCKING: bool = false` \
                         from the plugin, or make it an AsyncPlugin. (Said once per worker.)",
                        parts.method,
                        parts.uri.path(),
                        took.as_millis(),
                        plugin.name()
                    )
                });
            }
            result
        }
    }
}

fn into_hyper(ffi: FfiResponse, id: &str) -> Result<Response, String> {
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
        let value = HeaderValue::from_bytes(&h.value)
            .map_err(|_| format!("the value of header {name} is not valid"))?;
        response.headers_mut().append(name, value);
    }
    if let Ok(id) = HeaderValue::from_str(id) {
        // A static name: a `&str` name is copied on every insert.
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-request-id"), id);
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
            "blocking_handlers": shared.plugin.calls() == Calls::Blocking,
            "handler_calls": format!("{:?}", shared.plugin.calls()).to_lowercase(),
            "plugin_api": shared.plugin.api(),
            "uptime_ms": shared.started.elapsed().as_millis() as u64,
            "requests": shared.requests.load(Ordering::Relaxed),
        }),
        // A load balancer's health check on the service's own port: this worker serves, or
        // (503) it is draining and the balancer should send the next request elsewhere.
        "readyz" if *shared.draining.borrow() => {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_as_format_writes_it() {
        for n in [0, 1, 0xf, 0x10, 0xabc, u64::from(u32::MAX), u64::MAX] {
            let mut out = [0u8; 20];
            let end = push_hex(&mut out, 2, n);
            assert_eq!(&out[2..end], format!("{n:x}").as_bytes());
        }
    }

    #[test]
    fn a_request_id_is_the_clients_when_fit_else_pid_and_count() {
        let mut headers = http::HeaderMap::new();
        let made = request_id(&headers);
        let (pid, count) = made.as_str().split_once('-').unwrap();
        assert_eq!(pid, format!("{:x}", std::process::id()));
        assert!(u64::from_str_radix(count, 16).is_ok(), "{}", made.as_str());
        headers.insert("x-request-id", HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&headers).as_str(), "abc-123");
        // Too long, or not printable: the worker makes one.
        let long = "x".repeat(MAX_CLIENT_REQUEST_ID + 1);
        for refused in [long.as_str(), "a b"] {
            headers.insert("x-request-id", HeaderValue::from_str(refused).unwrap());
            let id = request_id(&headers);
            let (pid, _) = id.as_str().split_once('-').unwrap();
            assert_eq!(pid, format!("{:x}", std::process::id()), "{refused:?}");
        }
    }
}

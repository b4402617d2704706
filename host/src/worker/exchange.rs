//! One request on a connection, around `worker::respond`: marks the request in flight on its
//! connection (which the connection's limits read), gets its response, at once when it can and
//! else later, and accounts for it: its status and duration (`worker::stats`), the access log,
//! `max_requests`, and `Connection: close` once the worker drains.
//!
//! The common request (HTTP/1.1, a handler called inline or an async one that answers in its
//! first poll, no body) is answered within hyper's call of the service, with no future of its
//! own: [`Exchange`] is then the response, which hyper moves into place. A future for every
//! request was about 660 bytes (the request, what the access log keeps of it, the response's
//! future), moved on every request; a request answered later is now one boxed future.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    ops::Deref,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
    time::Duration,
};

use http::{header, HeaderValue, Method, Uri, Version};
use hyper::body::Incoming;

use super::{
    access_log,
    conn::ConnState,
    http::Response,
    liveness::ask_for_replacement,
    respond::{self, Now},
};
use crate::protocol::{coarse_ns, monotonic_ns};

/// A request's response: ready, or on its way.
pub enum Exchange {
    Now(Option<Response>),
    Later(Pin<Box<dyn Future<Output = Response> + Send>>),
}

impl Exchange {
    /// Serves `req`, which arrived on the connection of `state` from `client`.
    pub fn start(
        state: &Arc<ConnState>,
        client: Option<SocketAddr>,
        req: hyper::Request<Incoming>,
    ) -> Exchange {
        // A request answered now borrows the connection's state; one answered later holds a
        // reference count in its future (two locked instructions a request fewer on the first).
        let in_flight = InFlight::begin(state);
        let started = monotonic_ns();
        // Only when there is an access log: this is the request path.
        let logged = state.shared.access_log.as_ref().map(|_| Logged::of(&req));
        // HTTP/1.1 only: hyper's HTTP/2 calls the service inside the connection's own poll, so
        // a handler answered there would run one stream at a time on the connection's thread,
        // and hold up its other streams' frames. Its streams run as tasks of their own when
        // they have a future.
        let now = if state.h2 {
            Now::Later
        } else {
            respond::now(&req, &state.shared, &state.client_text)
        };
        let waiting = match now {
            Now::Done(response) => {
                return Exchange::Now(Some(finish(state, client, started, logged, response)))
            }
            Now::Waiting(call) => Some(call),
            Now::Later => None,
        };
        let in_flight = in_flight.owned(state);
        Exchange::Later(Box::pin(async move {
            let state = &in_flight.0;
            let (shared, client_text) = (&state.shared, &state.client_text);
            let response = match waiting {
                Some(call) => respond::waiting(call, req, shared, client_text).await,
                None => respond::later(req, shared, client_text).await,
            };
            finish(state, client, started, logged, response)
        }))
    }
}

impl Future for Exchange {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Exchange::Now(response) => Poll::Ready(Ok(response
                .take()
                .expect("an exchange is not polled after it ended"))),
            Exchange::Later(future) => future.as_mut().poll(cx).map(Ok),
        }
    }
}

/// What the access log needs of a request, taken before the request is consumed.
struct Logged {
    method: Method,
    uri: Uri,
    version: Version,
    referer: Option<String>,
    user_agent: Option<String>,
}

impl Logged {
    fn of(req: &hyper::Request<Incoming>) -> Logged {
        let header = |name| {
            req.headers()
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .map(str::to_string)
        };
        Logged {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            referer: header(header::REFERER),
            user_agent: header(header::USER_AGENT),
        }
    }
}

/// The accounting of a request that has its response (see the module comment).
fn finish(
    state: &ConnState,
    client: Option<SocketAddr>,
    started: u64,
    logged: Option<Logged>,
    mut response: Response,
) -> Response {
    let shared = &state.shared;
    let took = Duration::from_nanos(monotonic_ns().saturating_sub(started));
    shared.stats.record(response.status().as_u16(), took);
    if let (Some(log), Some(logged)) = (&shared.access_log, &logged) {
        let uri = &logged.uri;
        log.log(&access_log::Request {
            client,
            method: logged.method.as_str(),
            target: uri.path_and_query().map_or(uri.path(), |p| p.as_str()),
            version: logged.version,
            status: response.status().as_u16(),
            bytes: hyper::body::Body::size_hint(response.body())
                .exact()
                .unwrap_or(0),
            took,
            referer: logged.referer.as_deref(),
            user_agent: logged.user_agent.as_deref(),
            plugin_version: &shared.spec.plugin_version,
        });
    }
    let max = shared.spec.max_requests;
    if max != 0 {
        let served = shared.toward_max_requests.fetch_add(1, Ordering::Relaxed) + 1;
        if served == max {
            ask_for_replacement(
                &shared.link,
                &shared.replacement_asked,
                format!("it served {served} requests (max_requests, with its jitter)"),
            );
        }
    }
    // HTTP/2 has no Connection header: a draining worker sends GOAWAY instead.
    if !state.h2 && shared.is_draining() {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Marks a request in flight on its connection for as long as it lives.
struct InFlight<S: Deref<Target = ConnState>>(S);

impl<'a> InFlight<&'a ConnState> {
    fn begin(conn: &'a ConnState) -> Self {
        conn.in_flight.fetch_add(1, Ordering::SeqCst);
        conn.head_started.store(0, Ordering::Relaxed);
        InFlight(conn)
    }

    /// The same request in flight, for a future that outlives the borrow.
    fn owned(self, conn: &Arc<ConnState>) -> InFlight<Arc<ConnState>> {
        std::mem::forget(self);
        InFlight(conn.clone())
    }
}

impl<S: Deref<Target = ConnState>> Drop for InFlight<S> {
    fn drop(&mut self) {
        // Relaxed, then a release: whoever sees the count drop (`ConnState::idle_for`, with an
        // acquire) sees this time too. A SeqCst store would be a locked instruction.
        self.0.last_active.store(coarse_ns(), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Release);
    }
}

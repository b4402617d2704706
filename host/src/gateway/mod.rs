//! The gateway role of a `kind = "websocket"` service: a process that holds the client
//! connections and runs no plugin code, so a reload, which replaces only the business workers,
//! leaves every client connected (Workerman's GatewayWorker, built in).
//!
//! - `client`: one connection: its reader, and its writer with a bounded buffer.
//! - `router`: which business worker handles each client's events; moving clients to a new
//!   worker without losing, repeating or reordering an event; groups and sessions.
//! - `wire`: the frames between gateways and business workers.
//!
//! A gateway accepts on the service's listeners (the master's sockets, as HTTP workers do),
//! does the handshake with hyper and the framing with tokio-tungstenite, and asks the plugin
//! (through a business worker) whether to accept each client. Links to business workers are
//! socketpairs the master makes and passes on (at start, and as workers come and go). A
//! gateway is replaced only when it dies (its clients are disconnected and reconnect) and on a
//! stop or a host upgrade, when it closes its clients with 1001 (going away) after letting the
//! events in flight finish.

pub mod client;
pub mod router;
pub mod wire;

use std::{
    net::SocketAddr,
    os::unix::net::UnixStream as StdUnixStream,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::UnixStream, sync::Semaphore};
use tokio_tungstenite::{
    tungstenite::{handshake::derive_accept_key, protocol::WebSocketConfig},
    WebSocketStream,
};
use tracing::Instrument;

use self::{
    client::Client,
    router::{Router, Verdict},
    wire::{ConnectInfo, FromBusiness},
};
use crate::{
    inherit::{self, Kind},
    protocol::{FromWorker, Role, StartTimings, ToWorker, WorkerSpec, FIRST_LISTENER_FD},
    worker::link::Link,
};

/// Each client connection's read buffer (see where the websocket is made).
const READ_BUFFER: usize = 8 * 1024;

/// How long a connecting client waits for the plugin's verdict (a worker may be starting).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

struct Gateway {
    spec: WorkerSpec,
    router: Arc<Router>,
    max_message_bytes: usize,
    tls: Option<tokio_rustls::TlsAcceptor>,
    draining: AtomicBool,
    link: Arc<Link>,
}

/// Runs a gateway process (`host worker` with [`Role::Gateway`]) until its drain ends.
pub fn run(spec: WorkerSpec, channel: StdUnixStream, link: Arc<Link>) -> ExitCode {
    let Role::Gateway {
        index,
        workers,
        links,
        holders,
        max_message_bytes,
    } = spec.role.clone()
    else {
        return ExitCode::FAILURE;
    };
    let fail = |reason: String| link.start_failed(reason);
    let tls = match spec
        .tls
        .as_ref()
        .map(|pem| crate::tls::acceptor(pem, &[b"http/1.1"]))
        .transpose()
    {
        Ok(tls) => tls,
        Err(reason) => return fail(reason),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("could not start the async runtime: {e}")),
    };
    let gateway = Arc::new(Gateway {
        router: Arc::new(Router::new(index, workers)),
        max_message_bytes,
        tls,
        draining: AtomicBool::new(false),
        link: link.clone(),
        spec,
    });
    let span = tracing::Span::current();
    runtime.block_on(
        async move {
            let listeners = match crate::worker::inherited_listeners(&gateway.spec) {
                Ok(l) => l,
                Err(reason) => return fail(reason),
            };
            let first_link = FIRST_LISTENER_FD + gateway.spec.listen.len() as i32;
            for (i, (slot, pid)) in links.iter().enumerate() {
                let fd = first_link + i as i32;
                match inherit::adopt(fd, Kind::Socket) {
                    Some(fd) => gateway.open_link(*slot, *pid, StdUnixStream::from(fd)),
                    None => {
                        return fail(format!(
                            "the link to worker {pid} was not passed at fd {fd}"
                        ))
                    }
                }
            }
            for (slot, pid) in holders {
                gateway.router.set_holder(slot, pid);
            }
            gateway.serve(listeners, channel).await
        }
        .instrument(span),
    )
}

impl Gateway {
    /// Starts reading and writing the link to business worker `pid`.
    fn open_link(self: &Arc<Self>, slot: usize, pid: u32, stream: StdUnixStream) {
        let stream = match stream
            .set_nonblocking(true)
            .and_then(|()| UnixStream::from_std(stream))
        {
            Ok(s) => s,
            Err(e) => return tracing::error!("could not use the link to worker {pid}: {e}"),
        };
        let (tx, mut frames) = wire::open::<_, FromBusiness>(stream, self.max_message_bytes);
        self.router.link_opened(slot, pid, tx);
        let router = self.router.clone();
        tokio::spawn(
            async move {
                while let Some(frame) = frames.next().await {
                    match frame {
                        Ok(frame) => router.from_business(pid, frame),
                        Err(e) => {
                            tracing::warn!("worker {pid}: {e}");
                            break;
                        }
                    }
                }
                router.link_closed(pid);
            }
            .in_current_span(),
        );
    }

    async fn serve(
        self: Arc<Self>,
        listeners: Vec<tokio::net::TcpListener>,
        channel: StdUnixStream,
    ) -> ExitCode {
        let channel = match channel
            .set_nonblocking(true)
            .and_then(|()| UnixStream::from_std(channel))
        {
            Ok(c) => c,
            Err(_) => return ExitCode::FAILURE,
        };
        let slots = Arc::new(Semaphore::new(
            self.spec.max_connections.min(Semaphore::MAX_PERMITS),
        ));
        let accepting: Vec<_> = listeners
            .into_iter()
            .map(|l| tokio::spawn(self.clone().accept(l, slots.clone()).in_current_span()))
            .collect();
        self.link.send(&FromWorker::Ready {
            plugin_name: "gateway".into(),
            plugin_crate_version: env!("CARGO_PKG_VERSION").into(),
            timings: StartTimings::default(),
        });
        tracing::info!(
            "gateway {} ready on {}",
            self.router_index(),
            self.spec.listen.join(", ")
        );
        tokio::spawn(self.clone().heartbeat().in_current_span());
        self.clone().talk_to_master(channel).await;

        // The drain: no new clients; events in flight finish; then every client is closed
        // with 1001 and the plugin hears of each; then the links close.
        self.draining.store(true, Ordering::SeqCst);
        for task in accepting {
            task.abort();
        }
        self.link.send(&FromWorker::StoppedAccepting);
        let deadline = Instant::now() + Duration::from_millis(self.spec.drain_timeout_ms);
        let half = Instant::now() + Duration::from_millis(self.spec.drain_timeout_ms / 2);
        while !self.router.idle() && Instant::now() < half {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.router.close_all(1001, "going away");
        while self.router.clients() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.router.close_links();
        tracing::info!("gateway drained, exiting");
        ExitCode::SUCCESS
    }

    fn router_index(&self) -> u32 {
        match self.spec.role {
            Role::Gateway { index, .. } => index,
            _ => 0,
        }
    }

    async fn accept(self: Arc<Self>, listener: tokio::net::TcpListener, slots: Arc<Semaphore>) {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let gateway = self.clone();
            tokio::spawn(
                async move {
                    gateway.connection(stream, peer).await;
                    drop(permit);
                }
                .in_current_span(),
            );
        }
    }

    async fn connection(self: Arc<Self>, stream: tokio::net::TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let header_timeout = Duration::from_millis(self.spec.header_timeout_ms);
        match self.tls.clone() {
            None => self.http(TokioIo::new(stream), peer, false).await,
            Some(tls) => match tokio::time::timeout(header_timeout, tls.accept(stream)).await {
                Ok(Ok(stream)) => self.http(TokioIo::new(stream), peer, true).await,
                _ => tracing::debug!("no TLS handshake from {peer}"),
            },
        }
    }

    async fn http<I>(self: Arc<Self>, io: I, peer: SocketAddr, tls: bool)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let gateway = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let gateway = gateway.clone();
            async move { Ok::<_, std::convert::Infallible>(gateway.handshake(req, peer, tls).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_millis(self.spec.header_timeout_ms))
            .serve_connection(io, service)
            .with_upgrades()
            .await;
    }

    /// Answers a request: a WebSocket handshake the plugin accepts gets 101 and the connection
    /// becomes a client; anything else gets why not.
    async fn handshake(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        tls: bool,
    ) -> Response<Full<Bytes>> {
        let Some(key) = websocket_key(&req) else {
            let mut response = text(
                StatusCode::UPGRADE_REQUIRED,
                "this service speaks WebSocket: connect with a WebSocket client\n",
            );
            response
                .headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            return response;
        };
        if self.draining.load(Ordering::SeqCst) {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "going away; connect again\n",
            );
        }
        let info = ConnectInfo {
            path: req.uri().path().to_string(),
            query: req.uri().query().unwrap_or("").to_string(),
            peer: peer.to_string(),
            headers: req
                .headers()
                .iter()
                .map(|(n, v)| (n.as_str().to_string(), Bytes::copy_from_slice(v.as_bytes())))
                .collect(),
            tls,
        };
        let (socket, out) = Client::new();
        let (id, verdict) = self.router.connect(info, socket);
        match tokio::time::timeout(CONNECT_TIMEOUT, verdict).await {
            Ok(Ok(Verdict::Accepted)) => {}
            Ok(Ok(Verdict::Refused(reason))) => {
                self.router.forget(id);
                return text(StatusCode::FORBIDDEN, format!("{reason}\n"));
            }
            Ok(Ok(Verdict::Unavailable(why))) => {
                self.router.gone(id);
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{why}; try again\n"),
                );
            }
            Ok(Err(_)) | Err(_) => {
                self.router.gone(id);
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no business worker answered in time; try again\n",
                );
            }
        }
        // tungstenite allocates (and zero-fills) each connection's read buffer at once: 128 KiB
        // by default, nearly all of an idle client's memory (about 1.3 GiB for 10,000 clients;
        // benchmarks figure 13). 8 KiB reads are plenty for chat-sized messages, and a larger
        // message is still read whole, in more reads.
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .max_message_size(Some(self.max_message_bytes))
            .max_frame_size(Some(self.max_message_bytes));
        let router = self.router.clone();
        tokio::spawn(
            async move {
                match hyper::upgrade::on(req).await {
                    Ok(upgraded) => {
                        let ws = WebSocketStream::from_raw_socket(
                            TokioIo::new(upgraded),
                            tokio_tungstenite::tungstenite::protocol::Role::Server,
                            Some(config),
                        )
                        .await;
                        client::run(router, id, ws, out).await;
                    }
                    Err(e) => {
                        tracing::debug!("client {}: upgrade failed: {e}", router::show(id));
                        router.gone(id);
                    }
                }
            }
            .in_current_span(),
        );
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        response
    }

    async fn heartbeat(self: Arc<Self>) {
        let every = Duration::from_millis(self.spec.heartbeat_ms.max(10));
        loop {
            tokio::time::sleep(every).await;
            self.link.send(&FromWorker::Heartbeat {
                requests: 0,
                rss_bytes: crate::worker::rss_bytes(),
                connections: self.router.clients() as u64,
                stats: Default::default(),
            });
        }
    }

    /// Follows the master's messages until it says `Drain` or goes away.
    async fn talk_to_master(self: Arc<Self>, channel: UnixStream) {
        let mut messages = crate::worker::MasterMessages::new(channel, self.link.clone());
        while let Some((message, mut fds)) = messages.next().await {
            match message {
                ToWorker::Drain => {
                    tracing::info!("draining on the master's request");
                    messages.keep_reading();
                    return;
                }
                ToWorker::BusinessLink { slot, pid } => match fds.pop() {
                    Some(fd) => self.open_link(slot, pid, StdUnixStream::from(fd)),
                    None => tracing::warn!("a link to worker {pid} came without its socket"),
                },
                ToWorker::SlotHolder { slot, pid } => self.router.set_holder(slot, pid),
                ToWorker::Stats => {
                    self.link.send(&FromWorker::Stats {
                        requests: self.router.clients() as u64,
                    });
                }
                other => tracing::debug!("gateway: ignoring {other:?}"),
            }
        }
    }
}

/// The `Sec-WebSocket-Key` of a valid WebSocket handshake request (RFC 6455, 4.2.1).
fn websocket_key(req: &Request<Incoming>) -> Option<String> {
    let has = |name: header::HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    let version = req.headers().get(header::SEC_WEBSOCKET_VERSION)?;
    if req.method() != http::Method::GET
        || !has(header::UPGRADE, "websocket")
        || !has(header::CONNECTION, "upgrade")
        || version.as_bytes() != b"13"
    {
        return None;
    }
    req.headers()
        .get(header::SEC_WEBSOCKET_KEY)?
        .to_str()
        .ok()
        .map(str::to_string)
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.into())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

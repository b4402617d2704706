//! The admin listener: the page operators steer the host from, its JSON API, the health checks
//! a load balancer or Kubernetes asks, and the Prometheus metrics. Off unless `[admin]` is
//! configured (or `--admin`); its own listener, never a service's, served by the master.
//!
//! - `api`: the routes, and what each answers.
//! - `auth`: the bearer token and the brake on guessing it.
//! - `metrics`: the counters the workers' heartbeats feed, and the page's short time series.
//! - `page`: the page and its script, embedded in the binary.
//!
//! Bounded like every input: at most [`MAX_CONNECTIONS`] connections at once, a request head
//! within [`HEADER_TIMEOUT`], and no request body is read (no route takes one). The listener is
//! inherited by a new master in `host upgrade` like the services' (so it never refuses a
//! connection); the old master stops answering on it when the new one takes over. On stop it
//! keeps answering until the workers have drained (`/readyz` says 503 meanwhile), then lets
//! the requests in flight finish, for at most [`SHUTDOWN_GRACE`].

mod api;
mod auth;
pub mod metrics;
mod page;

use std::{
    net::{SocketAddr, TcpListener},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    sync::{watch, Semaphore},
    task::JoinHandle,
};
use tokio_rustls::TlsAcceptor;

pub use metrics::Metrics;

use crate::{config::AdminConfig, master::Master, protocol::TlsPem};

/// Connections served at once.
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request head (and to finish a TLS handshake).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests in flight may take to finish when the master exits.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// What the admin listener is called where listeners are named (an upgrade's handover); not a
/// possible service name.
pub const LISTENER_NAME: &str = "[admin]";

/// The admin listener and what its requests need.
pub struct Admin {
    config: RwLock<AdminConfig>,
    /// The master's own copy of the socket: handed to a new master in an upgrade.
    socket: TcpListener,
    token: RwLock<auth::Token>,
    tls: RwLock<Option<TlsAcceptor>>,
    guard: auth::Guard,
    task: Mutex<Option<JoinHandle<()>>>,
    /// Tells connections to finish (on exit, or after a handover).
    closing: watch::Sender<bool>,
    /// Connections open, to wait for on exit.
    open: watch::Sender<usize>,
}

impl Admin {
    /// Reads the token and certificate, and takes the listener (`socket`, already bound or
    /// inherited). Every problem is a start failure with its reason.
    pub fn new(config: AdminConfig, socket: TcpListener) -> Result<Admin, String> {
        let token = auth::Token::read(&config.token_file)?;
        let tls = acceptor(&config)?;
        Ok(Admin {
            config: RwLock::new(config),
            socket,
            token: RwLock::new(token),
            tls: RwLock::new(tls),
            guard: auth::Guard::default(),
            task: Mutex::new(None),
            closing: watch::Sender::new(false),
            open: watch::Sender::new(0),
        })
    }

    /// The address it listens on (with the port the system chose, if configured as 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.socket.local_addr().ok()
    }

    /// The URL to print in the ready line.
    pub fn url(&self) -> String {
        let scheme = if self.tls.read().unwrap().is_some() {
            "https"
        } else {
            "http"
        };
        match self.local_addr() {
            Some(addr) => format!("{scheme}://{addr}/"),
            None => format!("{scheme}://{}/", self.config.read().unwrap().listen),
        }
    }

    /// The configured address (a new master matches handed sockets by it).
    pub fn configured(&self) -> SocketAddr {
        self.config.read().unwrap().listen
    }

    pub fn socket(&self) -> &TcpListener {
        &self.socket
    }

    /// Starts answering on the listener.
    pub fn start(self: &Arc<Self>, master: Arc<Master>) -> Result<(), String> {
        let listener = self
            .socket
            .try_clone()
            .and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            })
            .map_err(|e| format!("could not serve the admin listener: {e}"))?;
        let task = tokio::spawn(self.clone().serve(master, listener));
        if let Some(old) = self.task.lock().unwrap().replace(task) {
            old.abort();
        }
        Ok(())
    }

    /// Stops accepting (the master handed over: the new one answers on the same socket).
    pub fn stop_accepting(&self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
        self.closing.send_replace(true);
    }

    /// Stops accepting and waits, for at most [`SHUTDOWN_GRACE`], for the requests in flight
    /// (a `POST /api/stop` waits for its last line).
    pub async fn shut_down(&self) {
        self.stop_accepting();
        let mut open = self.open.subscribe();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, open.wait_for(|n| *n == 0)).await;
    }

    /// `host reload` read the config again: a new token (or token file) and certificate take
    /// effect now; a new address needs a restart or an upgrade, and the log says so.
    pub fn reconfigure(&self, new: Option<&AdminConfig>) {
        let Some(new) = new else {
            tracing::warn!(
                "the config no longer has [admin]; the admin listener stays until the next \
                 start or `host upgrade`"
            );
            return;
        };
        if new.listen != self.configured() {
            tracing::warn!(
                "[admin] listen changed to {}; it takes effect at the next start or `host \
                 upgrade` (the admin listener stays on {})",
                new.listen,
                self.configured()
            );
        }
        match auth::Token::read(&new.token_file).and_then(|t| Ok((t, acceptor(new)?))) {
            Ok((token, tls)) => {
                *self.token.write().unwrap() = token;
                *self.tls.write().unwrap() = tls;
                let mut config = self.config.write().unwrap();
                let listen = config.listen;
                *config = new.clone();
                config.listen = listen;
            }
            Err(e) => tracing::error!("[admin]: {e}; the admin listener keeps its old settings"),
        }
    }

    /// The token and certificate files read again (a master started with flags: there is no
    /// config file to read again, but a rotated token or renewed certificate must apply).
    pub fn reread(&self) {
        let mut same = self.config.read().unwrap().clone();
        if let Some(tls) = &same.tls {
            match crate::config::Tls::read(tls.cert.clone(), tls.key.clone()) {
                Ok(tls) => same.tls = Some(tls),
                Err(e) => {
                    return tracing::error!(
                        "[admin]: tls: {e}; the admin listener keeps its old certificate"
                    )
                }
            }
        }
        self.reconfigure(Some(&same));
    }

    pub fn allow_upgrade_exe(&self) -> bool {
        self.config.read().unwrap().allow_upgrade_exe
    }

    async fn serve(self: Arc<Self>, master: Arc<Master>, listener: tokio::net::TcpListener) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of fds, most likely: wait instead of spinning.
                    tracing::warn!("admin listener: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::warn!(
                    "admin listener: {MAX_CONNECTIONS} connections open already; closed one \
                     from {peer}"
                );
                continue;
            };
            let (admin, master) = (self.clone(), master.clone());
            self.open.send_modify(|n| *n += 1);
            tokio::spawn(async move {
                admin.clone().connection(master, stream, peer).await;
                admin.open.send_modify(|n| *n -= 1);
                drop(permit);
            });
        }
    }

    async fn connection(
        self: Arc<Self>,
        master: Arc<Master>,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
    ) {
        let tls = self.tls.read().unwrap().clone();
        match tls {
            None => self.http(master, TokioIo::new(stream), peer).await,
            Some(tls) => match tokio::time::timeout(HEADER_TIMEOUT, tls.accept(stream)).await {
                Ok(Ok(stream)) => self.http(master, TokioIo::new(stream), peer).await,
                Ok(Err(e)) => tracing::debug!("admin listener: TLS handshake with {peer}: {e}"),
                Err(_) => tracing::debug!("admin listener: no TLS handshake from {peer}"),
            },
        }
    }

    async fn http<I>(self: Arc<Self>, master: Arc<Master>, io: I, peer: SocketAddr)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let admin = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let (admin, master) = (admin.clone(), master.clone());
            async move {
                Ok::<_, std::convert::Infallible>(api::route(&admin, &master, req, peer).await)
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(io, service);
        tokio::pin!(conn);
        let mut closing = self.closing.subscribe();
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = closing.wait_for(|c| *c) => {}
        }
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    }
}

fn acceptor(config: &AdminConfig) -> Result<Option<TlsAcceptor>, String> {
    config
        .tls
        .as_ref()
        .map(|tls| crate::tls::acceptor(&TlsPem::from(tls), &[b"http/1.1"]))
        .transpose()
        .map_err(|e| format!("[admin]: {e}"))
}

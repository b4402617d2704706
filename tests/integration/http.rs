//! A real HTTP client for the tests (hyper's client connection API): HTTP/1.1 with keep-alive,
//! or HTTP/2, over plain TCP or TLS (rustls), and without retries: a request that fails is
//! reported as failed, never quietly sent again, so the tests see every reset a reload would
//! cause. The one exception is HTTP/2's own: a request the server refused before processing it
//! (GOAWAY, REFUSED_STREAM) is sent again on a new connection, as every HTTP/2 client does, and
//! counted in `retried`.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    client::conn::{http1, http2},
    Request, Version,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{pki_types::ServerName, ClientConfig, RootCertStore};
use tokio::{net::TcpStream, runtime::Runtime};

pub struct Resp {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: String,
    /// The server said `Connection: close`.
    pub closes: bool,
    pub version: Version,
}

/// How a connection is made.
#[derive(Clone)]
pub enum Transport {
    Plain,
    /// TLS, trusting the given config's roots; the server is named `localhost`.
    Tls(Arc<ClientConfig>),
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

/// One client connection, reused across requests as long as the server keeps it open.
pub struct Conn {
    rt: Arc<Runtime>,
    addr: String,
    transport: Transport,
    h2: bool,
    sender: Option<Sender>,
    /// How many TCP connections this client opened.
    pub connects: usize,
    /// HTTP/2 requests the server refused unprocessed and that were sent again.
    pub retried: usize,
    /// Sent with every request (an `Authorization` header, say).
    pub headers: Vec<(String, String)>,
    /// The server's certificate on the last TLS connection (DER).
    pub server_cert: Option<Vec<u8>>,
}

/// A TLS client config that trusts `ca_pem`, offering HTTP/2 (`h2`) or HTTP/1.1 by ALPN.
pub fn tls_config(ca_pem: &str, h2: bool) -> Arc<ClientConfig> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    Arc::new(config)
}

impl Conn {
    /// HTTP/1.1 over plain TCP.
    pub fn new(addr: &str) -> Conn {
        Conn::with(addr, Transport::Plain, false)
    }

    pub fn with(addr: &str, transport: Transport, h2: bool) -> Conn {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Conn {
            rt: Arc::new(rt),
            addr: addr.to_string(),
            transport,
            h2,
            sender: None,
            connects: 0,
            retried: 0,
            headers: Vec::new(),
            server_cert: None,
        }
    }

    pub fn get(&mut self, path: &str) -> Result<Resp, String> {
        self.send("GET", path, Vec::new())
    }

    pub fn send(&mut self, method: &str, path: &str, body: Vec<u8>) -> Result<Resp, String> {
        let mut result = self.send_once(method, path, body.clone());
        if self.h2 {
            if let Err(e) = &result {
                if refused_unprocessed(e) {
                    self.retried += 1;
                    self.sender = None;
                    result = self.send_once(method, path, body);
                }
            }
        }
        result
    }

    fn send_once(&mut self, method: &str, path: &str, body: Vec<u8>) -> Result<Resp, String> {
        // A pooled client checks that an idle connection is still open before it uses it;
        // a connection the server closed cleanly *before* the request is not a failure.
        if self.sender.as_ref().is_some_and(|s| s.is_closed()) {
            self.sender = None;
        }
        let addr = self.addr.clone();
        let rt = self.rt.clone();
        let result = rt.block_on(async {
            if self.sender.is_none() {
                self.connect().await?;
            }
            let mut req = Request::builder().method(method);
            for (name, value) in &self.headers {
                req = req.header(name, value);
            }
            let req = req
                .uri(if self.h2 {
                    format!("https://{addr}{path}")
                } else {
                    path.to_string()
                })
                .header("host", &addr)
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let resp = match self.sender.as_mut().unwrap() {
                Sender::H1(s) => s.send_request(req).await,
                Sender::H2(s) => s.send_request(req).await,
            }
            .map_err(|e| format!("request: {e:?}"))?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let version = resp.version();
            let closes = resp
                .headers()
                .get("connection")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            Ok(Resp {
                status,
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
                closes,
                version,
            })
        });
        match &result {
            Ok(r) if !r.closes => {}
            _ => self.sender = None,
        }
        result
    }

    async fn connect(&mut self) -> Result<(), String> {
        let tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        self.connects += 1;
        match self.transport.clone() {
            Transport::Plain => self.handshake(TokioIo::new(tcp)).await,
            Transport::Tls(config) => {
                let name = ServerName::try_from("localhost").unwrap();
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS handshake: {e}"))?;
                self.server_cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.to_vec());
                self.handshake(TokioIo::new(tls)).await
            }
        }
    }

    async fn handshake<I>(&mut self, io: I) -> Result<(), String>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        if self.h2 {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(conn);
            self.sender = Some(Sender::H2(sender));
        } else {
            let (sender, conn) = http1::handshake(io)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(conn);
            self.sender = Some(Sender::H1(sender));
        }
        Ok(())
    }
}

/// Whether an HTTP/2 request failed before the server processed it, from the error's debug
/// text (so sending it again is safe, and what every HTTP/2 client does, RFC 9113 8.7): it was
/// never sent (canceled), the stream was refused, or it was above the last stream id of the
/// server's GOAWAY (h2 reports those as `GoAway(.., Remote)`).
pub fn refused_unprocessed(error: &str) -> bool {
    error.contains("Canceled")
        || error.contains("REFUSED_STREAM")
        || (error.contains("GoAway(") && error.contains("NO_ERROR"))
}

/// One request on a new connection; panics on a transport error.
pub fn get(addr: &str, path: &str) -> Resp {
    Conn::new(addr)
        .get(path)
        .unwrap_or_else(|e| panic!("GET http://{addr}{path} failed: {e}"))
}

//! A real HTTP/1.1 client for the tests (hyper's client connection API), with keep-alive and
//! without retries: a request that fails is reported as failed, never quietly sent again, so
//! the tests see every reset a reload would cause.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{client::conn::http1::SendRequest, Request};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, runtime::Runtime};

pub struct Resp {
    pub status: u16,
    pub body: String,
    /// The server said `Connection: close`.
    pub closes: bool,
}

/// One client connection, reused across requests as long as the server keeps it open.
pub struct Conn {
    rt: Runtime,
    addr: String,
    sender: Option<SendRequest<Full<Bytes>>>,
    /// How many TCP connections this client opened.
    pub connects: usize,
}

impl Conn {
    pub fn new(addr: &str) -> Conn {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Conn {
            rt,
            addr: addr.to_string(),
            sender: None,
            connects: 0,
        }
    }

    pub fn get(&mut self, path: &str) -> Result<Resp, String> {
        self.send("GET", path, Vec::new())
    }

    pub fn send(&mut self, method: &str, path: &str, body: Vec<u8>) -> Result<Resp, String> {
        let addr = self.addr.clone();
        // A pooled client checks that an idle connection is still open before it uses it;
        // a connection the server closed cleanly *before* the request is not a failure.
        if self.sender.as_ref().is_some_and(|s| s.is_closed()) {
            self.sender = None;
        }
        let result = self.rt.block_on(async {
            if self.sender.is_none() {
                let stream = TcpStream::connect(&addr)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| format!("handshake: {e}"))?;
                tokio::spawn(conn);
                self.sender = Some(sender);
                self.connects += 1;
            }
            let sender = self.sender.as_mut().unwrap();
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header("host", &addr)
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("request: {e}"))?;
            let status = resp.status().as_u16();
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
                body: String::from_utf8_lossy(&body).into_owned(),
                closes,
            })
        });
        match &result {
            Ok(r) if !r.closes => {}
            _ => self.sender = None,
        }
        result
    }
}

/// One request on a new connection; panics on a transport error.
pub fn get(addr: &str, path: &str) -> Resp {
    Conn::new(addr)
        .get(path)
        .unwrap_or_else(|e| panic!("GET http://{addr}{path} failed: {e}"))
}

//! Idle keep-alive HTTP/1.1 connections held open by the bench, for the memory curve: each one
//! connected, one `GET /` sent and its whole response read (so that the server has set the
//! connection up as it does for a real client, buffers included), then left idle.
//!
//! Blocking sockets, opened one at a time: no listen backlog to overflow, and 10,000 take a
//! few seconds. Each closes with a reset (SO_LINGER 0) when dropped, as figure 13's client
//! does, so that a round leaves no ports in TIME_WAIT for the next.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// A connection that does not open, or whose response does not come, within this counts as
/// refused.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Connections open to one server.
pub struct Idle {
    conns: Vec<TcpStream>,
    /// Connections that did not open or got no whole response.
    pub refused: u64,
}

impl Idle {
    pub fn new() -> Idle {
        Idle {
            conns: Vec::new(),
            refused: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Opens connections to `addr` until `n` are held.
    pub fn grow_to(&mut self, addr: &str, n: usize) {
        let addr: SocketAddr = addr.parse().unwrap();
        while self.conns.len() < n {
            match one(&addr) {
                Some(c) => self.conns.push(c),
                None => {
                    self.refused += 1;
                    // Give up on a server that refuses everything rather than loop forever.
                    assert!(self.refused < 1_000, "{addr} refused 1,000 connections");
                }
            }
        }
    }
}

impl Default for Idle {
    fn default() -> Self {
        Idle::new()
    }
}

fn one(addr: &SocketAddr) -> Option<TcpStream> {
    let mut s = TcpStream::connect_timeout(addr, TIMEOUT).ok()?;
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .ok()?;
    s.set_read_timeout(Some(TIMEOUT)).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n").ok()?;
    read_response(&mut s).then_some(s)
}

/// Reads one response with a `Content-Length` (both servers send one for hello's answer).
fn read_response(s: &mut TcpStream) -> bool {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let Ok(n) = s.read(&mut chunk) else {
            return false;
        };
        if n == 0 {
            return false;
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + len {
            return head.starts_with("http/1.1 200");
        }
    }
}

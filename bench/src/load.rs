//! The soak's own keep-alive load client: threads that send `GET /` back to back, each on its
//! own keep-alive connection, never retry, and count every failed request against the phase
//! the driver is in when it fails (wrk reports only totals at its end, and the soak needs them
//! per injected fault).
//!
//! A failure is what wrk counts: a connect, write or read error, a connection closed before the
//! whole response, no response within the timeout, or a non-2xx status. The client reconnects
//! after each failure and after a `Connection: close`, which a draining worker sends (that
//! request was answered: it is not a failure).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// No answer within this is a failure (wrk's `--timeout` in the suite).
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// How much of a failure's detail is kept (the counts are always complete).
const KEEP_FAILURES: usize = 10_000;

/// One failed request.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Unix time in ms when it failed.
    pub at_ms: u64,
    /// The phase the driver was in when it failed, and when the request was sent.
    pub phase: usize,
    pub sent_in: usize,
    pub kind: &'static str,
    pub detail: String,
}

struct Shared {
    stop: AtomicBool,
    phase: AtomicUsize,
    /// Answered requests per phase (at the time of the answer).
    ok: Vec<AtomicU64>,
    failed: Vec<AtomicU64>,
    connects: AtomicU64,
    closed_idle: AtomicU64,
    failures: Mutex<Vec<Failure>>,
}

pub struct Load {
    shared: Arc<Shared>,
    threads: Vec<thread::JoinHandle<()>>,
    started: Instant,
}

/// What the clients saw.
#[derive(Debug, Clone)]
pub struct Totals {
    pub ok: Vec<u64>,
    pub failed: Vec<u64>,
    pub connects: u64,
    /// Idle keep-alive connections found closed by the server before a request was sent on
    /// them (not failures: see `client`).
    pub closed_idle: u64,
    /// The failures, at most [`KEEP_FAILURES`] of them, in the order they happened.
    pub failures: Vec<Failure>,
    pub seconds: f64,
}

impl Load {
    /// `conns` client threads on `addr`; `phases` is how many phase indices the driver uses.
    /// With a `rate` (requests/s, all connections together), each connection paces its
    /// requests to its share; without, they go back to back.
    pub fn start(addr: SocketAddr, conns: usize, phases: usize, rate: Option<f64>) -> Load {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            phase: AtomicUsize::new(0),
            ok: (0..phases).map(|_| AtomicU64::new(0)).collect(),
            failed: (0..phases).map(|_| AtomicU64::new(0)).collect(),
            connects: AtomicU64::new(0),
            closed_idle: AtomicU64::new(0),
            failures: Mutex::new(Vec::new()),
        });
        let threads = (0..conns)
            .map(|_| {
                let shared = shared.clone();
                let every = rate.map(|r| Duration::from_secs_f64(conns as f64 / r));
                thread::spawn(move || client(addr, &shared, every))
            })
            .collect();
        Load {
            shared,
            threads,
            started: Instant::now(),
        }
    }

    /// From now on, answers and failures count against `phase`.
    pub fn set_phase(&self, phase: usize) {
        self.shared.phase.store(phase, Ordering::SeqCst);
    }

    /// Requests answered so far, all phases.
    pub fn answered(&self) -> u64 {
        self.shared
            .ok
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Failed requests so far, all phases.
    pub fn failed(&self) -> u64 {
        self.shared
            .failed
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Stops the clients (each finishes its request in flight, bounded by [`TIMEOUT`]).
    pub fn stop(self) -> Totals {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
        let s = &self.shared;
        Totals {
            ok: s.ok.iter().map(|c| c.load(Ordering::SeqCst)).collect(),
            failed: s.failed.iter().map(|c| c.load(Ordering::SeqCst)).collect(),
            connects: s.connects.load(Ordering::SeqCst),
            closed_idle: s.closed_idle.load(Ordering::SeqCst),
            failures: s.failures.lock().unwrap().clone(),
            seconds: self.started.elapsed().as_secs_f64(),
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn client(addr: SocketAddr, shared: &Shared, every: Option<Duration>) {
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(4096);
    let mut next = Instant::now();
    while !shared.stop.load(Ordering::SeqCst) {
        if let Some(every) = every {
            // A fixed schedule, not a pause after each answer: a slow answer is not followed
            // by a slower pace (but a late connection does not burst to catch up either).
            let now = Instant::now();
            if next > now {
                thread::sleep(next - now);
            }
            next = next.max(now) + every;
        }
        let sent_in = shared.phase.load(Ordering::SeqCst);
        // A keep-alive connection the server closed while it was idle (a worker that crashed
        // or was killed between two of its requests) is seen before sending, as a pooling
        // client (hyper's, a browser's) sees it, and replaced: no request was lost on it.
        // wrk would count the next request on it as a read error; the count is reported.
        if conn.as_ref().is_some_and(closed_by_peer) {
            conn = None;
            shared.closed_idle.fetch_add(1, Ordering::Relaxed);
        }
        let result = match conn.take() {
            Some(stream) => Ok(stream),
            None => connect(addr).inspect(|_| {
                shared.connects.fetch_add(1, Ordering::Relaxed);
            }),
        }
        .and_then(|mut stream| {
            let keep = request(&mut stream, &mut buf)?;
            Ok(keep.then_some(stream))
        });
        let phase = shared.phase.load(Ordering::SeqCst);
        match result {
            Ok(stream) => {
                shared.ok[phase].fetch_add(1, Ordering::Relaxed);
                conn = stream;
            }
            Err((kind, detail)) => {
                shared.failed[phase].fetch_add(1, Ordering::Relaxed);
                let mut failures = shared.failures.lock().unwrap();
                if failures.len() < KEEP_FAILURES {
                    failures.push(Failure {
                        at_ms: now_ms(),
                        phase,
                        sent_in,
                        kind,
                        detail,
                    });
                }
                drop(failures);
                // A server that refuses connections (none should) is not hammered.
                if kind == "connect" {
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

/// Whether the server closed (or reset) this idle connection: a peek that does not wait finds
/// its end (or an error) rather than nothing to read.
fn closed_by_peer(stream: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    match socket2::SockRef::from(stream)
        .recv_with_flags(&mut byte, nix::libc::MSG_PEEK | nix::libc::MSG_DONTWAIT)
    {
        Ok(0) => true,
        // Bytes nobody asked for: the connection is out of step; not one to reuse.
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

type Failed = (&'static str, String);

fn connect(addr: SocketAddr) -> Result<TcpStream, Failed> {
    let stream =
        TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| ("connect", e.to_string()))?;
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| ("connect", e.to_string()))?;
    stream
        .set_write_timeout(Some(TIMEOUT))
        .map_err(|e| ("connect", e.to_string()))?;
    Ok(stream)
}

/// One `GET /` and its whole response; returns whether the connection may be used again.
fn request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<bool, Failed> {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(|e| ("write", e.to_string()))?;
    buf.clear();
    let started = Instant::now();
    let mut chunk = [0u8; 4096];
    // Read until the head is complete, then until the body has its Content-Length.
    let mut head: Option<(usize, u16, usize, bool)> = None;
    loop {
        if let Some((head_len, status, length, close)) = head {
            if buf.len() >= head_len + length {
                if !(200..300).contains(&status) {
                    return Err(("status", format!("status {status}")));
                }
                return Ok(!close && buf.len() == head_len + length);
            }
        }
        let n = match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => {
                return Err(("closed", "connection closed before any response".into()))
            }
            Ok(0) => return Err(("closed", "connection closed mid-response".into())),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err((
                    "timeout",
                    format!("no response within {:?}", started.elapsed()),
                ))
            }
            Err(e) => return Err(("read", e.to_string())),
        };
        buf.extend_from_slice(&chunk[..n]);
        if head.is_none() {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let (status, length, close) = parse_head(&buf[..end]).ok_or_else(|| {
                    (
                        "bad response",
                        String::from_utf8_lossy(&buf[..end.min(200)]).into_owned(),
                    )
                })?;
                head = Some((end + 4, status, length, close));
            }
        }
    }
}

/// Status, Content-Length and whether the server closes the connection, from a response head.
fn parse_head(head: &[u8]) -> Option<(u16, usize, bool)> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let (mut length, mut close) = (None, false);
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse().ok();
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    Some((status, length?, close))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_response_head() {
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\ndate: x"),
            Some((200, 12, false))
        );
        assert_eq!(
            parse_head(
                b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0"
            ),
            Some((503, 0, true))
        );
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nx: y"), None);
    }
}

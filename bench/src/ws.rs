//! The WebSocket client of figure 13 (tokio-tungstenite, one thread): echo round trips with
//! sequence numbers on N connections, and N idle connections held open for the memory figure.
//!
//! One thread, as wrk runs with one: the client takes about one core of two, and the servers
//! get the same client whatever they are.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use futures_util::{stream, SinkExt, StreamExt};
use tokio::{net::TcpStream, runtime::Runtime};
use tokio_tungstenite::{tungstenite::Message, WebSocketStream};

type Ws = WebSocketStream<TcpStream>;

/// A message not answered within this is counted lost (wrk's `--timeout`, which figures 1-2 use).
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in flight while connecting: well under the servers' listen backlog (1024), so
/// that opening 10,000 connections never waits out a dropped SYN's retransmission (1 s).
const OPENING: usize = 128;
/// A connection whose handshake is not done within this counts as refused.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// What follows the sequence number in every message: 32 bytes in all with `echo 1 `, a few
/// more as the numbers grow.
const PAD: &str = "xxxxxxxxxxxxxxxxxxxxxxxxx";

/// Connections open to one server, on their own runtime.
pub struct Clients {
    // Before `rt`: fields drop in order, and the streams deregister from the runtime's reactor.
    conns: Vec<Ws>,
    /// Connections that did not open (connect, handshake, or a timeout).
    pub refused: u64,
    rt: Runtime,
}

/// What one echo run measured, over every connection.
#[derive(Debug, Default, Clone)]
pub struct Echo {
    /// Round trips answered with the number just sent.
    pub answered: u64,
    pub secs: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Messages never answered (within 5 s, or before the run's end).
    pub lost: u64,
    /// Answers with a number already answered.
    pub duplicated: u64,
    /// Answers that came after a later message was sent (late past the 5 s, or a number never
    /// sent).
    pub reordered: u64,
    /// Connections closed or broken during the run (by the server or the network).
    pub dropped: u64,
    /// Connections that did not open.
    pub refused: u64,
}

impl Echo {
    pub fn per_second(&self) -> f64 {
        self.answered as f64 / self.secs
    }

    /// Every way a message or a connection can go wrong: 0 is the goal.
    pub fn faults(&self) -> u64 {
        self.lost + self.duplicated + self.reordered + self.dropped + self.refused
    }
}

impl Clients {
    /// Opens `n` WebSocket connections to `ws://addr/`, at most [`OPENING`] handshakes at a
    /// time. Each socket closes with a reset when dropped (SO_LINGER 0): 10,000 connections
    /// opened per round would otherwise leave 10,000 ports in TIME_WAIT.
    pub fn connect(addr: &str, n: usize) -> Clients {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let url = format!("ws://{addr}/");
        let opened: Vec<Option<Ws>> = rt.block_on(
            stream::iter(0..n)
                .map(|_| open(addr, &url))
                .buffer_unordered(OPENING)
                .collect(),
        );
        let refused = opened.iter().filter(|c| c.is_none()).count() as u64;
        Clients {
            conns: opened.into_iter().flatten().collect(),
            refused,
            rt,
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Echo round trips on every connection until `length` has passed: each sends `echo N`
    /// (N counting from 1 on each connection) and waits for the answer carrying N before it
    /// sends N + 1. Latency is from the send to the answer.
    pub fn echo(self, length: Duration) -> Echo {
        let Clients { conns, refused, rt } = self;
        let start = Instant::now();
        let deadline = start + length;
        let per_conn: Vec<Conn> = rt.block_on(async {
            let tasks: Vec<_> = conns
                .into_iter()
                .map(|ws| tokio::spawn(talk(ws, deadline)))
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        let secs = start.elapsed().as_secs_f64();
        let mut latencies: Vec<u32> = per_conn
            .iter()
            .flat_map(|c| c.latencies_us.iter().copied())
            .collect();
        latencies.sort_unstable();
        let at = |q: f64| -> f64 {
            if latencies.is_empty() {
                return 0.0;
            }
            let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len());
            f64::from(latencies[i - 1]) / 1000.0
        };
        let sum = |f: fn(&Conn) -> u64| per_conn.iter().map(f).sum::<u64>();
        Echo {
            answered: latencies.len() as u64,
            secs,
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            lost: sum(|c| c.lost.len() as u64),
            duplicated: sum(|c| c.duplicated),
            reordered: sum(|c| c.reordered),
            dropped: sum(|c| u64::from(c.dropped)),
            refused,
        }
    }
}

async fn open(addr: &str, url: &str) -> Option<Ws> {
    let connect = async {
        let tcp = TcpStream::connect(addr).await.ok()?;
        tcp.set_nodelay(true).ok()?;
        socket2::SockRef::from(&tcp)
            .set_linger(Some(Duration::ZERO))
            .ok()?;
        let (ws, _) = tokio_tungstenite::client_async(url, tcp).await.ok()?;
        Some(ws)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .ok()
        .flatten()
}

/// One connection's run.
#[derive(Default)]
struct Conn {
    latencies_us: Vec<u32>,
    /// Numbers not answered yet, past their timeout.
    lost: HashSet<u64>,
    duplicated: u64,
    reordered: u64,
    dropped: bool,
}

async fn talk(mut ws: Ws, deadline: Instant) -> Conn {
    let mut c = Conn::default();
    let mut seq = 0u64;
    'run: while Instant::now() < deadline {
        seq += 1;
        let sent = Instant::now();
        if ws
            .send(Message::text(format!("echo {seq} {PAD}")))
            .await
            .is_err()
        {
            c.dropped = true;
            break;
        }
        loop {
            match tokio::time::timeout(REPLY_TIMEOUT, ws.next()).await {
                Err(_) => {
                    c.lost.insert(seq);
                    break;
                }
                Ok(Some(Ok(Message::Text(text)))) => match number(&text) {
                    Some(n) if n == seq => {
                        let us = sent.elapsed().as_micros();
                        c.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                        break;
                    }
                    // Answered after its timeout, once the next was sent: late, not lost.
                    Some(n) if c.lost.remove(&n) => c.reordered += 1,
                    Some(n) if n < seq => c.duplicated += 1,
                    _ => c.reordered += 1,
                },
                Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) => {
                    c.dropped = true;
                    break 'run;
                }
                // Pings (tungstenite answers them), pongs, binary: not ours.
                Ok(Some(Ok(_))) => {}
            }
        }
    }
    c
}

/// The number in an answer: the baseline echoes `echo N ...`, the chat plugin answers
/// `v1 echo N ...` (its version first).
fn number(text: &str) -> Option<u64> {
    let mut words = text.split_whitespace();
    words.find(|w| *w == "echo")?;
    words.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_number_is_read_from_both_servers_answers() {
        assert_eq!(number(&format!("echo 7 {PAD}")), Some(7));
        assert_eq!(number(&format!("v2 echo 12 {PAD}")), Some(12));
        assert_eq!(number("text messages only"), None);
        assert_eq!(format!("echo 1 {PAD}").len(), 32);
    }
}

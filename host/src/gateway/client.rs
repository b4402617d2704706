//! One client's WebSocket connection in a gateway: a reader that hands its messages to the
//! router, and a writer that sends what the plugin sends it, through a bounded buffer.
//!
//! A client that does not read what it is sent (a slow phone, a stuck tab) fills its buffer:
//! past [`MAX_OUT`] messages or [`MAX_OUT_BYTES`] it is closed with 1013, and the log says
//! so, rather than the gateway's memory growing for it. Pings are answered (tungstenite queues
//! the pong; the writer flushes it).

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc, Mutex,
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::{
    tungstenite::{
        protocol::{frame::coding::CloseCode, CloseFrame},
        Message, Utf8Bytes,
    },
    WebSocketStream,
};

use super::router::{show, Router};

/// Messages waiting to be written to one client, at most.
pub const MAX_OUT: usize = 1000;
pub const MAX_OUT_BYTES: usize = 1024 * 1024;

pub enum Out {
    Message(Message),
    /// Write what tungstenite queued (a pong).
    Flush,
}

/// The router's handle on a client's connection.
pub struct Client {
    out: mpsc::Sender<Out>,
    bytes: Arc<AtomicUsize>,
    closing: Arc<Closing>,
}

#[derive(Default)]
struct Closing {
    with: Mutex<Option<(u16, String)>>,
    wake: Notify,
}

/// The writer's side of a client's connection.
pub struct ClientOut {
    rx: mpsc::Receiver<Out>,
    /// To ask for a flush (weak: the router's handle alone keeps the channel open).
    flush: mpsc::WeakSender<Out>,
    bytes: Arc<AtomicUsize>,
    closing: Arc<Closing>,
}

impl Client {
    pub fn new() -> (Client, ClientOut) {
        let (tx, rx) = mpsc::channel(MAX_OUT);
        let bytes = Arc::new(AtomicUsize::new(0));
        let closing = Arc::new(Closing::default());
        let flush = tx.downgrade();
        (
            Client {
                out: tx,
                bytes: bytes.clone(),
                closing: closing.clone(),
            },
            ClientOut {
                rx,
                flush,
                bytes,
                closing,
            },
        )
    }

    /// Queues a message; closes the client with 1013 if its buffer is full.
    pub fn send(&self, text: bool, data: Bytes) {
        let len = data.len();
        let message = if text {
            match Utf8Bytes::try_from(data) {
                Ok(t) => Message::Text(t),
                Err(_) => return, // plugin-api sends text only from a &str
            }
        } else {
            Message::Binary(data)
        };
        let queued = self.bytes.fetch_add(len, Ordering::Relaxed) + len;
        if queued > MAX_OUT_BYTES || self.out.try_send(Out::Message(message)).is_err() {
            self.bytes.fetch_sub(len, Ordering::Relaxed);
            self.close(1013, "too slow: the send buffer is full");
        }
    }

    /// Closes the connection with `code` (the first close wins).
    pub fn close(&self, code: u16, reason: &str) {
        let mut with = self.closing.with.lock().unwrap();
        if with.is_none() {
            *with = Some((code, reason.to_string()));
            self.closing.wake.notify_one();
        }
    }
}

impl ClientOut {
    /// The close code asked for, if any (for tests).
    pub fn closed_with(&self) -> Option<u16> {
        self.closing.with.lock().unwrap().as_ref().map(|(c, _)| *c)
    }
}

/// Serves one client's upgraded connection until it ends; the router hears of its messages
/// and of its end.
pub async fn run<S>(router: Arc<Router>, id: u64, ws: WebSocketStream<S>, mut out: ClientOut)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let flush = out.flush.clone();
    let writer = {
        let closing = out.closing.clone();
        let bytes = out.bytes.clone();
        async move {
            loop {
                let notified = closing.wake.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let close = closing.with.lock().unwrap().clone();
                if let Some((code, reason)) = close {
                    let frame = CloseFrame {
                        code: CloseCode::from(code),
                        reason: reason.into(),
                    };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    let _ = sink.close().await;
                    return;
                }
                tokio::select! {
                    _ = &mut notified => continue,
                    next = out.rx.recv() => match next {
                        Some(Out::Message(m)) => {
                            let len = match &m {
                                Message::Text(t) => t.len(),
                                Message::Binary(b) => b.len(),
                                _ => 0,
                            };
                            // Everything queued goes out with one flush.
                            let mut failed = sink.feed(m).await.is_err();
                            bytes.fetch_sub(len, Ordering::Relaxed);
                            while !failed {
                                match out.rx.try_recv() {
                                    Ok(Out::Message(m)) => {
                                        let len = match &m {
                                            Message::Text(t) => t.len(),
                                            Message::Binary(b) => b.len(),
                                            _ => 0,
                                        };
                                        failed = sink.feed(m).await.is_err();
                                        bytes.fetch_sub(len, Ordering::Relaxed);
                                    }
                                    Ok(Out::Flush) => {}
                                    Err(_) => break,
                                }
                            }
                            if failed || sink.flush().await.is_err() {
                                return;
                            }
                        }
                        Some(Out::Flush) => {
                            if sink.flush().await.is_err() {
                                return;
                            }
                        }
                        // The router forgot the client: its connection is over.
                        None => {
                            let _ = sink.close().await;
                            return;
                        }
                    },
                }
            }
        }
    };
    let reader = {
        let router = router.clone();
        let pongs = move || {
            if let Some(tx) = flush.upgrade() {
                let _ = tx.try_send(Out::Flush);
            }
        };
        async move {
            while let Some(message) = stream.next().await {
                match message {
                    Ok(Message::Text(t)) => router.message(id, true, Bytes::from(t)),
                    Ok(Message::Binary(b)) => router.message(id, false, b),
                    Ok(Message::Ping(_)) => pongs(),
                    Ok(Message::Close(_)) => break,
                    Ok(Message::Pong(_) | Message::Frame(_)) => {}
                    Err(e) => {
                        tracing::debug!("client {}: {e}", show(id));
                        break;
                    }
                }
            }
        }
    };
    tokio::pin!(writer);
    tokio::select! {
        _ = reader => {
            // The client left (or broke): the plugin hears of it; the writer sends what is
            // still queued and ends when the router forgets the client.
            router.gone(id);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), &mut writer).await;
        }
        _ = &mut writer => router.gone(id),
    }
}

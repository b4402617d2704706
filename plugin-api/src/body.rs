//! Bodies that do not fit in memory: a request body read as a stream ([`crate::Request::chunk`]),
//! and responses written as a stream ([`BodySender`], server-sent events with [`SseSender`]).
//!
//! Both directions cross the boundary as a [`crate::ffi::ChunkSource`] whose `next_chunk`
//! future waits on a small channel: a producer that runs ahead of its reader waits in `send`,
//! so memory stays bounded whatever the body's size (backpressure).

use std::{fmt, sync::Arc};

use abi_stable::std_types::{RErr, RNone, ROk, RSome, RVec};
use async_ffi::FutureExt;
use tokio::sync::{mpsc, Mutex};

use crate::ffi::{ChunkSource, ChunkSource_TO, FfiBodyError, FfiChunk, FfiChunks, FfiFuture};

/// Chunks a response stream may run ahead of the client.
const STREAM_BUFFER: usize = 4;

/// Why a request body could not be read: too large, stalled, or broken off by the client.
/// Turn it into the fitting response with `Response::from(err)` (413, 408 or 400).
#[derive(Debug, Clone, PartialEq)]
pub struct BodyError {
    status: u16,
    message: String,
}

impl BodyError {
    pub(crate) fn new(status: u16, message: impl Into<String>) -> BodyError {
        BodyError {
            status,
            message: message.into(),
        }
    }

    pub(crate) fn from_ffi(e: FfiBodyError) -> BodyError {
        BodyError::new(e.status, e.message.into_string())
    }

    /// The HTTP status that fits: 413, 408 or 400.
    pub fn status(&self) -> u16 {
        self.status
    }
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BodyError {}

impl From<BodyError> for crate::Response {
    fn from(e: BodyError) -> crate::Response {
        crate::Response::text(e.status, format!("{}\n", e.message))
    }
}

/// The client went away: nobody reads the stream any more. Stop producing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the client closed the stream")
    }
}

impl std::error::Error for Closed {}

/// The writing end of a streamed response (see [`crate::Response::stream`]). Each `send`
/// waits while the client is slower than the plugin; dropping the sender ends the body.
pub struct BodySender {
    tx: mpsc::Sender<Vec<u8>>,
}

impl BodySender {
    /// Sends the next chunk (sent as is: an HTTP/1.1 chunk, or an HTTP/2 DATA frame).
    pub async fn send(&self, chunk: impl Into<Vec<u8>>) -> Result<(), Closed> {
        self.tx.send(chunk.into()).await.map_err(|_| Closed)
    }

    /// Whether the client has gone away.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The writing end of a server-sent event stream (see [`crate::Response::sse`]).
pub struct SseSender {
    inner: BodySender,
}

impl SseSender {
    /// Sends one event: `event` names it (`None`: the default "message"), `data` may hold
    /// several lines.
    pub async fn send(&self, event: Option<&str>, data: &str) -> Result<(), Closed> {
        let mut text = String::with_capacity(data.len() + 16);
        if let Some(event) = event {
            text.push_str("event: ");
            text.push_str(event);
            text.push('\n');
        }
        for line in data.split('\n') {
            text.push_str("data: ");
            text.push_str(line);
            text.push('\n');
        }
        text.push('\n');
        self.inner.send(text).await
    }

    /// Sends a comment line, which clients ignore: keeps idle proxies from closing the stream.
    pub async fn keep_alive(&self) -> Result<(), Closed> {
        self.inner.send(":\n\n").await
    }

    /// Whether the client has gone away.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }
}

/// A response stream's reading end, as the host sees it.
struct Outgoing {
    rx: Arc<Mutex<mpsc::Receiver<Vec<u8>>>>,
}

impl ChunkSource for Outgoing {
    fn next_chunk(&mut self) -> FfiFuture<FfiChunk> {
        let rx = self.rx.clone();
        async move {
            match rx.lock().await.recv().await {
                Some(chunk) => ROk(RSome(RVec::from(chunk))),
                None => ROk(RNone),
            }
        }
        .into_ffi()
    }
}

/// A new response stream: the sender for the plugin, the source for the host.
pub(crate) fn channel() -> (BodySender, FfiChunks) {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let source = Outgoing {
        rx: Arc::new(Mutex::new(rx)),
    };
    (
        BodySender { tx },
        ChunkSource_TO::from_value(source, abi_stable::sabi_trait::TD_Opaque),
    )
}

pub(crate) fn sse_sender(inner: BodySender) -> SseSender {
    SseSender { inner }
}

/// A request body as the plugin reads it: what arrived with the head, then the host's stream.
pub(crate) struct Incoming {
    pub(crate) first: Option<Vec<u8>>,
    pub(crate) rest: Option<FfiChunks>,
    /// Bytes handed out so far.
    pub(crate) read: u64,
    /// Where the stream is cut (`max_stream_bytes`; the host cuts there too).
    pub(crate) limit: u64,
}

impl Incoming {
    pub(crate) fn whole(bytes: Vec<u8>) -> Incoming {
        Incoming {
            first: Some(bytes),
            rest: None,
            read: 0,
            limit: u64::MAX,
        }
    }

    /// Whether the whole body was already here when the handler started.
    pub(crate) fn is_whole(&self) -> bool {
        self.rest.is_none()
    }

    pub(crate) async fn next(&mut self) -> Result<Option<Vec<u8>>, BodyError> {
        if let Some(first) = self.first.take().filter(|b| !b.is_empty()) {
            self.read += first.len() as u64;
            return Ok(Some(first));
        }
        let Some(rest) = self.rest.as_mut() else {
            return Ok(None);
        };
        match rest.next_chunk().await {
            ROk(RSome(chunk)) => {
                self.read += chunk.len() as u64;
                if self.read > self.limit {
                    self.rest = None;
                    return Err(BodyError::new(
                        413,
                        format!(
                            "the request body is larger than this service's max_stream_bytes \
                             ({} bytes)",
                            self.limit
                        ),
                    ));
                }
                Ok(Some(chunk.into_vec()))
            }
            ROk(RNone) => {
                self.rest = None;
                Ok(None)
            }
            RErr(e) => {
                self.rest = None;
                Err(BodyError::from_ffi(e))
            }
        }
    }
}

//! Bodies between hyper and a plugin: the response body type every route answers with (whole,
//! or streamed from the plugin), and the pump that streams a request body to an async plugin.
//!
//! Both streams go through a small bounded channel or one `next_chunk` future at a time, so a
//! slow side slows the other down instead of filling memory: a 2 GiB upload read by a plugin
//! passes through a few chunks of buffer, and a plugin that streams faster than its client
//! reads waits in its `send`.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use abi_stable::std_types::{RErr, RNone, ROk, RSome, RVec};
use async_ffi::FutureExt;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use plugin_api::ffi::{ChunkSource, ChunkSource_TO, FfiBodyError, FfiChunk, FfiChunks, FfiFuture};
use tokio::sync::{mpsc, Mutex};

/// Chunks of a request body read ahead of the plugin.
const PUMP_BUFFER: usize = 2;

/// A response body: all of it, or a plugin's stream (boxed: responses stay small on the common
/// path).
pub enum Body {
    Full(Option<Bytes>),
    Stream(Box<Streamed>),
}

pub struct Streamed {
    source: FfiChunks,
    /// The `next_chunk` call in progress.
    pending: Option<FfiFuture<FfiChunk>>,
}

impl Body {
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        Body::Full(Some(bytes.into()))
    }

    pub fn stream(source: FfiChunks) -> Body {
        Body::Stream(Box::new(Streamed {
            source,
            pending: None,
        }))
    }
}

/// Why a plugin's response stream failed (the connection is reset mid-body: the status has
/// been sent).
#[derive(Debug)]
pub struct StreamError(pub String);

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StreamError {}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = StreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamError>>> {
        match self.get_mut() {
            Body::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(stream) => {
                let Streamed { source, pending } = &mut **stream;
                // hyper polls for the next frame only when it can write: that is the
                // backpressure on the plugin.
                let future = pending.get_or_insert_with(|| source.next_chunk());
                let chunk = match Pin::new(future).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(chunk) => chunk,
                };
                *pending = None;
                Poll::Ready(match chunk {
                    ROk(RSome(bytes)) => Some(Ok(Frame::data(Bytes::from(bytes.into_vec())))),
                    ROk(RNone) => None,
                    RErr(e) => Some(Err(StreamError(e.message.into_string()))),
                })
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}

use std::future::Future;

/// The plugin's end of a request body that the host streams to it.
struct Pumped {
    rx: Arc<Mutex<mpsc::Receiver<Result<Bytes, FfiBodyError>>>>,
}

impl ChunkSource for Pumped {
    fn next_chunk(&mut self) -> FfiFuture<FfiChunk> {
        // Polled on the plugin's threads: a tokio channel and mutex need no runtime context.
        let rx = self.rx.clone();
        async move {
            match rx.lock().await.recv().await {
                Some(Ok(bytes)) => ROk(RSome(RVec::from(bytes.to_vec()))),
                Some(Err(e)) => RErr(e),
                None => ROk(RNone),
            }
        }
        .into_ffi()
    }
}

/// Streams `body` to a plugin from a task of the worker's runtime (hyper's body and the
/// `body_timeout` timer belong to it), at most `limit` bytes and never stalled longer than
/// `stall` between two parts. The task reads a frame only once the channel has room, so the
/// client sends no faster than the plugin reads; it ends when the plugin drops its end.
pub fn pump(mut body: Incoming, limit: u64, stall: Duration) -> FfiChunks {
    let (tx, rx) = mpsc::channel(PUMP_BUFFER);
    tokio::spawn(async move {
        let mut total: u64 = 0;
        loop {
            let Ok(permit) = tx.reserve().await else {
                return; // the plugin dropped the body
            };
            let failed = |status: u16, message: String| {
                Err(FfiBodyError {
                    status,
                    message: message.into(),
                })
            };
            match tokio::time::timeout(stall, body.frame()).await {
                Err(_) => {
                    let stall = humantime::format_duration(stall);
                    return permit.send(failed(
                        408,
                        format!("the request body stalled for longer than {stall} (body_timeout)"),
                    ));
                }
                Ok(None) => return,
                Ok(Some(Err(e))) => {
                    return permit
                        .send(failed(400, format!("could not read the request body: {e}")))
                }
                Ok(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    total += data.len() as u64;
                    if total > limit {
                        return permit.send(failed(
                            413,
                            format!(
                                "the request body is larger than this service's max_stream_bytes \
                                 ({limit} bytes)"
                            ),
                        ));
                    }
                    permit.send(Ok(data));
                }
            }
        }
    });
    ChunkSource_TO::from_value(
        Pumped {
            rx: Arc::new(Mutex::new(rx)),
        },
        abi_stable::sabi_trait::TD_Opaque,
    )
}

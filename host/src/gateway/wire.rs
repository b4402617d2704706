//! The frames between a gateway and a business worker: length-prefixed, postcard-encoded.
//!
//! Any ordered byte stream carries them: today a Unix socketpair the master makes for each
//! (gateway, worker) pair; a TCP connection would do as well, which is the door to business
//! workers on other machines. Each direction is one ordered stream, which is what the
//! guarantees rest on: a worker's sends and group changes for an event reach the event's
//! gateway before the worker's [`FromBusiness::Done`] for it.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::mpsc,
};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

/// A client's session, as its gateway keeps it.
pub type Session = Vec<(String, String)>;

/// What a gateway sends a business worker.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToBusiness {
    /// A client asks to connect; the worker answers with `Done` and a verdict.
    Connect {
        seq: u64,
        client: u64,
        request: ConnectInfo,
    },
    Message {
        seq: u64,
        client: u64,
        text: bool,
        data: Bytes,
        session: Session,
    },
    /// The client is gone.
    Close {
        seq: u64,
        client: u64,
        session: Session,
    },
    /// The answer to an [`FromBusiness::Ask`].
    Answer { id: u64, answer: Answer },
}

/// The handshake request of a connecting client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectInfo {
    pub path: String,
    pub query: String,
    pub peer: String,
    pub headers: Vec<(String, Bytes)>,
    pub tls: bool,
}

/// What a business worker sends a gateway.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromBusiness {
    /// Event `seq` of `client` is handled (and everything it asked for was sent before this).
    /// For a `Connect`: `refused` says why the client is turned away, if it is.
    Done {
        seq: u64,
        client: u64,
        refused: Option<String>,
    },
    Send {
        to: Target,
        text: bool,
        data: Bytes,
    },
    Join {
        client: u64,
        group: String,
    },
    Leave {
        client: u64,
        group: String,
    },
    Close {
        client: u64,
    },
    SetSession {
        client: u64,
        key: String,
        value: Option<String>,
    },
    Ask {
        id: u64,
        question: Question,
    },
}

/// Who a message goes to (on the gateway it is sent to).
#[derive(Debug, Serialize, Deserialize)]
pub enum Target {
    Clients(Vec<u64>),
    Group(String),
    All,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Question {
    GroupClients(String),
    Session(u64),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Answer {
    Clients(Vec<u64>),
    Session(Option<Session>),
}

/// The largest frame: a message, a session and a handshake's headers, with room to spare.
pub fn max_frame(max_message_bytes: usize) -> usize {
    max_message_bytes + 256 * 1024
}

pub fn encode(frame: &impl Serialize) -> Bytes {
    Bytes::from(postcard::to_allocvec(frame).expect("frames serialize"))
}

/// Splits a stream into a sender of encoded frames (a task writes them, in order) and a
/// stream of decoded ones. The sender's channel is unbounded: what goes in is bounded by the
/// gateway's per-client limits and the worker's one-event-at-a-time handling.
pub fn open<S, In>(
    stream: S,
    max_message_bytes: usize,
) -> (
    mpsc::UnboundedSender<Bytes>,
    impl futures_util::Stream<Item = Result<In, String>>,
)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    In: DeserializeOwned,
{
    let codec = || {
        LengthDelimitedCodec::builder()
            .max_frame_length(max_frame(max_message_bytes))
            .new_codec()
    };
    let (read, write) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    let mut sink = FramedWrite::new(write, codec());
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            // Everything queued goes out with one flush.
            if sink.feed(first).await.is_err() {
                return;
            }
            while let Ok(more) = rx.try_recv() {
                if sink.feed(more).await.is_err() {
                    return;
                }
            }
            if SinkExt::<Bytes>::flush(&mut sink).await.is_err() {
                return;
            }
        }
        let _ = SinkExt::<Bytes>::close(&mut sink).await;
    });
    let frames = FramedRead::new(read, codec()).map(|frame| {
        let frame = frame.map_err(|e| format!("link: {e}"))?;
        postcard::from_bytes(&frame).map_err(|e| format!("link: unreadable frame: {e}"))
    });
    (tx, frames)
}

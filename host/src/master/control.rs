//! The control socket: `host reload|status|stop` talk to the master here.
//!
//! One request per connection, as a JSON line; the master answers with JSON lines, the last of
//! which is `Status`, `Done` or `Error`. A reload keeps running if its client goes away; a stop
//! is answered by the run loop after the last worker exited (see `master::run`). The admin API
//! (`crate::admin`) starts the same operations the same way.
//!
//! Every input is bounded: only the master's own user (or root) may talk to it (the peer's
//! credentials, SO_PEERCRED, are checked, beside the socket's 0600 mode); a request line is at
//! most [`MAX_REQUEST`] bytes and must arrive within [`REQUEST_TIMEOUT`]; at most
//! [`MAX_CONNECTIONS`] clients are served at once. Anything else gets one error line and the
//! connection is closed, so a misbehaving client costs the master nothing lasting.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{unix::OwnedWriteHalf, UnixListener, UnixStream},
    sync::{mpsc, Semaphore},
};
use tracing::Instrument;

use super::{Master, Op};
use crate::protocol::{ControlReply, ControlRequest};

/// The longest request line, newline included.
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Control connections served at once.
const MAX_CONNECTIONS: usize = 32;

/// Accepts control connections for the life of the master.
pub async fn serve(master: Arc<Master>, listener: UnixListener) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let me = nix::unistd::geteuid().as_raw();
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                let uid = stream.peer_cred().map(|c| c.uid()).ok();
                if uid != Some(me) && uid != Some(0) {
                    tracing::warn!(
                        "refused a control connection from uid {uid:?}: only uid {me} (who runs \
                         the master) and root may control it"
                    );
                    let refusal = ControlReply::Error(format!(
                        "permission denied: this master runs as uid {me}; only that user and root \
                         may control it"
                    ));
                    tokio::spawn(async move {
                        let _ = stream.write_all(&crate::protocol::encode(&refusal)).await;
                    });
                    continue;
                }
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    let busy = ControlReply::Error(format!(
                        "the master is serving {MAX_CONNECTIONS} control connections already; \
                         try again"
                    ));
                    tokio::spawn(async move {
                        let _ = stream.write_all(&crate::protocol::encode(&busy)).await;
                    });
                    continue;
                };
                let master = master.clone();
                tokio::spawn(
                    async move {
                        handle(master, stream).await;
                        drop(slot);
                    }
                    .in_current_span(),
                );
            }
            Err(e) => {
                tracing::warn!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(master: Arc<Master>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // One byte more than allowed: a line that fills it is too long.
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64 + 1);
    let problem = match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => Some(format!(
            "no request line within {}",
            humantime::format_duration(REQUEST_TIMEOUT)
        )),
        Ok(Err(e)) => Some(format!("could not read the request: {e}")),
        Ok(Ok(_)) if line.len() > MAX_REQUEST => Some(format!(
            "request line longer than {MAX_REQUEST} bytes; refused"
        )),
        Ok(Ok(_)) if !line.ends_with('\n') => Some("incomplete request line".into()),
        Ok(Ok(_)) => None,
    };
    if let Some(problem) = problem {
        tracing::warn!("control connection: {problem}");
        let _ = send(&mut write, &ControlReply::Error(problem)).await;
        return;
    }
    let request = match serde_json::from_str::<ControlRequest>(&line) {
        Ok(r) => r,
        Err(e) => {
            let reply = ControlReply::Error(format!(
                "unreadable request ({e}); are the CLI and the master the same version?"
            ));
            let _ = send(&mut write, &reply).await;
            return;
        }
    };
    match request {
        ControlRequest::ReopenLogs => {
            let reply = match master.reopen_logs().await {
                Ok(summary) => ControlReply::Done { ok: true, summary },
                Err(e) => ControlReply::Error(e),
            };
            let _ = send(&mut write, &reply).await;
        }
        ControlRequest::Status => {
            let report = master.status().await;
            let _ = send(&mut write, &ControlReply::Status(report)).await;
        }
        ControlRequest::Reload { .. }
        | ControlRequest::Rollback { .. }
        | ControlRequest::Upgrade { .. }
        | ControlRequest::Stop => {
            let (tx, mut rx) = mpsc::unbounded_channel();
            // The job queue (or the run loop, for a stop) carries it out, so it completes even
            // if this client disconnects.
            match request {
                ControlRequest::Reload { services } => {
                    master.submit(Op::Reload(services), "host reload", Some(tx))
                }
                ControlRequest::Rollback { service, to } => {
                    master.submit(Op::Rollback { service, to }, "host rollback", Some(tx))
                }
                ControlRequest::Upgrade { exe } => {
                    master.submit(Op::Upgrade(exe), "host upgrade", Some(tx))
                }
                ControlRequest::Stop => master.request_stop(tx),
                ControlRequest::Status | ControlRequest::ReopenLogs => {
                    unreachable!("matched above")
                }
            }
            while let Some(reply) = rx.recv().await {
                let last = matches!(reply, ControlReply::Done { .. });
                if send(&mut write, &reply).await.is_err() || last {
                    break;
                }
            }
        }
    }
}

pub async fn send(write: &mut OwnedWriteHalf, reply: &ControlReply) -> std::io::Result<()> {
    write.write_all(&crate::protocol::encode(reply)).await
}

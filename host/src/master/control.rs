//! The control socket: `host reload|status|stop` talk to the master here.
//!
//! One request per connection, as a JSON line; the master answers with JSON lines, the last of
//! which is `Status`, `Done` or `Error`. A reload keeps running if its client goes away; a stop
//! is answered by the run loop after the last worker exited (see `master::run`).

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{unix::OwnedWriteHalf, UnixListener, UnixStream},
    sync::mpsc,
};
use tracing::Instrument;

use super::{Master, Op};
use crate::protocol::{ControlReply, ControlRequest};

/// Accepts control connections for the life of the master.
pub async fn serve(
    master: Arc<Master>,
    listener: UnixListener,
    stops: mpsc::UnboundedSender<OwnedWriteHalf>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(handle(master.clone(), stream, stops.clone()).in_current_span());
            }
            Err(e) => {
                tracing::warn!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(
    master: Arc<Master>,
    stream: UnixStream,
    stops: mpsc::UnboundedSender<OwnedWriteHalf>,
) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    if BufReader::new(read).read_line(&mut line).await.is_err() {
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
        ControlRequest::Status => {
            let report = master.status().await;
            let _ = send(&mut write, &ControlReply::Status(report)).await;
        }
        ControlRequest::Reload { .. } | ControlRequest::Rollback { .. } => {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let (op, why) = match request {
                ControlRequest::Reload { services } => (Op::Reload(services), "host reload"),
                ControlRequest::Rollback { service, to } => {
                    (Op::Rollback { service, to }, "host rollback")
                }
                ControlRequest::Status | ControlRequest::Stop => unreachable!("matched above"),
            };
            // The job queue runs it, so it completes even if this client disconnects.
            master.submit(op, why, Some(tx));
            while let Some(reply) = rx.recv().await {
                let last = matches!(reply, ControlReply::Done { .. });
                if send(&mut write, &reply).await.is_err() || last {
                    break;
                }
            }
        }
        ControlRequest::Stop => {
            let n = master.worker_count.borrow().to_owned();
            if send(
                &mut write,
                &ControlReply::Line(format!("stopping: draining {n} workers")),
            )
            .await
            .is_ok()
            {
                // The run loop stops the host and writes the final `Done` on this half.
                let _ = stops.send(write);
            }
        }
    }
}

pub async fn send(write: &mut OwnedWriteHalf, reply: &ControlReply) -> std::io::Result<()> {
    write.write_all(&crate::protocol::encode(reply)).await
}

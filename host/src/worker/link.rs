//! The worker's end of its channel to the master (fd 3): one writer for every message, usable
//! from any thread, async or not.
//!
//! Messages come from the async tasks (READY, heartbeats, stats), and also from whatever
//! thread a plugin panics on (the panic message must reach the master before an abort kills
//! the process). One mutex-guarded writer keeps each JSON line whole; the socket is
//! non-blocking (its read side belongs to tokio), so a full buffer (a master that stopped
//! reading) is waited out briefly and then the message is dropped rather than blocking a task.

use std::{
    io::{ErrorKind, Write},
    os::unix::net::UnixStream,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use crate::protocol::{encode, FromWorker};

/// How long a message may wait for room in the socket buffer.
const SEND_PATIENCE: Duration = Duration::from_secs(1);

pub struct Link {
    writer: Mutex<UnixStream>,
}

/// The worker's link, for callers that have no handle (the plugin's log callback).
static LINK: OnceLock<Arc<Link>> = OnceLock::new();

impl Link {
    /// Wraps a write handle of the channel and makes it reachable through [`Link::global`].
    pub fn install(writer: UnixStream) -> Arc<Link> {
        let link = Arc::new(Link {
            writer: Mutex::new(writer),
        });
        let _ = LINK.set(link.clone());
        link
    }

    /// A link that is not made the process's global one: for unit tests that build a worker's
    /// state in-process (`worker::alloc_count`).
    #[cfg(test)]
    pub fn unregistered(writer: UnixStream) -> Arc<Link> {
        Arc::new(Link {
            writer: Mutex::new(writer),
        })
    }

    pub fn global() -> Option<&'static Arc<Link>> {
        LINK.get()
    }

    /// A start that failed: logs `reason` and tells the master (which gives it to whoever
    /// asked for the start); the process exits with the code returned.
    pub fn start_failed(&self, reason: String) -> std::process::ExitCode {
        tracing::error!("{reason}");
        self.send(&FromWorker::Failed { reason });
        std::process::ExitCode::FAILURE
    }

    /// Sends one message; false if it could not be sent (the master is gone or not reading).
    pub fn send(&self, message: &FromWorker) -> bool {
        let bytes = encode(message);
        let mut writer = match self.writer.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        let deadline = Instant::now() + SEND_PATIENCE;
        let mut sent = 0;
        while sent < bytes.len() {
            match writer.write(&bytes[sent..]) {
                Ok(0) => return false,
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return false,
            }
        }
        true
    }
}

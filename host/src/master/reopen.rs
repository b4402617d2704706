//! `host reopen-logs`, for logrotate: the master opens its log file and the services' access
//! logs again (logrotate moved the old ones), points its own stderr at the new log file, and
//! hands each worker its new files (`fdpass`). Each worker answers once it has switched
//! ([`FromWorker::Reopened`]; for an access log, once its writer thread has written what was
//! logged before to the old file), and the command returns when every worker has answered, so
//! that nothing more goes to the old files from then on: logrotate may compress them at once.
//! A worker that does not answer within [`PATIENCE`] (a slow disk, a worker still starting) is
//! named in the reply, which then fails. Workers started later get the new files at their
//! start.
//!
//! [`FromWorker::Reopened`]: crate::protocol::FromWorker::Reopened

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{sync::oneshot, time::Instant};

use super::{pool::Outgoing, workers, Master};
use crate::protocol::ToWorker;

/// How long the master waits for every worker's answer (a worker waits up to 3 s for its
/// access log writer).
const PATIENCE: Duration = Duration::from_secs(5);

/// A worker's answer to come: its pid and what it was asked to reopen.
type Answer = (u32, &'static str, oneshot::Receiver<Option<String>>);

/// Sends `message(id)` with `file` to the worker `w`, and notes the answer to wait for; none
/// when its channel is closed (it is exiting: its replacement starts with the new files).
fn ask(
    pid: u32,
    w: &mut super::pool::WorkerEntry,
    what: &'static str,
    message: fn(u64) -> ToWorker,
    file: Arc<std::fs::File>,
) -> Option<Answer> {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    w.to_worker.send(Outgoing(message(id), Some(file))).ok()?;
    let (tx, rx) = oneshot::channel();
    w.reopen_waiters.insert(id, tx);
    Some((pid, what, rx))
}

impl Master {
    /// `host reopen-logs` (see the module comment): `Ok` with what was reopened, or `Err` when
    /// a file could not be opened or a worker did not switch.
    pub async fn reopen_logs(&self) -> Result<String, String> {
        // The files would reach this master's workers, not those of the master taking over.
        if let Some(refusal) = self.refused_for_upgrade() {
            return Err(refusal);
        }
        let (reopened, worker_count, answers) = self.send_reopened_files()?;
        if reopened.is_empty() {
            return Ok(
                "nothing to reopen: this master logs to the stderr it was started with \
                 (no --log-file, no --daemon) and no service has an access_log"
                    .into(),
            );
        }
        let deadline = Instant::now() + PATIENCE;
        let mut problems = Vec::new();
        for (pid, what, answer) in answers {
            match tokio::time::timeout_at(deadline, answer).await {
                Ok(Ok(None)) => {}
                Ok(Ok(Some(error))) => problems.push(format!("worker {pid} ({what}): {error}")),
                // It exited meanwhile: its replacement, if any, starts with the new files.
                Ok(Err(_)) => {}
                Err(_) => problems.push(format!(
                    "worker {pid} ({what}) did not confirm within {} s: it may still be \
                     starting, or be stuck; until it switches, its lines go to the old file",
                    PATIENCE.as_secs()
                )),
            }
        }
        let done = format!(
            "reopened {} (the master and its {})",
            reopened.join(", "),
            workers(worker_count)
        );
        if problems.is_empty() {
            return Ok(done);
        }
        Err(format!(
            "{done}, but not every worker switched: {}. Keep the old files uncompressed \
             (logrotate's delaycompress) until they do; `host status` shows the workers",
            problems.join("; ")
        ))
    }

    /// Opens the files again and sends them to the workers; returns what was reopened, how
    /// many workers there are, and the answers to wait for.
    fn send_reopened_files(&self) -> Result<(Vec<String>, usize, Vec<Answer>), String> {
        let mut reopened = Vec::new();
        let mut answers = Vec::new();
        let mut reg = self.registry.lock().unwrap();
        if let Some(path) = &self.log_file {
            crate::daemon::log_to(path)?;
            let file = Arc::new(crate::daemon::open_log(path)?);
            for (pid, w) in reg.workers.iter_mut() {
                let message = |id| ToWorker::ReopenLogs { id };
                answers.extend(ask(*pid, w, "log file", message, file.clone()));
            }
            tracing::info!("log file {} reopened", path.display());
            reopened.push(path.display().to_string());
        }
        // One open file per access log path, shared by the workers that write it.
        let mut access_logs = HashMap::new();
        for (pid, w) in reg.workers.iter_mut() {
            let Some(log) = &w.config.access_log else {
                continue;
            };
            let file = match access_logs.get(&log.path) {
                Some(file) => Arc::clone(file),
                None => {
                    let file = Arc::new(log.open()?);
                    access_logs.insert(log.path.clone(), file.clone());
                    reopened.push(log.path.display().to_string());
                    file
                }
            };
            let message = |id| ToWorker::ReopenAccessLog { id };
            answers.extend(ask(*pid, w, "access log", message, file));
        }
        Ok((reopened, reg.workers.len(), answers))
    }
}

//! Reloads and rollbacks that someone asked for (`host reload`, `host rollback`, SIGHUP and
//! SIGUSR1, the watcher): a queue that runs them one at a time, in order.
//!
//! A reload asked for while an identical one (same services) waits in the queue joins it
//! instead of queueing another: a burst of 200 SIGHUPs during a reload ends in one follow-up
//! reload, and every caller who asked is told the outcome of the reload that covered its
//! request. Rollbacks are never merged, and reloads of other services never either.
//!
//! Changes the master makes by itself (an automatic rollback, a recycled worker) do not queue
//! here: they take only the lock of the service they change (`Service::lock`), which the
//! rollouts of queued jobs take too.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio::sync::{mpsc, Notify};

use super::{
    rollout::{Kind, Outcome},
    service::{Release, Service},
    Master,
};
use crate::protocol::ControlReply;

/// What a job does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Reload these services (sorted; empty: every reloadable one).
    Reload(Vec<String>),
    /// Roll a service back to its previous version, or to the kept one whose hash starts `to`.
    Rollback {
        service: Option<String>,
        to: Option<String>,
    },
    /// Replace the master with a new one from this executable (default: its own).
    Upgrade(Option<std::path::PathBuf>),
}

struct Job {
    op: Op,
    why: String,
    waiters: Vec<mpsc::UnboundedSender<ControlReply>>,
}

/// The queue of jobs; see the module comment.
#[derive(Default)]
pub struct Jobs {
    queue: Mutex<JobQueue>,
    wake: Notify,
}

#[derive(Default)]
struct JobQueue {
    waiting: VecDeque<Job>,
    running: bool,
    running_upgrade: bool,
}

/// Where progress lines go: every caller waiting on the job (if any), and always the log.
#[derive(Clone, Default)]
pub struct Progress(Vec<mpsc::UnboundedSender<ControlReply>>);

impl Progress {
    pub fn log_only() -> Progress {
        Progress::default()
    }

    pub fn line(&self, line: String) {
        tracing::info!("{line}");
        for tx in &self.0 {
            let _ = tx.send(ControlReply::Line(line.clone()));
        }
    }
}

impl Master {
    /// Queues `op` (or joins an identical queued reload). `reply`, if given, receives progress
    /// lines and, at the end, `Done`. `why` names the asker in the log ("SIGHUP").
    /// Why an operation cannot run now, if an upgrade of the master is waiting or under way,
    /// or this master handed over to a new one: what was asked would act on a master that is
    /// going away (a stop would leave the new one serving; a reopen would miss its workers).
    pub fn refused_for_upgrade(&self) -> Option<String> {
        self.upgrade_refusal(&self.jobs.queue.lock().unwrap())
    }

    fn upgrade_refusal(&self, q: &JobQueue) -> Option<String> {
        if let Some(new) = self.home.handed_over_to() {
            return Some(format!(
                "this master handed over to a new one (pid {new}) and is draining; talk to that \
                 one (`host` commands find it through the same state directory)"
            ));
        }
        let upgrading =
            q.running_upgrade || q.waiting.iter().any(|j| matches!(j.op, Op::Upgrade(_)));
        upgrading.then(|| {
            "an upgrade of the master is in progress; try again when it has finished \
             (`host status` shows the master's pid)"
                .to_string()
        })
    }

    pub fn submit(&self, op: Op, why: &str, reply: Option<mpsc::UnboundedSender<ControlReply>>) {
        let op = match op {
            Op::Reload(mut names) => {
                names.sort();
                names.dedup();
                Op::Reload(names)
            }
            other => other,
        };
        let say = |line: &str| {
            if let Some(tx) = &reply {
                let _ = tx.send(ControlReply::Line(line.to_string()));
            }
        };
        let mut q = self.jobs.queue.lock().unwrap();
        // An upgrade runs alone, and nothing comes after it: the new master takes over.
        if let Some(refusal) = self.upgrade_refusal(&q) {
            tracing::warn!("{why}: refused: {refusal}");
            if let Some(tx) = &reply {
                let _ = tx.send(ControlReply::Done {
                    ok: false,
                    summary: refusal,
                });
            }
            return;
        }
        if matches!(op, Op::Reload(_)) {
            if let Some(job) = q.waiting.iter_mut().find(|j| j.op == op) {
                say("a reload of the same services is already waiting to run; this request joins it");
                tracing::info!("{why}: joins the reload already waiting");
                job.waiters.extend(reply);
                return;
            }
        }
        if q.running || !q.waiting.is_empty() {
            say("another reload is running; this one waits for it to finish");
            tracing::info!("{why}: queued behind the jobs before it");
        }
        q.waiting.push_back(Job {
            op,
            why: why.to_string(),
            waiters: reply.into_iter().collect(),
        });
        drop(q);
        self.jobs.wake.notify_one();
    }

    /// Runs queued jobs one at a time, for the life of the master.
    pub(super) async fn run_jobs(self: Arc<Self>) {
        loop {
            let job = {
                let mut q = self.jobs.queue.lock().unwrap();
                match q.waiting.pop_front() {
                    Some(job) => {
                        q.running = true;
                        q.running_upgrade = matches!(job.op, Op::Upgrade(_));
                        Some(job)
                    }
                    None => None,
                }
            };
            let Some(job) = job else {
                self.jobs.wake.notified().await;
                continue;
            };
            tracing::debug!("running {:?} ({})", job.op, job.why);
            // Names no successor once the job is over, even if it panicked (a stop waits for
            // that: `Master::stop`).
            let successor = matches!(job.op, Op::Upgrade(_)).then(|| NoSuccessorAfter(&self));
            let progress = Progress(job.waiters.clone());
            let (ok, summary) = match &job.op {
                Op::Reload(names) => {
                    super::systemd::reloading();
                    let outcome = self.reload(names, &progress).await;
                    super::systemd::ready(&self);
                    outcome
                }
                Op::Rollback { service, to } => {
                    self.rollback(service.as_deref(), to.as_deref(), &progress)
                        .await
                }
                Op::Upgrade(exe) => self.upgrade(exe.clone(), &progress).await,
            };
            if job.waiters.is_empty() {
                if ok {
                    tracing::info!("{}: {summary}", job.why);
                } else {
                    tracing::error!("{}: {summary}", job.why);
                }
            }
            for tx in &job.waiters {
                let _ = tx.send(ControlReply::Done {
                    ok,
                    summary: summary.clone(),
                });
            }
            // A stop waits for the upgrade's end (`Master::stop`); when the stop ended it, the
            // asker gets "upgrade abandoned" before this master exits (each receiver goes once
            // its outcome is written; 2 s at most).
            if successor.is_some() && *self.stopping.borrow() {
                let written = async {
                    for tx in &job.waiters {
                        tx.closed().await;
                    }
                };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), written).await;
            }
            drop(successor);
            let mut q = self.jobs.queue.lock().unwrap();
            q.running = false;
            q.running_upgrade = false;
        }
    }

    /// Rolls a service back to its previous version, or to the kept version whose hash starts
    /// with `to`.
    async fn rollback(
        self: &Arc<Self>,
        name: Option<&str>,
        to: Option<&str>,
        progress: &Progress,
    ) -> (bool, String) {
        let started = Instant::now();
        let svc = match self.rollback_target(name) {
            Ok(s) => s,
            Err(e) => return (false, e),
        };
        let _turn = svc.lock.lock().await;
        let target = {
            let st = svc.state();
            // The live version failed its trial and the host goes back to the version before
            // by itself (it waits for this lock): the previous version may be the one that
            // failed.
            if let Some(t) = st.trial.as_ref().filter(|t| t.failure.is_some()) {
                return (
                    false,
                    format!(
                        "{}: {} failed on probation and the host is rolling back to {} by \
                         itself; run host status, and roll back once it is done if you still \
                         want to",
                        svc.name(),
                        t.to,
                        t.from
                    ),
                );
            }
            match to {
                Some(prefix) => st
                    .previous
                    .iter()
                    .rev()
                    .find(|v| v.hash.starts_with(prefix))
                    .cloned()
                    .ok_or_else(|| {
                        let kept: Vec<_> = st.previous.iter().map(|v| v.short().to_string()).collect();
                        format!(
                            "{}: no kept version starts with {prefix:?}; the previous versions are: {}",
                            svc.name(),
                            if kept.is_empty() { "(none)".to_string() } else { kept.join(", ") }
                        )
                    }),
                None => st.previous.last().cloned().ok_or_else(|| {
                    format!(
                        "{}: there is no previous version to roll back to (only {} has been live)",
                        svc.name(),
                        st.live
                    )
                }),
            }
        };
        let failed = match target {
            Ok(version) if version.hash == svc.live().hash => {
                return (false, format!("{}: {version} is already live", svc.name()))
            }
            Ok(version) => match self
                .roll_out(
                    &svc,
                    Release {
                        version,
                        config: svc.config(),
                    },
                    Kind::Rollback,
                    progress,
                )
                .await
                .problem()
            {
                // The rollout set aside the version it left.
                None => vec![],
                Some(problem) => {
                    progress.line(problem);
                    vec![svc.name().to_string()]
                }
            },
            Err(e) => return (false, e),
        };
        self.prune_store();
        summary("rollback", started, &failed)
    }

    fn rollback_target(&self, name: Option<&str>) -> Result<Arc<Service>, String> {
        let services = self.services();
        match name {
            Some(name) => self.reloadable_service(name),
            None if services.len() == 1 => self.reloadable_service(services[0].name()),
            None => Err(format!(
                "there are several services; name the one to roll back: {}",
                self.service_names()
            )),
        }
    }

    pub(super) fn reloadable_service(&self, name: &str) -> Result<Arc<Service>, String> {
        match self.service(name) {
            Some(s) if s.config().reloadable => Ok(s),
            Some(_) => Err(format!(
                "service {name} has reloadable = false, so reload leaves it alone; restart the \
                 host to change its code"
            )),
            None => Err(format!(
                "there is no service {name}; the services are: {}",
                self.service_names()
            )),
        }
    }

    pub(super) fn service_names(&self) -> String {
        self.services()
            .iter()
            .map(|s| s.name().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Outcome {
    /// The paragraph to show when the rollout did not simply succeed.
    pub fn problem(self) -> Option<String> {
        match self {
            Outcome::Done => None,
            Outcome::Rejected(text) | Outcome::RolledBack(text) | Outcome::Failed(text) => {
                Some(text)
            }
        }
    }
}

pub(super) fn summary(what: &str, started: Instant, failed: &[String]) -> (bool, String) {
    let ms = started.elapsed().as_millis();
    if failed.is_empty() {
        (true, format!("{what} done in {ms} ms"))
    } else {
        (
            false,
            format!(
                "{what} failed for {} (after {ms} ms); see above",
                failed.join(", ")
            ),
        )
    }
}

/// Clears `Master::successor` when dropped.
struct NoSuccessorAfter<'a>(&'a Master);

impl Drop for NoSuccessorAfter<'_> {
    fn drop(&mut self) {
        self.0.successor.send_replace(None);
    }
}

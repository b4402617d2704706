//! The rollout: how a new version replaces the old one, proves itself, and is rolled back when
//! it fails. Surge, never dip: every step starts a new worker and waits for its READY before an
//! old one drains.
//!
//! 1. **Canary.** Slot 0 gets a worker on the new version. If it cannot start (not loadable,
//!    ABI mismatch, on_start error or panic, crash, ready timeout), nothing changed: every old
//!    worker keeps serving, and the reload is *rejected*.
//! 2. **Canary probation** (`canary_probation`): the canary serves live traffic alone, beside
//!    the old workers of the other slots.
//! 3. **The rest**, slot by slot; a slot whose new worker fails to start gets one retry.
//! 4. **Probation** (`probation`): every worker runs the new version; the previous version's
//!    copy is kept. When it ends, the new version is *healthy*.
//!
//! What rolls out is a [`Release`]: a plugin version with the service's configuration, so a
//! config reload that changes the plugin's config table, the limits or the worker count goes
//! the same way, and a rollback restores the configuration too.
//!
//! From the canary's READY to the end of probation the release is on *trial*
//! ([`super::service::Trial`]). A crash of one of its workers, a liveness failure, or a slot
//! that fails twice *rolls the service back*: the live version switches back at once (so a
//! crashed slot restarts on the old version), then every worker on the new version is replaced
//! by the same surge-and-drain path. During steps 1-3 the rollout task does this itself and
//! reports it to whoever asked for the reload; during probation a task is started for it.
//! Outside a trial, `crash_loop_crashes` crashes within `crash_loop_window` roll the service back
//! to the last version that proved healthy, if there is one and an operator did not roll back
//! from it.
//!
//! An operator's rollback is a rollout too, and a failure in steps 1-3 goes back to what was
//! serving; but its probation has no fallback ([`super::service::Trial::fallback`]): the
//! version it left is the one the operator rejected (set aside as step 4 begins), so a crash
//! of the version rolled back to ends its probation without bringing that one back (the crash
//! counts towards a crash loop, whose fallback skips set-aside versions).

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use super::{
    jobs::Progress,
    service::{Release, Service, TrialPhase},
    Master,
};
use crate::protocol::{epoch_secs, RolloutEvent};

/// What a rollout is for: it names the rollout in the history, and says what a failure after it
/// falls back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A new version or configuration (`host reload`, a config reload, `--watch`): on trial
    /// until its probation ends, and a crash meanwhile goes back to the version before.
    Reload,
    /// An operator's `host rollback`: the version it leaves is not a fallback.
    Rollback,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Reload => "reload",
            Kind::Rollback => "rollback",
        }
    }
}

/// How a rollout ended.
pub enum Outcome {
    /// Every worker runs the new version (which may still be on probation).
    Done,
    /// The canary failed: nothing changed. The reason says why.
    Rejected(String),
    /// The new version failed after its canary started, and the service went back.
    RolledBack(String),
    /// Something else stopped it (the host is stopping).
    Failed(String),
}

impl Master {
    /// Rolls `svc` out to `new`; the caller holds the service's lock.
    pub async fn roll_out(
        self: &Arc<Self>,
        svc: &Arc<Service>,
        new: Release,
        kind: Kind,
        progress: &Progress,
    ) -> Outcome {
        if *self.stopping.borrow() {
            return Outcome::Failed("the host is stopping; nothing was reloaded".into());
        }
        let name = svc.name();
        let started = Instant::now();
        let workers = new.config.workers;
        let (old, earlier_trial) = (svc.release(), svc.state().trial.clone());
        let config_changed = *old.config != *new.config;
        progress.line(format!(
            "{name}: reloading {}, plugin {old} -> {new}{}",
            super::workers(workers),
            if config_changed {
                ", new configuration"
            } else {
                ""
            }
        ));
        // The same release again (a plain `host reload` of an unchanged file) restarts the
        // workers; there is nothing to prove and nothing to roll back to.
        let on_trial = !new.same_as(&old);
        // If the live release is itself on trial and already failed, a rollback is under way;
        // a failure of `new` should go back to what that rollback goes back to.
        let from = match &earlier_trial {
            Some(t) if t.failure.is_some() => t.from.clone(),
            _ => old.clone(),
        };

        // 1. The canary.
        if on_trial {
            svc.begin_trial(from.clone(), new.clone(), TrialPhase::Rolling);
        }
        let t = Instant::now();
        let canary = match self.start_worker(svc, 0, &new).await {
            Ok(pid) => pid,
            Err(reason) => {
                let mut st = svc.state();
                // The earlier trial (a release still on probation) goes on.
                st.trial = earlier_trial;
                if on_trial && !config_changed {
                    st.mark_failed(&new.version.hash, reason.clone());
                }
                drop(st);
                self.save_history();
                let text = format!(
                    "{name}: reload rejected, the first new worker failed: {reason}\n\
                     {name}: nothing changed; still serving {old} with all {}",
                    super::workers(old.config.workers)
                );
                self.record_event(
                    svc,
                    kind.as_str(),
                    &old,
                    &new,
                    "rejected",
                    started,
                    Some(&reason),
                );
                return Outcome::Rejected(text);
            }
        };
        svc.go_live(&new);
        {
            let mut st = svc.state();
            st.failed.shift_remove(&new.version.hash);
            st.set_aside.shift_remove(&new.version.hash);
        }
        self.save_history();
        if workers == 1 {
            svc.close_listeners_not_in(&new.config);
        }
        let displaced = self.install(svc, 0, canary);
        if let Some(old_pid) = displaced {
            self.drain_and_wait(svc, old_pid).await;
        }
        progress.line(slot_line(name, 0, displaced, canary, &new, t));

        // 2. The canary serves alone for a while.
        let canary_probation = new.config.canary_probation;
        if on_trial && !canary_probation.is_zero() && workers > 1 {
            progress.line(format!(
                "{name}: canary {canary} serves alone for {} (canary_probation)",
                humantime::format_duration(canary_probation)
            ));
        }
        if on_trial {
            if let Some(failure) = self.trial_wait(svc, canary_probation).await {
                return self
                    .fail_rollout(svc, kind, &from, &new, failure, started, progress)
                    .await;
            }
        }

        // 3. The other slots (more or fewer than before, if the worker count changed).
        for slot in 1..workers {
            if let Some(failure) = self.trial_failure(svc) {
                return self
                    .fail_rollout(svc, kind, &from, &new, failure, started, progress)
                    .await;
            }
            if slot == workers - 1 {
                svc.close_listeners_not_in(&new.config);
            }
            let t = Instant::now();
            let mut change = self.replace_slot(svc, slot, &new).await;
            if let (Err(_), Some(failure)) = (&change, self.trial_failure(svc)) {
                return self
                    .fail_rollout(svc, kind, &from, &new, failure, started, progress)
                    .await;
            }
            if let Err(reason) = &change {
                progress.line(format!(
                    "{name}: worker {slot} failed to start ({reason}); trying once more"
                ));
                change = self.replace_slot(svc, slot, &new).await;
            }
            match change {
                Ok(c) => progress.line(slot_line(name, slot, c.old, c.new, &new, t)),
                Err(reason) if on_trial => {
                    let failure = format!("worker {slot} failed to start twice: {reason}");
                    self.note_trial_failure(svc, &new, &failure);
                    return self
                        .fail_rollout(svc, kind, &from, &new, failure, started, progress)
                        .await;
                }
                Err(reason) => {
                    let text = format!("{name}: restart stopped at worker {slot}: {reason}");
                    self.record_event(
                        svc,
                        kind.as_str(),
                        &old,
                        &new,
                        "failed",
                        started,
                        Some(&reason),
                    );
                    return Outcome::Failed(text);
                }
            }
        }
        self.trim_slots(svc, workers).await;

        // 4. Probation. The failure check and the phase change are one step under the state
        // lock, so a failure noted in between is never left to a probation nobody watches.
        let probation = new.config.probation;
        let until = Instant::now() + probation;
        let trial = {
            let mut st = svc.state();
            let trial = match st.trial.as_mut() {
                Some(t) if t.to.same_as(&new) => match (&t.failure, t.phase) {
                    (Some(failure), _) => Err(failure.clone()),
                    (None, _) if on_trial => {
                        t.phase = TrialPhase::Probation { until };
                        // An operator's rollback: from here on, what it left is no fallback.
                        t.fallback = kind != Kind::Rollback;
                        Ok(Probation::New(t.id))
                    }
                    // The same release again, while it is on probation from the reload that
                    // brought it: that probation goes on as it was (its timer, what it rolls
                    // back to); restarting the workers proves nothing new.
                    (None, TrialPhase::Probation { until: ends }) => Ok(Probation::Ongoing(
                        ends.saturating_duration_since(Instant::now()),
                        t.from.clone(),
                    )),
                    (None, TrialPhase::Rolling) => Ok(Probation::None),
                },
                _ => Ok(Probation::None),
            };
            // Set aside in the same step, so that no crash loop in between can go back to it,
            // and a restart or an upgrade of the master, which start from the plugin file,
            // keep this rollback (`service::starting_version`).
            if kind == Kind::Rollback && trial.is_ok() {
                st.mark_set_aside(
                    &old.version.hash,
                    format!(
                        "rolled back by an operator at {}",
                        humantime::format_rfc3339_seconds(SystemTime::now())
                    ),
                );
            }
            trial
        };
        if kind == Kind::Rollback {
            self.save_history();
        }
        let trial = match trial {
            Ok(id) => id,
            Err(failure) => {
                return self
                    .fail_rollout(svc, kind, &from, &new, failure, started, progress)
                    .await
            }
        };
        let mut done = format!(
            "{name}: done in {} ms, all {} on {new}",
            started.elapsed().as_millis(),
            super::workers(workers)
        );
        match trial {
            Probation::New(id) if !probation.is_zero() => {
                tokio::spawn(self.clone().end_probation(svc.clone(), id, probation));
                done += &match kind {
                    Kind::Reload => format!(
                        "; on probation for {} (a crash rolls back to {from})",
                        humantime::format_duration(probation)
                    ),
                    Kind::Rollback => format!(
                        "; on probation for {} without a fallback ({from} is the version \
                         rolled back from: a crash restarts {new} with backoff)",
                        humantime::format_duration(probation)
                    ),
                };
            }
            Probation::New(_) => self.pass_probation(svc, &new),
            Probation::Ongoing(left, back) => {
                done += &format!(
                    "; its probation goes on: {} more (a crash rolls back to {back})",
                    humantime::format_duration(Duration::from_secs(left.as_secs()))
                )
            }
            Probation::None => {}
        }
        progress.line(done + " (old workers drain in the background)");
        self.record_event(svc, kind.as_str(), &old, &new, "done", started, None);
        Outcome::Done
    }

    /// Drains the workers of slots at or beyond `workers` (after the worker count shrank).
    pub(super) async fn trim_slots(&self, svc: &Service, workers: usize) {
        let extra: Vec<u32> = {
            let reg = self.registry.lock().unwrap();
            reg.slots
                .iter()
                .filter(|((service, slot), _)| service == svc.name() && *slot >= workers)
                .filter_map(|(_, s)| s.pid)
                .collect()
        };
        for pid in extra {
            self.drain_and_wait(svc, pid).await;
        }
    }

    /// Waits `how_long` unless the trial fails first; returns the failure.
    async fn trial_wait(&self, svc: &Service, how_long: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + how_long;
        loop {
            let notified = svc.trial_failed.notified();
            tokio::pin!(notified);
            // Registered before the check: a failure noted in between still wakes us.
            notified.as_mut().enable();
            if let Some(failure) = self.trial_failure(svc) {
                return Some(failure);
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => return self.trial_failure(svc),
            }
        }
    }

    fn trial_failure(&self, svc: &Service) -> Option<String> {
        svc.state().trial.as_ref().and_then(|t| t.failure.clone())
    }

    /// Records the first failure of the release on trial: the service switches back to the
    /// release the trial came from, at once, so that a crashed slot restarts on it. Returns
    /// whether it was the trial's first failure and the trial is in probation (then the caller
    /// starts the rollback; a running rollout does it itself).
    fn note_trial_failure(&self, svc: &Service, failed: &Release, failure: &str) -> bool {
        let mut st = svc.state();
        let Some(trial) = st.trial.as_mut() else {
            return false;
        };
        if !trial.to.same_as(failed) || trial.failure.is_some() {
            return false;
        }
        trial.failure = Some(failure.to_string());
        let (from, in_probation) = (
            trial.from.clone(),
            matches!(trial.phase, TrialPhase::Probation { .. }),
        );
        if from.version.hash != failed.version.hash {
            st.mark_failed(&failed.version.hash, format!("rolled back: {failure}"));
        }
        drop(st);
        svc.go_live(&from);
        svc.trial_failed.notify_waiters();
        in_probation
    }

    /// What a crash of a slot holder running `release` means for its service: a failed trial
    /// (roll back), part of a crash loop (roll back to the last healthy version), or just a
    /// crash.
    pub(super) fn judge_crash(self: &Arc<Self>, svc: &Arc<Service>, release: &Release, what: &str) {
        if *self.stopping.borrow() {
            return;
        }
        svc.state().note_crash();
        let fallback = {
            let mut st = svc.state();
            match st.trial.as_ref().filter(|t| t.to.same_as(release)) {
                // The probation of an operator's rollback: it failed, and there is nothing to
                // go back to; the crash counts towards a crash loop as any other.
                Some(t) if !t.fallback => {
                    let left = t.from.clone();
                    st.trial = None;
                    drop(st);
                    tracing::error!(service = %svc.name(), "{release} failed on probation: {what}; no fallback ({left} is the version an operator rolled back from): restarting it");
                    false
                }
                Some(_) => true,
                None => false,
            }
        };
        if fallback {
            if self.note_trial_failure(svc, release, what) {
                let from = svc.release();
                tracing::error!(service = %svc.name(), "{release} failed on probation: {what}; rolling back to {from}");
                self.spawn_roll_back(svc, release.clone(), from, what.to_string());
            }
            return;
        }
        let current = svc.release();
        if !current.same_as(release) {
            return;
        }
        let config = &current.config;
        let mut st = svc.state();
        let crashes = st.record_crash(config.crash_loop_window);
        if crashes < config.crash_loop_crashes as usize {
            return;
        }
        let window = humantime::format_duration(config.crash_loop_window);
        match st.last_healthy() {
            Some(version) => {
                let reason = format!(
                    "crash loop: {crashes} crashes within {window} (crash_loop_crashes), the last: {what}"
                );
                st.mark_failed(&release.version.hash, format!("rolled back: {reason}"));
                drop(st);
                let target = Release {
                    version,
                    config: config.clone(),
                };
                svc.go_live(&target);
                tracing::error!(service = %svc.name(), "{release} is in a {reason}; rolling back to {target}, the last version that served healthily");
                self.spawn_roll_back(svc, release.clone(), target, reason);
            }
            None => {
                // A healthy version an operator rolled back from is no fallback, but it is
                // there: say so, and how to go to it on purpose.
                let set_aside = st
                    .last_healthy_set_aside()
                    .map(|v| {
                        format!(
                            " ({v} served healthily, but an operator rolled back from it: \
                             `host rollback --to {}` goes to it on purpose)",
                            v.short()
                        )
                    })
                    .unwrap_or_default();
                drop(st);
                tracing::error!(
                    service = %svc.name(),
                    "{release} is in a crash loop ({crashes} crashes within {window}) and there \
                     is no earlier healthy version to roll back to{set_aside}; restarting with \
                     backoff"
                );
            }
        }
    }

    /// The rollout's own rollback (steps 1-3): the caller holds the service's lock.
    #[allow(clippy::too_many_arguments)]
    async fn fail_rollout(
        self: &Arc<Self>,
        svc: &Arc<Service>,
        kind: Kind,
        from: &Release,
        new: &Release,
        failure: String,
        started: Instant,
        progress: &Progress,
    ) -> Outcome {
        let name = svc.name();
        progress.line(format!(
            "{name}: {new} failed: {failure}; rolling back to {from}"
        ));
        let back = self.roll_back_workers(svc, from, progress).await;
        svc.state().trial = None;
        self.save_history();
        self.record_event(
            svc,
            kind.as_str(),
            from,
            new,
            "rolled back",
            started,
            Some(&failure),
        );
        let outcome = match back {
            Ok(()) => format!(
                "rolled back to {from}: all {} run {from} again",
                super::workers(from.config.workers)
            ),
            Err(e) => format!("the rollback to {from} did not finish: {e}"),
        };
        Outcome::RolledBack(format!(
            "{name}: reload of {new} failed: {failure}; {outcome}"
        ))
    }

    /// A rollback the master starts by itself (probation failure, crash loop); the service
    /// already went live on `target`.
    fn spawn_roll_back(
        self: &Arc<Self>,
        svc: &Arc<Service>,
        bad: Release,
        target: Release,
        reason: String,
    ) {
        let (master, svc) = (self.clone(), svc.clone());
        tokio::spawn(async move {
            let _turn = svc.lock.lock().await;
            if !svc.release().same_as(&target) || *master.stopping.borrow() {
                return; // superseded by a newer reload, or stopping
            }
            let started = Instant::now();
            let progress = Progress::log_only();
            let result = master.roll_back_workers(&svc, &target, &progress).await;
            {
                let mut st = svc.state();
                if st.trial.as_ref().is_some_and(|t| t.to.same_as(&bad)) {
                    st.trial = None;
                }
            }
            master.save_history();
            master.record_event(
                &svc,
                "automatic rollback",
                &bad,
                &target,
                if result.is_ok() { "done" } else { "failed" },
                started,
                Some(&reason),
            );
            match result {
                Ok(()) => tracing::warn!(
                    service = %svc.name(),
                    "rolled back from {bad} to {target} in {} ms: {reason}",
                    started.elapsed().as_millis()
                ),
                Err(e) => {
                    tracing::error!(service = %svc.name(), "rollback to {target} failed: {e}")
                }
            }
            master.prune_store();
        });
    }

    /// Replaces every worker that does not run `target` with one that does, slot by slot
    /// (surge and drain); empty slots that a respawn is already filling are left to it. The
    /// caller holds the service's lock.
    async fn roll_back_workers(
        self: &Arc<Self>,
        svc: &Arc<Service>,
        target: &Release,
        progress: &Progress,
    ) -> Result<(), String> {
        let name = svc.name();
        let workers = target.config.workers;
        let mut failed = Vec::new();
        for slot in 0..workers {
            let (holder, respawning) = {
                let mut reg = self.registry.lock().unwrap();
                let state = reg.slot(name, slot);
                let (pid, respawning) = (state.pid, state.respawning);
                let runs = pid.and_then(|p| reg.workers.get(&p).map(|w| w.release()));
                (runs, respawning)
            };
            match holder {
                Some(release) if release.same_as(target) => continue,
                None if respawning => continue,
                _ => {}
            }
            let t = Instant::now();
            match self.replace_slot(svc, slot, target).await {
                Ok(c) => progress.line(slot_line(name, slot, c.old, c.new, target, t)),
                Err(e) => {
                    progress.line(format!(
                        "{name}: worker {slot}: could not start {target}: {e}"
                    ));
                    failed.push(slot);
                }
            }
        }
        self.trim_slots(svc, workers).await;
        if !failed.is_empty() {
            return Err(format!(
                "slots {failed:?} could not start {target}; they are retried with backoff"
            ));
        }
        // Slots left to their respawn (a crashed worker's): "rolled back" means every slot
        // serves the target again, so wait for them too.
        let deadline = Instant::now() + target.config.ready_timeout + Duration::from_secs(1);
        loop {
            let pending = self
                .holders(svc)
                .iter()
                .take(workers)
                .filter(|h| h.as_ref().is_none_or(|(_, r)| !r.same_as(target)))
                .count();
            if pending == 0 {
                return Ok(());
            }
            if Instant::now() > deadline || *self.stopping.borrow() {
                return Err(format!(
                    "{pending} slots do not run {target} yet; they are retried with backoff"
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Ends a probation that saw no failure: the release is healthy.
    async fn end_probation(self: Arc<Self>, svc: Arc<Service>, id: u64, after: Duration) {
        tokio::time::sleep(after).await;
        let release = {
            let st = svc.state();
            match &st.trial {
                Some(t) if t.id == id && t.failure.is_none() => t.to.clone(),
                _ => return,
            }
        };
        self.pass_probation(&svc, &release);
    }

    fn pass_probation(&self, svc: &Service, release: &Release) {
        {
            let mut st = svc.state();
            if st.trial.as_ref().is_some_and(|t| t.to.same_as(release)) {
                st.trial = None;
            }
            st.healthy.insert(release.version.hash.clone());
        }
        tracing::info!(service = %svc.name(), "{release} passed its probation: healthy");
        self.save_history();
        self.prune_store();
    }

    /// Starts the probation of the release a service started with. When the history says
    /// another version was live before, it is a trial (a crash rolls back to that version, so
    /// a restart onto a bad build can fall back); otherwise the version becomes healthy if it
    /// does not crash within the probation.
    pub(super) fn probation_at_start(
        self: &Arc<Self>,
        svc: &Arc<Service>,
        before: Option<crate::shadow::PluginVersion>,
    ) {
        let live = svc.release();
        let probation = live.config.probation;
        if svc.state().healthy.contains(&live.version.hash) {
            return;
        }
        let Some(before) = before.filter(|b| b.hash != live.version.hash && !probation.is_zero())
        else {
            let (master, svc) = (self.clone(), svc.clone());
            tokio::spawn(async move {
                tokio::time::sleep(probation).await;
                let calm = {
                    let st = svc.state();
                    st.live.hash == live.version.hash && st.crashes_within(probation) == 0
                };
                if calm {
                    master.pass_probation(&svc, &live);
                }
            });
            return;
        };
        let before = Release {
            version: before,
            config: live.config.clone(),
        };
        let until = Instant::now() + probation;
        let id = svc.begin_trial(
            before.clone(),
            live.clone(),
            TrialPhase::Probation { until },
        );
        tracing::info!(
            service = %svc.name(),
            "{live} is new since the last start: on probation for {} (a crash rolls back to {before})",
            humantime::format_duration(probation)
        );
        tokio::spawn(self.clone().end_probation(svc.clone(), id, probation));
    }

    #[allow(clippy::too_many_arguments)]
    fn record_event(
        &self,
        svc: &Service,
        kind: &str,
        from: &Release,
        to: &Release,
        outcome: &str,
        started: Instant,
        detail: Option<&str>,
    ) {
        let event = RolloutEvent {
            at: epoch_secs(SystemTime::now()),
            service: svc.name().to_string(),
            kind: kind.to_string(),
            from: from.version.short().to_string(),
            to: to.version.short().to_string(),
            outcome: outcome.to_string(),
            duration_ms: started.elapsed().as_millis() as u64,
            detail: detail.map(str::to_string),
        };
        self.metrics.rollout(
            &event.service,
            &event.kind,
            &event.outcome,
            started.elapsed(),
        );
        {
            let mut events = self.events.lock().unwrap();
            events.push(event);
            // As many as the history file keeps: a master that runs for months must not grow.
            let excess = events.len().saturating_sub(crate::shadow::KEEP_EVENTS);
            events.drain(..excess);
        }
        self.save_history();
    }
}

fn slot_line(
    name: &str,
    slot: usize,
    old: Option<u32>,
    new: u32,
    version: &Release,
    since: Instant,
) -> String {
    let old = old.map_or_else(|| "(empty)".to_string(), |p| p.to_string());
    format!(
        "{name}: worker {slot}: {old} -> {new} (plugin {version}, ready in {} ms)",
        since.elapsed().as_millis()
    )
}

/// What a rollout's last step leaves: a new probation (its trial's id), the one already under
/// way for the same release (time left, what it rolls back to), or none.
enum Probation {
    New(u64),
    Ongoing(Duration, Release),
    None,
}

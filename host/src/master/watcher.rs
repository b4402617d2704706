//! The plugin watcher: when a service's plugin file is rebuilt, run the same rolling reload as
//! `host reload` (canary included), by itself.
//!
//! - It watches the plugin's *directory*: cargo replaces the file (remove + hard link), and a
//!   watch on the file itself would go silent with the old inode. A slow check of the
//!   directory's inode re-creates the watch if the directory itself is replaced (`cargo clean`).
//! - Access events (the master's own reads of the file) are ignored.
//! - A build writes in bursts: the file must stay quiet for `watch_debounce` before it is read.
//! - The content hash decides: a touch, or a rebuild to identical bytes, reloads nothing; nor does
//!   a build that was already rejected or rolled back (the next build is tried).
//! - The reload is queued like `host reload SERVICE` (`master::jobs`), and the watcher waits for
//!   its outcome: events that arrive meanwhile wait in the channel and are looked at when it
//!   ends, so a burst of rebuilds ends in one reload (two at most) of the newest.

use std::{
    ffi::OsString,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::{service::Service, Master, Op};
use crate::protocol::ControlReply;

/// How often the watched directory's identity is checked (to survive `cargo clean`).
const DIR_CHECK: Duration = Duration::from_secs(2);

/// Starts watching the plugin file of `svc`; the task is the service's watcher (replacing any
/// earlier one).
pub fn spawn(master: Arc<Master>, svc: Arc<Service>) -> Result<(), String> {
    let plugin = svc.config().plugin.clone();
    let (dir, file) = match (plugin.parent(), plugin.file_name()) {
        (Some(dir), Some(file)) => (dir.to_path_buf(), file.to_os_string()),
        _ => {
            return Err(format!(
                "cannot watch {}: not a file path",
                plugin.display()
            ))
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let watcher = watch_dir(&dir, &file, tx.clone())?;
    let task = tokio::spawn(run(master, svc.clone(), dir, file, watcher, tx, rx));
    if let Some(old) = svc.watcher.lock().unwrap().replace(task) {
        old.abort();
    }
    Ok(())
}

fn watch_dir(
    dir: &Path,
    file: &OsString,
    tx: mpsc::UnboundedSender<()>,
) -> Result<RecommendedWatcher, String> {
    let file = file.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, EventKind::Access(_)) {
            return;
        }
        if event
            .paths
            .iter()
            .any(|p| p.file_name() == Some(file.as_os_str()))
        {
            let _ = tx.send(());
        }
    })
    .map_err(|e| format!("could not start a file watcher: {e}"))?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(|e| format!("could not watch {}: {e}", dir.display()))?;
    Ok(watcher)
}

fn dir_identity(dir: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

async fn run(
    master: Arc<Master>,
    svc: Arc<Service>,
    dir: PathBuf,
    file: OsString,
    // Held, not read: dropping it ends the watch.
    mut _watcher: RecommendedWatcher,
    tx: mpsc::UnboundedSender<()>,
    mut rx: mpsc::UnboundedReceiver<()>,
) {
    let name = svc.name().to_string();
    let debounce = svc.config().watch_debounce;
    tracing::info!(service = %name, "watching {} for rebuilds", svc.config().plugin.display());
    let mut identity = dir_identity(&dir);
    let mut check = tokio::time::interval(DIR_CHECK);
    loop {
        tokio::select! {
            event = rx.recv() => if event.is_none() { return },
            _ = check.tick() => {
                let now = dir_identity(&dir);
                if now == identity || now.is_none() {
                    continue;
                }
                // The directory was replaced: watch the new one, and look at the file in it.
                identity = now;
                match watch_dir(&dir, &file, tx.clone()) {
                    Ok(w) => _watcher = w,
                    Err(e) => { tracing::warn!(service = %name, "{e}"); continue }
                }
            }
        }
        // Debounce: wait until the file has been quiet for `debounce`.
        loop {
            match tokio::time::timeout(debounce, rx.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) => return,
                Err(_) => break,
            }
        }
        if *master.stopping.borrow() {
            return;
        }
        let new = match master.store_plugin(&svc.config()).await {
            Ok(v) => v,
            // Removed or unreadable mid-build: the next event brings us back.
            Err(e) => {
                tracing::warn!(service = %name, "plugin file changed but cannot be read yet: {e}");
                continue;
            }
        };
        let old = svc.live();
        if new.hash == old.hash {
            tracing::info!(service = %name, "plugin {name}: file changed, content the same ({old}); not reloading");
            continue;
        }
        if let Some(why) = svc.state().failed.get(&new.hash) {
            tracing::info!(service = %name, "plugin {name}: {new} failed before ({why}); waiting for another build");
            continue;
        }
        tracing::info!(
            service = %name,
            "plugin {name} rebuilt ({old} -> {new}), reloading {}",
            super::workers(svc.config().workers)
        );
        let started = Instant::now();
        let (tx, mut replies) = mpsc::unbounded_channel();
        master.submit(Op::Reload(vec![name.clone()]), "watcher", Some(tx));
        let mut why = String::new();
        while let Some(reply) = replies.recv().await {
            match reply {
                ControlReply::Line(line) => why = line,
                ControlReply::Done { ok: true, .. } => {
                    tracing::info!(service = %name, "plugin {name} rebuilt: done in {} ms, serving {}", started.elapsed().as_millis(), svc.live());
                    break;
                }
                ControlReply::Done { ok: false, .. } => {
                    tracing::error!(service = %name, "plugin {name} rebuilt ({new}) rejected: {why}; still serving {}", svc.live());
                    break;
                }
                _ => {}
            }
        }
    }
}

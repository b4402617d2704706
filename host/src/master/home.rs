//! The master's home: its state directory while it runs, with the lock, the pid file and the
//! control socket in it.
//!
//! The directory can disappear under a running master (an operator's `rm -rf`, a tmpfiles
//! cleaner). Without it, the CLI cannot find the master, and a second `host start` on the same
//! path would take a new lock and run beside it. So every second the master checks that the
//! directory at its path is still the one it locked; if not, it makes a new one: the lock, the
//! pid file, the control socket, and the plugin copies written again from the verified files
//! it holds open (`ShadowStore::rehome`). It says so once in the log. A single plugin copy
//! deleted from the directory is restored the same way.

use std::{
    os::unix::fs::PermissionsExt,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    net::{unix::OwnedWriteHalf, UnixListener},
    sync::mpsc,
    task::JoinHandle,
};

use super::{control, Master};
use crate::state_dir::{MasterLock, StateDir};

/// How often the master looks at its state directory.
const CHECK_EVERY: Duration = Duration::from_secs(1);

pub struct Home {
    state: StateDir,
    lock: Mutex<MasterLock>,
    /// Where `host stop` connections go (the run loop answers them when the host stopped).
    stops: mpsc::UnboundedSender<OwnedWriteHalf>,
    control: Mutex<Option<JoinHandle<()>>>,
}

impl Home {
    pub fn new(
        state: StateDir,
        lock: MasterLock,
        stops: mpsc::UnboundedSender<OwnedWriteHalf>,
    ) -> Result<Home, String> {
        Ok(Home {
            state,
            lock: Mutex::new(lock),
            stops,
            control: Mutex::new(None),
        })
    }
}

impl Master {
    /// Binds the control socket in the state directory and serves it. Only the user who runs
    /// the master may use it: 0600 on the socket, inside the directory's 0700, and each peer's
    /// credentials are checked (`master::control`).
    pub(super) fn serve_control(self: &Arc<Self>) -> Result<(), String> {
        let path = self.home.state.socket();
        let listener = UnixListener::bind(&path)
            .and_then(|l| {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                Ok(l)
            })
            .map_err(|e| format!("could not create control socket {}: {e}", path.display()))?;
        let task = tokio::spawn(control::serve(
            self.clone(),
            listener,
            self.home.stops.clone(),
        ));
        if let Some(old) = self.home.control.lock().unwrap().replace(task) {
            old.abort();
        }
        Ok(())
    }

    /// Checks the state directory every second, for the life of the master (see the module
    /// comment).
    pub(super) async fn guard_home(self: Arc<Self>) {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported = false;
        loop {
            tick.tick().await;
            if *self.stopping.borrow() {
                return;
            }
            let locked = self.home.lock.lock().unwrap().identity;
            if self.home.state.identity_now() == Some(locked) {
                reported = false;
                // Single copies deleted from it come back from the verified open files.
                let restored = self.store.restore_missing(&self.versions_in_use());
                if !restored.is_empty() {
                    tracing::warn!(
                        "plugin copies were deleted from the state directory; restored {} from \
                         the verified files the master holds: {}",
                        restored.len(),
                        restored.join(", ")
                    );
                }
                continue;
            }
            match self.recreate_home() {
                Ok(copies) => tracing::warn!(
                    "state directory {} was deleted or replaced under the running master; \
                     recreated it with the lock, pid file, control socket and {copies} plugin \
                     copies",
                    self.home.state.root.display()
                ),
                Err(e) if !reported => {
                    reported = true;
                    tracing::error!(
                        "state directory {} was deleted or replaced, and could not be recreated: \
                         {e}. `host` commands cannot reach this master until it is; it keeps \
                         serving.",
                        self.home.state.root.display()
                    );
                }
                Err(_) => {}
            }
        }
    }

    fn recreate_home(self: &Arc<Self>) -> Result<usize, String> {
        let lock = self.home.state.lock_for_master()?;
        let versions = self.versions_in_use();
        self.store.rehome(lock.dir(), &versions)?;
        *self.home.lock.lock().unwrap() = lock;
        self.serve_control()?;
        self.save_history();
        Ok(versions.len())
    }
}

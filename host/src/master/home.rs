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

use tokio::{net::UnixListener, sync::mpsc, task::JoinHandle};

use super::{control, Master};
use crate::state_dir::{MasterLock, StateDir};

/// How often the master looks at its state directory.
const CHECK_EVERY: Duration = Duration::from_secs(1);

pub struct Home {
    state: StateDir,
    lock: Mutex<MasterLock>,
    /// Where stop requests go (the run loop answers them when the host stopped).
    pub(super) stops: mpsc::UnboundedSender<super::StopWaiter>,
    control: Mutex<Option<JoinHandle<()>>>,
    /// The control socket, bound under a temporary name until it is published.
    unpublished: Mutex<Option<std::path::PathBuf>>,
    /// The pid of the master this one handed over to, once it did.
    handed_over_to: Mutex<Option<u32>>,
}

impl Home {
    pub fn new(
        state: StateDir,
        lock: MasterLock,
        stops: mpsc::UnboundedSender<super::StopWaiter>,
    ) -> Home {
        Home {
            state,
            lock: Mutex::new(lock),
            stops,
            control: Mutex::new(None),
            unpublished: Mutex::new(None),
            handed_over_to: Mutex::new(None),
        }
    }

    /// A second open file of the lock (for a new master in an upgrade: the lock belongs to the
    /// open file, so both hold it until this one exits).
    pub fn lock_file(&self) -> std::io::Result<std::fs::File> {
        self.lock.lock().unwrap().file().try_clone()
    }

    /// From now on the state directory's files are the new master's: this one leaves the pid
    /// file and the socket alone when it exits, and no longer guards the directory.
    pub fn hand_over(&self, new_pid: u32) {
        self.lock.lock().unwrap().leave_files();
        *self.handed_over_to.lock().unwrap() = Some(new_pid);
    }

    pub fn handed_over_to(&self) -> Option<u32> {
        *self.handed_over_to.lock().unwrap()
    }
}

impl Master {
    /// Binds the control socket in the state directory and serves it. Only the user who runs
    /// the master may use it: 0600 on the socket, inside the directory's 0700, and each peer's
    /// credentials are checked (`master::control`). It is bound under a temporary name, then
    /// renamed into place, so the CLI never finds a half-made socket; with `publish` false the
    /// rename waits for [`Master::publish_home`] (a new master in an upgrade, until the
    /// takeover).
    pub(super) fn serve_control(self: &Arc<Self>, publish: bool) -> Result<(), String> {
        let path = self.home.state.socket();
        let temp = path.with_file_name(format!(".host.sock.{}", std::process::id()));
        let _ = std::fs::remove_file(&temp);
        let listener = UnixListener::bind(&temp)
            .and_then(|l| {
                std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))?;
                Ok(l)
            })
            .map_err(|e| format!("could not create control socket {}: {e}", path.display()))?;
        let task = tokio::spawn(control::serve(self.clone(), listener));
        if let Some(old) = self.home.control.lock().unwrap().replace(task) {
            old.abort();
        }
        *self.home.unpublished.lock().unwrap() = Some(temp);
        if publish {
            self.publish_control()?;
        }
        Ok(())
    }

    fn publish_control(&self) -> Result<(), String> {
        if let Some(temp) = self.home.unpublished.lock().unwrap().take() {
            let path = self.home.state.socket();
            std::fs::rename(&temp, &path)
                .map_err(|e| format!("could not create control socket {}: {e}", path.display()))?;
        }
        Ok(())
    }

    /// A new master's takeover in an upgrade: its control socket replaces the old one's, and
    /// the pid file names it (each an atomic rename).
    pub(super) fn publish_home(&self) -> Result<(), String> {
        self.publish_control()?;
        self.home.lock.lock().unwrap().take_files()
    }

    /// Checks the state directory every second, for the life of the master (see the module
    /// comment).
    pub(super) async fn guard_home(self: Arc<Self>) {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported = false;
        loop {
            tick.tick().await;
            if *self.stopping.borrow() || self.is_handed_over() {
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
        self.serve_control(true)?;
        self.save_history();
        Ok(versions.len())
    }
}

//! The state directory: how the CLI finds a running master, and how two masters are kept apart.
//!
//! It holds the control socket (`host.sock`), the pid file (`host.pid`), a lock file
//! (`host.lock`, flock'd by the master for its whole life) and the shadow store (`plugins/`).
//! The default is `.host` in the current directory, so `cargo build && host reload` works in the
//! directory where `host start` ran. The directory is mode 0700, which also protects the socket.
//! The lock, not the pid file, decides whether a master is running: a master killed with SIGKILL
//! leaves a stale socket and pid file behind, and the kernel drops its lock.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

/// Paths inside a state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

/// Held by the running master; dropping it releases the lock.
pub struct MasterLock {
    _lock: Flock<File>,
    pid_file: PathBuf,
}

impl Drop for MasterLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.pid_file);
    }
}

impl StateDir {
    pub fn new(root: PathBuf) -> StateDir {
        StateDir {
            root: std::path::absolute(&root).unwrap_or(root),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.root.join("host.sock")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.root.join("host.pid")
    }

    pub fn plugins(&self) -> PathBuf {
        self.root.join("plugins")
    }

    /// Creates the directory (0700) and takes the master lock, or says who holds it.
    pub fn lock_for_master(&self) -> Result<MasterLock, String> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(|e| {
                format!(
                    "could not create state directory {}: {e}",
                    self.root.display()
                )
            })?;
        let _ = fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("host.lock"))
            .map_err(|e| {
                format!(
                    "could not open {}: {e}",
                    self.root.join("host.lock").display()
                )
            })?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| {
            let pid = fs::read_to_string(self.pid_file()).unwrap_or_default();
            format!(
                "another host master (pid {}) is already running with state directory {}; \
                 stop it with `host stop`, or give this one its own --state-dir",
                pid.trim(),
                self.root.display()
            )
        })?;
        // We hold the lock, so any socket or pid file here was left by a master that died.
        remove_if_exists(&self.socket())
            .map_err(|e| format!("could not remove stale {}: {e}", self.socket().display()))?;
        fs::write(self.pid_file(), format!("{}\n", std::process::id()))
            .map_err(|e| format!("could not write {}: {e}", self.pid_file().display()))?;
        Ok(MasterLock {
            _lock: lock,
            pid_file: self.pid_file(),
        })
    }
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_and_stale_files_do_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("s"));
        let lock = state.lock_for_master().unwrap();
        let err = state.lock_for_master().err().unwrap();
        assert!(err.contains("already running"), "{err}");
        drop(lock);
        // A stale socket file (as a killed master leaves) is cleared by the next start.
        fs::write(state.socket(), "").unwrap();
        let _lock = state.lock_for_master().unwrap();
        assert!(!state.socket().exists());
    }
}

//! The state directory: how the CLI finds a running master, how two masters are kept apart,
//! and the one place the host keeps files it will trust later.
//!
//! It holds the control socket (`host.sock`), the pid file (`host.pid`), a lock file
//! (`host.lock`, flock'd by the master for its whole life) and the shadow store (`plugins/`).
//! The default is `.host` in the current directory, so `cargo build && host reload` works in the
//! directory where `host start` ran.
//!
//! It is a trust boundary (`crate::trust`): created 0700, refused if it is a symlink, belongs to
//! another user or is writable by others. Files in it are opened relative to the directory's
//! own fd with `O_NOFOLLOW` (a symlink planted in it is never followed), and written to a temp
//! file first, then renamed into place (a reader sees all of a file or the one before).
//!
//! The lock, not the pid file, decides whether a master is running: a master killed with SIGKILL
//! leaves a stale socket and pid file behind, and the kernel drops its lock.

use std::{
    fs::{self, File},
    io::{self, Read, Write},
    os::{
        fd::{AsFd, OwnedFd},
        unix::fs::{DirBuilderExt, MetadataExt},
    },
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{openat, renameat, Flock, FlockArg, OFlag},
    sys::stat::{fstat, Mode},
    unistd::{geteuid, unlinkat, UnlinkatFlags},
};

/// Paths inside a state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

/// Held by the running master; dropping it releases the lock and removes the pid file.
pub struct MasterLock {
    dir: Dir,
    lock: Flock<File>,
    /// (device, inode) of the directory, to notice it being deleted or replaced.
    pub identity: (u64, u64),
    /// Leave the pid file when dropped (it names a new master now).
    leave_files: bool,
}

impl MasterLock {
    /// The locked directory.
    pub fn dir(&self) -> &Dir {
        &self.dir
    }

    /// The lock file (the lock belongs to its open file description).
    pub fn file(&self) -> &File {
        &self.lock
    }

    /// Writes this process's pid into the pid file (temp file, then rename).
    pub fn write_pid(&self) -> Result<(), String> {
        self.dir
            .write_atomically(
                "host.pid",
                format!("{}\n", std::process::id()).as_bytes(),
                0o644,
            )
            .map_err(|e| {
                format!(
                    "could not write {}: {e}",
                    self.dir.path().join("host.pid").display()
                )
            })
    }

    /// Drop without removing the pid file: a new master took the directory over.
    pub fn leave_files(&mut self) {
        self.leave_files = true;
    }

    /// Writes the pid file and makes it this master's to remove (an upgrade's takeover).
    pub fn take_files(&mut self) -> Result<(), String> {
        self.write_pid()?;
        self.leave_files = false;
        Ok(())
    }
}

impl Drop for MasterLock {
    fn drop(&mut self) {
        if !self.leave_files {
            let _ = self.dir.remove("host.pid");
        }
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

    /// Creates the directory (0700) if it is missing, checks it, and takes the master lock, or
    /// says who holds it. The pid file is written atomically; a stale socket is removed.
    pub fn lock_for_master(&self) -> Result<MasterLock, String> {
        let me = geteuid();
        if fs::symlink_metadata(&self.root).is_err() {
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
        }
        crate::trust::check_state_dir(&self.root, me)?;
        let dir = Dir::open(&self.root)?;
        let lock_file = dir.open_file("host.lock", OFlag::O_RDWR | OFlag::O_CREAT, 0o600)?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|_| {
            let pid = dir.read_to_string("host.pid").unwrap_or_default();
            format!(
                "another host master (pid {}) is already running with state directory {}; \
                 stop it with `host stop`, or give this one its own --state-dir",
                pid.trim(),
                self.root.display()
            )
        })?;
        // We hold the lock, so any socket or pid file here was left by a master that died.
        dir.remove("host.sock")
            .map_err(|e| format!("could not remove stale {}: {e}", self.socket().display()))?;
        let identity = dir.identity()?;
        let lock = MasterLock {
            dir,
            lock,
            identity,
            leave_files: false,
        };
        lock.write_pid()?;
        Ok(lock)
    }

    /// For a new master in an upgrade: the lock file it inherited, checked to be this state
    /// directory's (the old master holds the same lock until it exits). The pid file is written
    /// at the takeover.
    pub fn adopt_lock(&self, file: File) -> Result<MasterLock, String> {
        crate::trust::check_state_dir(&self.root, geteuid())?;
        let dir = Dir::open(&self.root)?;
        let here = dir.open_file("host.lock", OFlag::O_RDONLY, 0)?;
        let (a, b) = (
            fstat(&here).map_err(|e| e.to_string())?,
            fstat(&file).map_err(|e| e.to_string())?,
        );
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) {
            return Err(format!(
                "the lock passed in the upgrade is not {}",
                self.root.join("host.lock").display()
            ));
        }
        // Taking the lock again on the same open file succeeds: it is already held by it.
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| format!("could not hold the inherited lock: {e}"))?;
        let identity = dir.identity()?;
        Ok(MasterLock {
            dir,
            lock,
            identity,
            // The pid file is the old master's until the takeover (`take_files`).
            leave_files: true,
        })
    }

    /// (device, inode) of the directory at the path now, if there is one.
    pub fn identity_now(&self) -> Option<(u64, u64)> {
        fs::symlink_metadata(&self.root)
            .ok()
            .map(|m| (m.dev(), m.ino()))
    }

    /// For the CLI, before it trusts what answers on the control socket: the directory passes
    /// the same checks as for the master, and the socket and pid file belong to this user (or
    /// root). Returns the pid in the pid file, if any.
    pub fn check_for_client(&self) -> Result<Option<u32>, String> {
        let me = geteuid();
        if fs::symlink_metadata(&self.root).is_err() {
            return Ok(None);
        }
        crate::trust::check_state_dir(&self.root, me)?;
        for path in [self.socket(), self.pid_file()] {
            if let Ok(meta) = fs::symlink_metadata(&path) {
                let ok_type = if path == self.socket() {
                    std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type())
                } else {
                    meta.is_file()
                };
                if !ok_type || !(meta.uid() == me.as_raw() || meta.uid() == 0) {
                    return Err(format!(
                        "{} is not what a master of {} would leave (a {} owned by uid {}); \
                         something else put it there. Stop anything using this state directory \
                         and remove the file.",
                        path.display(),
                        me,
                        if meta.file_type().is_symlink() {
                            "symlink"
                        } else {
                            "file"
                        },
                        meta.uid()
                    ));
                }
            }
        }
        let dir = Dir::open(&self.root)?;
        Ok(dir
            .read_to_string("host.pid")
            .ok()
            .and_then(|s| s.trim().parse().ok()))
    }
}

/// An open directory: files in it are opened, written and removed relative to its fd, never
/// following a symlink in the last component.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// Opens a directory (not through a symlink).
    pub fn open(path: &Path) -> Result<Dir, String> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("could not open directory {}: {e}", path.display()))?;
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Opens (or creates, 0700) a subdirectory and checks that it belongs to us and is not
    /// writable by others.
    pub fn subdir(&self, name: &str) -> Result<Dir, String> {
        match nix::sys::stat::mkdirat(&self.fd, name, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => {
                return Err(format!(
                    "could not create {}: {e}",
                    self.path.join(name).display()
                ))
            }
        }
        let fd = openat(
            &self.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            format!(
                "could not open {} (it must be a directory, not a symlink): {e}",
                self.path.join(name).display()
            )
        })?;
        let st = fstat(&fd).map_err(|e| format!("could not look at {name}: {e}"))?;
        if st.st_uid != geteuid().as_raw() || st.st_mode & 0o022 != 0 {
            return Err(format!(
                "{} belongs to uid {} with mode {:o}; the host only trusts a directory of its own \
                 that others cannot write. Remove it; the host recreates it.",
                self.path.join(name).display(),
                st.st_uid,
                st.st_mode & 0o7777
            ));
        }
        Ok(Dir {
            fd,
            path: self.path.join(name),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn identity(&self) -> Result<(u64, u64), String> {
        fstat(&self.fd)
            .map(|st| (st.st_dev, st.st_ino))
            .map_err(|e| format!("could not look at {}: {e}", self.path.display()))
    }

    /// Opens a file in the directory without following a symlink.
    pub fn open_file(&self, name: &str, flags: OFlag, mode: u32) -> Result<File, String> {
        openat(
            &self.fd,
            name,
            flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )
        .map(File::from)
        .map_err(|e| match e {
            Errno::ELOOP => format!(
                "{} is a symlink; the host does not follow symlinks in its state directory. \
                 Remove it.",
                self.path.join(name).display()
            ),
            e => format!("could not open {}: {e}", self.path.join(name).display()),
        })
    }

    pub fn read_to_string(&self, name: &str) -> Result<String, String> {
        let mut text = String::new();
        self.open_file(name, OFlag::O_RDONLY, 0)?
            .read_to_string(&mut text)
            .map_err(|e| format!("could not read {}: {e}", self.path.join(name).display()))?;
        Ok(text)
    }

    /// Writes `name` as a whole: a temp file beside it (created exclusively, so never through a
    /// symlink), synced, then renamed over it.
    pub fn write_atomically(&self, name: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
        let tmp = format!(".{name}.tmp-{}-{}", std::process::id(), unique());
        let mut file = File::from(
            openat(
                &self.fd,
                tmp.as_str(),
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(mode),
            )
            .map_err(io::Error::from)?,
        );
        let written = file
            .write_all(bytes)
            .and_then(|()| file.sync_all())
            .and_then(|()| {
                nix::sys::stat::fchmod(file.as_fd(), Mode::from_bits_truncate(mode))
                    .map_err(io::Error::from)
            })
            .and_then(|()| {
                renameat(&self.fd, tmp.as_str(), &self.fd, name).map_err(io::Error::from)
            });
        if written.is_err() {
            let _ = unlinkat(&self.fd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        written
    }

    /// Removes a file; a missing one is fine.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        match unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Names of the entries (not `.` and `..`).
    pub fn names(&self) -> Vec<String> {
        let Ok(fd) = self.fd.try_clone() else {
            return Vec::new();
        };
        let Ok(mut dir) = nix::dir::Dir::from_fd(fd) else {
            return Vec::new();
        };
        dir.iter()
            .flatten()
            .filter_map(|e| e.file_name().to_str().ok().map(str::to_string))
            .filter(|n| n != "." && n != "..")
            .collect()
    }
}

/// A number that differs between calls in one process (for temp file names).
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
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

    #[test]
    fn a_planted_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("s"));
        drop(state.lock_for_master().unwrap());
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, state.pid_file()).unwrap();
        let _lock = state.lock_for_master().unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert!(!fs::symlink_metadata(state.pid_file())
            .unwrap()
            .file_type()
            .is_symlink());
    }
}

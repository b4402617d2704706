//! Taking over file descriptors that a parent process passed at known numbers: a worker's
//! channel, plugin copy and listeners; an upgraded master's listeners and lock; the sockets
//! systemd passes (`LISTEN_FDS`). Each is checked to be what it should be, marked
//! close-on-exec (so that a process started later does not inherit it by accident), and adopted
//! at most once.
//!
//! The one `unsafe` operation, turning a number into an owned fd, lives here.

use std::{
    collections::HashSet,
    os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd},
    sync::Mutex,
};

use nix::{
    fcntl::{fcntl, FcntlArg, FdFlag},
    sys::stat::{fstat, SFlag},
};

/// The fds adopted so far: adopting one twice would give two owners.
static ADOPTED: Mutex<Option<HashSet<RawFd>>> = Mutex::new(None);

/// What an inherited fd must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Socket,
    File,
    Pipe,
    /// Anything a log can be written to: a file, a pipe, a terminal, a socket (a container's
    /// stdout, systemd's journal stream).
    Output,
}

/// Adopts `fd` if it is open, of `kind`, and not adopted before.
pub fn adopt(fd: RawFd, kind: Kind) -> Option<OwnedFd> {
    if fd < 0 {
        return None;
    }
    let mut adopted = ADOPTED.lock().unwrap();
    let adopted = adopted.get_or_insert_with(HashSet::new);
    if adopted.contains(&fd) {
        return None;
    }
    // SAFETY: the borrow lives only for the two calls below; on a closed fd they fail with
    // EBADF, which means "not inherited", and nothing is closed through this handle.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let wanted: &[SFlag] = match kind {
        Kind::Socket => &[SFlag::S_IFSOCK],
        Kind::File => &[SFlag::S_IFREG],
        Kind::Pipe => &[SFlag::S_IFIFO],
        Kind::Output => &[
            SFlag::S_IFREG,
            SFlag::S_IFIFO,
            SFlag::S_IFCHR,
            SFlag::S_IFSOCK,
        ],
    };
    let is_kind = fstat(borrowed)
        .map(|st| wanted.contains(&(SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT)))
        .unwrap_or(false);
    if !is_kind || fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).is_err() {
        return None;
    }
    adopted.insert(fd);
    // SAFETY: `fd` is open (checked above), it was passed to this process by its parent at a
    // number only this module takes, and the set above makes sure it is adopted once: no other
    // owner exists in this process.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Takes ownership of an fd this process just received in an SCM_RIGHTS message (`fdpass`).
pub fn received(fd: RawFd) -> OwnedFd {
    // SAFETY: the kernel installed `fd` in this process's table for this one `recvmsg`, whose
    // caller passes each received fd here exactly once; nothing else knows the number yet, so
    // the returned `OwnedFd` is its only owner.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

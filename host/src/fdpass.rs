//! JSON lines with file descriptors attached, over a master-worker channel (a Unix stream
//! socket): how the master hands running workers a reopened log file (`host reopen-logs`).
//!
//! A line that carries an fd is sent with one `sendmsg` and the fd as SCM_RIGHTS ancillary
//! data; the kernel delivers the fd with the first bytes of that line. The receiving side reads
//! with `recvmsg` (a plain read would drop, and close, the fds) and hands each completed line
//! the fds that arrived since the previous one.

use std::{
    collections::VecDeque,
    io::{self, IoSlice, IoSliceMut},
    os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd},
};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use tokio::{io::Interest, net::UnixStream};

/// Sends `bytes` with `fd` attached; what `sendmsg` did not take is written plainly after.
pub async fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    let fds = [fd.as_raw_fd()];
    let sent = loop {
        stream.writable().await?;
        match stream.try_io(Interest::WRITABLE, || {
            sendmsg::<()>(
                stream.as_raw_fd(),
                &[IoSlice::new(bytes)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        }) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    let mut rest = &bytes[sent..];
    while !rest.is_empty() {
        stream.writable().await?;
        match stream.try_write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads lines, and the fds that came with them.
///
/// Which line an fd belongs to: Linux delivers a unix stream's fds with the data of the
/// `sendmsg` that sent them, and a `recvmsg` stops right after data that carries fds. So the
/// fds of a read belong to the line that ends at (or after) the last byte of that read, never
/// to an earlier line still in the buffer (two messages with an fd each, sent back to back,
/// must each get their own).
pub struct LineReader {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Received fds, with the stream position of the last byte of the read they came with.
    fds: VecDeque<(u64, OwnedFd)>,
    /// Bytes received, and bytes handed out as lines, since the start.
    received: u64,
    consumed: u64,
}

impl LineReader {
    pub fn new(stream: UnixStream) -> LineReader {
        LineReader {
            stream,
            buf: Vec::new(),
            fds: VecDeque::new(),
            received: 0,
            consumed: 0,
        }
    }

    /// The next line (without its newline) and the fds received with it; `None` at the end.
    pub async fn next_line(&mut self) -> io::Result<Option<(String, Vec<OwnedFd>)>> {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                self.consumed += line.len() as u64;
                let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                let mut fds = Vec::new();
                while self.fds.front().is_some_and(|(at, _)| *at <= self.consumed) {
                    fds.extend(self.fds.pop_front().map(|(_, fd)| fd));
                }
                return Ok(Some((text, fds)));
            }
            self.stream.readable().await?;
            let received = self.stream.try_io(Interest::READABLE, || {
                let mut chunk = [0u8; 4096];
                let mut space = nix::cmsg_space!([RawFd; 4]);
                let mut iov = [IoSliceMut::new(&mut chunk)];
                let msg = recvmsg::<()>(
                    self.stream.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                for cmsg in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(raw) = cmsg {
                        fds.extend(raw);
                    }
                }
                let n = msg.bytes;
                Ok((chunk[..n].to_vec(), fds))
            });
            match received {
                Ok((bytes, fds)) => {
                    self.received += bytes.len() as u64;
                    let at = self.received;
                    // A log file, or a link's socket.
                    self.fds
                        .extend(fds.into_iter().map(|fd| (at, crate::inherit::received(fd))));
                    if bytes.is_empty() {
                        return Ok(None);
                    }
                    self.buf.extend_from_slice(&bytes);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

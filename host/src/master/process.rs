//! Starting one worker process: `/proc/self/exe worker ...` with its channel at fd 3, the
//! verified plugin copy at fd 4 (a gateway has none), the service's listeners at fds 5, 6, ...
//! and, after them, the process's other files: the service's access log, or a websocket
//! service's links between gateways and business workers.
//!
//! The master executes its own executable afresh (never fork without exec in a process that
//! runs tokio), through `/proc/self/exe` so that workers run exactly the host code the master
//! runs even if the file on disk was replaced. The fd mapping is done by the command-fds crate;
//! every other fd of the master is close-on-exec, so a worker inherits nothing else.
//!
//! Each worker gets a process group of its own: the master can then kill a worker together
//! with whatever its plugin started (`killpg`), and a Ctrl-C in the terminal reaches only the
//! master, which drains the workers in order instead of every process stopping at once.

use std::{
    fs::File,
    io,
    net::TcpListener,
    os::{fd::OwnedFd, unix::net::UnixStream as StdUnixStream},
    process::Stdio,
};

use command_fds::{CommandFdExt, FdMapping};
use tokio::{net::UnixStream, process::Child};

use crate::protocol::{WorkerSpec, CHANNEL_FD, FIRST_LISTENER_FD, PLUGIN_FD};

/// A started worker process and the master's end of its channel.
pub struct Spawned {
    pub child: Child,
    pub channel: UnixStream,
}

/// The fd number a worker with `listeners` listeners finds the `index`th of [`spawn`]'s
/// `extra` files at.
pub fn extra_fd(listeners: usize, index: usize) -> i32 {
    FIRST_LISTENER_FD + (listeners + index) as i32
}

/// Starts `host worker` for `spec`, passing the verified `plugin` copy, `listeners` (in the
/// order of `spec.listen`) and the `extra` files after them.
pub fn spawn(
    spec: &WorkerSpec,
    plugin: Option<&File>,
    listeners: Vec<TcpListener>,
    extra: Vec<OwnedFd>,
) -> io::Result<Spawned> {
    let (master_end, worker_end) = StdUnixStream::pair()?;
    let mut mappings = vec![FdMapping {
        parent_fd: OwnedFd::from(worker_end),
        child_fd: CHANNEL_FD,
    }];
    if let Some(plugin) = plugin {
        mappings.push(FdMapping {
            parent_fd: OwnedFd::from(plugin.try_clone()?),
            child_fd: PLUGIN_FD,
        });
    }
    let listener_count = listeners.len();
    for (i, listener) in listeners.into_iter().enumerate() {
        mappings.push(FdMapping {
            parent_fd: OwnedFd::from(listener),
            child_fd: FIRST_LISTENER_FD + i as i32,
        });
    }
    for (i, fd) in extra.into_iter().enumerate() {
        mappings.push(FdMapping {
            parent_fd: fd,
            child_fd: extra_fd(listener_count, i),
        });
    }
    let mut command = tokio::process::Command::new("/proc/self/exe");
    // argv[0] as the master's, so `ps` shows `host worker --service x --slot 0`.
    if let Some(arg0) = std::env::args_os().next() {
        command.arg0(arg0);
    }
    command
        .arg("worker")
        .args(["--service", &spec.service, "--slot", &spec.slot.to_string()])
        .args(["--master-pid", &std::process::id().to_string()])
        .stdin(Stdio::null())
        .process_group(0)
        .fd_mappings(mappings)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let child = command.spawn()?;
    // Dropping `command` closes the master's copies of the worker's channel end and of the
    // listener dups, so the channel reports EOF when the worker dies.
    drop(command);
    master_end.set_nonblocking(true)?;
    Ok(Spawned {
        child,
        channel: UnixStream::from_std(master_end)?,
    })
}

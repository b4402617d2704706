//! The baselines' process model (bins `baseline` and `ws_baseline`): the host's, without its
//! machinery. A parent binds the listener with the host's backlog and re-executes itself as N
//! children that accept on it. Both sides are here: what the baseline binaries call
//! ([`parent`], [`inherited_listener`]), and the suite's handle on such a server
//! ([`Prefork`]: started in a process group of its own, killed by it when dropped).

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener, TcpStream},
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use command_fds::{CommandFdExt, FdMapping};
use nix::{
    sys::signal::{killpg, Signal},
    unistd::Pid,
};

/// Where a child finds the listening socket.
const LISTENER_FD: i32 = 3;

/// How the children share the port.
#[derive(Clone, Copy, PartialEq)]
pub enum Share {
    /// One listening socket, inherited by every child (the host's model): which child takes a
    /// connection is up to the kernel's accept wake-ups, so the split is whatever they give.
    OneListener,
    /// A listening socket per child, each with `SO_REUSEPORT`: the kernel spreads the
    /// connections over them by a hash of their addresses, so the split is about even.
    ReusePort,
}

/// The parent's part: binds `addr` (backlog 1024, the host's), starts `workers` children as
/// `/proc/self/exe --child <child_args>` with a listener at fd 3 (the same one or one each, as
/// `share` says), prints `ready`, and waits for them (they run until the suite kills the
/// process group).
pub fn parent(addr: SocketAddr, workers: usize, share: Share, child_args: &[String]) {
    let bind = || {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )
        .unwrap();
        socket.set_reuse_address(true).unwrap();
        if share == Share::ReusePort {
            socket.set_reuse_port(true).unwrap();
        }
        socket.bind(&addr.into()).unwrap();
        socket.listen(1024).unwrap();
        TcpListener::from(socket)
    };
    // Every socket is bound before any child starts, so that none misses a connection.
    let listeners: Vec<TcpListener> = match share {
        Share::OneListener => {
            let one = bind();
            (0..workers).map(|_| one.try_clone().unwrap()).collect()
        }
        Share::ReusePort => (0..workers).map(|_| bind()).collect(),
    };
    let mut children = Vec::new();
    for listener in listeners {
        let fd = OwnedFd::from(listener);
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg("--child").args(child_args);
        cmd.fd_mappings(vec![FdMapping {
            parent_fd: fd,
            child_fd: LISTENER_FD,
        }])
        .unwrap();
        children.push(cmd.spawn().unwrap());
    }
    println!("ready");
    for mut c in children {
        let _ = c.wait();
    }
}

/// The child's part: the listener [`parent`] mapped at fd 3, non-blocking, for tokio.
pub fn inherited_listener() -> TcpListener {
    // SAFETY: the parent maps the listening socket at fd 3 and nothing else in this process
    // owns that fd.
    let listener = unsafe { TcpListener::from_raw_fd(LISTENER_FD) };
    listener.set_nonblocking(true).unwrap();
    listener
}

/// Every connection is a file: raises the soft limit on open files (often 1024) to the hard
/// one, as the host's master does for itself and its workers. The WebSocket baseline calls it,
/// and the suite for its clients of 10,000 idle connections and for wrk's 10,000 keep-alive
/// ones (wrk, the baseline and nginx inherit the bench's limit; the host raises its own).
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// A free port: bind to 0, read it, let it go (a baseline takes the number on its command line).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A baseline server started by the suite, in its own process group.
pub struct Prefork {
    pub child: Child,
    pub addr: String,
}

impl Prefork {
    /// `exe --listen 127.0.0.1:PORT --workers N <args>` on a free port; returns once it
    /// printed `ready` and accepts connections.
    pub fn start(exe: &Path, workers: usize, args: &[&str]) -> Prefork {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(exe)
            .args(["--listen", &addr, "--workers", &workers.to_string()])
            .args(args)
            .stdout(Stdio::piped())
            // The HTTP baseline's children log each start ("Info: hello v1 started"), which
            // would mix with the results; a baseline that fails to start still says so through
            // its stdout.
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // Built before the checks, so that a failed one kills what did start.
        let server = Prefork { child, addr };
        assert_eq!(line.trim(), "ready", "{} did not start", exe.display());
        let start = Instant::now();
        while TcpStream::connect(&server.addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{} never listened",
                exe.display()
            );
            thread::sleep(Duration::from_millis(10));
        }
        server
    }

    /// The parent and its children.
    pub fn pids(&self) -> Vec<u32> {
        crate::procs::tree(self.child.id())
    }
}

impl Drop for Prefork {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

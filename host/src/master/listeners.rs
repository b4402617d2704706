//! Where a service's listening sockets come from, in this order: the master this one replaces
//! in a `host upgrade` (its sockets are inherited, so no connection is ever refused), systemd's
//! socket activation (`LISTEN_FDS`, matched by address), or a new bind.
//!
//! A bind is done the way every worker will share the socket: no SO_REUSEPORT (with one socket
//! per worker, connections queued on a closing worker's socket would be reset), and a deep
//! backlog, where connections wait while workers are replaced.

use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Socket, Type};

use super::service::Listener;
use crate::inherit::{adopt, Kind};

/// The listen backlog: connections wait here while workers are replaced.
const BACKLOG: i32 = 1024;

/// One socket handed over by the master this one upgrades.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Handed {
    pub service: String,
    /// The address as configured (port 0 stays 0).
    pub listen: SocketAddr,
    pub fd: i32,
}

/// Sockets this master was given, waiting to be claimed by the services that listen on them.
#[derive(Default)]
pub struct Given {
    handed: Vec<(String, SocketAddr, TcpListener)>,
    activated: Vec<(SocketAddr, TcpListener)>,
}

impl Given {
    /// The sockets of an upgrade (`handed`) and of systemd's socket activation.
    pub fn collect(handed: &[Handed]) -> Result<Given, String> {
        let mut given = Given::default();
        for h in handed {
            let fd = adopt(h.fd, Kind::Socket).ok_or_else(|| {
                format!(
                    "the listener for {} ({}) was not passed at fd {}",
                    h.service, h.listen, h.fd
                )
            })?;
            given
                .handed
                .push((h.service.clone(), h.listen, TcpListener::from(fd)));
        }
        let fds = sd_notify::listen_fds()
            .map_err(|e| format!("could not read systemd's LISTEN_FDS: {e}"))?;
        for raw in fds {
            let Some(fd) = adopt(raw, Kind::Socket) else {
                return Err(format!(
                    "systemd passed fd {raw} (LISTEN_FDS), which is not a socket"
                ));
            };
            let socket = TcpListener::from(fd);
            let addr = socket.local_addr().map_err(|e| {
                format!("systemd passed fd {raw}, which is not a TCP listener ({e})")
            })?;
            given.activated.push((addr, socket));
        }
        Ok(given)
    }

    /// The socket for `service` listening on `addr`: a handed or activated one, or a new bind.
    pub fn open(&mut self, service: &str, addr: SocketAddr) -> Result<Listener, String> {
        let mut handed = false;
        let socket = if let Some(i) = self
            .handed
            .iter()
            .position(|(s, a, _)| s == service && *a == addr)
        {
            handed = true;
            self.handed.swap_remove(i).2
        } else if let Some(i) = self.activated.iter().position(|(a, _)| *a == addr) {
            tracing::info!(service, "using the socket systemd passed for {addr}");
            self.activated.swap_remove(i).1
        } else {
            bind(addr).map_err(|e| {
                format!(
                    "could not listen on {addr} for service {service}: {e}. Is another server \
                     using this address (a host started earlier, for one)? Listen elsewhere (the \
                     service's `listen`, or `--listen`), or stop the other server."
                )
            })?
        };
        let bound = socket
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| addr.to_string());
        Ok(Listener {
            handed,
            configured: addr,
            bound,
            socket,
        })
    }

    /// Systemd sockets no service claimed (a unit that names an address the config does not);
    /// they are closed, and the start says so.
    pub fn unclaimed(&self) -> Vec<SocketAddr> {
        self.activated.iter().map(|(a, _)| *a).collect()
    }
}

/// Makes a listener take no new connections, while those already queued stay queued for the
/// workers to accept: a socket filter that drops every SYN sent to it, so a new client's
/// connect goes unanswered (it retries, and finds the port closed once the last worker closed
/// its copy). Only SYNs: a handshake already under way when the filter lands completes (its
/// last ACK passes) and joins the queue the workers take before closing their copies; a filter
/// that dropped every packet left such a client believing it was connected, and reset when
/// the socket closed. Closing the socket instead would reset every connection still in its
/// queue. (Accepted connections have sockets of their own: the filter does not touch them.)
pub fn stop_new_connections(listener: &TcpListener) {
    // A TCP socket's filter sees the segment from its TCP header: byte 13 holds the flags.
    let drop_syns = [
        socket2::SockFilter::new(0x30, 0, 0, 13), // BPF_LD | BPF_B | BPF_ABS: A = flags
        socket2::SockFilter::new(0x45, 0, 1, 0x02), // BPF_JMP | BPF_JSET | BPF_K: SYN set?
        socket2::SockFilter::new(0x06, 0, 0, 0),  // BPF_RET | BPF_K: drop
        socket2::SockFilter::new(0x06, 0, 0, u32::MAX), // BPF_RET | BPF_K: keep all of it
    ];
    if let Err(e) = socket2::SockRef::from(listener).attach_filter(&drop_syns) {
        // Seen as EPERM for unprivileged processes on some kernels: the listener then just
        // closes, and a connection arriving in that instant may be reset.
        tracing::warn!(
            "could not stop new connections on a listener before closing it ({e}); a \
             connection that arrives while it closes may be reset"
        );
    }
}

/// Binds a listener (see the module comment).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::TcpStream,
        time::Duration,
    };

    use super::*;

    #[test]
    fn a_stopped_listener_keeps_its_queue_and_answers_no_new_syn() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = TcpStream::connect(addr).unwrap();
        stop_new_connections(&listener);
        // Data sent on a connection that was queued before still arrives.
        queued.write_all(b"ping").unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        let mut buf = [0; 4];
        accepted.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        // A new SYN is dropped, not answered: the connect times out.
        let err = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    }
}

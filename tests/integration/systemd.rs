//! systemd: the notifications of `Type=notify` (on a datagram socket this test binds and names
//! in NOTIFY_SOCKET, as systemd would), and socket activation with the real
//! `systemd-socket-activate` (Debian package `systemd`; it works without systemd as PID 1).

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::unix::net::UnixDatagram,
    thread,
    time::{Duration, Instant},
};

use crate::{
    harness::{dir_with_config, wait_until, Host},
    http::get,
};

/// Collects the datagrams the master sends to NOTIFY_SOCKET.
struct Notifications {
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl Notifications {
    fn bind(dir: &std::path::Path) -> (Notifications, std::path::PathBuf) {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        (
            Notifications {
                socket,
                seen: Vec::new(),
            },
            path,
        )
    }

    /// Waits until a datagram containing `text` arrived (all datagrams are kept).
    fn wait_for(&mut self, text: &str) -> String {
        let start = Instant::now();
        loop {
            if let Some(found) = self.seen.iter().find(|d| d.contains(text)) {
                return found.clone();
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no notification with {text:?}; got {:?}",
                self.seen
            );
            let mut buf = [0u8; 4096];
            if let Ok(n) = self.socket.recv(&mut buf) {
                self.seen
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }
}

#[test]
fn the_master_tells_systemd_ready_reloading_and_stopping() {
    let dir = Host::dir_with_plugin("versioned");
    let (mut notes, path) = Notifications::bind(dir.path());
    let mut host = Host::serving_with(dir, 1, &[], &[("NOTIFY_SOCKET", &path)]);
    let ready = notes.wait_for("READY=1");
    assert!(ready.contains("STATUS=1 services: plugin "), "{ready}");
    notes.seen.clear();

    host.reload_ok();
    let reloading = notes.wait_for("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    notes.wait_for("READY=1");
    notes.seen.clear();

    // An upgrade: the new master names itself the main process.
    let out = host.cli(&["upgrade"]);
    assert!(
        out.status.success(),
        "{}",
        crate::harness::output_text(&out)
    );
    let new_pid = host.status()["master_pid"].as_u64().unwrap();
    assert_ne!(new_pid, host.pid as u64);
    notes.wait_for(&format!("MAINPID={new_pid}"));
    assert!(host.wait_exit(), "the old master exits once drained");

    assert!(host.cli(&["stop"]).status.success());
    notes.wait_for("STOPPING=1");
}

#[test]
fn sockets_passed_by_systemd_socket_activate_are_used() {
    let activate = "/usr/bin/systemd-socket-activate";
    assert!(
        std::path::Path::new(activate).exists(),
        "this test needs {activate}: apt-get install systemd"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let config = format!(
        "[[service]]\nname = \"web\"\nlisten = [\"{addr}\"]\nplugin = \"plugin.so\"\nworkers = 1\n"
    );
    let dir = dir_with_config(&config, &[("plugin.so", "versioned")]);
    // systemd-socket-activate binds the address, waits for the first connection, then execs
    // the host with the socket (LISTEN_FDS=1): that first request is queued until the host
    // serves it.
    let first = {
        let addr = addr.clone();
        thread::spawn(move || {
            let mut stream = loop {
                match TcpStream::connect(&addr) {
                    Ok(s) => break s,
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            };
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).unwrap();
            answer
        })
    };
    let listen = format!("--listen={addr}");
    let host = Host::launch_wrapped(&[activate, &listen], dir, &["--config", "host.toml"]);
    let answer = first.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("versioned v1"), "{answer}");
    host.wait_for_log(&format!("using the socket systemd passed for {addr}"));
    assert!(get(&addr, "/").body.contains("versioned v1"));
    // The passed socket survives a reload too.
    host.replace_plugin("versioned-v2");
    host.reload_ok();
    wait_until("v2 answers on the passed socket", || {
        get(&addr, "/").body.contains("versioned v2")
    });
}

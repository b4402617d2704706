//! Limits that keep one bad client from starving the rest, tried with real sockets: slow heads,
//! stalled bodies, idle connections, too many connections, thousands of slow clients at a low
//! fd limit, a body announced too large; and how a stop treats new and cut connections.

use std::{
    io::{Read, Write},
    net::TcpStream,
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;

use crate::{
    harness::{artifacts, dir_with_config, wait_until, Host},
    http::{get, Conn},
};

/// One `web` service of `plugin` with one worker and `extra` config lines.
fn start(plugin: &str, extra: &str) -> Host {
    let config = format!(
        "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\nplugin = \"plugin.so\"\n\
         workers = 1\n{extra}\n"
    );
    Host::start(
        dir_with_config(&config, &[("plugin.so", plugin)]),
        &["--config", "host.toml"],
    )
}

/// Reads until the server closes the connection (or the deadline): what it sent.
fn read_until_closed(stream: &mut TcpStream, deadline: Duration) -> (String, Duration) {
    let started = Instant::now();
    stream.set_read_timeout(Some(deadline)).unwrap();
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    (
        String::from_utf8_lossy(&got).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn a_slow_request_head_is_cut_at_header_timeout() {
    let host = start("versioned", "header_timeout = \"1s\"");
    let mut stream = TcpStream::connect(host.addr("web")).unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let (_, took) = read_until_closed(&mut stream, Duration::from_secs(30));
    assert!(
        took < Duration::from_secs(20),
        "the connection stayed open {took:?}"
    );
    // Others are served meanwhile and after.
    assert_eq!(get(&host.addr("web"), "/").status, 200);
}

#[test]
fn a_stalled_body_gets_a_408() {
    let host = start("echo", "body_timeout = \"1s\"");
    let mut stream = TcpStream::connect(host.addr("web")).unwrap();
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        .unwrap();
    let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(30));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
}

#[test]
fn an_idle_keep_alive_connection_closes_at_keepalive_timeout() {
    let host = start("versioned", "keepalive_timeout = \"1s\"");
    let mut stream = TcpStream::connect(host.addr("web")).unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (answer, took) = read_until_closed(&mut stream, Duration::from_secs(30));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        took < Duration::from_secs(20),
        "the idle connection stayed open {took:?}"
    );
}

#[test]
fn a_body_announced_too_large_gets_a_413_before_it_is_sent() {
    let host = start("echo", "max_body_bytes = \"1KiB\"");
    let mut stream = TcpStream::connect(host.addr("web")).unwrap();
    stream
        .write_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n\r\n",
        )
        .unwrap();
    // Without sending any of the body: the answer comes at once, and it is no 100 Continue.
    let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(30));
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

#[test]
fn a_worker_stops_accepting_at_max_connections() {
    let host = start("versioned", "max_connections = 2");
    let addr = host.addr("web");
    let mut first = Conn::new(&addr);
    let mut second = Conn::new(&addr);
    assert_eq!(first.get("/").unwrap().status, 200);
    assert_eq!(second.get("/").unwrap().status, 200);
    // The third waits in the listen queue: connected by the kernel, but not answered.
    let mut third = TcpStream::connect(&addr).unwrap();
    third
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(
        third.read(&mut buf).is_err(),
        "answered beyond max_connections"
    );
    drop(first);
    let (answer, _) = read_until_closed(&mut third, Duration::from_secs(30));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn two_thousand_slow_clients_at_a_low_fd_limit_do_not_starve_a_normal_one() {
    // This process opens 2,000 sockets itself.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    if hard < 8192 {
        eprintln!("skipped: the hard open-file limit ({hard}) is too low for 2,000 clients");
        return;
    }
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    // The host starts with the common default soft limit of 1024 and must raise it itself.
    let config =
        "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\nplugin = \"plugin.so\"\n\
                  workers = 2\n";
    let dir = dir_with_config(config, &[("plugin.so", "echo")]);
    let host = Host::launch_wrapped(
        &["sh", "-c", "ulimit -S -n 1024 && exec \"$0\" \"$@\""],
        dir,
        &["--config", "host.toml"],
    );
    let addr = host.addr("web");
    let mut slow = Vec::new();
    for _ in 0..2000 {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nx")
            .unwrap();
        slow.push(s);
    }
    wait_until("the workers hold the slow clients", || {
        let status = host.status();
        let open: u64 = status["services"][0]["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["connections"].as_u64().unwrap_or(0))
            .sum();
        open >= 2000
    });
    let started = Instant::now();
    let resp = Conn::new(&addr)
        .get("/normal")
        .expect("the normal client is served");
    let took = started.elapsed();
    assert_eq!(resp.status, 200);
    assert!(
        took < Duration::from_secs(1),
        "the normal client waited {took:?}"
    );
    assert!(!host.logs().contains("accept failed"), "{}", host.logs());
    drop(slow);
}

#[test]
fn stop_refuses_new_connections_at_once_and_finishes_the_old() {
    let mut host = start("slow", "");
    let addr = host.addr("web");
    let slow = host.slow_request_in_flight(2000);
    let state_dir = host.state_dir();
    let stopper = thread::spawn(move || {
        let mut cmd = std::process::Command::new(&artifacts().host);
        cmd.args(["stop", "--state-dir"]).arg(state_dir);
        crate::harness::run(cmd)
    });
    host.wait_for_log("draining on the master's request");
    // Once the stop began, a new connection is either refused or answered in full, never
    // accepted and left to be reset; and soon every one is refused.
    wait_until("new connections are refused", || {
        match TcpStream::connect(&addr) {
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
                true
            }
            Ok(mut s) => {
                s.write_all(b"GET /?ms=0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let (answer, _) = read_until_closed(&mut s, Duration::from_secs(30));
                assert!(
                    answer.starts_with("HTTP/1.1 200"),
                    "accepted, then: {answer:?}"
                );
                false
            }
        }
    });
    let resp = slow
        .join()
        .unwrap()
        .expect("the request in flight completes");
    assert_eq!(resp.status, 200);
    assert!(stopper.join().unwrap().status.success());
    assert!(host.wait_exit());
}

#[test]
fn a_second_sigterm_stops_at_once_and_says_requests_were_cut() {
    let mut host = start("slow", "drain_timeout = \"60s\"");
    let _slow = host.slow_request_in_flight(30_000);
    host.signal(Signal::SIGTERM);
    host.wait_for_log("SIGTERM: stopping");
    host.signal(Signal::SIGTERM);
    assert!(!host.wait_exit(), "a stop that cut requests exits non-zero");
    assert!(
        host.logs().contains("second SIGTERM: stopping now"),
        "{}",
        host.logs()
    );
}

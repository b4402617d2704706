//! Accept balancing (host/src/balance.rs): a burst of new connections is shared evenly among a
//! service's workers, before and after a reload; with `balance_accepts = false` it is left to
//! the kernel's wake-ups.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    time::Duration,
};

use crate::harness::{dir_with_config, Host};

const CONNECTIONS: usize = 32;

/// Opens `CONNECTIONS` connections at once (the kernel queues them all before the workers
/// accept), then asks each which worker holds it; returns how many each pid holds.
fn split(addr: &str) -> HashMap<u32, usize> {
    let mut streams: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    let mut held = HashMap::new();
    for stream in &mut streams {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream
            .write_all(b"GET /__host/worker HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        *held.entry(pid_of(&read_response(stream))).or_insert(0) += 1;
    }
    held
}

/// One HTTP/1.1 response with a Content-Length, left open: its body.
fn read_response(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).expect("a response"), 1, "closed");
        got.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("a content-length")
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    String::from_utf8(body).unwrap()
}

fn pid_of(worker_json: &str) -> u32 {
    let v: serde_json::Value = serde_json::from_str(worker_json).expect("JSON");
    v["pid"].as_u64().expect("a pid") as u32
}

/// Every one of `workers` holds within 4 of an even share.
fn assert_even(held: &HashMap<u32, usize>, workers: &[u32]) {
    let even = CONNECTIONS / workers.len();
    for pid in workers {
        let n = held.get(pid).copied().unwrap_or(0);
        assert!(
            n.abs_diff(even) <= 4,
            "worker {pid} holds {n} of {CONNECTIONS} connections (even: {even}): {held:?}"
        );
    }
    assert_eq!(
        held.keys().filter(|p| !workers.contains(p)).count(),
        0,
        "connections held by workers other than {workers:?}: {held:?}"
    );
}

#[test]
fn a_burst_of_connections_is_shared_evenly_before_and_after_a_reload() {
    // A worker over its share waits 30 ms, not 1, for the other to take a connection: on a
    // machine busy with other tests the other may not run within 1-2 ms, and then the split
    // would be decided by the scheduler, not by the rule under test.
    let host = Host::serving_with(
        Host::dir_with_plugin("versioned"),
        2,
        &[],
        &[("HOST_ACCEPT_YIELD_MS", Path::new("30"))],
    );
    let addr = host.addr("plugin");
    let first = host.ready_pids("plugin");
    for pid in &first {
        assert!(maps_table(*pid), "worker {pid} has no balancing table");
    }
    assert_even(&split(&addr), &first);
    // The replaced workers drain: they no longer count, and the new ones share the next burst.
    host.replace_plugin("versioned-v2");
    host.reload_ok();
    host.wait_for_replacement("plugin", &first);
    assert_even(&split(&addr), &host.ready_pids("plugin"));
    assert!(
        !host.logs().contains("accepting unbalanced"),
        "{}",
        host.logs()
    );
}

#[test]
fn balancing_can_be_turned_off() {
    let config =
        "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\nplugin = \"plugin.so\"\n\
                  workers = 2\nbalance_accepts = false\n";
    let host = Host::start(
        dir_with_config(config, &[("plugin.so", "versioned")]),
        &["--config", "host.toml"],
    );
    // Served, by whichever worker the kernel's wake-up favours; no worker maps the table.
    let held = split(&host.addr("web"));
    assert_eq!(held.values().sum::<usize>(), CONNECTIONS);
    for pid in host.ready_pids("web") {
        assert!(!maps_table(pid), "worker {pid} maps the balancing table");
    }
}

/// Whether worker `pid` has its service's balancing table mapped.
fn maps_table(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .contains("/memfd:host-accept-balance")
}

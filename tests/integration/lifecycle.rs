//! Processes: crashed workers are replaced, a dead master leaves no worker behind, stop leaves
//! nothing running and frees the port, one master per state directory, several services.

use std::net::TcpListener;

use nix::{
    sys::signal::{kill, killpg, Signal},
    unistd::Pid,
};

use crate::{
    harness::{alive, dir_with_config, output_text, wait_until, Host},
    http::get,
};

fn versioned(workers: usize) -> Host {
    Host::serving("versioned", workers, &[])
}

#[test]
fn worker_killed_with_sigkill_is_replaced() {
    let host = versioned(2);
    let pids = host.ready_pids("plugin");
    kill(Pid::from_raw(pids[0] as i32), Signal::SIGKILL).unwrap();
    wait_until("the slot is refilled", || {
        let now = host.ready_pids("plugin");
        now.len() == 2 && !now.contains(&pids[0]) && now.contains(&pids[1])
    });
    assert!(get(&host.addr("plugin"), "/").body.contains("versioned v1"));
    host.wait_for_log("was killed by signal 9 (SIGKILL)");
    host.wait_for_log("; starting a replacement");
}

#[test]
fn master_killed_with_sigkill_leaves_no_worker_behind() {
    let host = versioned(3);
    let pids = host.ready_pids("plugin");
    host.signal(Signal::SIGKILL);
    wait_until("every worker has exited", || {
        pids.iter().all(|p| !alive(*p))
    });
}

#[test]
fn stop_drains_leaves_no_process_and_frees_the_port() {
    let mut host = versioned(2);
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: std::path::PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(host.state_dir()), 0o700, "state dir");
    assert_eq!(
        mode(host.state_dir().join("host.sock")),
        0o600,
        "control socket"
    );
    let addr = host.addr("plugin");
    let pids = host.ready_pids("plugin");
    let out = host.cli(&["stop"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(output_text(&out).contains("stopped"));
    // `host stop` returns once the master's process has ended, so what runs next (a
    // `host start`, a deploy script) finds everything free: checked before the exit is reaped.
    assert!(
        !alive(host.pid),
        "the master is gone when `host stop` returns"
    );
    assert!(pids.iter().all(|p| !alive(*p)), "no worker is left");
    TcpListener::bind(&addr).expect("the port is free again");
    assert!(!host.state_dir().join("host.sock").exists());
    assert!(!host.state_dir().join("host.pid").exists());
    assert!(host.wait_exit(), "the master exits with status 0");
}

#[test]
fn sigterm_stops_gracefully_after_in_flight_requests() {
    let mut host = Host::serving("slow", 1, &[]);
    let slow = host.slow_request_in_flight(1500);
    host.signal(Signal::SIGTERM);
    let resp = slow.join().unwrap().expect("the in-flight request failed");
    assert_eq!(resp.status, 200);
    assert!(host.wait_exit());
}

#[test]
fn second_master_on_the_same_state_dir_is_refused() {
    let host = versioned(1);
    let out = host.cli(&["start", "--plugin", "plugin.so", "--listen", "127.0.0.1:0"]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "another host master (pid {}) is already running",
            host.pid
        )),
        "{text}"
    );
}

#[test]
fn stale_state_from_a_killed_master_does_not_block_a_new_start() {
    let first = versioned(1);
    killpg(Pid::from_raw(first.pid as i32), Signal::SIGKILL).unwrap();
    wait_until("the master is gone", || !alive(first.pid));
    assert!(
        first.state_dir().join("host.sock").exists(),
        "a killed master leaves its socket"
    );
    // Start again in the same directory, with the same state dir.
    let dir = first.into_dir();
    let second = Host::serving_in(dir, 1, &[]);
    assert!(get(&second.addr("plugin"), "/")
        .body
        .contains("versioned v1"));
}

#[test]
fn services_reload_together_and_reloadable_false_keeps_its_workers() {
    let config = r#"
        [[service]]
        name = "greet"
        listen = ["127.0.0.1:0"]
        plugin = "greet.so"
        workers = 2
        [service.config]
        greeting = "Howdy"

        [[service]]
        name = "echo"
        listen = ["127.0.0.1:0", "[::1]:0"]
        plugin = "echo.so"
        workers = 1

        [[service]]
        name = "sessions"
        listen = ["127.0.0.1:0"]
        plugin = "counter.so"
        workers = 2
        reloadable = false
    "#;
    let host = Host::start(
        dir_with_config(
            config,
            &[
                ("greet.so", "versioned"),
                ("echo.so", "echo"),
                ("counter.so", "counter"),
            ],
        ),
        &["--config", "host.toml"],
    );
    assert_eq!(
        get(&host.addr("greet"), "/").body,
        "Howdy from versioned v1\n"
    );
    let before: Vec<_> = ["greet", "echo", "sessions"]
        .iter()
        .map(|s| host.ready_pids(s))
        .collect();
    crate::harness::copy_new_inode(
        &crate::harness::artifacts().plugin("versioned-v2"),
        &host.dir.path().join("greet.so"),
    );
    let out = host.reload_ok();
    assert!(
        out.contains("sessions: kept as it is (reloadable = false)"),
        "{out}"
    );
    let after: Vec<_> = ["greet", "echo", "sessions"]
        .iter()
        .map(|s| host.ready_pids(s))
        .collect();
    assert!(
        after[0].iter().all(|p| !before[0].contains(p)),
        "greet was reloaded"
    );
    assert!(
        after[1].iter().all(|p| !before[1].contains(p)),
        "echo was reloaded"
    );
    assert_eq!(after[2], before[2], "sessions kept its workers");
    assert_eq!(
        get(&host.addr("greet"), "/").body,
        "Howdy from versioned v2\n"
    );
    // The echo service listens on IPv6 too.
    let status = host.status();
    let echo = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "echo")
        .unwrap()
        .clone();
    let v6 = echo["listen"][1].as_str().unwrap();
    assert!(get(v6, "/v6").body.contains("\"path\":\"/v6\""));
    // Reloading a reloadable = false service by name is refused with a reason.
    let out = host.cli(&["reload", "sessions"]);
    assert!(output_text(&out).contains("reloadable = false"));
    assert_eq!(out.status.code(), Some(1));
}

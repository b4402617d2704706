//! `host start --daemon`, the log file and `host reopen-logs`, and SIGUSR2.

use std::{fs, process::Command};

use nix::sys::signal::Signal;

use crate::{
    harness::{artifacts, kill_master_and_workers, output_text, run, wait_until, Host},
    http::get,
};

/// Stops a daemon (by pid, with its workers) when dropped, whatever the test did.
struct Daemon(u32);

impl Drop for Daemon {
    fn drop(&mut self) {
        kill_master_and_workers(self.0);
    }
}

fn host(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(&artifacts().host);
    cmd.args(args).current_dir(dir).env_remove("HOST_STATE_DIR");
    run(cmd)
}

#[test]
fn a_daemon_returns_once_ready_and_is_controlled_like_any_master() {
    let dir = Host::dir_with_plugin("versioned");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let out = host(
        dir.path(),
        &["start", "-d", "--plugin", "plugin.so", "--listen", &addr],
    );
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    let pid: u32 = text
        .split("master pid ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {text:?}"));
    let _daemon = Daemon(pid);
    // Ready means ready: the first request needs no wait.
    assert!(get(&addr, "/").body.contains("versioned v1"));
    let status = output_text(&host(dir.path(), &["status"]));
    assert!(status.contains(&format!("master pid {pid}")), "{status}");
    // Its own session, and its log in the state directory.
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        fields[3],
        pid.to_string(),
        "the daemon leads its own session"
    );
    let log = dir.path().join(".host/host.log");
    wait_until("the log has the worker's ready line", || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("ready: plugin")
    });
    assert!(host(dir.path(), &["stop"]).status.success());
    // Not a child of this test: once it ends, init (or the nearest subreaper) reaps it, so it
    // may still show as a zombie for a moment; `alive` counts a zombie as gone.
    assert!(
        !crate::harness::alive(pid),
        "the daemon is gone when `host stop` returns"
    );

    // A daemon that cannot start says why, in the terminal.
    let out = host(
        dir.path(),
        &["start", "-d", "--plugin", "missing.so", "--listen", &addr],
    );
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("missing.so does not exist"), "{text}");
}

#[test]
fn reopen_logs_moves_master_and_workers_to_the_new_file() {
    let dir = Host::dir_with_plugin("versioned");
    let log = dir.path().join("host.log");
    let log_arg = log.to_str().unwrap().to_string();
    let host = Host::serving_in(dir, 2, &["--log-file", &log_arg]);
    let addr = host.addr("plugin");
    wait_until("the log file fills", || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("ready: plugin")
    });
    // logrotate: move the file, then tell the host.
    let rotated = log.with_extension("log.1");
    fs::rename(&log, &rotated).unwrap();
    let out = host.cli(&["reopen-logs"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("(the master and its 2 workers)"), "{text}");
    // It returned once both workers had switched: their lines saying so are in the new file.
    let new = fs::read_to_string(&log).unwrap();
    assert_eq!(
        new.matches("log file reopened").count(),
        2,
        "each worker's own line, in the new file:\n{new}"
    );
    // A worker that was running before logs to the new file; so does the master.
    let mut conn = crate::http::Conn::new(&addr);
    conn.get("/").unwrap();
    let pids = host.ready_pids("plugin");
    host.cli(&["stop"]);
    wait_until("the drained workers' lines are in the new file", || {
        let text = fs::read_to_string(&log).unwrap_or_default();
        text.contains("log file reopened")
            && pids
                .iter()
                .all(|p| text.contains(&format!("pid={p}")) && text.contains("drained after"))
            && text.contains("stopped: every worker exited")
    });
    assert!(!fs::read_to_string(&rotated)
        .unwrap()
        .contains("stopped: every worker exited"));
}

#[test]
fn sigusr2_upgrades_the_master() {
    let mut host = Host::serving("versioned", 1, &[]);
    let addr = host.addr("plugin");
    host.signal(Signal::SIGUSR2);
    host.wait_for_log("SIGUSR2: upgraded in");
    let new_pid = host.status()["master_pid"].as_u64().unwrap();
    assert_ne!(new_pid, host.pid as u64);
    assert!(get(&addr, "/").body.contains("versioned v1"));
    assert!(host.wait_exit());
}

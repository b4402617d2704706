//! Liveness: a wedged or stopped worker is found and replaced, a handler that overruns its
//! timeout gets its client a 503 and its worker replaced, and workers die with their master
//! whatever their runtime is doing.

use std::{
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, killpg, Signal},
    unistd::Pid,
};

use crate::{
    harness::{alive, dir_with_config, wait_until, Host},
    http::{get, Conn},
    rollout::start,
};

/// Enough `/spin` requests to wedge every runtime thread of `workers` workers (the runtime has
/// one thread per core), each on its own connection; they never get an answer.
fn wedge(addr: &str, workers: usize) {
    let threads = thread::available_parallelism().map_or(2, |n| n.get());
    for _ in 0..workers * threads * 2 {
        let addr = addr.to_string();
        thread::spawn(move || {
            let _ = Conn::new(&addr).get("/spin");
        });
    }
}

fn heartbeat_ages(host: &Host) -> Vec<u64> {
    host.status()["services"][0]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["heartbeat_age_ms"].as_u64().unwrap_or(0))
        .collect()
}

#[test]
fn a_wedged_worker_is_killed_and_replaced() {
    let host = start("versioned", 1, "liveness_timeout = \"1s\"");
    let addr = host.addr("web");
    let old = host.ready_pids("web");
    wedge(&addr, 1);
    host.wait_for_log("it stopped answering (no heartbeat for 1s, liveness_timeout)");
    host.wait_for_replacement("web", &old);
    wait_until("the wedged worker is gone", || !alive(old[0]));
    assert!(get(&addr, "/").body.contains("versioned v1"));
}

#[test]
fn a_stopped_worker_is_killed_and_replaced() {
    let host = start("versioned", 2, "liveness_timeout = \"1s\"");
    let addr = host.addr("web");
    let pids = host.ready_pids("web");
    kill(Pid::from_raw(pids[0] as i32), Signal::SIGSTOP).unwrap();
    host.wait_for_log(&format!("worker {} it stopped answering", pids[0]));
    wait_until("the stopped worker is replaced", || {
        let now = host.ready_pids("web");
        now.len() == 2 && !now.contains(&pids[0]) && now.contains(&pids[1])
    });
    wait_until("the stopped worker is gone", || !alive(pids[0]));
    assert!(get(&addr, "/").body.contains("versioned v1"));
}

#[test]
fn a_blocking_handler_past_handler_timeout_gets_a_503_and_its_worker_is_replaced() {
    let config =
        "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\nplugin = \"plugin.so\"\n\
                  workers = 1\nhandler_timeout = \"1s\"\ndrain_timeout = \"5s\"\n";
    let host = Host::start(
        dir_with_config(config, &[("plugin.so", "slow")]),
        &["--config", "host.toml"],
    );
    let addr = host.addr("web");
    let old = host.ready_pids("web");
    let resp = Conn::new(&addr).get("/?ms=4000").unwrap();
    assert_eq!(resp.status, 503, "{}", resp.body);
    assert!(resp.body.contains("handler_timeout"), "{}", resp.body);
    host.wait_for_log("has run longer than handler_timeout (1s): its thread is lost");
    host.wait_for_replacement("web", &old);
    assert_eq!(get(&addr, "/?ms=0").status, 200);
}

#[test]
fn an_inline_handler_past_handler_timeout_has_its_worker_replaced() {
    // With more than one runtime thread the worker keeps its heartbeat and says it lost a
    // thread; with one, the heartbeat stops. Either way the worker is replaced.
    let host = start(
        "versioned",
        1,
        "handler_timeout = \"1s\"\nliveness_timeout = \"3s\"\ndrain_timeout = \"2s\"",
    );
    let addr = host.addr("web");
    let old = host.ready_pids("web");
    let spin = addr.clone();
    thread::spawn(move || {
        let _ = Conn::new(&spin).get("/spin");
    });
    host.wait_for_replacement("web", &old);
    let logs = host.logs();
    assert!(
        logs.contains("longer than handler_timeout (1s): its thread is lost")
            || logs.contains("it stopped answering"),
        "{logs}"
    );
    assert!(get(&addr, "/").body.contains("versioned v1"));
}

/// Kills the given workers' process groups when dropped: the master is gone in this test,
/// so the harness cannot find them through it.
struct Orphans(Vec<u32>);

impl Drop for Orphans {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = killpg(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
    }
}

#[test]
fn wedged_workers_die_soon_after_their_master_is_killed() {
    let drain = Duration::from_secs(2);
    let host = start(
        "versioned",
        2,
        "drain_timeout = \"2s\"\nliveness_timeout = \"60s\"",
    );
    let addr = host.addr("web");
    let workers = Orphans(host.ready_pids("web"));
    // Connections queue for whichever worker still accepts: keep sending `/spin` until neither
    // does.
    wedge(&addr, 1);
    wait_until("both workers are wedged", || {
        let wedged = heartbeat_ages(&host).iter().all(|age| *age > 1500);
        if !wedged {
            wedge(&addr, 1);
        }
        wedged
    });
    host.signal(Signal::SIGKILL);
    let killed = Instant::now();
    wait_until("the orphaned workers exit", || {
        workers.0.iter().all(|p| !alive(*p))
    });
    // The watchdog ends them after the drain timeout plus half a second; the rest is slack
    // for a loaded machine. Without the watchdog they would run forever.
    assert!(
        killed.elapsed() < drain + Duration::from_secs(5),
        "took {:?}",
        killed.elapsed()
    );
}

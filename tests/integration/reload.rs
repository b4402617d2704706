//! Smooth reload: clients on keep-alive connections see no failed request, the new code
//! serves, every worker is replaced, and a long request in flight gets its whole answer.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread,
};

use crate::{
    harness::{alive, wait_until, Host},
    http::{get, Conn},
};

#[derive(Default)]
struct ClientStats {
    ok: usize,
    errors: Vec<String>,
    bodies: HashSet<String>,
    connects: usize,
}

#[test]
fn reload_under_keep_alive_load_fails_no_request() {
    let host = Host::serving("versioned", 3, &[]);
    let addr = host.addr("plugin");
    let before = host.ready_pids("plugin");
    assert_eq!(before.len(), 3);

    const CLIENTS: usize = 4;
    let stop = Arc::new(AtomicBool::new(false));
    // How many clients have been answered by v1, and by v2: each client counts itself once, so
    // that the waits below are for every client (on a loaded machine one client's thread can
    // lag far behind the others').
    let saw_v1 = Arc::new(AtomicUsize::new(0));
    let saw_v2 = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (addr, stop, saw_v1, saw_v2) =
                (addr.clone(), stop.clone(), saw_v1.clone(), saw_v2.clone());
            thread::spawn(move || {
                let mut conn = Conn::new(&addr);
                let mut stats = ClientStats::default();
                while !stop.load(Ordering::SeqCst) {
                    match conn.get("/") {
                        Ok(r) if r.status == 200 => {
                            stats.ok += 1;
                            for (version, saw) in
                                [("versioned v1", &saw_v1), ("versioned v2", &saw_v2)]
                            {
                                let first = !stats.bodies.iter().any(|b| b.contains(version));
                                if first && r.body.contains(version) {
                                    saw.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                            stats.bodies.insert(r.body);
                        }
                        Ok(r) => stats
                            .errors
                            .push(format!("status {}: {}", r.status, r.body)),
                        Err(e) => stats.errors.push(e),
                    }
                }
                stats.connects = conn.connects;
                stats
            })
        })
        .collect();
    wait_until("every client is served by v1", || {
        saw_v1.load(Ordering::SeqCst) == CLIENTS
    });

    host.replace_plugin("versioned-v2");
    let out = host.reload_ok();
    assert_eq!(
        out.matches(" -> ").count(),
        4,
        "one line per worker plus the plugin line:\n{out}"
    );
    // Keep the load on until every client has been served by the new code.
    wait_until("every client sees v2", || {
        saw_v2.load(Ordering::SeqCst) == CLIENTS
    });
    stop.store(true, Ordering::SeqCst);

    let stats: Vec<ClientStats> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    for (i, s) in stats.iter().enumerate() {
        assert!(
            s.errors.is_empty(),
            "client {i} had failed requests: {:?}",
            s.errors
        );
        assert!(
            s.bodies.iter().any(|b| b.contains("versioned v1")),
            "client {i} never saw v1"
        );
        assert!(
            s.bodies.iter().any(|b| b.contains("versioned v2")),
            "client {i} never saw v2"
        );
        // Its keep-alive connection was to an old worker, which closed it cleanly.
        assert!(s.connects >= 2, "client {i} never reconnected");
    }
    let after = host.ready_pids("plugin");
    assert_eq!(after.len(), 3);
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "every worker pid changes: {before:?} -> {after:?}"
    );
    assert!(get(&addr, "/").body.contains("versioned v2"));
    wait_until("the old workers have exited", || {
        before.iter().all(|p| !alive(*p))
    });
}

#[test]
fn request_in_flight_across_a_reload_gets_its_full_answer() {
    let host = Host::serving("slow", 1, &[]);
    let addr = host.addr("plugin");
    let old = host.ready_pids("plugin");
    let slow = host.slow_request_in_flight(5000);

    host.reload_ok();
    let new = host.ready_pids("plugin");
    assert_ne!(new, old);
    // The new worker serves while the old one still finishes its request.
    let fast = get(&addr, "/?ms=0");
    assert!(
        fast.body.contains(&format!("pid {}", new[0])),
        "{}",
        fast.body
    );
    assert!(
        !slow.is_finished(),
        "the slow request should still be running"
    );

    let resp = slow.join().unwrap().expect("the in-flight request failed");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, format!("slept 5000 ms in pid {}\n", old[0]));
    assert!(
        resp.closes,
        "a draining worker answers with Connection: close"
    );
    wait_until("the old worker has exited", || !alive(old[0]));
}

#[test]
fn counter_state_is_per_worker_and_lost_on_reload() {
    let host = Host::serving("counter", 1, &[]);
    let addr = host.addr("plugin");
    get(&addr, "/");
    assert!(get(&addr, "/").body.starts_with("request 2 "));
    host.reload_ok();
    assert!(
        get(&addr, "/").body.starts_with("request 1 "),
        "a new worker starts from zero"
    );
}

#[test]
fn signals_hup_and_usr1_reload() {
    use nix::sys::signal::Signal;
    let host = Host::serving("versioned", 1, &[]);
    let addr = host.addr("plugin");
    host.replace_plugin("versioned-v2");
    host.signal(Signal::SIGHUP);
    wait_until("SIGHUP reloaded v2", || {
        get(&addr, "/").body.contains("versioned v2")
    });
    let pids = host.ready_pids("plugin");
    host.signal(Signal::SIGUSR1);
    wait_until("SIGUSR1 replaced the worker", || {
        let now = host.ready_pids("plugin");
        now.len() == 1 && now != pids
    });
}

#[test]
fn clients_idle_between_requests_lose_nothing_across_reloads() {
    // 16 clients pause 1 s between requests on their keep-alive connections, less than the
    // idle grace (5 s): a draining worker answers their next request (with Connection: close)
    // instead of closing the idle connection under them. Each reload takes a little over its
    // 1 s canary probation, so a client sends at least one request between two reloads.
    let host = crate::rollout::start("versioned", 2, "canary_probation = \"1s\"");
    let addr = host.addr("web");
    let load = crate::load::Load::start(&addr, 16, std::time::Duration::from_secs(1));
    load.wait_for_more(16);
    for round in 0..8 {
        host.replace_plugin(if round % 2 == 0 {
            "versioned-v2"
        } else {
            "versioned"
        });
        host.reload_ok();
    }
    load.wait_for_more(32);
    assert!(load.answers_with("versioned v2") > 0);
    let seen = load.stop();
    assert!(seen.errors.is_empty(), "failed requests: {:?}", seen.errors);
    assert!(seen.ok >= 16 * 8, "{} requests", seen.ok);
}

#[test]
fn a_worker_past_max_requests_is_replaced_without_a_failed_request() {
    let host = crate::rollout::start("versioned", 1, "max_requests = 50\nmax_requests_jitter = 0");
    let addr = host.addr("web");
    let mut conn = Conn::new(&addr);
    let mut pids = HashSet::new();
    for _ in 0..5000 {
        let resp = conn.get("/pid").expect("no request may fail");
        assert_eq!(resp.status, 200);
        pids.insert(resp.body);
        if pids.len() >= 3 {
            break;
        }
    }
    assert!(
        pids.len() >= 3,
        "the worker was recycled at least twice: {pids:?}"
    );
    host.wait_for_log("it served 50 requests (max_requests, with its jitter)");
}

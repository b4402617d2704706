//! Async plugins (plugin-api's `AsyncPlugin`): handlers that await run on the plugin's own
//! runtime, so waiting requests hold no threads; a handler calls another HTTP service; the
//! worker's stop waits for the plugin's background tasks; a reload lets in-flight futures
//! finish.

use std::{
    fs,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::{
    harness::{dir_with_config, Host},
    http::{get, Conn},
};

/// `n` GETs of `path` at once, each on its own connection, from one client runtime; returns
/// how many got a 200, and how long the slowest took.
fn concurrent_gets(addr: &str, path: &str, n: usize) -> (usize, Duration) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ok = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (addr, path, ok) = (addr.to_string(), path.to_string(), ok.clone());
            tasks.push(tokio::spawn(async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await.ok()?;
                let (mut sender, conn) = http1::handshake(TokioIo::new(tcp)).await.ok()?;
                tokio::spawn(conn);
                let req = hyper::Request::get(path)
                    .header("host", addr)
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let resp = sender.send_request(req).await.ok()?;
                let status = resp.status();
                resp.into_body().collect().await.ok()?;
                if status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                Some(())
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    (ok.load(Ordering::Relaxed), started.elapsed())
}

fn threads_of(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

/// A handler that answers in its first poll is answered within hyper's call; one that waits is
/// polled again later: either way its response carries the id its log lines carry.
#[test]
fn an_async_handler_that_waits_answers_with_the_id_its_log_lines_carry() {
    let host = Host::serving("wait", 1, &[]);
    let addr = host.addr("plugin");
    // No await in it: answered in the first poll.
    let now = get(&addr, "/ticks");
    assert_eq!(now.status, 200, "{}", now.body);
    assert!(now.headers.contains_key("x-request-id"));
    // 500 ms or more: the plugin logs the wait, under the request's id.
    let waited = get(&addr, "/wait?ms=500");
    assert_eq!(waited.status, 200, "{}", waited.body);
    let id = waited.headers["x-request-id"].to_str().unwrap().to_string();
    host.wait_for_log("waiting 500 ms");
    let line = host
        .logs()
        .lines()
        .find(|l| l.contains("waiting 500 ms"))
        .map(str::to_string)
        .unwrap();
    assert!(
        line.contains(&format!("request_id=\"{id}\"")),
        "the response's id is {id}; the handler logged: {line}"
    );
}

#[test]
fn one_worker_serves_a_thousand_concurrent_one_second_waits_at_once_on_few_threads() {
    let host = Host::serving("wait", 1, &[]);
    let addr = host.addr("plugin");
    let pid = host.ready_pids("plugin")[0];
    assert_eq!(get(&addr, "/wait?ms=1").status, 200, "warm up");

    // Count the worker's threads while the requests wait.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        thread::spawn(move || {
            let mut most = 0;
            while !done.load(Ordering::Relaxed) {
                most = most.max(threads_of(pid));
                thread::sleep(Duration::from_millis(50));
            }
            most
        })
    };
    let (ok, took) = concurrent_gets(&addr, "/wait?ms=1000", 1000);
    done.store(true, Ordering::Relaxed);
    let threads = sampler.join().unwrap();
    eprintln!("1000 x 1 s waits: {ok} ok in {took:?}, at most {threads} threads in the worker");
    assert_eq!(ok, 1000, "every request answered");
    // The host's runtime has a thread per core, the plugin's 2, plus a few of the worker's own:
    // a handful, not one per waiting request.
    let cores = thread::available_parallelism().map_or(2, |n| n.get());
    assert!(threads <= cores + 12, "{threads} threads in the worker");
    // Not a speed figure (those are in bench/): a bound that tells "all at once" from "a few
    // at a time". Waits held on threads, 16 at a time, would take at least 1000 / 16 = 62 s;
    // waiting together they take about 1 s, plus whatever a loaded CI machine adds.
    assert!(
        took < Duration::from_secs(30),
        "took {took:?}: the waits were not served concurrently"
    );
}

#[test]
fn an_async_handler_calls_an_upstream_over_http() {
    let upstream = Host::serving("echo", 1, &[]);
    let config = format!(
        r#"
        [[service]]
        name = "fetch"
        listen = ["127.0.0.1:0"]
        plugin = "plugin.so"
        workers = 1
        [service.config]
        upstream = "http://{}"
        "#,
        upstream.addr("plugin")
    );
    let host = Host::start(
        dir_with_config(&config, &[("plugin.so", "fetch")]),
        &["--config", "host.toml"],
    );
    let mut conn = Conn::new(&host.addr("fetch"));
    for _ in 0..3 {
        let resp = conn.get("/fetch/some/path?x=1").unwrap();
        assert_eq!(resp.status, 200, "{}", resp.body);
        assert!(
            resp.body.starts_with("upstream said 200: "),
            "{}",
            resp.body
        );
        assert!(
            resp.body.contains(r#""path":"/some/path""#),
            "{}",
            resp.body
        );
    }
}

#[test]
fn the_workers_stop_waits_for_the_plugins_background_tasks() {
    let mut host = Host::serving("wait", 1, &[]);
    host.wait_for_log("wait started as worker 0");
    let out = host.cli(&["stop"]);
    assert!(out.status.success());
    assert!(host.wait_exit(), "the master exits 0");
    let logs = host.logs();
    let finished = logs
        .find("background task finished after the drain")
        .unwrap_or_else(|| panic!("the background task did not finish:\n{logs}"));
    let stopping = logs.find("wait stopping after").expect("on_stop ran");
    let exited = logs.find("drained after").expect("the worker's last line");
    assert!(stopping < finished && finished < exited, "{logs}");
}

#[test]
fn a_reload_lets_in_flight_async_requests_finish() {
    let host = Host::serving("wait", 2, &[]);
    let addr = host.addr("plugin");
    let in_flight: Vec<_> = (0..4)
        .map(|_| {
            let addr = addr.clone();
            thread::spawn(move || Conn::new(&addr).get("/wait?ms=1500"))
        })
        .collect();
    // Every request is in its handler (each logs "waiting 1500 ms") before the reload starts.
    crate::harness::wait_until("4 requests are waiting", || {
        host.logs().matches("waiting 1500 ms").count() >= 4
    });
    let old = host.ready_pids("plugin");
    host.reload_ok();
    assert_ne!(host.ready_pids("plugin"), old);
    for request in in_flight {
        let resp = request.join().unwrap().expect("no request is cut");
        assert_eq!(resp.status, 200);
        assert!(resp.body.starts_with("waited 1500 ms"), "{}", resp.body);
    }
}

#[test]
fn a_worker_whose_plugin_runtime_is_wedged_is_killed_and_replaced() {
    let host = crate::rollout::start(
        "async-wedge",
        1,
        "liveness_timeout = \"1s\"\n[service.config]\nruntime_threads = \"1\"",
    );
    let addr = host.addr("web");
    let old = host.ready_pids("web");
    let wedged = {
        let addr = addr.clone();
        thread::spawn(move || Conn::new(&addr).get("/wedge"))
    };
    host.wait_for_log("the plugin's runtime has not run a task for");
    host.wait_for_log("it stopped answering (no heartbeat for 1s, liveness_timeout)");
    host.wait_for_replacement("web", &old);
    assert!(
        wedged.join().unwrap().is_err(),
        "its connection died with it"
    );
    assert_eq!(get(&addr, "/").body, "ok\n");
}

#[test]
fn an_async_handler_that_blocks_its_poll_is_found_and_its_worker_replaced() {
    let host = crate::rollout::start(
        "async-wedge",
        1,
        "handler_timeout = \"1s\"\nliveness_timeout = \"2s\"\ndrain_timeout = \"1s\"",
    );
    let addr = host.addr("web");
    let old = host.ready_pids("web");
    let blocked = {
        let addr = addr.clone();
        thread::spawn(move || Conn::new(&addr).get("/block"))
    };
    host.wait_for_log("blocking the thread that polls the handler");
    host.wait_for_replacement("web", &old);
    // Found either way: the heartbeat task sees the poll's age (and asks for a replacement),
    // or, when the stuck thread holds the heartbeat task itself, the heartbeats stop.
    let logs = host.logs();
    assert!(
        logs.contains("or one poll of an async handler) has run for")
            || logs.contains("it stopped answering (no heartbeat for 2s"),
        "{logs}"
    );
    assert_eq!(get(&addr, "/").body, "ok\n");
    assert!(
        blocked.join().unwrap().is_err(),
        "its connection ends with the old worker"
    );
}

#[test]
fn an_async_handler_past_handler_timeout_is_a_503_and_is_dropped() {
    let host = crate::rollout::start("wait", 1, "handler_timeout = \"300ms\"");
    let addr = host.addr("web");
    let pid = host.ready_pids("web");
    let resp = get(&addr, "/wait?ms=5000");
    assert_eq!(resp.status, 503, "{}", resp.body);
    host.wait_for_log("it was cancelled and the client got a 503");
    // And it was: the handler's future was dropped (the plugin logs it from a drop guard).
    host.wait_for_log("a wait of 5000 ms was cancelled before it ended");
    // No thread was lost: the worker is not replaced, and serves on.
    assert_eq!(get(&addr, "/wait?ms=1").status, 200);
    assert_eq!(host.ready_pids("web"), pid);
    assert!(!host.logs().contains("asking the master for a replacement"));
}

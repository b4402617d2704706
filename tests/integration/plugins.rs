//! What plugins see and do: requests in and responses out, logging through the host, blocking
//! handlers, body limits, and the host's own routes that a reload does not change.

use crate::{
    harness::{dir_with_config, Host},
    http::{get, Conn},
};

#[test]
fn echo_round_trips_method_path_query_headers_body() {
    let host = Host::serving("echo", 1, &[]);
    let resp = Conn::new(&host.addr("plugin"))
        .send("POST", "/a/b?x=1", b"payload".to_vec())
        .unwrap();
    assert_eq!(resp.status, 200);
    let v: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/a/b");
    assert_eq!(v["query"], "x=1");
    assert_eq!(v["body"], "payload");
    assert_eq!(v["headers"]["content-length"], "7");
}

#[test]
fn body_over_the_limit_is_a_413() {
    let config = r#"
        [[service]]
        name = "echo"
        listen = ["127.0.0.1:0"]
        plugin = "plugin.so"
        workers = 1
        max_body_bytes = 16
    "#;
    let host = Host::start(
        dir_with_config(config, &[("plugin.so", "echo")]),
        &["--config", "host.toml"],
    );
    let mut conn = Conn::new(&host.addr("echo"));
    assert_eq!(conn.send("POST", "/", vec![b'x'; 16]).unwrap().status, 200);
    let resp = conn.send("POST", "/", vec![b'x'; 17]).unwrap();
    assert_eq!(resp.status, 413);
    assert!(resp.body.contains("limit of 16 bytes"), "{}", resp.body);
}

#[test]
fn plugin_logs_carry_service_pid_and_version() {
    let host = Host::serving("versioned", 1, &[]);
    let pid = host.ready_pids("plugin")[0];
    let version = host.status()["services"][0]["version"]
        .as_str()
        .unwrap()
        .to_string();
    host.wait_for_log("versioned v1 started as worker 0");
    let logs = host.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("versioned v1 started as worker 0"))
        .expect(&logs);
    assert!(line.contains("service=plugin"), "{line}");
    assert!(line.contains(&format!("pid={pid}")), "{line}");
    assert!(line.contains(&format!("plugin={version}")), "{line}");
}

#[test]
fn blocking_handler_does_not_stall_other_requests_on_the_worker() {
    let host = Host::serving("slow", 1, &[]);
    let addr = host.addr("plugin");
    let worker: serde_json::Value =
        serde_json::from_str(&get(&addr, "/__host/worker").body).unwrap();
    assert_eq!(
        worker["blocking_handlers"], true,
        "slow keeps the default: BLOCKING = true"
    );
    let slow = host.slow_request_in_flight(3000);
    for _ in 0..5 {
        assert_eq!(get(&addr, "/?ms=0").status, 200);
    }
    assert!(
        !slow.is_finished(),
        "fast requests were answered while the slow one still ran"
    );
    assert_eq!(slow.join().unwrap().unwrap().status, 200);
    assert_eq!(get(&addr, "/?ms=abc").status, 400);
}

#[test]
fn host_route_stays_the_same_across_a_reload_while_the_plugin_changes() {
    let host = Host::serving("versioned", 2, &[]);
    let addr = host.addr("plugin");
    let info_before = get(&addr, "/__host/info").body;
    let worker_before = get(&addr, "/__host/worker").body;
    host.replace_plugin("versioned-v2");
    host.reload_ok();
    assert_eq!(
        get(&addr, "/__host/info").body,
        info_before,
        "static code: unchanged"
    );
    assert!(
        get(&addr, "/").body.contains("versioned v2"),
        "plugin code: changed"
    );
    let worker_after: serde_json::Value =
        serde_json::from_str(&get(&addr, "/__host/worker").body).unwrap();
    let worker_before: serde_json::Value = serde_json::from_str(&worker_before).unwrap();
    assert_ne!(worker_after["pid"], worker_before["pid"]);
    assert_ne!(
        worker_after["plugin_version"],
        worker_before["plugin_version"]
    );
    assert_eq!(
        worker_after["blocking_handlers"], false,
        "the versioned fixture declares BLOCKING = false"
    );
}

#[test]
fn a_plugin_that_blocks_after_declaring_it_never_does_is_named_in_the_log() {
    let host = Host::serving("inline-sleep", 1, &[]);
    let addr = host.addr("plugin");
    for _ in 0..2 {
        assert_eq!(get(&addr, "/").body, "slept inline\n");
    }
    host.wait_for_log("which declares BLOCKING = false");
    let logs = host.logs();
    assert_eq!(
        logs.matches("which declares BLOCKING = false").count(),
        1,
        "said once per worker"
    );
}

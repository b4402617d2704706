//! The admin listener: the token on every `/api/` route (and the brake on guessing it), health
//! checks, operations streamed as NDJSON through the same paths as the CLI, metrics read by
//! the Prometheus project's own parser, HTTPS, host routes, and the listener living on
//! through `host upgrade`.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    harness::{dir_with_config, output_text, wait_until, Host},
    http::{get, Conn, Resp},
};

pub const TOKEN: &str = "test-token-0123456789abcdef";

/// A config with an `[admin]` table (and `admin_extra` lines in it) and one service `web`.
pub fn config(admin_extra: &str, service_extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"token\"\n{admin_extra}\n\n\
         [[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\nplugin = \"plugin.so\"\n\
         workers = 2\ncanary_probation = \"0s\"\nprobation = \"0s\"\n{service_extra}\n"
    )
}

pub fn write_token(dir: &Path) {
    let path = dir.join("token");
    fs::write(&path, format!("{TOKEN}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
}

/// A host serving `plugin` as `web`, with an admin listener.
pub fn start(plugin: &str, admin_extra: &str, service_extra: &str) -> Host {
    let dir = dir_with_config(
        &config(admin_extra, service_extra),
        &[("plugin.so", plugin)],
    );
    write_token(dir.path());
    Host::start(dir, &["--config", "host.toml"])
}

/// `127.0.0.1:PORT` of the admin listener, from `host status`.
pub fn admin_addr(host: &Host) -> String {
    let url = host.status()["admin"].as_str().unwrap().to_string();
    url.trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string()
}

/// A client that sends the token.
pub fn authorized(addr: &str) -> Conn {
    let mut conn = Conn::new(addr);
    conn.headers
        .push(("authorization".into(), format!("Bearer {TOKEN}")));
    conn
}

fn json(resp: &Resp) -> Value {
    serde_json::from_str(&resp.body).unwrap_or_else(|e| panic!("{e}: {}", resp.body))
}

/// The lines of an NDJSON answer, parsed.
fn ndjson(resp: &Resp) -> Vec<Value> {
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(resp.headers["content-type"], "application/x-ndjson");
    resp.body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn every_api_route_needs_the_token_and_health_and_metrics_do_not() {
    let host = start("hello", "", "");
    let addr = admin_addr(&host);

    assert_eq!(get(&addr, "/livez").status, 200);
    assert_eq!(get(&addr, "/readyz").status, 200);
    assert_eq!(get(&addr, "/metrics").status, 200);

    // No token, a wrong one, the right one without "Bearer": the same 401, nothing else said.
    for auth in [None, Some("Bearer wrong-token-0123456789"), Some(TOKEN)] {
        for (method, path) in [("GET", "/api/status"), ("POST", "/api/reload")] {
            let mut conn = Conn::new(&addr);
            if let Some(auth) = auth {
                conn.headers.push(("authorization".into(), auth.into()));
            }
            let resp = conn.send(method, path, vec![]).unwrap();
            assert_eq!(resp.status, 401, "{method} {path} with {auth:?}");
            assert_eq!(resp.body, "unauthorized\n");
        }
    }
    host.wait_for_log("admin: refused GET /api/status from 127.0.0.1: wrong or missing token");

    let mut admin = authorized(&addr);
    let status = json(&admin.get("/api/status").unwrap());
    let pids: Vec<u64> = status["services"][0]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().unwrap())
        .collect();
    let mut ready: Vec<u64> = host.ready_pids("web").iter().map(|p| *p as u64).collect();
    ready.sort();
    let mut pids_sorted = pids.clone();
    pids_sorted.sort();
    assert_eq!(pids_sorted, ready);
    // Mutations are POST only; reads GET only.
    let resp = admin.get("/api/reload").unwrap();
    assert_eq!(
        (resp.status, resp.headers["allow"].to_str().unwrap()),
        (405, "POST")
    );
    let resp = admin.send("POST", "/api/status", vec![]).unwrap();
    assert_eq!(resp.status, 405);
    // Running another program needs allow_upgrade_exe.
    let resp = admin
        .send("POST", "/api/upgrade?exe=/bin/true", vec![])
        .unwrap();
    assert_eq!(resp.status, 403, "{}", resp.body);
    assert!(resp.body.contains("allow_upgrade_exe"), "{}", resp.body);
}

#[test]
fn repeated_failures_from_one_address_are_answered_late() {
    let host = start("hello", "", "");
    let addr = admin_addr(&host);
    for _ in 0..3 {
        assert_eq!(get(&addr, "/api/status").status, 401);
    }
    // The fourth failure in a row waits a second before its 401.
    let t = Instant::now();
    assert_eq!(get(&addr, "/api/status").status, 401);
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    host.wait_for_log("4 in a row from this address; answering after 1s");
    // The right token still works, and clears the address's record.
    assert_eq!(authorized(&addr).get("/api/status").unwrap().status, 200);
    let t = Instant::now();
    assert_eq!(get(&addr, "/api/status").status, 401);
    assert!(t.elapsed() < Duration::from_secs(1));
}

#[test]
fn reload_and_rollback_through_the_api_stream_what_the_cli_prints() {
    let host = start("versioned", "", "");
    let addr = admin_addr(&host);
    let before = host.ready_pids("web");
    host.replace_plugin("versioned-v2");

    let events = ndjson(
        &authorized(&addr)
            .send("POST", "/api/reload?service=web", vec![])
            .unwrap(),
    );
    let (last, progress) = events.split_last().unwrap();
    assert_eq!(last["done"], true);
    assert_eq!(last["ok"], true, "{events:?}");
    let lines: Vec<&str> = progress
        .iter()
        .map(|e| e["line"].as_str().unwrap())
        .collect();
    assert!(
        lines.iter().any(|l| l.starts_with("web: worker 0: ")),
        "{lines:?}"
    );
    let after = host.ready_pids("web");
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} {after:?}"
    );
    assert!(get(&host.addr("web"), "/").body.contains("v2"));

    let events = ndjson(
        &authorized(&addr)
            .send("POST", "/api/rollback?service=web", vec![])
            .unwrap(),
    );
    assert_eq!(events.last().unwrap()["ok"], true, "{events:?}");
    assert!(get(&host.addr("web"), "/").body.contains("v1"));

    // The history and the series say what happened.
    let history = json(&authorized(&addr).get("/api/history").unwrap());
    let kinds: Vec<&str> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["reload", "rollback"]);
    let series = json(&authorized(&addr).get("/api/series").unwrap());
    assert_eq!(series["interval_s"], 1);

    // A rollback of a service that does not exist fails with the CLI's words.
    let events = ndjson(
        &authorized(&addr)
            .send("POST", "/api/rollback?service=nope", vec![])
            .unwrap(),
    );
    let out = host.cli(&["rollback", "nope"]);
    let last = events.last().unwrap();
    assert_eq!(last["ok"], false);
    assert!(
        output_text(&out).contains(last["summary"].as_str().unwrap()),
        "{last} vs {}",
        output_text(&out)
    );
}

#[test]
fn the_history_lists_the_services_the_host_keeps_but_does_not_run() {
    let api = "\n[[service]]\nname = \"api\"\nlisten = [\"127.0.0.1:0\"]\nplugin = \"plugin.so\"\n\
               workers = 1\ncanary_probation = \"0s\"\nprobation = \"0s\"\n";
    let host = start("versioned", "", api);
    let addr = admin_addr(&host);
    let live = host.service("api")["version"].as_str().unwrap().to_string();
    let history = || json(&authorized(&addr).get("/api/history").unwrap());
    assert_eq!(history()["not_running"], serde_json::json!([]));

    // A config reload that removes `api` keeps its history, and the API lists it.
    fs::write(host.dir.path().join("host.toml"), config("", "")).unwrap();
    host.reload_ok();
    let report = history();
    let services: Vec<&str> = report["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(services, ["web"]);
    let gone = &report["not_running"];
    assert_eq!(gone.as_array().unwrap().len(), 1, "{gone}");
    assert_eq!(gone[0]["name"], "api");
    assert_eq!(gone[0]["live"]["version"], live.as_str(), "{gone}");
    assert!(gone[0]["last_ran"].as_u64().unwrap() > 0, "{gone}");

    // Named again, it runs and leaves the list.
    fs::write(host.dir.path().join("host.toml"), config("", api)).unwrap();
    host.reload_ok();
    assert_eq!(history()["not_running"], serde_json::json!([]));
    assert_eq!(host.service("api")["version"], live.as_str());
}

#[test]
fn readyz_says_503_while_the_host_drains_and_the_stop_streams_to_the_end() {
    let mut host = start("slow", "", "drain_timeout = \"20s\"");
    let addr = admin_addr(&host);
    // Long enough for the checks below to run while the drain waits for it, on a loaded
    // machine too (the drain_timeout is longer).
    let slow = host.slow_request_in_flight(10_000);
    // The stop's answer arrives line by line: the first before the drain ends.
    let mut stream = TcpStream::connect(&addr).unwrap();
    write!(
        stream,
        "POST /api/stop HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {TOKEN}\r\n\
         content-length: 0\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !line.contains("stopping: draining") {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended");
    }
    let readyz = get(&addr, "/readyz");
    assert_eq!(readyz.status, 503);
    assert_eq!(readyz.body, "not ready: the host is stopping\n");
    assert_eq!(get(&addr, "/livez").status, 200);
    // The request in flight completes; then the stop's outcome.
    assert_eq!(slow.join().unwrap().unwrap().status, 200);
    let mut rest = String::new();
    while !rest.contains("\"done\":true") {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "no outcome: {rest}"
        );
        rest += &line;
    }
    assert!(rest.contains("\"ok\":true"), "{rest}");
    assert!(host.wait_exit());
}

/// Runs the Prometheus project's parser on `/metrics`; every sample, keyed by name and labels.
fn scrape(addr: &str) -> Vec<Value> {
    let text = get(addr, "/metrics").body;
    let mut python = Command::new("/usr/bin/python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tools/parse_metrics.py"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 (Debian's python3 with python3-prometheus-client)");
    python
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = python.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the metrics do not parse (install python3-prometheus-client if it is missing): {}\n{text}",
        output_text(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sample(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s["name"] == name)
        .filter(|s| labels.iter().all(|(k, v)| s["labels"][k] == *v))
        .map(|s| s["value"].as_f64().unwrap())
        .sum()
}

#[test]
fn metrics_parse_and_count_every_request_across_a_reload() {
    let host = start("versioned", "", "max_body_bytes = \"16B\"");
    let addr = admin_addr(&host);
    let web = host.addr("web");
    let mut conn = Conn::new(&web);
    for _ in 0..30 {
        assert_eq!(conn.get("/").unwrap().status, 200);
    }
    let too_big = Conn::new(&web).send("POST", "/", vec![b'x'; 100]).unwrap();
    assert_eq!(too_big.status, 413);
    drop(conn);
    host.replace_plugin("versioned-v2");
    host.reload_ok();
    let mut conn = Conn::new(&web);
    for _ in 0..20 {
        assert_eq!(conn.get("/").unwrap().status, 200);
    }
    // Workers report with their heartbeats (and once more as they exit): wait for the counts.
    let requests = |s: &[Value]| sample(s, "host_requests_total", &[("service", "web")]);
    wait_until("the metrics count all 51 requests", || {
        requests(&scrape(&addr)) == 51.0
    });
    // The old workers' exits are counted when the master reaps them, after their last
    // heartbeat: wait for those too.
    wait_until("both drained workers' exits are counted", || {
        let exits = &[("service", "web"), ("reason", "drained")];
        sample(&scrape(&addr), "host_worker_exits_total", exits) == 2.0
    });
    let s = scrape(&addr);
    assert_eq!(sample(&s, "host_requests_total", &[("class", "4xx")]), 1.0);
    // Requests of both versions, each under its own version label.
    let versions: std::collections::HashSet<&str> = s
        .iter()
        .filter(|x| x["name"] == "host_requests_total")
        .map(|x| x["labels"]["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions.len(), 2, "{versions:?}");
    assert_eq!(
        sample(
            &s,
            "host_request_duration_seconds_count",
            &[("service", "web")]
        ),
        51.0
    );
    assert_eq!(
        sample(
            &s,
            "host_worker_exits_total",
            &[("service", "web"), ("reason", "drained")]
        ),
        2.0
    );
    assert_eq!(
        sample(
            &s,
            "host_rollouts_total",
            &[("kind", "reload"), ("outcome", "done")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &s,
            "host_workers",
            &[("service", "web"), ("state", "ready")]
        ),
        2.0
    );
    assert_eq!(
        sample(&s, "host_plugin_version_info", &[("service", "web")]),
        1.0
    );
    assert!(sample(&s, "host_master_uptime_seconds", &[]) > 0.0);
}

#[test]
fn host_routes_are_off_with_an_admin_listener_unless_asked_for() {
    let host = start("hello", "", "");
    // The plugin answers /__host/ paths like any other.
    let resp = get(&host.addr("web"), "/__host/info");
    assert!(!resp.body.contains("master_pid"), "{}", resp.body);
    drop(host);

    let host = start("hello", "", "host_routes = true");
    let web = host.addr("web");
    assert!(get(&web, "/__host/info").body.contains("master_pid"));
    let ready = get(&web, "/__host/readyz");
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
}

#[test]
fn the_admin_listener_serves_https_with_its_own_certificate() {
    let dir = dir_with_config(
        &config(
            "tls = { cert = \"admin-cert.pem\", key = \"admin-key.pem\" }",
            "",
        ),
        &[("plugin.so", "hello")],
    );
    write_token(dir.path());
    let certs = crate::tls::Certs::new();
    certs.issue(dir.path());
    fs::rename(
        dir.path().join("cert.pem"),
        dir.path().join("admin-cert.pem"),
    )
    .unwrap();
    fs::rename(dir.path().join("key.pem"), dir.path().join("admin-key.pem")).unwrap();
    let host = Host::start(dir, &["--config", "host.toml"]);
    let url = host.status()["admin"].as_str().unwrap().to_string();
    assert!(url.starts_with("https://"), "{url}");
    let addr = admin_addr(&host);
    let transport = crate::http::Transport::Tls(crate::http::tls_config(&certs.ca_pem, false));
    let mut conn = Conn::with(&addr, transport, false);
    conn.headers
        .push(("authorization".into(), format!("Bearer {TOKEN}")));
    assert_eq!(conn.get("/api/status").unwrap().status, 200);
    // Plain HTTP gets no answer from a TLS listener.
    assert!(Conn::new(&addr).get("/livez").is_err());
}

#[test]
fn a_token_file_others_can_read_is_refused_with_the_fix() {
    let dir = dir_with_config(&config("", ""), &[("plugin.so", "hello")]);
    write_token(dir.path());
    fs::set_permissions(dir.path().join("token"), fs::Permissions::from_mode(0o644)).unwrap();
    let (mut host, _) = Host::try_start(dir, &["--config", "host.toml"])
        .err()
        .expect("the host must not start");
    // Its last lines go to stderr, which may still be on the way when stdout closes: wait for
    // the master to exit and its output to be read to the end.
    assert!(!host.wait_exit(), "the master must exit with an error");
    let log = host.logs();
    assert!(log.contains("admin token file"), "{log}");
    assert!(log.contains("chmod 600"), "{log}");
}

#[test]
fn the_admin_listener_lives_on_through_an_upgrade() {
    let host = start("hello", "", "");
    let addr = admin_addr(&host);
    let old = json(&authorized(&addr).get("/api/status").unwrap())["master_pid"].clone();
    let events = ndjson(
        &authorized(&addr)
            .send("POST", "/api/upgrade", vec![])
            .unwrap(),
    );
    assert_eq!(events.last().unwrap()["ok"], true, "{events:?}");
    // Same address; the new master answers.
    assert_eq!(admin_addr(&host), addr);
    wait_until("the new master answers on the admin listener", || {
        json(&authorized(&addr).get("/api/status").unwrap())["master_pid"] != old
    });
    assert_eq!(get(&addr, "/readyz").status, 200);
}

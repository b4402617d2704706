//! The access log: one line per request in either format, from every worker into one file
//! without torn lines, and a new file after `host reopen-logs` (logrotate's way).

use std::{fs, time::Duration};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use serde_json::Value;

use crate::{
    harness::{dir_with_config, output_text, wait_until, Host},
    http::Conn,
    load::Load,
};

fn start(format: &str, workers: usize) -> Host {
    start_with(format, workers, "")
}

fn start_with(format: &str, workers: usize, extra: &str) -> Host {
    let config = format!(
        "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\nplugin = \"plugin.so\"\n\
         workers = {workers}\ncanary_probation = \"0s\"\nprobation = \"0s\"\n\
         access_log = {{ path = \"access.log\", format = \"{format}\" }}\n{extra}"
    );
    let dir = dir_with_config(&config, &[("plugin.so", "versioned")]);
    Host::start(dir, &["--config", "host.toml"])
}

fn lines(host: &Host, file: &str) -> Vec<String> {
    fs::read_to_string(host.dir.path().join(file))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn json_lines_say_who_asked_what_and_which_worker_and_version_answered() {
    let host = start("json", 2);
    let web = host.addr("web");
    let mut conn = Conn::new(&web);
    conn.headers
        .push(("user-agent".into(), "access-log-test/1".into()));
    for i in 0..200 {
        assert_eq!(conn.get(&format!("/?n={i}")).unwrap().status, 200);
        // A new connection now and then, so both workers answer some.
        if i % 10 == 9 {
            conn = Conn::new(&web);
            conn.headers
                .push(("user-agent".into(), "access-log-test/1".into()));
        }
    }
    wait_until("200 lines in the access log", || {
        lines(&host, "access.log").len() == 200
    });
    let version = host.status()["services"][0]["version"]
        .as_str()
        .unwrap()
        .to_string();
    let workers = host.ready_pids("web");
    let mut seen = Vec::new();
    for line in lines(&host, "access.log") {
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["method"], "GET");
        assert_eq!(v["status"], 200);
        assert_eq!(v["client"], "127.0.0.1");
        assert_eq!(v["user_agent"], "access-log-test/1");
        assert_eq!(v["plugin_version"], version.as_str());
        assert!(v["bytes"].as_u64().unwrap() > 0);
        assert!(v["duration_s"].as_f64().unwrap() >= 0.0);
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
        let pid = v["pid"].as_u64().unwrap() as u32;
        assert!(workers.contains(&pid), "{pid} not in {workers:?}");
        seen.push(v["target"].as_str().unwrap().to_string());
    }
    seen.sort();
    let mut asked: Vec<String> = (0..200).map(|i| format!("/?n={i}")).collect();
    asked.sort();
    assert_eq!(seen, asked, "every request once");
}

#[test]
fn combined_lines_read_as_apache_writes_them_and_reopen_logs_moves_to_a_new_file() {
    let host = start("combined", 1);
    let web = host.addr("web");
    let mut conn = Conn::new(&web);
    assert_eq!(conn.get("/before").unwrap().status, 200);
    wait_until("a line in the access log", || {
        !lines(&host, "access.log").is_empty()
    });
    let line = &lines(&host, "access.log")[0];
    let pid = host.ready_pids("web")[0];
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(line.contains("] \"GET /before HTTP/1.1\" 200 "), "{line}");
    assert!(line.contains(&format!(" pid={pid} plugin=")), "{line}");

    // logrotate: move the file, then tell the host.
    fs::rename(
        host.dir.path().join("access.log"),
        host.dir.path().join("access.log.1"),
    )
    .unwrap();
    let out = host.cli(&["reopen-logs"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("access.log"),
        "{}",
        output_text(&out)
    );
    // `reopen-logs` returns once the worker's writer has switched to the new file: the same
    // worker, on the same keep-alive connection, writes the next line there at once, and the
    // old file gets nothing more (logrotate may compress it).
    assert_eq!(conn.get("/after").unwrap().status, 200);
    wait_until("the line after the rotation is in the new file", || {
        lines(&host, "access.log")
            .iter()
            .any(|l| l.contains("GET /after"))
    });
    assert_eq!(lines(&host, "access.log.1").len(), 1);
}

/// A worker that cannot switch (here stopped by SIGSTOP; a slow disk or a start under way
/// alike) is named, and the command fails: the rotated file must not be compressed yet.
#[test]
fn reopen_logs_names_a_worker_that_did_not_switch() {
    // Long enough that liveness does not replace the stopped worker meanwhile.
    let host = start_with("combined", 2, "liveness_timeout = \"60s\"\n");
    let pids = host.ready_pids("web");
    kill(Pid::from_raw(pids[0] as i32), Signal::SIGSTOP).unwrap();
    let out = host.cli(&["reopen-logs"]);
    kill(Pid::from_raw(pids[0] as i32), Signal::SIGCONT).unwrap();
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "worker {} (access log) did not confirm within 5 s",
            pids[0]
        )),
        "{text}"
    );
    assert!(!text.contains(&format!("worker {} (", pids[1])), "{text}");
    // Once it runs again it reads the message and switches.
    wait_until("both workers said they reopened the access log", || {
        host.logs().matches("access log reopened").count() == 2
    });
}

#[test]
fn workers_replaced_under_load_leave_every_line_behind() {
    let host = start("json", 2);
    let load = Load::start(&host.addr("web"), 4, Duration::ZERO);
    load.wait_for_more(300);
    // The old workers serve until the moment they exit: their last lines must be written
    // before they do (the writer takes its buffer only every moment).
    host.replace_plugin("versioned-v2");
    host.reload_ok();
    load.wait_for_more(300);
    let seen = load.stop();
    assert!(seen.errors.is_empty(), "{:?}", seen.errors);
    wait_until("a line for every request answered", || {
        lines(&host, "access.log").len() >= seen.ok
    });
    assert_eq!(lines(&host, "access.log").len(), seen.ok);
}

#[test]
fn an_unknown_format_is_refused_with_the_choices() {
    let config =
        "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\nplugin = \"plugin.so\"\n\
                  access_log = { path = \"a.log\", format = \"nginx\" }\n";
    let dir = dir_with_config(config, &[("plugin.so", "hello")]);
    let out = crate::harness::run({
        let mut cmd = std::process::Command::new(&crate::harness::artifacts().host);
        cmd.args(["check", "--config", "host.toml"])
            .current_dir(dir.path());
        cmd
    });
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("format \"nginx\" is not one of \"combined\" or \"json\""),
        "{}",
        output_text(&out)
    );
}

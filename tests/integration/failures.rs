//! A failed new build never takes the service down: each broken plugin makes the reload fail
//! with a readable reason, and the old workers keep answering with the old code.

use std::fs;

use crate::{
    harness::{artifacts, copy_new_inode, dir_with_config, output_text, Host},
    http::{get, Conn},
};

/// The default ready timeout (10 s): a healthy worker on a loaded machine is ready well within.
const CONFIG: &str = r#"
[[service]]
name = "web"
listen = ["127.0.0.1:0"]
plugin = "plugin.so"
workers = 2
"#;

/// `CONFIG` for the tests that wait for a hanging start to time out: short, but long enough
/// for the healthy starts and for what the test does meanwhile on a loaded machine.
fn short_ready_timeout() -> String {
    format!("{CONFIG}ready_timeout = \"5s\"\n")
}

/// Starts versioned v1, breaks the plugin with `break_it`, reloads, and checks nothing changed;
/// then a good build reloads fine. Returns the failed reload's output.
fn reload_is_rejected(break_it: impl FnOnce(&std::path::Path)) -> String {
    reload_is_rejected_in(CONFIG, break_it)
}

fn reload_is_rejected_in(config: &str, break_it: impl FnOnce(&std::path::Path)) -> String {
    let host = Host::start(
        dir_with_config(config, &[("plugin.so", "versioned")]),
        &["--config", "host.toml"],
    );
    let addr = host.addr("web");
    let pids = host.ready_pids("web");
    break_it(&host.dir.path().join("plugin.so"));

    let out = host.cli(&["reload"]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "the reload must fail:\n{text}");
    assert!(text.contains("nothing changed; still serving"), "{text}");
    assert!(
        get(&addr, "/").body.contains("versioned v1"),
        "the old version keeps answering"
    );
    assert_eq!(host.ready_pids("web"), pids, "the old workers keep serving");

    // The service is not stuck: the next good build goes live.
    host.replace_plugin("versioned-v2");
    host.reload_ok();
    assert!(get(&addr, "/").body.contains("versioned v2"));
    text
}

fn with_fixture(name: &'static str) -> impl FnOnce(&std::path::Path) {
    move |path| copy_new_inode(&artifacts().plugin(name), path)
}

#[test]
fn plugin_built_against_an_old_api_is_rejected() {
    let text = reload_is_rejected(with_fixture("old-api"));
    assert!(
        text.contains("built against plugin-api 0.0.3, but this host uses plugin-api 0.2.1"),
        "{text}"
    );
    assert!(text.contains("Rebuild the plugin"), "{text}");
}

#[test]
fn library_that_is_not_a_plugin_is_rejected() {
    let text = reload_is_rejected(with_fixture("not-a-plugin"));
    assert!(
        text.contains("is a shared library but not a plugin"),
        "{text}"
    );
    assert!(text.contains("export_plugin!"), "{text}");
}

#[test]
fn file_that_is_not_a_library_is_rejected() {
    let text = reload_is_rejected(|path| {
        let _ = fs::remove_file(path);
        fs::write(path, "this is not a shared library\n").unwrap();
    });
    assert!(
        text.contains("is not a shared library (it starts with bytes 74 68 69 73"),
        "{text}"
    );
}

#[test]
fn half_written_library_is_rejected() {
    let text = reload_is_rejected(|path| {
        // Cut inside the loadable segments (the first few hundred KiB; the rest of a debug
        // build is debug info, and a file cut there still loads and runs).
        let bytes = fs::read(artifacts().plugin("versioned-v2")).unwrap();
        let _ = fs::remove_file(path);
        fs::write(path, &bytes[..64 * 1024]).unwrap();
    });
    assert!(text.contains("the first new worker failed"), "{text}");
}

#[test]
fn on_start_error_is_rejected_with_its_reason() {
    let text = reload_is_rejected(with_fixture("bad-start"));
    assert!(
        text.contains("failed to start: database url is not configured"),
        "{text}"
    );
}

#[test]
fn on_start_panic_is_rejected_with_the_panic_message() {
    let text = reload_is_rejected(with_fixture("start-panic"));
    assert!(
        text.contains("on_start panicked: fixture panics in on_start"),
        "{text}"
    );
}

#[test]
fn worker_crash_during_start_is_rejected() {
    let text = reload_is_rejected(with_fixture("start-crash"));
    assert!(text.contains("SIGABRT"), "{text}");
}

#[test]
fn hanging_on_start_hits_the_ready_timeout() {
    let text = reload_is_rejected_in(&short_ready_timeout(), with_fixture("start-hang"));
    assert!(
        text.contains("did not report ready within the ready timeout (5s)"),
        "{text}"
    );
}

#[test]
fn broken_plugin_at_start_fails_the_start_clearly() {
    let dir = dir_with_config(CONFIG, &[("plugin.so", "bad-start")]);
    let (mut host, why) = match Host::try_start(dir, &["--config", "host.toml"]) {
        Ok(_) => panic!("a host with a broken plugin must not start"),
        Err(failed) => failed,
    };
    assert!(why.contains("exited"), "{why}");
    assert!(!host.wait_exit(), "exit status must be non-zero");
    assert!(
        host.logs().contains("database url is not configured"),
        "{}",
        host.logs()
    );
}

#[test]
fn panic_in_a_handler_is_a_500_and_the_worker_keeps_serving() {
    let host = Host::serving("panic", 1, &[]);
    let addr = host.addr("plugin");
    let mut conn = Conn::new(&addr);
    let pid_before = get(&addr, "/__host/worker").body;
    let resp = conn.get("/panic").unwrap();
    assert_eq!(resp.status, 500);
    assert!(
        !resp.body.contains("asked to panic"),
        "panic details stay in the log, not the response"
    );
    let ok = conn.get("/").unwrap();
    assert_eq!((ok.status, ok.body.as_str()), (200, "ok\n"));
    assert_eq!(conn.connects, 1, "the same connection keeps working");
    let pid_after = get(&addr, "/__host/worker").body;
    let pid = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap()["pid"].clone();
    assert_eq!(
        pid(&pid_before),
        pid(&pid_after),
        "the worker was not replaced"
    );
    host.wait_for_log("handler panicked: asked to panic on /panic");
}

#[test]
fn missing_plugin_file_fails_the_reload_and_keeps_serving() {
    let host = Host::start(
        dir_with_config(CONFIG, &[("plugin.so", "versioned")]),
        &["--config", "host.toml"],
    );
    fs::remove_file(host.dir.path().join("plugin.so")).unwrap();
    let out = host.cli(&["reload"]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("does not exist; build the plugin first"),
        "{text}"
    );
    assert!(get(&host.addr("web"), "/").body.contains("versioned v1"));
}

#[test]
fn a_reload_asked_for_during_another_waits_its_turn() {
    let host = Host::start(
        dir_with_config(&short_ready_timeout(), &[("plugin.so", "versioned")]),
        &["--config", "host.toml"],
    );
    let addr = host.addr("web");
    // The first reload hangs on its canary until the 5 s ready timeout: the second must
    // connect before then.
    host.replace_plugin("start-hang");
    let state_dir = host.state_dir();
    let first = std::thread::spawn(move || {
        let mut cmd = std::process::Command::new(&artifacts().host);
        cmd.args(["reload", "--state-dir"]).arg(state_dir);
        crate::harness::run(cmd)
    });
    crate::harness::wait_until("the first reload runs", || {
        host.logs().contains("reloading 2 workers")
    });
    // It has read the plugin file already; the second reload will read this one.
    host.replace_plugin("versioned-v2");
    let second = host.cli(&["reload"]);
    let first = first.join().unwrap();
    let (first, second) = (output_text(&first), output_text(&second));
    assert!(
        first.contains("did not report ready within the ready timeout"),
        "{first}"
    );
    assert!(
        second.contains("another reload is running; this one waits for it to finish"),
        "{second}"
    );
    assert!(second.contains("reload done"), "{second}");
    assert!(get(&addr, "/").body.contains("versioned v2"));
}

#[test]
fn a_library_for_another_architecture_says_which() {
    let text = reload_is_rejected(|path| {
        let mut bytes = fs::read(artifacts().plugin("versioned-v2")).unwrap();
        // e_machine (offset 18): claim aarch64, or x86_64 when this machine is aarch64.
        let other: u16 = if std::env::consts::ARCH == "aarch64" {
            62
        } else {
            183
        };
        bytes[18..20].copy_from_slice(&other.to_le_bytes());
        let _ = fs::remove_file(path);
        fs::write(path, bytes).unwrap();
    });
    let other = if std::env::consts::ARCH == "aarch64" {
        "x86_64"
    } else {
        "aarch64"
    };
    assert!(
        text.contains(&format!(
            "was built for {other} (64-bit), but this host runs on {}",
            std::env::consts::ARCH
        )),
        "{text}"
    );
}

#[test]
fn an_rlib_says_the_crate_needs_cdylib() {
    let text = reload_is_rejected(|path| {
        let _ = fs::remove_file(path);
        fs::write(
            path,
            b"!<arch>\n/               0           0     0     0       8       `\n",
        )
        .unwrap();
    });
    assert!(
        text.contains("is a static archive (an rlib or staticlib)"),
        "{text}"
    );
    assert!(
        text.contains("crate-type = [\"cdylib\", \"rlib\"]"),
        "{text}"
    );
}

#[test]
fn a_missing_library_beside_an_rlib_says_the_crate_needs_cdylib() {
    let host = Host::start(
        dir_with_config(CONFIG, &[("plugin.so", "versioned")]),
        &["--config", "host.toml"],
    );
    fs::remove_file(host.dir.path().join("plugin.so")).unwrap();
    fs::write(host.dir.path().join("plugin.rlib"), b"!<arch>\n").unwrap();
    let out = host.cli(&["reload"]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("does not exist"), "{text}");
    assert!(text.contains("plugin.rlib beside it"), "{text}");
    assert!(text.contains("crate-type"), "{text}");
}

#[test]
fn a_rejected_start_leaves_no_copy_of_its_plugin() {
    let dir = dir_with_config(CONFIG, &[("plugin.so", "bad-start")]);
    let (mut host, _) = match Host::try_start(dir, &["--config", "host.toml"]) {
        Ok(_) => panic!("a host with a broken plugin must not start"),
        Err(failed) => failed,
    };
    assert!(!host.wait_exit());
    let copies: Vec<_> = fs::read_dir(host.state_dir().join("plugins"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        copies
            .iter()
            .all(|name| !name.to_string_lossy().ends_with(".so")),
        "copies left: {copies:?}"
    );
}

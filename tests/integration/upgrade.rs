//! `host upgrade`: a new master from a new executable takes over the listening sockets while a
//! long request finishes in the old one, under keep-alive load, with no failed request; and
//! every way an upgrade can fail leaves the old master serving, untouched.

use std::{
    fs, io::Write, os::unix::fs::PermissionsExt, path::PathBuf, process::Output, time::Duration,
};

use crate::{
    harness::{alive, artifacts, children, dir_with_config, output_text, wait_until, Host},
    http::get,
    load::Load,
};

fn config(plugin_extra: &str) -> String {
    format!(
        "upgrade_timeout = \"5s\"\n\
         [[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\nplugin = \"plugin.so\"\n\
         workers = 2\ncanary_probation = \"200ms\"\n{plugin_extra}\n"
    )
}

fn start(plugin: &str) -> Host {
    Host::start(
        dir_with_config(&config(""), &[("plugin.so", plugin)]),
        &["--config", "host.toml"],
    )
}

/// A copy of the host binary with some bytes appended: the same program, another build id.
fn another_build(dir: &std::path::Path) -> PathBuf {
    let exe = dir.join("host-next");
    let mut bytes = fs::read(&artifacts().host).unwrap();
    bytes.extend_from_slice(b"\0another build\0");
    fs::write(&exe, bytes).unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    exe
}

/// A script that stands in for a broken host binary.
fn script(dir: &std::path::Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    let mut f = fs::File::create(&path).unwrap();
    writeln!(f, "#!/bin/sh\n{body}").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn master_of(host: &Host) -> (u64, String) {
    let status = host.status();
    (
        status["master_pid"].as_u64().unwrap(),
        status["build_id"].as_str().unwrap().to_string(),
    )
}

#[test]
fn an_upgrade_takes_over_while_a_long_request_finishes_and_nothing_fails() {
    let mut host = start("slow");
    let addr = host.addr("web");
    let (old_pid, old_build) = master_of(&host);
    let load = Load::start_path(&addr, "/?ms=0", 4, Duration::ZERO);
    load.wait_for_more(200);
    let slow = host.slow_request_in_flight(10_000);

    let exe = another_build(host.dir.path());
    let out = host.cli(&["upgrade", "--exe", exe.to_str().unwrap()]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}\n{}", host.logs());
    assert!(text.contains("upgraded in"), "{text}");

    let (new_pid, new_build) = master_of(&host);
    assert_ne!(new_pid, old_pid, "the new master answers the CLI");
    assert_ne!(new_build, old_build, "and says which build it is");
    let pid_file = fs::read_to_string(host.state_dir().join("host.pid")).unwrap();
    assert_eq!(pid_file.trim(), new_pid.to_string());
    load.wait_for_more(200);

    // The 10 s request started before the upgrade gets its whole answer from the old master's
    // worker, which then exits with its master.
    let resp = slow
        .join()
        .unwrap()
        .expect("the long request in flight completes");
    assert_eq!(resp.status, 200);
    assert!(resp.body.starts_with("slept 10000 ms"), "{}", resp.body);
    assert!(
        host.wait_exit(),
        "the old master exits cleanly once drained"
    );
    load.wait_for_more(100);
    let seen = load.stop();
    assert!(seen.errors.is_empty(), "failed requests: {:?}", seen.errors);
    assert_eq!(get(&addr, "/?ms=0").status, 200);
    // The new master is in charge: a reload goes to it.
    host.reload_ok();
}

/// Runs `host upgrade ARGS` against `host` on a thread of its own, while the test goes on.
fn upgrade_in_background(host: &Host, args: &[&str]) -> std::thread::JoinHandle<Output> {
    let mut cmd = std::process::Command::new(&artifacts().host);
    cmd.arg("upgrade")
        .args(args)
        .arg("--state-dir")
        .arg(host.state_dir());
    std::thread::spawn(move || crate::harness::run(cmd))
}

/// Starts an upgrade whose new master's canary serves alone for 3 s, and returns it once that
/// canary is ready, with the new master's pid (its first progress line names it): the upgrade
/// is under way for a while yet.
fn slow_upgrade_under_way(host: &Host) -> (std::thread::JoinHandle<Output>, u32) {
    let slow = config("").replace("canary_probation = \"200ms\"", "canary_probation = \"3s\"");
    fs::write(host.dir.path().join("host.toml"), slow).unwrap();
    let upgrade = upgrade_in_background(host, &[]);
    host.wait_for_log(": web: worker 0: ");
    let logs = host.logs();
    let new_pid = logs
        .split("new master ")
        .find_map(|rest| rest.split(": web: worker 0: ").next()?.parse().ok())
        .unwrap_or_else(|| panic!("no progress line names the new master:\n{logs}"));
    (upgrade, new_pid)
}

/// An upgrade that must fail: the old master keeps serving with the same pid and workers, no
/// request fails, and nothing the new master started is left.
fn upgrade_fails(host: &Host, args: &[&str], expect: &str) {
    let addr = host.addr("web");
    let (pid, _) = master_of(host);
    let workers = host.ready_pids("web");
    let load = Load::start(&addr, 2, Duration::ZERO);
    load.wait_for_more(100);
    let before = children(host.pid);
    let mut cli = vec!["upgrade"];
    cli.extend_from_slice(args);
    let out = host.cli(&cli);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "the upgrade must fail:\n{text}");
    assert!(text.contains(expect), "expected {expect:?} in:\n{text}");
    assert!(text.contains("keeps serving"), "{text}");
    assert_eq!(master_of(host).0, pid);
    assert_eq!(host.ready_pids("web"), workers);
    load.wait_for_more(100);
    let seen = load.stop();
    assert!(seen.errors.is_empty(), "{:?}", seen.errors);
    // The failed new master and its workers are gone.
    wait_until("nothing of the new master is left", || {
        children(host.pid)
            .iter()
            .all(|p| before.contains(p) || !alive(*p))
    });
    // New connections too: the failed master shared the listening sockets, and must not have
    // closed them to new clients on its way out.
    for _ in 0..3 {
        let to = addr.parse().unwrap();
        std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("a new connection after the failed upgrade: {e}"));
        assert_eq!(get(&addr, "/").status, 200);
    }
}

#[test]
fn an_upgrade_to_a_missing_or_broken_executable_changes_nothing() {
    let host = start("versioned");
    let dir = host.dir.path().to_path_buf();
    upgrade_fails(&host, &["--exe", "/nonexistent/host"], "cannot be used");
    let not_exec = dir.join("not-executable");
    fs::write(&not_exec, "text").unwrap();
    upgrade_fails(
        &host,
        &["--exe", not_exec.to_str().unwrap()],
        "not an executable file",
    );
    let exits = script(&dir, "exits", "exit 1");
    upgrade_fails(
        &host,
        &["--exe", exits.to_str().unwrap()],
        "exited with status 1 before it was ready",
    );
    let sleeps = script(&dir, "sleeps", "exec sleep 1000");
    upgrade_fails(
        &host,
        &["--exe", sleeps.to_str().unwrap()],
        "did not report ready within upgrade_timeout (5s)",
    );
}

#[test]
fn an_upgrade_with_a_bad_config_or_plugin_changes_nothing() {
    let host = start("versioned");
    fs::write(
        host.dir.path().join("host.toml"),
        config("").replace("workers = 2", "workers = 0"),
    )
    .unwrap();
    upgrade_fails(&host, &[], "workers must be from 1 to 256");
    fs::write(host.dir.path().join("host.toml"), config("")).unwrap();
    host.replace_plugin("old-api");
    upgrade_fails(&host, &[], "built against plugin-api 0.0.3");
    host.replace_plugin("versioned");
    let out = host.cli(&["upgrade"]);
    assert!(out.status.success(), "{}", output_text(&out));
}

#[test]
fn a_reload_stop_reopen_or_second_upgrade_during_an_upgrade_is_refused() {
    let host = start("versioned");
    let sleeps = script(host.dir.path(), "sleeps", "exec sleep 1000");
    let first = upgrade_in_background(&host, &["--exe", sleeps.to_str().unwrap()]);
    host.wait_for_log("upgrade: starting a new master");
    // A stop would stop this master and leave the new one serving; a reopen would miss the new
    // one's workers.
    for args in [
        &["reload"][..],
        &["upgrade"][..],
        &["stop"][..],
        &["reopen-logs"][..],
    ] {
        let out = host.cli(args);
        let text = output_text(&out);
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(
            text.contains("an upgrade of the master is in progress"),
            "{text}"
        );
    }
    let first = first.join().unwrap();
    assert_eq!(first.status.code(), Some(1));
    host.reload_ok();
}

/// An upgrade keeps a rollback: the new master starts the version that was live, not the plugin
/// file the operator rolled back from, and says so; `host reload` asks for the file again.
#[test]
fn an_upgrade_after_a_rollback_keeps_the_version_rolled_back_to() {
    let host = start("versioned");
    let addr = host.addr("web");
    host.replace_plugin("versioned-v2");
    host.reload_ok();
    assert!(get(&addr, "/").body.contains("versioned v2"));
    let out = host.cli(&["rollback"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let status = output_text(&host.cli(&["status"]));
    assert!(status.contains(", rolled back by an operator)"), "{status}");
    // Set aside, not failed: a crash loop of v1 could still fall back to it.
    let v2 = host.status()["services"][0]["previous"][0].clone();
    assert!(
        v2["set_aside"].is_string() && v2["failed"].is_null(),
        "{v2}"
    );

    let out = host.cli(&["upgrade"]);
    assert!(out.status.success(), "{}", output_text(&out));
    for _ in 0..4 {
        let body = get(&addr, "/").body;
        assert!(body.contains("versioned v1"), "{body}\n{}", host.logs());
    }
    host.wait_for_log("which was set aside (rolled back by an operator at ");
    assert!(host.status()["services"][0]["held_back"].is_string());
    host.reload_ok();
    assert!(get(&addr, "/").body.contains("versioned v2"));
    assert!(host.status()["services"][0]["held_back"].is_null());
}

/// SIGTERM to the master during an upgrade stops the host: the new master does not take over
/// (it would have served on after the operator stopped the host); it drains its workers and
/// exits, and the old master exits once it has.
#[test]
fn sigterm_during_an_upgrade_stops_both_masters() {
    let mut host = start("versioned");
    let (upgrade, new_pid) = slow_upgrade_under_way(&host);
    let new_workers = children(new_pid);
    assert!(!new_workers.is_empty(), "{}", host.logs());
    host.signal(nix::sys::signal::Signal::SIGTERM);

    let out = upgrade.join().unwrap();
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("upgrade abandoned"), "{text}");
    assert!(host.wait_exit(), "{}", host.logs());
    for pid in new_workers.iter().chain([&new_pid]) {
        assert!(!alive(*pid), "{pid} outlived the stop\n{}", host.logs());
    }
    assert!(
        host.logs().contains("this master does not take over"),
        "{}",
        host.logs()
    );
}

/// A crash of the old master during an upgrade does not take the service down: the new master,
/// in the middle of its canary probation, goes on and takes over anyway.
#[test]
fn the_new_master_takes_over_when_the_old_one_dies_during_the_upgrade() {
    let host = start("versioned");
    let addr = host.addr("web");
    let (upgrade, new_pid) = slow_upgrade_under_way(&host);
    host.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = upgrade.join().unwrap();

    host.wait_for_log("went away before the takeover; taking over anyway");
    host.wait_for_log("this master now serves");
    let pid_file = fs::read_to_string(host.state_dir().join("host.pid")).unwrap();
    assert_eq!(pid_file.trim(), new_pid.to_string());
    assert!(alive(new_pid));
    assert_eq!(get(&addr, "/").status, 200);
}

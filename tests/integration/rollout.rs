//! The self-healing rollout: a version that fails after its canary started is rolled back by
//! itself, with keep-alive clients counting every failed request; reload requests that pile up
//! are merged.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::{
    harness::{artifacts, copy_new_inode, dir_with_config, output_text, wait_until, Host},
    http::get,
    load::Load,
};

/// One service `web` of `plugin.so` (a copy of `plugin`) with `workers` workers and `extra`
/// lines of config (which may end with a `[service.config]` table).
pub fn start(plugin: &str, workers: usize, extra: &str) -> Host {
    let config = format!(
        "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:0\"]\nplugin = \"plugin.so\"\n\
         workers = {workers}\nready_timeout = \"5s\"\n{extra}\n"
    );
    Host::start(
        dir_with_config(&config, &[("plugin.so", plugin)]),
        &["--config", "host.toml"],
    )
}

fn web(host: &Host) -> Value {
    host.status()["services"][0].clone()
}

fn live_version(host: &Host) -> String {
    web(host)["version"].as_str().unwrap().to_string()
}

/// Waits until every slot has a ready worker on `version`, and no other version is ready.
fn wait_all_on(host: &Host, version: &str, workers: usize) {
    wait_until(&format!("every worker runs {version}"), || {
        let svc = web(host);
        let ready: Vec<&Value> = svc["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == "ready")
            .collect();
        ready.len() == workers && ready.iter().all(|w| w["version"] == version)
    });
}

/// The newest rollout event of the service.
fn last_event(host: &Host) -> Value {
    web(host)["recent"][0].clone()
}

/// A handler that crashes its worker on the first request: the canary takes all the traffic
/// during its probation (one worker), crashes, and `host reload` rolls back and says why.
fn crash_on_first_request_rolls_back(fault: &str, signals: &[&str]) {
    let host = start(
        "versioned",
        1,
        "canary_probation = \"3s\"\nprobation = \"30s\"",
    );
    let addr = host.addr("web");
    let v1 = live_version(&host);
    let load = Load::start(&addr, 4, Duration::ZERO);
    load.wait_for_more(100);

    host.replace_plugin(fault);
    let out = host.cli(&["reload"]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "the reload must fail:\n{text}");
    assert!(
        signals.iter().any(|s| text.contains(s)),
        "the reason names the signal ({signals:?}):\n{text}"
    );
    assert!(text.contains("(slot 0, plugin "), "which worker:\n{text}");
    assert!(text.contains("after it started"), "when:\n{text}");
    assert!(text.contains(&format!("rolled back to {v1}")), "{text}");

    assert_eq!(live_version(&host), v1);
    wait_all_on(&host, &v1, 1);
    load.wait_for_more(100);
    let seen = load.stop();
    // Only requests in flight on the worker when it crashed may fail: one per client at most.
    assert!(
        seen.errors.len() <= 4,
        "{} failed requests: {:?}",
        seen.errors.len(),
        seen.errors
    );
    assert!(get(&addr, "/").body.contains("versioned v1"));
    let event = last_event(&host);
    assert_eq!(event["kind"], "reload");
    assert_eq!(event["outcome"], "rolled back");
    let failed = &web(&host)["previous"][0];
    assert!(
        failed["failed"].is_string(),
        "the bad version is marked failed: {failed}"
    );
}

#[test]
fn a_handler_that_aborts_is_rolled_back() {
    crash_on_first_request_rolls_back("fault-abort", &["SIGABRT"]);
}

#[test]
fn a_handler_that_segfaults_is_rolled_back() {
    crash_on_first_request_rolls_back("fault-segv", &["SIGSEGV"]);
}

#[test]
fn a_handler_that_overflows_its_stack_is_rolled_back() {
    crash_on_first_request_rolls_back("fault-stack", &["SIGABRT", "SIGSEGV"]);
}

#[test]
fn a_version_that_exits_during_probation_is_rolled_back_automatically() {
    let host = start(
        "versioned",
        2,
        // The rollout, and reading the live version, must end before the first exit.
        "canary_probation = \"0s\"\nprobation = \"30s\"\n[service.config]\nexit_after_ms = \"8000\"",
    );
    let addr = host.addr("web");
    let v1 = live_version(&host);
    let load = Load::start(&addr, 4, Duration::ZERO);
    load.wait_for_more(100);

    host.replace_plugin("fault-exit");
    let text = host.reload_ok();
    assert!(text.contains("on probation for 30s"), "{text}");
    let v2 = live_version(&host);
    assert_ne!(v2, v1);

    host.wait_for_log(&format!("rolling back to {v1}"));
    host.wait_for_log(&format!("rolled back from {v2} to {v1}"));
    wait_all_on(&host, &v1, 2);
    load.wait_for_more(200);
    let seen = load.stop();
    // Two workers exit (each may take one request per client with it).
    assert!(
        seen.errors.len() <= 8,
        "{} failed requests: {:?}",
        seen.errors.len(),
        seen.errors
    );
    assert!(host.logs().contains("exited with status 3"));
    let event = last_event(&host);
    assert_eq!(event["kind"], "automatic rollback", "{event}");
    assert_eq!(event["outcome"], "done", "{event}");
    assert!(get(&addr, "/").body.contains("versioned v1"));
}

/// `host reload` of the file already live, while it is on probation from the reload that
/// brought it: the workers restart, and the probation goes on as it was (its end, what it rolls
/// back to), not a new one that would roll back to the same version.
#[test]
fn reloading_the_same_file_during_its_probation_keeps_that_probation() {
    let host = start(
        "versioned",
        1,
        "canary_probation = \"0s\"\nprobation = \"30s\"",
    );
    let v1 = live_version(&host);
    host.replace_plugin("versioned-v2");
    let text = host.reload_ok();
    assert!(
        text.contains(&format!(
            "on probation for 30s (a crash rolls back to {v1})"
        )),
        "{text}"
    );
    let v2 = live_version(&host);
    let text = host.reload_ok();
    assert!(
        text.contains("its probation goes on: ")
            && text.contains(&format!("more (a crash rolls back to {v1})")),
        "{text}"
    );
    assert!(!text.contains(&format!("rolls back to {v2}")), "{text}");
    let svc = web(&host);
    assert_eq!(svc["version"], v2.as_str(), "{svc}");
    assert_eq!(svc["probation_fallback"], v1.as_str(), "{svc}");
    let left = svc["probation_left_ms"].as_u64().unwrap();
    assert!(
        left < 30_000,
        "the first probation's end, not a new one: {left} ms left"
    );
}

#[test]
fn a_later_slot_that_fails_twice_rolls_the_whole_service_back() {
    let host = start("versioned", 3, "canary_probation = \"0s\"");
    let addr = host.addr("web");
    let v1 = live_version(&host);
    let load = Load::start(&addr, 4, Duration::ZERO);
    load.wait_for_more(100);

    host.replace_plugin("fault-later-slot");
    let out = host.cli(&["reload"]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("trying once more"), "{text}");
    assert!(text.contains("failed to start twice"), "{text}");
    assert!(text.contains("worker 1 refuses to start"), "{text}");
    assert!(text.contains(&format!("rolled back to {v1}")), "{text}");
    wait_all_on(&host, &v1, 3);
    load.wait_for_more(100);
    let seen = load.stop();
    assert!(seen.errors.is_empty(), "{:?}", seen.errors);
}

#[test]
fn a_crash_loop_after_probation_goes_back_to_the_last_healthy_version() {
    // v1 proves healthy within 300 ms of the start; v2 passes its short probation and only
    // then starts exiting, 5 s after each start (the rollout and the probation must end
    // before that, on a loaded machine too).
    let host = start(
        "versioned",
        2,
        "canary_probation = \"0s\"\nprobation = \"300ms\"\ncrash_loop_crashes = 3\n\
         [service.config]\nexit_after_ms = \"5000\"",
    );
    let addr = host.addr("web");
    let v1 = live_version(&host);
    host.wait_for_log("passed its probation: healthy");
    host.replace_plugin("fault-exit");
    host.reload_ok();
    host.wait_for_log("crash loop: 3 crashes within 1m");
    host.wait_for_log("the last version that served healthily");
    wait_all_on(&host, &v1, 2);
    assert!(get(&addr, "/").body.contains("versioned v1"));
    wait_until("the rollback is in the history", || {
        last_event(&host)["kind"] == "automatic rollback"
    });
}

/// An operator's rollback leaves a version the operator rejected: neither a crash of the version
/// rolled back to during its probation nor its crash loop after brings that one back.
#[test]
fn a_crash_after_an_operators_rollback_never_brings_back_the_version_rolled_back_from() {
    // fault-exit exits 2 s after each start, within its 3 s probation; versioned never does.
    let host = start(
        "fault-exit",
        1,
        "canary_probation = \"0s\"\nprobation = \"3s\"\ncrash_loop_crashes = 2\n\
         [service.config]\nexit_after_ms = \"2000\"",
    );
    let faulty = live_version(&host);
    host.replace_plugin("versioned");
    host.reload_ok();
    let good = live_version(&host);
    assert_ne!(good, faulty);
    host.wait_for_log(&format!("{good} passed its probation: healthy"));
    let loops_before = host.logs().matches("is in a crash loop").count();

    let out = host.cli(&["rollback"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "on probation for 3s without a fallback ({good} is the version rolled back from"
        )),
        "{text}"
    );
    let svc = web(&host);
    assert!(svc["probation_left_ms"].is_u64(), "{svc}");
    assert!(svc["probation_fallback"].is_null(), "{svc}");
    // Its first exit falls within its probation, its second makes a crash loop; the healthy
    // version before it is the one the operator left.
    wait_until("the version rolled back to is in a crash loop", || {
        host.logs().matches("is in a crash loop").count() > loops_before
    });
    let logs = host.logs();
    assert!(
        logs.contains(&format!(
            "; no fallback ({good} is the version an operator rolled back from): restarting it"
        )),
        "{logs}"
    );
    assert!(
        logs.contains(&format!(
            "no earlier healthy version to roll back to ({good} served healthily, but an \
             operator rolled back from it: `host rollback --to {good}` goes to it on purpose)"
        )),
        "{logs}"
    );
    assert!(!logs.contains(&format!("rolling back to {good}")), "{logs}");
    assert_eq!(live_version(&host), faulty);
}

#[test]
fn a_burst_of_reload_requests_is_merged_into_one_follow_up() {
    let host = start(
        "versioned",
        1,
        "canary_probation = \"5s\"\nprobation = \"0s\"",
    );
    // The first reload (to a new version) runs for 5 s, its canary probation; everything below
    // arrives meanwhile, even on a loaded machine.
    host.replace_plugin("versioned-v2");
    host.signal(Signal::SIGHUP);
    host.wait_for_log("reloading 1 worker,");
    for _ in 0..200 {
        host.signal(Signal::SIGHUP);
    }
    // The signals are handled on the master's own time: the callers below must find the
    // follow-up the signals queued, not queue it themselves.
    host.wait_for_log("SIGHUP: queued behind the jobs before it");
    // Two callers who ask for the same reload join the waiting one and hear its outcome.
    let callers: Vec<_> = (0..2)
        .map(|_| {
            let state_dir = host.state_dir();
            std::thread::spawn(move || {
                let mut cmd = std::process::Command::new(&crate::harness::artifacts().host);
                cmd.args(["reload", "--state-dir"]).arg(state_dir);
                crate::harness::run(cmd)
            })
        })
        .collect();
    for caller in callers {
        let out = caller.join().unwrap();
        let text = output_text(&out);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("joins it"), "{text}");
        assert!(text.contains("reload done"), "{text}");
    }
    let reloads = web(&host)["recent"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "reload")
        .count();
    assert_eq!(reloads, 2, "one reload, then one merged follow-up");
    assert!(get(&host.addr("web"), "/").body.contains("versioned v2"));
}

/// A restart after a rejected reload starts the version that was live, not the plugin file
/// that failed: that file would fail the start itself.
#[test]
fn a_restart_after_a_rejected_reload_starts_the_version_that_was_live() {
    let host = start("versioned", 1, "");
    let v1 = live_version(&host);
    host.replace_plugin("bad-start");
    let out = host.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(host.cli(&["stop"]).status.success());

    let host = Host::start(host.into_dir(), &["--config", "host.toml"]);
    assert_eq!(live_version(&host), v1);
    host.wait_for_log("which was set aside (");
    assert!(get(&host.addr("web"), "/").body.contains("versioned v1"));
    // Status says so too, not only the log.
    let held_back = web(&host)["held_back"].as_str().unwrap().to_string();
    assert!(
        held_back.contains(&format!("starting {v1} instead")),
        "{held_back}"
    );
    let text = output_text(&host.cli(&["status"]));
    assert!(
        text.contains("  held back: ") && text.contains("plugin.so holds plugin "),
        "{text}"
    );
}

/// A master run on another config in the same state directory keeps the history of the
/// services it does not run, and their copies: back on the first config, `host rollback`
/// still goes back.
#[test]
fn a_master_on_another_config_keeps_the_history_of_services_it_does_not_run() {
    let host = start("versioned", 1, "");
    let v1 = live_version(&host);
    host.replace_plugin("versioned-v2");
    host.reload_ok();
    assert!(host.cli(&["stop"]).status.success());

    let dir = host.into_dir();
    // Another plugin: no copy of it keeps the copies of web's versions by chance.
    copy_new_inode(&artifacts().plugin("counter"), &dir.path().join("other.so"));
    std::fs::write(
        dir.path().join("other.toml"),
        "[[service]]\nname = \"other\"\nlisten = [\"127.0.0.1:0\"]\nplugin = \"other.so\"\n",
    )
    .unwrap();
    let other = Host::start(dir, &["--config", "other.toml"]);
    assert!(other.cli(&["stop"]).status.success());

    let host = Host::start(other.into_dir(), &["--config", "host.toml"]);
    assert!(get(&host.addr("web"), "/").body.contains("versioned v2"));
    assert_eq!(web(&host)["previous"][0]["version"], v1.as_str());
    let out = host.cli(&["rollback"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(get(&host.addr("web"), "/").body.contains("versioned v1"));
}

/// A version that proved healthy stays so through a trial that fails, even when the history
/// keeps no earlier version (`keep_versions = 1`): the trial falls back to it, and it comes
/// back healthy, a crash loop's way back again.
#[test]
fn the_version_a_failed_trial_falls_back_to_stays_healthy() {
    let host = start(
        "versioned",
        1,
        "keep_versions = 1\nprobation = \"1s\"\ncanary_probation = \"3s\"",
    );
    let addr = host.addr("web");
    let v1 = live_version(&host);
    wait_until("v1 passed its probation", || {
        web(&host)["version_healthy"] == true
    });
    let load = Load::start(&addr, 2, Duration::ZERO);
    load.wait_for_more(50);
    host.replace_plugin("fault-abort");
    let out = host.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(output_text(&out).contains(&format!("rolled back to {v1}")));
    drop(load.stop());
    assert_eq!(live_version(&host), v1);
    assert_eq!(web(&host)["version_healthy"], true, "{}", web(&host));
}

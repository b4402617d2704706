//! Reload on rebuild (`--watch`), version history and rollback, and the `host dev` loop.

use std::fs;

use crate::{
    harness::{artifacts, copy_new_inode, output_text, wait_until, Host},
    http::get,
};

fn watched(plugin: &str, workers: usize) -> Host {
    Host::serving(plugin, workers, &["--watch"])
}

#[test]
fn a_rebuild_is_served_without_any_command() {
    let host = watched("versioned", 2);
    let addr = host.addr("plugin");
    let before = host.ready_pids("plugin");
    host.replace_plugin("versioned-v2");
    wait_until("v2 is served", || {
        get(&addr, "/").body.contains("versioned v2")
    });
    wait_until("both workers are replaced", || {
        let now = host.ready_pids("plugin");
        now.len() == 2 && now.iter().all(|p| !before.contains(p))
    });
    host.wait_for_log("plugin plugin rebuilt (");
    host.wait_for_log("reloading 2 workers");
}

#[test]
fn a_broken_build_is_rejected_and_the_next_good_one_goes_live() {
    let host = watched("versioned", 2);
    let addr = host.addr("plugin");
    let pids = host.ready_pids("plugin");
    let path = host.dir.path().join("plugin.so");
    let bytes = fs::read(artifacts().plugin("versioned-v2")).unwrap();
    fs::remove_file(&path).unwrap();
    fs::write(&path, &bytes[..64 * 1024]).unwrap();
    wait_until("the watcher rejects the build", || {
        host.logs().contains(") rejected: ")
    });
    assert!(
        get(&addr, "/").body.contains("versioned v1"),
        "the old version keeps answering"
    );
    assert_eq!(host.ready_pids("plugin"), pids);
    assert!(host.logs().contains("still serving"));

    host.replace_plugin("versioned-v2");
    wait_until("the good build goes live", || {
        get(&addr, "/").body.contains("versioned v2")
    });
}

#[test]
fn a_touch_or_an_identical_rebuild_does_not_reload() {
    let host = watched("versioned", 1);
    let pids = host.ready_pids("plugin");
    let path = host.dir.path().join("plugin.so");
    // Identical bytes in a new file, as `cargo build` with nothing to do... or a touch.
    host.replace_plugin("versioned");
    wait_until("the watcher looked", || {
        host.logs().contains("content the same")
    });
    let file = fs::OpenOptions::new().append(true).open(&path).unwrap();
    file.set_modified(std::time::SystemTime::now()).unwrap();
    drop(file);
    wait_until("the watcher looked again", || {
        host.logs().matches("content the same").count() >= 2
    });
    assert_eq!(host.ready_pids("plugin"), pids);
    assert!(!host.logs().contains("rebuilt ("));
}

#[test]
fn a_burst_of_rebuilds_ends_in_one_or_two_reloads_of_the_newest() {
    let host = watched("versioned", 2);
    let addr = host.addr("plugin");
    let path = host.dir.path().join("plugin.so");
    for name in [
        "versioned-v2",
        "versioned",
        "versioned-v2",
        "versioned",
        "versioned-v2",
    ] {
        copy_new_inode(&artifacts().plugin(name), &path);
    }
    wait_until("the newest build is served", || {
        get(&addr, "/").body.contains("versioned v2")
    });
    // Both reload lines (if there were two) are logged before the newest build serves.
    host.wait_for_log("plugin plugin rebuilt (");
    let logs = host.logs();
    let reloads = logs.matches("plugin plugin rebuilt (").count();
    assert!((1..=2).contains(&reloads), "{reloads} reloads:\n{logs}");
}

#[test]
fn rollback_goes_back_and_to_a_named_version() {
    let host = watched("versioned", 2);
    let addr = host.addr("plugin");
    let v1 = host.status()["services"][0]["version"]
        .as_str()
        .unwrap()
        .to_string();
    host.replace_plugin("versioned-v2");
    wait_until("v2 is served", || {
        get(&addr, "/").body.contains("versioned v2")
    });
    let status = host.status();
    let v2 = status["services"][0]["version"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(status["services"][0]["previous"][0]["version"], v1.as_str());
    assert!(output_text(&host.cli(&["status"])).contains(&format!("previous versions: {v1}")));

    let out = host.cli(&["rollback"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("plugin {v2} -> {v1}")), "{text}");
    assert_eq!(
        text.matches(" ready in ").count(),
        2,
        "one line per worker:\n{text}"
    );
    assert!(get(&addr, "/").body.contains("versioned v1"));

    let out = host.cli(&["rollback", "plugin", "--to", &v2[..5]]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(get(&addr, "/").body.contains("versioned v2"));

    let out = host.cli(&["rollback", "--to", "0000000"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(output_text(&out).contains("no kept version starts with"));
}

#[test]
fn dev_builds_serves_and_picks_up_a_source_edit() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let krate = dir.path().join("devhello");
    fs::create_dir_all(krate.join("src")).unwrap();
    fs::copy(
        root.join("tests/fixtures/versioned/src/lib.rs"),
        krate.join("src/lib.rs"),
    )
    .unwrap();
    // The workspace's lock file: the same dependency versions, no registry lookup.
    fs::copy(root.join("Cargo.lock"), krate.join("Cargo.lock")).unwrap();
    fs::write(
        krate.join("Cargo.toml"),
        format!(
            "[package]\nname = \"devhello\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
             [lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\nplugin-api = {{ path = {:?} }}\n\n\
             [workspace]\n",
            root.join("plugin-api")
        ),
    )
    .unwrap();
    // Share the test's target dir: the dependencies are compiled already.
    let target_dir = artifacts().host.parent().unwrap().parent().unwrap();
    let args = ["devhello", "--listen", "127.0.0.1:0", "--workers", "1"];
    let host = Host::launch("dev", dir, &args, &[("CARGO_TARGET_DIR", target_dir)])
        .unwrap_or_else(|(host, why)| panic!("host dev did not start: {why}\n{}", host.logs()));
    let addr = host.addr("devhello");
    assert!(get(&addr, "/").body.contains("versioned v1"));

    let lib = krate.join("src/lib.rs");
    let source = fs::read_to_string(&lib).unwrap();
    fs::write(&lib, source.replace("None => \"v1\"", "None => \"v3\"")).unwrap();
    wait_until("the edit is served", || {
        get(&addr, "/").body.contains("versioned v3")
    });

    let broken = fs::read_to_string(&lib).unwrap() + "\nfn broken( {\n";
    fs::write(&lib, broken).unwrap();
    wait_until("the build fails", || host.logs().contains("build failed"));
    assert!(
        get(&addr, "/").body.contains("versioned v3"),
        "the running version keeps serving"
    );
}

#[test]
fn the_version_history_survives_a_master_restart() {
    let mut host = Host::serving("versioned", 1, &[]);
    let v1 = host.status()["services"][0]["version"]
        .as_str()
        .unwrap()
        .to_string();
    host.replace_plugin("versioned-v2");
    host.reload_ok();
    let first_loaded = |host: &Host, version: &str| {
        let service = &host.status()["services"][0];
        service["previous"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["version"] == version)
            .map(|v| v["first_loaded"].as_u64().unwrap())
    };
    assert!(host.cli(&["stop"]).status.success());
    assert!(host.wait_exit());
    // Times are in seconds: the restart below is in a later second than the stop.
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let stopped_at = now();
    wait_until("the clock moves to a later second", || now() > stopped_at);

    let dir = host.into_dir();
    let host = Host::serving_in(dir, 1, &[]);
    let addr = host.addr("plugin");
    assert!(get(&addr, "/").body.contains("versioned v2"));
    assert_eq!(
        host.status()["services"][0]["previous"][0]["version"],
        v1.as_str()
    );
    let v2 = host.status()["services"][0]["version"]
        .as_str()
        .unwrap()
        .to_string();
    let out = host.cli(&["rollback"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(get(&addr, "/").body.contains("versioned v1"));
    // v2 kept the time it was first loaded across the restart: before the stop, not at the
    // restart that copied it into the store again.
    let v2_loaded = first_loaded(&host, &v2).unwrap();
    assert!(v2_loaded <= stopped_at, "{v2_loaded} vs {stopped_at}");
}

#[test]
fn the_version_live_at_stop_can_be_rolled_back_to_after_a_restart_on_a_new_build() {
    let mut host = Host::serving("versioned", 1, &[]);
    let v1 = host.status()["services"][0]["version"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(host.cli(&["stop"]).status.success());
    assert!(host.wait_exit());

    // A new build while the host was down; the restart serves it.
    let dir = host.into_dir();
    copy_new_inode(
        &artifacts().plugin("versioned-v2"),
        &dir.path().join("plugin.so"),
    );
    let host = Host::serving_in(dir, 1, &[]);
    let addr = host.addr("plugin");
    assert!(get(&addr, "/").body.contains("versioned v2"));
    let status = host.status();
    assert_eq!(status["services"][0]["previous"][0]["version"], v1.as_str());
    assert!(
        status["services"][0]["probation_left_ms"].is_u64(),
        "a new build since the last start is on probation: {status}"
    );
    let out = host.cli(&["rollback"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(get(&addr, "/").body.contains("versioned v1"));
}

//! The trust boundary, tried as another local user would: state directories and plugins others
//! could write are refused, planted files are never loaded or followed, a fake control socket is
//! not believed, the control socket's input is bounded, a deleted state directory comes back,
//! and workers run as an unprivileged user. Most of these need root (as CI runs); without it
//! they say so and return.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::{
        fs::{chown, PermissionsExt},
        net::{UnixListener, UnixStream},
    },
    thread,
};

use crate::{
    harness::{artifacts, copy_new_inode, output_text, run, wait_until, Host},
    http::get,
};

/// A uid no account uses, for files "owned by another user".
const STRANGER: u32 = 4242;

fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: this test needs root (to own files as another user)");
    false
}

/// `host start` with the versioned plugin, its state directory at `state`; must fail.
fn start_fails(dir: &std::path::Path, state: &std::path::Path, extra: &[&str]) -> String {
    let mut cmd = std::process::Command::new(&artifacts().host);
    cmd.args(["start", "--plugin", "plugin.so", "--listen", "127.0.0.1:0"])
        .args(extra)
        .arg("--state-dir")
        .arg(state)
        .current_dir(dir);
    let out = run(cmd);
    assert!(!out.status.success(), "the start must be refused");
    output_text(&out)
}

#[test]
fn a_state_dir_of_another_user_or_through_a_symlink_is_refused() {
    if !root() {
        return;
    }
    let dir = Host::dir_with_plugin("versioned");
    let theirs = dir.path().join("theirs");
    fs::create_dir(&theirs).unwrap();
    fs::set_permissions(&theirs, fs::Permissions::from_mode(0o700)).unwrap();
    chown(&theirs, Some(STRANGER), Some(STRANGER)).unwrap();
    let text = start_fails(dir.path(), &theirs, &[]);
    assert!(text.contains("belongs to uid 4242"), "{text}");
    assert!(text.contains("Remove it"), "{text}");

    let shared = dir.path().join("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
    let text = start_fails(dir.path(), &shared, &[]);
    assert!(
        text.contains("writable by everyone") && text.contains("chmod 700"),
        "{text}"
    );

    let real = dir.path().join("real");
    fs::create_dir(&real).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    fs::set_permissions(&real, fs::Permissions::from_mode(0o755)).unwrap();
    let text = start_fails(dir.path(), &link, &[]);
    assert!(text.contains("is a symlink"), "{text}");
    let mode = fs::metadata(&real).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755, "the link's target was not touched");
}

#[test]
fn a_planted_pid_file_symlink_is_not_followed() {
    let dir = Host::dir_with_plugin("versioned");
    let state = dir.path().join(".host");
    fs::create_dir(&state).unwrap();
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).unwrap();
    let victim = dir.path().join("victim");
    fs::write(&victim, "precious\n").unwrap();
    std::os::unix::fs::symlink(&victim, state.join("host.pid")).unwrap();
    let host = Host::serving_in(dir, 1, &[]);
    assert_eq!(
        fs::read_to_string(host.dir.path().join("victim")).unwrap(),
        "precious\n"
    );
    let pid = fs::read_to_string(host.state_dir().join("host.pid")).unwrap();
    assert_eq!(pid.trim(), host.pid.to_string());
}

#[test]
fn a_planted_shadow_copy_is_never_loaded() {
    let mut host = Host::serving("versioned", 1, &[]);
    host.replace_plugin("versioned-v2");
    host.reload_ok();
    assert!(host.cli(&["stop"]).status.success());
    assert!(host.wait_exit());
    // Someone with access swaps v1's kept copy for other code (v3), keeping name and mode.
    let plugins = host.state_dir().join("plugins");
    let copies: Vec<_> = fs::read_dir(&plugins)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "so"))
        .collect();
    let live_v2 = fs::read(artifacts().plugin("versioned-v2")).unwrap();
    let v1_copy = copies
        .iter()
        .find(|p| fs::read(p).unwrap() != live_v2)
        .expect("a kept copy of v1");
    fs::remove_file(v1_copy).unwrap();
    copy_new_inode(&artifacts().plugin("versioned-v3"), v1_copy);
    fs::set_permissions(v1_copy, fs::Permissions::from_mode(0o444)).unwrap();

    let host = Host::serving_in(host.into_dir(), 1, &[]);
    let addr = host.addr("plugin");
    host.wait_for_log("does not hold plugin");
    let out = host.cli(&["rollback"]);
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(get(&addr, "/").body.contains("versioned v2"));
    assert!(
        !host.logs().contains("versioned v3 started"),
        "{}",
        host.logs()
    );
}

#[test]
fn a_fake_control_socket_is_not_believed() {
    let host = Host::serving("versioned", 1, &[]);
    // Replace the master's socket with one served by this process, whose pid is not the one
    // in the pid file: the CLI must not trust its "done".
    let socket = host.state_dir().join("host.sock");
    fs::remove_file(&socket).unwrap();
    let fake = UnixListener::bind(&socket).unwrap();
    thread::spawn(move || {
        for stream in fake.incoming().flatten() {
            let mut stream = stream;
            let _ = stream.write_all(b"{\"Done\":{\"ok\":true,\"summary\":\"reload done\"}}\n");
        }
    });
    let out = host.cli(&["reload"]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("is not the master the pid file names"),
        "{text}"
    );
}

#[test]
fn an_oversized_control_line_is_refused_without_growing_the_master() {
    let host = Host::serving("versioned", 1, &[]);
    let rss = |pid: u32| -> u64 {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let before = rss(host.pid);
    let mut stream = UnixStream::connect(host.state_dir().join("host.sock")).unwrap();
    let chunk = vec![b'x'; 1 << 20];
    // Up to 100 MiB without a newline; the master stops reading at 64 KiB.
    for _ in 0..100 {
        if stream.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut reply = String::new();
    let _ = BufReader::new(&stream).read_line(&mut reply);
    assert!(reply.contains("longer than 65536 bytes"), "{reply}");
    let after = rss(host.pid);
    assert!(
        after < before + 8 * 1024,
        "master RSS grew from {before} KiB to {after} KiB"
    );
    // A malformed line gets an error too, and the master goes on.
    let mut stream = UnixStream::connect(host.state_dir().join("host.sock")).unwrap();
    stream.write_all(b"{not json}\n").unwrap();
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).unwrap();
    assert!(reply.contains("unreadable request"), "{reply}");
    assert!(host.cli(&["status"]).status.success());
}

#[test]
fn plugins_others_could_write_are_refused_unless_allowed() {
    let dir = Host::dir_with_plugin("versioned");
    let plugin = dir.path().join("plugin.so");
    fs::set_permissions(&plugin, fs::Permissions::from_mode(0o666)).unwrap();
    let text = start_fails(dir.path(), &dir.path().join(".host"), &[]);
    assert!(text.contains("is writable by everyone"), "{text}");
    assert!(text.contains("allow_insecure_plugin_path"), "{text}");

    // A plugin of ours in a directory everyone may write.
    fs::set_permissions(&plugin, fs::Permissions::from_mode(0o644)).unwrap();
    let open = dir.path().join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    copy_new_inode(&plugin, &open.join("plugin.so"));
    let mut cmd = std::process::Command::new(&artifacts().host);
    cmd.args([
        "check",
        "--plugin",
        "open/plugin.so",
        "--listen",
        "127.0.0.1:0",
    ])
    .current_dir(dir.path());
    let text = output_text(&run(cmd));
    assert!(text.contains("which is writable by everyone"), "{text}");

    // The explicit override loads it, with a warning.
    let host = Host::start(
        dir,
        &[
            "--plugin",
            "open/plugin.so",
            "--listen",
            "127.0.0.1:0",
            "--allow-insecure-plugin-path",
        ],
    );
    assert!(get(&host.addr("plugin"), "/").body.contains("versioned v1"));
    host.wait_for_log("loading the plugin anyway (allow_insecure_plugin_path = true)");
}

#[test]
fn a_plugin_owned_by_another_user_is_refused() {
    if !root() {
        return;
    }
    let dir = Host::dir_with_plugin("versioned");
    chown(dir.path().join("plugin.so"), Some(STRANGER), None).unwrap();
    let text = start_fails(dir.path(), &dir.path().join(".host"), &[]);
    assert!(text.contains("belongs to uid 4242"), "{text}");
}

#[test]
fn a_state_dir_deleted_under_a_live_master_comes_back_with_its_lock() {
    let host = Host::serving("versioned", 1, &[]);
    let addr = host.addr("plugin");
    fs::remove_dir_all(host.state_dir()).unwrap();
    host.wait_for_log("was deleted or replaced under the running master; recreated it");
    wait_until("the control socket is back", || {
        host.cli(&["status"]).status.success()
    });
    // A second master on the same path is refused, naming the running one.
    let out = host.cli(&["start", "--plugin", "plugin.so", "--listen", "127.0.0.1:0"]);
    let text = output_text(&out);
    assert!(
        text.contains(&format!(
            "another host master (pid {}) is already running",
            host.pid
        )),
        "{text}"
    );
    // Workers still start: the plugin copy came back with the directory.
    host.replace_plugin("versioned-v2");
    host.reload_ok();
    assert!(get(&addr, "/").body.contains("versioned v2"));
    assert!(host.logs().matches("was deleted or replaced").count() == 1);
}

#[test]
fn workers_run_as_an_unprivileged_user() {
    if !root() {
        return;
    }
    let host = Host::serving("versioned", 2, &["--user", "nobody"]);
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("a nobody user")
        .uid
        .as_raw();
    for pid in host.ready_pids("plugin") {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uids = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        let ids: Vec<u32> = uids
            .split_whitespace()
            .skip(1)
            .map(|n| n.parse().unwrap())
            .collect();
        assert!(ids.iter().all(|id| *id == nobody), "worker {pid}: {uids}");
        let groups = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
        assert!(!groups.split_whitespace().any(|g| g == "0"), "{groups}");
    }
    assert!(get(&host.addr("plugin"), "/").body.contains("versioned v1"));
    // Reloads start workers as that user too.
    host.replace_plugin("versioned-v2");
    host.reload_ok();
    assert!(get(&host.addr("plugin"), "/").body.contains("versioned v2"));

    let dir = Host::dir_with_plugin("versioned");
    let text = start_fails(
        dir.path(),
        &dir.path().join(".host"),
        &["--user", "no-such-user-here"],
    );
    assert!(
        text.contains("there is no user \"no-such-user-here\""),
        "{text}"
    );
}

#[test]
fn a_deleted_plugin_copy_is_restored_once_not_respawned_forever() {
    let host = Host::serving("versioned", 1, &[]);
    let plugins = host.state_dir().join("plugins");
    let copy = fs::read_dir(&plugins)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "so"))
        .unwrap();
    fs::remove_file(&copy).unwrap();
    host.wait_for_log("plugin copies were deleted from the state directory; restored 1");
    assert!(copy.exists());
    // Workers still start from it.
    let pids = host.ready_pids("plugin");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the slot is refilled", || {
        let now = host.ready_pids("plugin");
        now.len() == 1 && now != pids
    });
    assert!(get(&host.addr("plugin"), "/").body.contains("versioned v1"));
}

//! A plugin made as a new user would, outside this repository: `cargo install --path host`,
//! `host new NAME`, `host dev NAME`; and plugin-api as a git dependency (from a local bare
//! repository: no git host is reachable here).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{
    harness::{artifacts, output_text, run, Host},
    http::{get, Conn},
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The test's own target dir: dependencies compiled already, nothing left in the user's.
fn target_dir() -> PathBuf {
    artifacts()
        .host
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.env("CARGO_TARGET_DIR", target_dir());
    cmd
}

fn succeeds(cmd: Command) -> String {
    let description = format!("{cmd:?}");
    let out = run(cmd);
    let text = output_text(&out);
    assert!(out.status.success(), "{description} failed:\n{text}");
    text
}

#[test]
fn install_new_and_dev_serve_a_new_plugin_outside_the_workspace() {
    let tmp = tempfile::tempdir().unwrap();
    let installed = tmp.path().join("root");
    let mut install = cargo();
    install
        .args(["install", "--debug", "--offline", "--locked", "--path"])
        .arg(root().join("host"))
        .arg("--root")
        .arg(&installed);
    succeeds(install);
    let host = installed.join("bin/host");

    let work = tempfile::tempdir().unwrap();
    let mut new = Command::new(&host);
    new.args(["new", "my-plugin"]).current_dir(work.path());
    let said = succeeds(new);
    assert!(said.contains("host dev my-plugin"), "{said}");
    // The workspace's lock file: the same dependency versions, no registry lookup.
    fs::copy(
        root().join("Cargo.lock"),
        work.path().join("my-plugin/Cargo.lock"),
    )
    .unwrap();

    let mut dev = Command::new(&host);
    dev.env("CARGO_TARGET_DIR", target_dir());
    let args = ["my-plugin", "--listen", "127.0.0.1:0", "--workers", "1"];
    let host = Host::launch_command(dev, "dev", work, &args)
        .unwrap_or_else(|(host, why)| panic!("host dev did not start: {why}\n{}", host.logs()));
    let addr = host.addr("my_plugin");
    assert_eq!(get(&addr, "/").body, "Hello from my-plugin (worker 0)\n");
    assert_eq!(get(&addr, "/wait/20").body, "waited 20 ms\n");
    let resp = Conn::new(&addr)
        .send("POST", "/greet", br#"{"name":"Ann"}"#.to_vec())
        .unwrap();
    assert_eq!(resp.body, r#"{"name":"Ann"}"#);
}

#[test]
fn plugin_api_builds_as_a_git_dependency_from_a_bare_repository() {
    let tmp = tempfile::tempdir().unwrap();
    let bare = tmp.path().join("host.git");
    let mut clone = Command::new("git");
    clone
        .args(["clone", "--quiet", "--bare"])
        .arg(root())
        .arg(&bare);
    succeeds(clone);

    let url = format!("file://{}", bare.display());
    let mut new = Command::new(&artifacts().host);
    new.args(["new", "from-git", "--plugin-api", &url])
        .current_dir(tmp.path());
    succeeds(new);
    let krate = tmp.path().join("from-git");
    let manifest = fs::read_to_string(krate.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains(&format!("plugin-api = {{ git = \"{url}\" }}")),
        "{manifest}"
    );
    fs::copy(root().join("Cargo.lock"), krate.join("Cargo.lock")).unwrap();
    let mut build = cargo();
    build.arg("build").current_dir(&krate);
    succeeds(build);
    assert!(target_dir().join("debug/libfrom_git.so").exists());
}

/// In this repository: after a workspace build, `cargo build -p hello` compiles hello alone.
/// (cargo unifies features over what one invocation builds, so hello alone would get smaller
/// feature sets for the crates it shares with the host, and compile them again;
/// plugins/workspace-hack gives it the host's.) Fails when a change to the host's dependencies
/// leaves the hack behind: `cargo tree --workspace -e features -i CRATE` says what to add.
#[test]
fn after_a_workspace_build_one_plugin_builds_alone() {
    let build = |args: &[&str]| {
        let mut cmd = cargo();
        cmd.args(args)
            .current_dir(root())
            .env_remove("FIXTURE_VERSION")
            .env_remove("FIXTURE_FAULT")
            .env_remove("CHAT_VERSION");
        succeeds(cmd)
    };
    build(&["build"]);
    let out = build(&["build", "-p", "hello", "--message-format=json"]);
    let compiled: Vec<String> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["fresh"] == false)
        .map(|m| m["target"]["name"].as_str().unwrap_or("?").to_string())
        .collect();
    assert!(
        compiled.is_empty(),
        "`cargo build -p hello` after `cargo build` compiled {compiled:?} again: their features \
         differ between the two builds; add the workspace build's features of those crates to \
         plugins/workspace-hack/Cargo.toml (`cargo tree --workspace -e features -i CRATE`)"
    );
}

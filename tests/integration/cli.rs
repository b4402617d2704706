//! The command line: check, status, errors for bad config and for no running master.

use std::process::Command;

use crate::harness::{artifacts, dir_with_config, output_text, run, Host};

fn host_in(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(&artifacts().host);
    cmd.args(args).current_dir(dir).env_remove("HOST_STATE_DIR");
    run(cmd)
}

#[test]
fn check_loads_each_plugin_in_a_throwaway_worker() {
    let config = r#"
        [[service]]
        name = "good"
        listen = ["127.0.0.1:0"]
        plugin = "good.so"

        [[service]]
        name = "bad"
        listen = ["127.0.0.1:0"]
        plugin = "bad.so"
    "#;
    let dir = dir_with_config(config, &[("good.so", "versioned"), ("bad.so", "bad-start")]);
    let out = host_in(dir.path(), &["check", "--config", "host.toml"]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("ok    service good: plugin fixture-versioned 0.1.0"),
        "{text}"
    );
    assert!(
        text.contains("FAIL  service bad: plugin fixture-bad-start"),
        "{text}"
    );
    assert!(text.contains("database url is not configured"), "{text}");

    let dir = dir_with_config("", &[("p.so", "echo")]);
    let out = host_in(
        dir.path(),
        &["check", "--plugin", "p.so", "--listen", "127.0.0.1:0"],
    );
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(output_text(&out).contains("configuration ok: 1 service(s)"));
}

#[test]
fn bad_config_is_a_usage_error_that_names_the_field() {
    let config = "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1\"]\nplugin = \"p.so\"\n";
    let dir = dir_with_config(config, &[]);
    let out = host_in(dir.path(), &["start", "--config", "host.toml"]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("service \"web\": listen \"127.0.0.1\""),
        "{text}"
    );

    let dir = dir_with_config("[[service]]\nname = \"web\"\nworkerz = 2\n", &[]);
    let text = output_text(&host_in(dir.path(), &["check", "--config", "host.toml"]));
    assert!(text.contains("unknown field `workerz`"), "{text}");
}

#[test]
fn client_commands_without_a_master_say_how_to_start_one() {
    let dir = tempfile::tempdir().unwrap();
    for cmd in ["status", "reload", "stop"] {
        let out = host_in(dir.path(), &[cmd]);
        let text = output_text(&out);
        assert_eq!(out.status.code(), Some(3), "{cmd}: {text}");
        assert!(text.contains("no host master is running"), "{text}");
        assert!(text.contains("host start"), "{text}");
    }
}

#[test]
fn status_table_shows_master_and_workers() {
    let host = Host::serving("versioned", 2, &[]);
    crate::http::get(&host.addr("plugin"), "/");
    let out = host.cli(&["status"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("master pid {}", host.pid)), "{text}");
    assert!(
        text.contains("SLOT  PID      STATE     VERSION  UPTIME     RSS       CONNS  REQUESTS"),
        "{text}"
    );
    assert_eq!(text.matches(" ready ").count(), 2, "{text}");
    // A worker that does not answer the master's count in time shows `null`: not yet.
    crate::harness::wait_until("the status counts the request", || {
        let status = host.status();
        let counts: Option<Vec<u64>> = status["services"][0]["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["requests"].as_u64())
            .collect();
        counts.is_some_and(|c| c.iter().sum::<u64>() == 1)
    });
    let out = host.cli(&["reload", "nope"]);
    assert!(output_text(&out).contains("there is no service nope; the services are: plugin"));
}

#[test]
fn example_config_checks_out() {
    // examples/host.toml points at ../target/debug; the harness has built those plugins.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let built = artifacts().host.parent().unwrap().to_path_buf();
    if built != root.join("target/debug") {
        eprintln!(
            "skipped: plugins are built in {}, not target/debug",
            built.display()
        );
        return;
    }
    let out = host_in(root, &["check", "--config", "examples/host.toml"]);
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("configuration ok: 3 service(s)"), "{text}");
}

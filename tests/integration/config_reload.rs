//! `host reload` reads the config file again: worker counts, plugin config tables, listen
//! addresses and whole services change without a restart, each with the rollout's rules; an
//! invalid file changes nothing.

use std::{fs, net::TcpStream, time::Duration};

use crate::{
    harness::{dir_with_config, output_text, wait_until, Host},
    http::get,
    load::Load,
};

fn service(name: &str, listen: &[&str], workers: usize, extra: &str) -> String {
    let listen: Vec<String> = listen.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "[[service]]\nname = \"{name}\"\nlisten = [{}]\nplugin = \"plugin.so\"\nworkers = {workers}\n\
         canary_probation = \"0s\"\nprobation = \"0s\"\n{extra}\n",
        listen.join(", ")
    )
}

fn start(config: &str) -> Host {
    Host::start(
        dir_with_config(config, &[("plugin.so", "versioned")]),
        &["--config", "host.toml"],
    )
}

fn rewrite(host: &Host, config: &str) {
    fs::write(host.dir.path().join("host.toml"), config).unwrap();
}

/// A free port on 127.0.0.1 (bound and released: the master binds it again right after).
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[test]
fn worker_counts_grow_and_shrink() {
    let host = start(&service("web", &["127.0.0.1:0"], 2, ""));
    let before = host.ready_pids("web");
    rewrite(&host, &service("web", &["127.0.0.1:0"], 3, ""));
    let out = host.reload_ok();
    assert!(out.contains("web: workers 2 -> 3"), "{out}");
    let grown = host.ready_pids("web");
    assert_eq!(grown.len(), 3);
    assert!(
        before.iter().all(|p| grown.contains(p)),
        "the running workers stay"
    );
    rewrite(&host, &service("web", &["127.0.0.1:0"], 1, ""));
    let out = host.reload_ok();
    assert!(out.contains("web: workers 3 -> 1"), "{out}");
    wait_until("two workers drained", || host.ready_pids("web").len() == 1);
}

#[test]
fn a_changed_plugin_config_rolls_out_and_a_breaking_one_is_rejected() {
    let host = start(&service(
        "web",
        &["127.0.0.1:0"],
        2,
        "[service.config]\ngreeting = \"Hi\"",
    ));
    let addr = host.addr("web");
    assert_eq!(get(&addr, "/").body, "Hi from versioned v1\n");
    rewrite(
        &host,
        &service(
            "web",
            &["127.0.0.1:0"],
            2,
            "[service.config]\ngreeting = \"Ho\"",
        ),
    );
    let out = host.reload_ok();
    assert!(out.contains("web: [service.config] changed"), "{out}");
    assert!(out.contains("new configuration"), "{out}");
    assert_eq!(get(&addr, "/").body, "Ho from versioned v1\n");

    // A config the plugin refuses: the canary fails, the old config keeps serving.
    rewrite(
        &host,
        &service(
            "web",
            &["127.0.0.1:0"],
            2,
            "[service.config]\nrefuse_to_start = \"bad key\"",
        ),
    );
    let out = host.cli(&["reload"]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("refused to start: bad key"), "{text}");
    assert!(text.contains("nothing changed"), "{text}");
    assert_eq!(get(&addr, "/").body, "Ho from versioned v1\n");
}

#[test]
fn an_invalid_file_changes_nothing_and_says_where() {
    let host = start(&service("web", &["127.0.0.1:0"], 1, ""));
    let pids = host.ready_pids("web");
    rewrite(&host, &service("web", &["127.0.0.1:0"], 0, ""));
    let out = host.cli(&["reload"]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("service \"web\": workers must be from 1 to 256"),
        "{text}"
    );
    assert!(text.contains("nothing changed"), "{text}");
    assert_eq!(host.ready_pids("web"), pids);
}

#[test]
fn services_come_and_go() {
    let second = free_addr();
    let one = service("web", &["127.0.0.1:0"], 1, "");
    let host = start(&one);
    rewrite(&host, &(one.clone() + &service("api", &[&second], 1, "")));
    let out = host.reload_ok();
    assert!(out.contains("api: new service on"), "{out}");
    assert!(get(&second, "/").body.contains("versioned v1"));

    rewrite(&host, &one);
    let out = host.reload_ok();
    assert!(out.contains("api: removed from the config"), "{out}");
    wait_until("the removed service's port is closed", || {
        TcpStream::connect(&second).is_err()
    });
    let status = host.status();
    assert_eq!(status["services"].as_array().unwrap().len(), 1);
}

/// A service removed from the config and added back comes back with its history: the versions
/// it kept for a rollback are still there.
#[test]
fn a_service_added_back_keeps_its_history() {
    let second = free_addr();
    let one = service("web", &["127.0.0.1:0"], 1, "");
    let both = one.clone() + &service("api", &[&second], 1, "");
    let host = start(&both);
    let v1 = host.service("api")["version"].as_str().unwrap().to_string();
    host.replace_plugin("versioned-v2");
    host.reload_ok();
    assert!(get(&second, "/").body.contains("versioned v2"));

    rewrite(&host, &one);
    host.reload_ok();
    rewrite(&host, &both);
    let out = host.reload_ok();
    assert!(out.contains("api: new service on"), "{out}");
    assert_eq!(host.service("api")["previous"][0]["version"], v1.as_str());
    let out = host.cli(&["rollback", "api"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(get(&second, "/").body.contains("versioned v1"));
}

#[test]
fn listen_addresses_move_without_a_reset() {
    let (a, b) = (free_addr(), free_addr());
    let host = start(&service("web", &[&a], 2, "idle_grace = \"1s\""));
    // Keep-alive load on the address that goes away.
    let load = Load::start(&a, 4, Duration::ZERO);
    load.wait_for_more(200);
    rewrite(&host, &service("web", &[&b], 2, "idle_grace = \"1s\""));
    let out = host.reload_ok();
    assert!(out.contains(&format!("listen +{b} -{a}")), "{out}");
    assert!(get(&b, "/").body.contains("versioned v1"));
    wait_until("the old address is closed", || {
        TcpStream::connect(&a).is_err()
    });
    let seen = load.stop();
    // Clients of the old address are told `Connection: close` and then find it closed: a
    // refused connect, never a reset or a cut request.
    let cut: Vec<_> = seen
        .errors
        .iter()
        .filter(|e| !e.contains("Connection refused"))
        .collect();
    assert!(cut.is_empty(), "{cut:?}");
}

#[test]
fn a_new_address_that_cannot_be_bound_refuses_the_change() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let host = start(&service("web", &["127.0.0.1:0"], 1, ""));
    let addr = host.addr("web");
    rewrite(&host, &service("web", &["127.0.0.1:0", &taken_addr], 2, ""));
    let out = host.cli(&["reload"]);
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("could not listen on {taken_addr}")),
        "{text}"
    );
    assert!(text.contains("keeps its old configuration"), "{text}");
    assert_eq!(host.ready_pids("web").len(), 1);
    assert!(get(&addr, "/").body.contains("versioned v1"));
}

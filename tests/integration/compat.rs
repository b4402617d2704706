//! Plugins built against plugin-api 0.1 (the fixture api-0-1, built against the frozen copy
//! in compat/plugin-api-0.1) keep loading and serving in a 0.2 host, and a service moves
//! between a 0.1 and a 0.2 plugin with ordinary reloads. A plugin built against 0.2.0 (the
//! fixture api-0-2-0: its root module has no `handle_ref`) is handed 0.2.0's owned request.

use crate::{
    harness::Host,
    http::{get, Conn},
};

#[test]
fn a_plugin_built_against_api_0_1_serves_unchanged() {
    let host = Host::serving("api-0-1", 1, &[]);
    let addr = host.addr("plugin");
    host.wait_for_log("api 0.1 plugin started as worker 0");
    let resp = Conn::new(&addr)
        .send("POST", "/a/b?x=1", b"payload".to_vec())
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.body,
        "hello from plugin-api 0.1.0: POST /a/b q=x=1 x-test=- body=payload\n"
    );
    let worker: serde_json::Value =
        serde_json::from_str(&get(&addr, "/__host/worker").body).unwrap();
    assert_eq!(worker["plugin_api"], "0.1", "{worker}");
    assert_eq!(worker["handler_calls"], "blocking", "0.1's default");

    // A panic is still one 500, and the worker goes on.
    assert_eq!(get(&addr, "/panic").status, 500);
    assert_eq!(get(&addr, "/").status, 200);
    host.wait_for_log("a 0.1 plugin panicked");
}

#[test]
fn a_service_reloads_from_an_api_0_1_plugin_to_0_2_and_back() {
    let host = Host::serving("api-0-1", 2, &[]);
    let addr = host.addr("plugin");
    assert!(get(&addr, "/").body.contains("plugin-api 0.1.0"));
    host.replace_plugin("versioned");
    host.reload_ok();
    assert!(get(&addr, "/").body.contains("versioned v1"));
    host.replace_plugin("api-0-1");
    host.reload_ok();
    assert!(get(&addr, "/").body.contains("plugin-api 0.1.0"));
    host.wait_for_log("api 0.1 plugin stopping");
}

#[test]
fn a_plugin_built_against_api_0_2_0_gets_the_owned_request() {
    // Each way the host calls a handler has its own path to 0.2.0's entries.
    for calls in ["inline", "blocking", "async"] {
        let env = [("FIXTURE_API_020_CALLS", std::path::Path::new(calls))];
        let host = Host::serving_with(Host::dir_with_plugin("api-0-2-0"), 1, &[], &env);
        let addr = host.addr("plugin");
        host.wait_for_log("api 0.2.0 plugin started");
        let resp = crate::requests::call(
            &addr,
            "POST",
            "/a/b?x=1",
            &[("x-test", "yes"), ("x-request-id", "compat-1")],
            "payload",
        );
        assert_eq!(resp.status, 200, "{calls}: {}", resp.body);
        let head = format!(
            "plugin-api 0.2.0: POST /a/b q=x=1 host={addr} x-test=yes id=compat-1 client=some \
             HTTP/1.1 body="
        );
        // A sync handler gets the body whole; an async one may get it as a stream.
        let bodies = [format!("{head}payload\n"), format!("{head}(streamed)\n")];
        let whole_only = calls != "async";
        assert!(
            resp.body == bodies[0] || (!whole_only && resp.body == bodies[1]),
            "{calls}: {}",
            resp.body
        );
        let worker: serde_json::Value =
            serde_json::from_str(&get(&addr, "/__host/worker").body).unwrap();
        assert_eq!(worker["handler_calls"], calls, "{worker}");
    }
}

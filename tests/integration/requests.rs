//! What an async plugin gets from plugin-api 0.2 for requests and responses (the `api`
//! example): routes with parameters, 404 and 405, JSON in and out, cookies, the client's
//! address, TLS or not, the HTTP version, and the request id, which the host's log lines for
//! the request carry too.

use serde_json::Value;

use crate::{
    harness::{dir_with_config, Host},
    http::{tls_config, Conn, Resp, Transport},
    tls::Certs,
};

/// One request on a new connection, with headers; panics on a transport error.
pub fn call(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut conn = Conn::new(addr);
    conn.headers
        .extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    conn.send(method, path, body.as_bytes().to_vec())
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path} failed: {e}"))
}

#[test]
fn routes_json_cookies_and_request_facts() {
    let host = Host::serving("api", 1, &[]);
    let addr = host.addr("plugin");

    let hello = call(&addr, "GET", "/hello/ann", &[], "");
    assert_eq!((hello.status, hello.body.as_str()), (200, "hello, ann\n"));
    assert_eq!(call(&addr, "GET", "/nowhere", &[], "").status, 404);
    let wrong = call(&addr, "DELETE", "/hello/ann", &[], "");
    assert_eq!(wrong.status, 405);
    assert_eq!(wrong.headers["allow"], "GET, HEAD");

    let created = call(&addr, "POST", "/items", &[], r#"{"name":"pen","qty":3}"#);
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.headers["content-type"], "application/json");
    let item: Value = serde_json::from_str(&created.body).unwrap();
    assert_eq!(item["name"], "pen");
    let read = call(&addr, "GET", &format!("/items/{}", item["id"]), &[], "");
    assert_eq!(read.body, created.body);
    let bad = call(&addr, "POST", "/items", &[], r#"{"name":"pen"}"#);
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.body.contains("not valid JSON"), "{}", bad.body);

    let first = call(&addr, "GET", "/whoami", &[], "");
    let facts: Value = serde_json::from_str(&first.body).unwrap();
    assert!(
        facts["client_addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{facts}"
    );
    assert_eq!(facts["tls"], false);
    assert_eq!(facts["http_version"], "HTTP/1.1");
    assert_eq!(facts["visits"], 1);
    let cookie = first.headers["set-cookie"].to_str().unwrap();
    assert!(cookie.starts_with("visits=1"), "{cookie}");
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    let again = call(&addr, "GET", "/whoami", &[("cookie", "a=b; visits=1")], "");
    let facts: Value = serde_json::from_str(&again.body).unwrap();
    assert_eq!(facts["visits"], 2);

    // The id: in the response's X-Request-Id, in the body, and in the log line the handler
    // wrote for this request.
    let id = again.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(facts["request_id"], id.as_str());
    host.wait_for_log(&format!("request_id=\"{id}\""));
    let line = host
        .logs()
        .lines()
        .find(|l| l.contains(&id) && l.contains("whoami from"))
        .map(str::to_string);
    assert!(line.is_some(), "{}", host.logs());
    let given = call(&addr, "GET", "/whoami", &[("x-request-id", "abc-123")], "");
    assert_eq!(
        given.headers["x-request-id"], "abc-123",
        "the client's id is kept"
    );
}

#[test]
fn a_json_body_over_max_body_bytes_is_a_413() {
    let config = r#"
        [[service]]
        name = "api"
        listen = ["127.0.0.1:0"]
        plugin = "plugin.so"
        workers = 1
        max_body_bytes = 64
    "#;
    let host = Host::start(
        dir_with_config(config, &[("plugin.so", "api")]),
        &["--config", "host.toml"],
    );
    let addr = host.addr("api");
    let long = format!(r#"{{"name":"{}","qty":1}}"#, "x".repeat(100));
    let resp = call(&addr, "POST", "/items", &[], &long);
    assert_eq!(resp.status, 413, "{}", resp.body);
    let short = call(&addr, "POST", "/items", &[], r#"{"name":"pen","qty":1}"#);
    assert_eq!(short.status, 201);
}

#[test]
fn a_plugin_is_told_a_request_came_over_tls_and_http2() {
    let config = r#"
        [[service]]
        name = "api"
        listen = ["127.0.0.1:0"]
        plugin = "plugin.so"
        workers = 1
        tls = { cert = "cert.pem", key = "key.pem" }
    "#;
    let certs = Certs::new();
    let dir = dir_with_config(config, &[("plugin.so", "api")]);
    certs.issue(dir.path());
    let host = Host::start(dir, &["--config", "host.toml"]);
    let addr = host.addr("api");
    let tls = Transport::Tls(tls_config(&certs.ca_pem, true));
    let resp = Conn::with(&addr, tls, true).get("/whoami").unwrap();
    assert_eq!(resp.status, 200, "{}", resp.body);
    let facts: Value = serde_json::from_str(&resp.body).unwrap();
    assert_eq!(facts["tls"], true, "{facts}");
    assert_eq!(facts["http_version"], "HTTP/2.0", "{facts}");
    // curl's HTTP/2 requests carry the host in :authority only, never in a Host header (the
    // test's own client sends both): the plugin reads it as `host` all the same.
    let plain = Host::start(
        dir_with_config(
            &config.replace("tls = ", "# tls = "),
            &[("plugin.so", "api")],
        ),
        &["--config", "host.toml"],
    );
    let plain_addr = plain.addr("api");
    let mut curl = std::process::Command::new("curl");
    curl.args(["-s", "--http2-prior-knowledge"])
        .arg(format!("http://{plain_addr}/whoami"));
    let facts: Value =
        serde_json::from_str(&crate::harness::output_text(&crate::harness::run(curl))).unwrap();
    assert_eq!(facts["http_version"], "HTTP/2.0", "{facts}");
    assert_eq!(facts["host"], plain_addr.as_str(), "{facts}");
}

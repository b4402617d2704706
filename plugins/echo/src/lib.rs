//! echo: answers with the request it received (method, path, query, headers, body) as JSON.
//! Useful to see what a plugin gets from the host.

use plugin_api::{Context, Plugin, Request, Response};
use serde_json::{json, Map, Value};

/// The plugin; it has no state.
pub struct Echo;

impl Plugin for Echo {
    // Computes its answer from the request and memory alone: the host may call it inline.
    const BLOCKING: bool = false;

    fn on_start(_ctx: &Context) -> Result<Self, plugin_api::Error> {
        Ok(Echo)
    }

    fn handle(&self, req: &Request) -> Response {
        let headers: Map<String, Value> = req
            .headers()
            .map(|(name, value)| (name.to_string(), String::from_utf8_lossy(value).into()))
            .collect();
        let body = json!({
            "method": req.method(),
            "path": req.path(),
            "query": req.query(),
            "headers": headers,
            "body": String::from_utf8_lossy(req.body()),
        });
        Response::json(200, body.to_string())
    }
}

plugin_api::export_plugin!(Echo);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_the_request() {
        let req = Request::new("POST", "/p?q=1")
            .with_header("x-a", "b")
            .with_body("data");
        let resp = Echo.handle(&req);
        let v: Value = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(v["method"], "POST");
        assert_eq!(v["path"], "/p");
        assert_eq!(v["query"], "q=1");
        assert_eq!(v["headers"]["x-a"], "b");
        assert_eq!(v["body"], "data");
    }
}

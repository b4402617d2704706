//! hello: the smallest useful plugin, and the one the README runs.
//!
//! It answers every request with a greeting and its version string. Edit `VERSION` (or the
//! greeting), `cargo build`, `host reload`, and the new text is served without a failed request.

use plugin_api::{Context, Plugin, Request, Response};

/// The version this build answers with. `HELLO_VERSION` at build time overrides it, which is how
/// the integration tests build a "v2" of this crate without editing it.
pub const VERSION: &str = match option_env!("HELLO_VERSION") {
    Some(v) => v,
    None => "v1",
};

/// The plugin: the greeting comes from `greeting` in the service's `[service.config]`.
pub struct Hello {
    greeting: String,
}

impl Plugin for Hello {
    // Computes its answer from the request and memory alone: the host may call it inline.
    const BLOCKING: bool = false;

    fn on_start(ctx: &Context) -> Result<Self, plugin_api::Error> {
        let greeting = ctx.config("greeting").unwrap_or("Hello").to_string();
        plugin_api::info!("hello {VERSION} started as worker {}", ctx.worker_id());
        Ok(Hello { greeting })
    }

    fn handle(&self, _req: &Request) -> Response {
        Response::text(200, format!("{} from hello {VERSION}\n", self.greeting))
    }
}

plugin_api::export_plugin!(Hello);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greets_with_version() {
        let ctx = Context::for_tests("hello").with_config("greeting", "Hi");
        let plugin = Hello::on_start(&ctx).unwrap();
        let resp = plugin.handle(&Request::new("GET", "/"));
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.body(), format!("Hi from hello {VERSION}\n").as_bytes());
    }
}

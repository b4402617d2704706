//! hello-async: the `hello` example as an `AsyncPlugin`, the smallest one there is. Its handler
//! does exactly what hello's does, so the benchmark can compare the host's two paths for a
//! handler that never blocks: inline sync (hello) and async (this one, a task on the plugin's
//! runtime and a future across the boundary).

use plugin_api::{AsyncPlugin, Context, Request, Response};

/// The version this build answers with (`HELLO_VERSION` at build time overrides it).
pub const VERSION: &str = match option_env!("HELLO_VERSION") {
    Some(v) => v,
    None => "v1",
};

/// The plugin: the greeting comes from `greeting` in the service's `[service.config]`.
pub struct HelloAsync {
    greeting: String,
}

impl AsyncPlugin for HelloAsync {
    async fn on_start(ctx: &Context) -> Result<Self, plugin_api::Error> {
        let greeting = ctx.config("greeting").unwrap_or("Hello").to_string();
        Ok(HelloAsync { greeting })
    }

    async fn handle(&self, _req: Request) -> Response {
        Response::text(200, format!("{} from hello {VERSION}\n", self.greeting))
    }
}

plugin_api::export_async_plugin!(HelloAsync);

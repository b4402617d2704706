//! panic: panics on `/panic` and answers `ok` elsewhere. The host turns the panic into a 500 for
//! that one request; the worker keeps serving.

use plugin_api::{Context, Plugin, Request, Response};

/// The plugin; it has no state.
pub struct Panicky;

impl Plugin for Panicky {
    // Computes its answer from the request and memory alone: the host may call it inline.
    const BLOCKING: bool = false;

    fn on_start(_ctx: &Context) -> Result<Self, plugin_api::Error> {
        Ok(Panicky)
    }

    fn handle(&self, req: &Request) -> Response {
        if req.path() == "/panic" {
            panic!("asked to panic on {}", req.path());
        }
        Response::text(200, "ok\n")
    }
}

plugin_api::export_plugin!(Panicky);

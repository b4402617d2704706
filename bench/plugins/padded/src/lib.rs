//! A bench fixture: hello's answer from a plugin that carries `PAD_MIB` MiB of real data in its
//! read-only section, so that the reload-time curve by plugin size (`bench/src/scaling`) measures
//! what a large plugin costs the host (hashing, the shadow copy, loading), not a sparse file.

use plugin_api::{Context, Plugin, Request, Response};

/// `PAD_VERSION` at build time (v1 by default): the bench reloads v1 and v2 in turn.
const VERSION: &str = match option_env!("PAD_VERSION") {
    Some(v) => v,
    None => "v1",
};

/// The padding, written by build.rs: pseudo-random, so every page of it is in the file.
static PAD: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pad.bin"));

pub struct Padded;

impl Plugin for Padded {
    const BLOCKING: bool = false;

    fn on_start(_ctx: &Context) -> Result<Self, plugin_api::Error> {
        // Referenced where the optimizer cannot see through, so that the linker keeps it.
        let pad = std::hint::black_box(PAD);
        plugin_api::info!(
            "padded {VERSION} started with {} bytes of padding",
            pad.len()
        );
        Ok(Padded)
    }

    fn handle(&self, _req: &Request) -> Response {
        Response::text(200, format!("Hello from padded {VERSION}\n"))
    }
}

plugin_api::export_plugin!(Padded);

//! slow: sleeps `?ms=N` milliseconds (at most 60 s), then answers with its pid, like GoFrame's
//! `/sleep` example. Shows that a blocking handler stalls neither other requests nor a reload:
//! a request in flight when a reload starts gets its full answer from the old worker.

use std::{thread, time::Duration};

use plugin_api::{Context, Plugin, Request, Response};

const MAX_MS: u64 = 60_000;

/// The plugin; it has no state.
pub struct Slow;

impl Plugin for Slow {
    fn on_start(_ctx: &Context) -> Result<Self, plugin_api::Error> {
        Ok(Slow)
    }

    fn handle(&self, req: &Request) -> Response {
        let ms = match req.query_param("ms").map(str::parse::<u64>) {
            None => 0,
            Some(Ok(ms)) if ms <= MAX_MS => ms,
            Some(_) => {
                return Response::text(
                    400,
                    format!("ms must be a whole number from 0 to {MAX_MS}\n"),
                )
            }
        };
        plugin_api::info!("sleeping {ms} ms");
        thread::sleep(Duration::from_millis(ms));
        Response::text(
            200,
            format!("slept {ms} ms in pid {}\n", std::process::id()),
        )
    }
}

plugin_api::export_plugin!(Slow);

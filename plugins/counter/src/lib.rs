//! counter: counts the requests this worker served, in memory. The count starts again at zero in
//! every new worker, so a reload "loses" it: the reason handlers should keep state that matters
//! outside the process.

use std::sync::atomic::{AtomicU64, Ordering};

use plugin_api::{Context, Plugin, Request, Response};

/// The plugin: one counter per worker process.
pub struct Counter {
    count: AtomicU64,
    worker: u32,
}

impl Plugin for Counter {
    // Computes its answer from the request and memory alone: the host may call it inline.
    const BLOCKING: bool = false;

    fn on_start(ctx: &Context) -> Result<Self, plugin_api::Error> {
        Ok(Counter {
            count: AtomicU64::new(0),
            worker: ctx.worker_id(),
        })
    }

    fn handle(&self, _req: &Request) -> Response {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        Response::text(
            200,
            format!(
                "request {n} on worker {} (pid {})\n",
                self.worker,
                std::process::id()
            ),
        )
    }
}

plugin_api::export_plugin!(Counter);

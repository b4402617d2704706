//! counter: two counters, to show where state lives.
//!
//! - `GET /`: counts the requests this worker served, in its memory. The count starts again at
//!   zero in every new worker, so a reload "loses" it.
//! - `POST /shared` (or `GET /shared/incr`): adds one to a count kept in the host's key/value
//!   store (`plugin_api::kv`), shared by every worker of the service and kept across reloads;
//!   `GET /shared` reads it. Increments from any number of workers are atomic: none is lost.

use std::sync::atomic::{AtomicU64, Ordering};

use plugin_api::{AsyncPlugin, Context, Request, Response};

const KEY: &str = "count";

/// The plugin: one in-memory counter per worker process.
pub struct Counter {
    count: AtomicU64,
    worker: u32,
}

impl AsyncPlugin for Counter {
    async fn on_start(ctx: &Context) -> Result<Self, plugin_api::Error> {
        Ok(Counter {
            count: AtomicU64::new(0),
            worker: ctx.worker_id(),
        })
    }

    async fn handle(&self, req: Request) -> Response {
        let shared = match (req.method(), req.path()) {
            ("POST", "/shared") | ("GET", "/shared/incr") => {
                plugin_api::kv::increment(KEY, 1).await
            }
            ("GET", "/shared") => plugin_api::kv::get(KEY).await.map(|v| {
                v.and_then(|v| String::from_utf8(v).ok()?.parse().ok())
                    .unwrap_or(0)
            }),
            _ => {
                let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
                return Response::text(
                    200,
                    format!(
                        "request {n} on worker {} (pid {})\n",
                        self.worker,
                        std::process::id()
                    ),
                );
            }
        };
        match shared {
            Ok(n) => Response::text(200, format!("shared count {n}\n")),
            Err(e) => Response::text(503, format!("the shared count is unavailable: {e}\n")),
        }
    }
}

plugin_api::export_async_plugin!(Counter);

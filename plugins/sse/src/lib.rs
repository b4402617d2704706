//! sse: streamed responses.
//!
//! - `GET /events`: server-sent events, a `tick` every `every_ms` (default 200) until the
//!   worker drains; then a last `bye` event, and the stream ends. A browser's `EventSource`
//!   reconnects by itself, to a new worker after a reload.
//! - `GET /bytes?mb=N`: N MiB in 64 KiB chunks (chunked encoding), produced as fast as the
//!   client reads and no faster: `send` waits while the client is behind (backpressure).

use std::time::Duration;

use plugin_api::{AsyncPlugin, Context, Request, Response};

const CHUNK: usize = 64 * 1024;

/// The plugin: how often a tick goes out.
pub struct Sse {
    every: Duration,
}

impl AsyncPlugin for Sse {
    async fn on_start(ctx: &Context) -> Result<Self, plugin_api::Error> {
        let every = ctx
            .config("every_ms")
            .map(|ms| ms.parse::<u64>().map_err(|_| "every_ms must be a number"))
            .transpose()?
            .unwrap_or(200);
        Ok(Sse {
            every: Duration::from_millis(every),
        })
    }

    async fn handle(&self, req: Request) -> Response {
        match req.path() {
            "/events" => {
                let (response, events) = Response::sse();
                let every = self.every;
                // The stream is written by a task of the worker; the response goes out now.
                plugin_api::spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    let mut n = 0u64;
                    loop {
                        tokio::select! {
                            _ = tick.tick() => {
                                n += 1;
                                if events.send(Some("tick"), &n.to_string()).await.is_err() {
                                    return; // the client left
                                }
                            }
                            _ = plugin_api::shutdown() => {
                                let _ = events.send(Some("bye"), "reconnect").await;
                                return;
                            }
                        }
                    }
                });
                response
            }
            "/bytes" => {
                let mb: usize = req
                    .query_param("mb")
                    .and_then(|m| m.parse().ok())
                    .unwrap_or(1)
                    .min(4096);
                let (response, body) = Response::stream(200);
                plugin_api::spawn(async move {
                    let chunk = vec![b'x'; CHUNK];
                    for _ in 0..mb * (1024 * 1024 / CHUNK) {
                        if body.send(chunk.clone()).await.is_err() {
                            return;
                        }
                    }
                });
                response.with_header("content-type", "application/octet-stream")
            }
            _ => Response::text(404, "try /events or /bytes?mb=N\n"),
        }
    }
}

plugin_api::export_async_plugin!(Sse);

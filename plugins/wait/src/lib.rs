//! wait: an async plugin. `GET /wait?ms=N` awaits a timer for N ms (at most 60 s) and answers;
//! while it waits, it holds no thread, so one worker serves thousands of waiting requests.
//!
//! It also runs a background task, started in `on_start` with `plugin_api::spawn`: it counts
//! ticks, and when the worker drains (`plugin_api::shutdown`) it finishes its last piece of
//! work and logs it. The worker's stop waits for it. `GET /ticks` shows the count.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use plugin_api::{AsyncPlugin, Context, Request, Response};

const MAX_MS: u64 = 60_000;

/// The plugin: the tick count its background task keeps.
pub struct Wait {
    ticks: Arc<AtomicU64>,
}

impl AsyncPlugin for Wait {
    async fn on_start(ctx: &Context) -> Result<Self, plugin_api::Error> {
        let ticks = Arc::new(AtomicU64::new(0));
        let counted = ticks.clone();
        plugin_api::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = every.tick() => { counted.fetch_add(1, Ordering::Relaxed); }
                    _ = plugin_api::shutdown() => break,
                }
            }
            // Work that must not be cut: the worker waits for it before it exits.
            tokio::time::sleep(Duration::from_millis(300)).await;
            plugin_api::info!("background task finished after the drain");
        });
        plugin_api::info!("wait started as worker {}", ctx.worker_id());
        Ok(Wait { ticks })
    }

    async fn handle(&self, req: Request) -> Response {
        match req.path() {
            "/ticks" => Response::text(200, format!("{}\n", self.ticks.load(Ordering::Relaxed))),
            "/wait" => {
                let ms = match req.query_param("ms").map(str::parse::<u64>) {
                    None => 0,
                    Some(Ok(ms)) if ms <= MAX_MS => ms,
                    Some(_) => {
                        return Response::text(400, format!("ms must be from 0 to {MAX_MS}\n"))
                    }
                };
                if ms >= 500 {
                    plugin_api::info!("waiting {ms} ms");
                }
                // Dropped before the sleep ends: the host cancelled the request (its
                // handler_timeout, or the client went away), which drops this future.
                let mut cancelled = Cancelled { ms, ended: false };
                tokio::time::sleep(Duration::from_millis(ms)).await;
                cancelled.ended = true;
                Response::text(
                    200,
                    format!("waited {ms} ms in pid {}\n", std::process::id()),
                )
            }
            _ => Response::text(404, "try /wait?ms=N or /ticks\n"),
        }
    }

    async fn on_stop(&self) {
        plugin_api::info!(
            "wait stopping after {} ticks",
            self.ticks.load(Ordering::Relaxed)
        );
    }
}

/// Logs when a wait is dropped before it ended.
struct Cancelled {
    ms: u64,
    ended: bool,
}

impl Drop for Cancelled {
    fn drop(&mut self) {
        if !self.ended {
            plugin_api::info!("a wait of {} ms was cancelled before it ended", self.ms);
        }
    }
}

plugin_api::export_async_plugin!(Wait);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_and_answers() {
        let plugin = Wait {
            ticks: Arc::default(),
        };
        let resp = plugin.handle(Request::new("GET", "/wait?ms=10")).await;
        assert_eq!(resp.status(), 200);
        let resp = plugin.handle(Request::new("GET", "/wait?ms=x")).await;
        assert_eq!(resp.status(), 400);
    }
}

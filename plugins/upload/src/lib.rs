//! upload: `POST /upload` reads the request body as a stream, chunk by chunk, and answers with
//! its size and a checksum (FNV-1a), never holding more than a chunk: a body of gigabytes
//! passes in constant memory, up to the service's `max_stream_bytes`. The client sends the next
//! part only as the handler reads it.

use plugin_api::{AsyncPlugin, Context, Request, Response};

/// The plugin; it has no state.
pub struct Upload;

/// FNV-1a over a stream of chunks.
struct Fnv(u64);

impl Fnv {
    fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

impl AsyncPlugin for Upload {
    async fn on_start(_ctx: &Context) -> Result<Self, plugin_api::Error> {
        Ok(Upload)
    }

    async fn handle(&self, mut req: Request) -> Response {
        if (req.method(), req.path()) != ("POST", "/upload") {
            return Response::text(404, "POST /upload\n");
        }
        let mut size: u64 = 0;
        let mut sum = Fnv(0xcbf2_9ce4_8422_2325);
        loop {
            match req.chunk().await {
                Ok(Some(chunk)) => {
                    size += chunk.len() as u64;
                    sum.update(&chunk);
                }
                Ok(None) => break,
                // 413 past max_stream_bytes, 408 when the client stalls, 400 when it breaks off.
                Err(e) => return e.into(),
            }
        }
        plugin_api::info!("received {size} bytes");
        Response::text(
            200,
            format!("received {size} bytes, fnv1a {:016x}\n", sum.0),
        )
    }
}

plugin_api::export_async_plugin!(Upload);

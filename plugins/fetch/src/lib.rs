//! fetch: an async plugin that calls another HTTP service. `GET /fetch/PATH` asks the
//! service's `upstream` (from `[service.config]`, e.g. `"http://127.0.0.1:8081"`) for `/PATH`
//! and answers with the upstream's status and body.
//!
//! The client is hyper's pooled client (hyper-util), made once in `on_start` and shared by
//! every request: connections are kept alive between calls. It runs on the plugin's own
//! runtime, so its sockets and timers work as in any tokio program. For HTTPS upstreams add
//! `hyper-rustls` (with ring) as the connector, or use reqwest with `rustls-tls`.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use plugin_api::{AsyncPlugin, Context, Request, Response};

/// An upstream that takes longer than this is a 504.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// The plugin: the upstream's base URL and a pooled client.
pub struct Fetch {
    upstream: String,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl AsyncPlugin for Fetch {
    async fn on_start(ctx: &Context) -> Result<Self, plugin_api::Error> {
        let upstream = ctx
            .config("upstream")
            .ok_or("set upstream = \"http://HOST:PORT\" in the service's [service.config]")?
            .trim_end_matches('/')
            .to_string();
        if !upstream.starts_with("http://") {
            return Err(format!("upstream {upstream:?} must start with http://").into());
        }
        let client = Client::builder(TokioExecutor::new()).build_http();
        Ok(Fetch { upstream, client })
    }

    async fn handle(&self, req: Request) -> Response {
        let Some(path) = req.path().strip_prefix("/fetch") else {
            return Response::text(404, "try /fetch/PATH\n");
        };
        let uri = format!("{}{path}", self.upstream);
        let uri = match uri.parse::<hyper::Uri>() {
            Ok(uri) => uri,
            Err(e) => return Response::text(400, format!("bad path: {e}\n")),
        };
        let call = async {
            let response = self.client.get(uri).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
        };
        match tokio::time::timeout(UPSTREAM_TIMEOUT, call).await {
            Ok(Ok((status, body))) => Response::new(200)
                .with_header("content-type", "text/plain; charset=utf-8")
                .with_body(format!(
                    "upstream said {status}: {}",
                    String::from_utf8_lossy(&body)
                )),
            Ok(Err(e)) => Response::text(502, format!("the upstream failed: {e}\n")),
            Err(_) => Response::text(504, "the upstream did not answer in time\n"),
        }
    }
}

use plugin_api::tokio;

plugin_api::export_async_plugin!(Fetch);

//! The admin listener's routes (docs/operations.md is their reference):
//!
//! - `GET /`, `/admin.js`, `/admin.css`: the page (`admin::page`);
//! - `GET /livez`, `/readyz`, `/metrics`: for probes and Prometheus, without a token;
//! - `GET /api/status|history|series`: JSON;
//! - `POST /api/reload|rollback|upgrade|stop`: newline-delimited JSON, one line per progress
//!   event as `host reload` prints them, then the outcome.
//!
//! Every `/api/` route needs the bearer token, reads included (they show pids, paths and
//! versions); the token is judged before anything else, so a client without it learns nothing,
//! not even which routes exist. The operations are the CLI's: the same job queue
//! (`Master::submit`), the same stop.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{channel::Channel, combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::Incoming;
use serde::Serialize;
use tokio::sync::mpsc;

use super::{page, Admin};
use crate::{
    master::{Master, Op},
    protocol::ControlReply,
};

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

pub async fn route(
    admin: &Admin,
    master: &Arc<Master>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let get = method == Method::GET || method == Method::HEAD;
    if let Some(name) = path.strip_prefix("/api/") {
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        let accepted = admin.token.read().unwrap().accepts(token);
        let what = format!("{method} {path}");
        if !admin.guard.judge(peer.ip(), accepted, &what).await {
            let mut response = text(StatusCode::UNAUTHORIZED, "unauthorized\n");
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
        let query = Query::parse(req.uri().query());
        let asker = format!("admin API ({peer})");
        return match (name, get, method == Method::POST) {
            ("status", true, _) => json(StatusCode::OK, &master.status().await),
            ("history", true, _) => json(StatusCode::OK, &master.history_report()),
            ("series", true, _) => json(StatusCode::OK, &series(master)),
            ("reload", _, true) => operation(master, Op::Reload(query.all("service")), &asker),
            ("rollback", _, true) => operation(
                master,
                Op::Rollback {
                    service: query.one("service"),
                    to: query.one("to"),
                },
                &asker,
            ),
            ("upgrade", _, true) => upgrade(admin, master, query.one("exe"), &asker),
            ("stop", _, true) => stop(master, &asker),
            ("status" | "history" | "series", false, _) => not_allowed("GET"),
            ("reload" | "rollback" | "upgrade" | "stop", _, false) => not_allowed("POST"),
            _ => text(StatusCode::NOT_FOUND, "no such API route\n"),
        };
    }
    if !get {
        return not_allowed("GET");
    }
    match path.as_str() {
        "/livez" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match master.readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => {
            let body = master.metrics.encode(&master.metrics_view());
            let mut response = Response::new(full(body));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        _ => match page::asset(&path) {
            Some((content_type, body)) => {
                let mut response = Response::new(full(body));
                let headers = response.headers_mut();
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
                page::harden(headers);
                response
            }
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        },
    }
}

/// The query string's parameters.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>) -> Query {
        Query(
            form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    fn one(&self, key: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, v)| k == key && !v.is_empty())
            .map(|(_, v)| v.clone())
    }

    fn all(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, v)| k == key && !v.is_empty())
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// A queued operation, its progress streamed as it comes.
fn operation(master: &Master, op: Op, asker: &str) -> Response<Body> {
    let (tx, rx) = mpsc::unbounded_channel();
    // The job queue runs it, so it completes even if this client goes away.
    master.submit(op, asker, Some(tx));
    stream(rx)
}

fn upgrade(admin: &Admin, master: &Master, exe: Option<String>, asker: &str) -> Response<Body> {
    let exe = match exe {
        None => None,
        Some(_) if !admin.allow_upgrade_exe() => {
            return text(
                StatusCode::FORBIDDEN,
                "upgrading to another executable runs a program of the caller's choosing, so \
                 the admin API refuses ?exe= unless [admin] has allow_upgrade_exe = true. Leave \
                 exe out to start the executable the master was started from, or use `host \
                 upgrade --exe PATH` on the machine.\n",
            )
        }
        Some(exe) if !exe.starts_with('/') => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("exe must be an absolute path, not {exe:?}\n"),
            )
        }
        Some(exe) => Some(exe.into()),
    };
    operation(master, Op::Upgrade(exe), asker)
}

fn stop(master: &Master, asker: &str) -> Response<Body> {
    tracing::info!("{asker}: stopping");
    let (tx, rx) = mpsc::unbounded_channel();
    master.request_stop(tx);
    stream(rx)
}

/// Streams replies as newline-delimited JSON until the outcome.
fn stream(mut replies: mpsc::UnboundedReceiver<ControlReply>) -> Response<Body> {
    let (mut body_tx, body) = Channel::<Bytes, Infallible>::new(16);
    tokio::spawn(async move {
        while let Some(reply) = replies.recv().await {
            let last = matches!(reply, ControlReply::Done { .. } | ControlReply::Error(_));
            let mut line = serde_json::to_vec(&Event::from(reply)).expect("serializes");
            line.push(b'\n');
            if body_tx.send_data(Bytes::from(line)).await.is_err() || last {
                break;
            }
        }
    });
    let mut response = Response::new(body.boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// One line of an operation's stream.
#[derive(Serialize)]
#[serde(untagged)]
enum Event {
    Progress {
        line: String,
    },
    Outcome {
        done: bool,
        ok: bool,
        summary: String,
    },
}

impl From<ControlReply> for Event {
    fn from(reply: ControlReply) -> Event {
        match reply {
            ControlReply::Line(line) => Event::Progress { line },
            ControlReply::Done { ok, summary } => Event::Outcome {
                done: true,
                ok,
                summary,
            },
            ControlReply::Error(summary) => Event::Outcome {
                done: true,
                ok: false,
                summary,
            },
            ControlReply::Status(_) => Event::Progress {
                line: "status".into(),
            },
        }
    }
}

#[derive(Serialize)]
struct Series {
    /// The master's clock (seconds since the Unix epoch), for the chart's right edge.
    now: u64,
    /// Seconds between two points.
    interval_s: u64,
    services: std::collections::HashMap<String, Vec<super::metrics::Point>>,
    /// The reloads and rollbacks of the charted window, for markers.
    events: Vec<crate::protocol::RolloutEvent>,
}

fn series(master: &Master) -> Series {
    let services = master.metrics.series();
    let since = services
        .values()
        .filter_map(|points| points.first().map(|p| p.t))
        .min()
        .unwrap_or(u64::MAX);
    Series {
        now: crate::protocol::epoch_secs(std::time::SystemTime::now()),
        interval_s: super::metrics::SAMPLE_EVERY.as_secs(),
        services,
        events: master
            .rollout_events()
            .into_iter()
            .filter(|e| e.at >= since)
            .collect(),
    }
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed_unsync()
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let mut body = serde_json::to_vec(value).expect("serializes");
    body.push(b'\n');
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut response = Response::new(full(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("this route answers {allow} only\n"),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

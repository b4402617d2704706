//! Streamed bodies with async plugins: a 2 GiB upload streamed from the client passes through
//! a worker that stays under 64 MiB; `max_stream_bytes` cuts a longer one; a streamed response
//! is produced no faster than the client reads; a server-sent event stream ends cleanly when
//! its worker drains.

use std::{
    fs,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
    thread,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{
    body::{Body, Frame, SizeHint},
    client::conn::http1,
};
use hyper_util::rt::TokioIo;

use crate::harness::{dir_with_config, Host};

const MIB: u64 = 1024 * 1024;
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// A request body of `left` zero bytes, made as it is sent (64 KiB frames of one static
/// buffer): the client holds none of it in memory.
struct Zeros {
    left: u64,
}

impl Body for Zeros {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(ZEROS.len() as u64);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            &ZEROS[..n as usize],
        )))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

fn rss_bytes(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Samples `pid`'s resident memory until the returned flag is set; join for the peak.
fn watch_rss(pid: u32) -> (Arc<AtomicBool>, thread::JoinHandle<u64>) {
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let sampler = thread::spawn(move || {
        let mut peak = 0;
        while !flag.load(Ordering::Relaxed) {
            peak = peak.max(rss_bytes(pid));
            thread::sleep(Duration::from_millis(20));
        }
        peak
    });
    (done, sampler)
}

/// POSTs `size` zero bytes to `/upload`, streamed; returns status and body.
fn upload(addr: &str, size: u64) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = http1::handshake(TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::post("/upload")
            .header("host", addr)
            .body(Zeros { left: size })
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    })
}

#[test]
fn a_2_gib_upload_streams_through_a_worker_under_64_mib() {
    let host = Host::serving("upload", 1, &[]);
    let addr = host.addr("plugin");
    let pid = host.ready_pids("plugin")[0];
    let (done, sampler) = watch_rss(pid);
    let started = Instant::now();
    let (status, body) = upload(&addr, 2048 * MIB);
    done.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    eprintln!(
        "2 GiB upload: {status} in {:?}, worker RSS peak {} MiB",
        started.elapsed(),
        peak / MIB
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("received 2147483648 bytes"), "{body}");
    assert!(peak < 64 * MIB, "worker RSS peaked at {} MiB", peak / MIB);
}

#[test]
fn max_stream_bytes_cuts_a_longer_stream_with_a_413() {
    let config = r#"
        [[service]]
        name = "upload"
        listen = ["127.0.0.1:0"]
        plugin = "plugin.so"
        workers = 1
        max_stream_bytes = "1MiB"
    "#;
    let host = Host::start(
        dir_with_config(config, &[("plugin.so", "upload")]),
        &["--config", "host.toml"],
    );
    let addr = host.addr("upload");
    let (status, body) = upload(&addr, MIB);
    assert_eq!(status, 200, "{body}");
    // Declared longer than the limit: refused before the plugin is called. The client sends its
    // body anyway (it does not ask `Expect: 100-continue`), far more than the sockets' buffers
    // hold: it must still read the 413, not a reset.
    for _ in 0..3 {
        let (status, body) = upload(&addr, 16 * MIB);
        assert_eq!(status, 413, "{body}");
        assert!(body.contains("max_stream_bytes"), "{body}");
    }
}

#[test]
fn a_sync_plugin_s_client_over_max_body_bytes_reads_its_413_not_a_reset() {
    let host = crate::rollout::start("echo", 1, "max_body_bytes = \"1MiB\"");
    let addr = host.addr("web");
    for _ in 0..3 {
        let (status, body) = upload(&addr, 16 * MIB);
        assert_eq!(status, 413, "{body}");
    }
}

#[test]
fn a_streamed_response_waits_for_a_slow_client() {
    let host = Host::serving("sse", 1, &[]);
    let addr = host.addr("plugin");
    let pid = host.ready_pids("plugin")[0];
    let (done, sampler) = watch_rss(pid);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let received = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (mut sender, conn) = http1::handshake(TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get("/bytes?mb=512")
            .header("host", &addr)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["transfer-encoding"], "chunked");
        let mut body = resp.into_body();
        let mut received: u64 = 0;
        // Stop reading for a while: the plugin must wait, not buffer 512 MiB.
        tokio::time::sleep(Duration::from_millis(500)).await;
        while let Some(frame) = body.frame().await {
            received += frame.unwrap().into_data().map_or(0, |d| d.len() as u64);
        }
        received
    });
    done.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    eprintln!(
        "512 MiB streamed response: worker RSS peak {} MiB",
        peak / MIB
    );
    assert_eq!(received, 512 * MIB);
    assert!(peak < 64 * MIB, "worker RSS peaked at {} MiB", peak / MIB);
}

#[test]
fn an_event_stream_ends_cleanly_when_its_worker_drains_on_reload() {
    let host = Host::serving("sse", 1, &[]);
    let addr = host.addr("plugin");
    let (events_tx, events_rx) = std::sync::mpsc::channel::<String>();
    let reader = {
        let addr = addr.clone();
        thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
                let (mut sender, conn) = http1::handshake(TokioIo::new(tcp)).await.unwrap();
                tokio::spawn(conn);
                let req = hyper::Request::get("/events")
                    .header("host", &addr)
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let resp = sender.send_request(req).await.unwrap();
                assert_eq!(resp.headers()["content-type"], "text/event-stream");
                let mut body = resp.into_body();
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|e| e.to_string())?;
                    if let Some(data) = frame.data_ref() {
                        let _ = events_tx.send(String::from_utf8_lossy(data).into_owned());
                    }
                }
                Ok::<(), String>(())
            })
        })
    };
    // Two ticks arrive, then the reload drains the worker that serves the stream.
    for _ in 0..2 {
        let event = events_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(event.starts_with("event: tick\n"), "{event}");
    }
    let started = Instant::now();
    host.reload_ok();
    let rest: Vec<String> = events_rx.iter().collect();
    let ended = reader.join().unwrap();
    assert_eq!(ended, Ok(()), "the stream ended cleanly, not cut");
    assert!(
        rest.last()
            .is_some_and(|e| e == "event: bye\ndata: reconnect\n\n"),
        "{rest:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the drain did not wait for its timeout"
    );
}

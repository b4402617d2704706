//! Allocations per request: a regression guard in `cargo test`, not a benchmark.
//!
//! A worker's request path is served in-process, as a worker serves it: a [`Shared`] with a
//! plugin built from plugin-api's glue (the same `extern "C"` entry points a plugin library
//! exports, so the plugin's own allocations on the host's thread count too), `http::serve` on a
//! listener at 127.0.0.1, a current-thread tokio runtime (so every task of the host runs on the
//! test's thread), and a keep-alive client on a real loopback connection that writes and reads
//! raw bytes without allocating. After a warm-up (first-request buffers, lazily made state), the
//! heap allocations made on the test's thread while [`REQUESTS`] identical requests are served
//! are counted and divided; each case fails when its count per request goes over its ceiling.
//!
//! The count is exact and the same from run to run: a counting `#[global_allocator]` (in this
//! crate's unit-test binary only) counts per thread, and only while a measurement is on, so the
//! other tests running in parallel add nothing. What the plugin's own runtime threads allocate
//! (the async case: the handler runs there) and the access log's writer thread are not counted;
//! what the request hands them is.
//!
//! Where the allocations come from: `ALLOC_BACKTRACES=1 cargo test -p host --lib alloc_count --
//! --nocapture --test-threads=1` prints a backtrace of every allocation of one request per
//! case (docs/benchmarks.md has the breakdown).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    backtrace::Backtrace,
    cell::{Cell, RefCell},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64},
        Arc, OnceLock,
    },
    time::{Duration, Instant, SystemTime},
};

use plugin_api::{ffi::PluginModRef, AsyncPlugin, Context, Request, Response};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{oneshot, watch},
};

use super::{
    access_log::AccessLog,
    http::{self, Shared},
    link::Link,
    plugin::Plugin,
};
use crate::{config::AccessLogFormat, protocol::WorkerSpec};

/// Requests served before counting starts.
const WARM_UP: usize = 20;
/// Requests counted.
const REQUESTS: u64 = 100;

// The ceilings: allocations per request, as measured when each was set (the count is exact;
// there is no margin). Raise one only on purpose, with the reason in the commit message.

/// HTTP/1.1 keep-alive GET, sync handler called inline (`BLOCKING = false`), no access log.
const CEILING_H1_INLINE: f64 = 7.0;
/// The same over HTTP/2 (h2c, prior knowledge): 15 each (h2's HPACK table no longer grows: the
/// `x-request-id` value, new on every request, is marked sensitive, never indexed). One of the
/// 15 is the response's boxed future (`exchange::Exchange::Later`): HTTP/2
/// requests are not answered within the service call, which hyper makes inside the
/// connection's poll (the streams would run one at a time).
const CEILING_H2_INLINE: f64 = 15.0;
/// HTTP/1.1 inline with the access log on, JSON lines.
const CEILING_H1_INLINE_LOG_JSON: f64 = 8.0;
/// HTTP/1.1 inline with the access log on, combined format.
const CEILING_H1_INLINE_LOG_COMBINED: f64 = 10.0;
/// HTTP/1.1 with an async handler, which plugin-api polls on the host's thread (so its
/// allocations count here too): the inline case's, plus the FFI future (the handler's future
/// is held inside it, with the request id the handler logs with). The handler answers in the
/// first poll, which the host makes within hyper's call of the service, so the response needs
/// no boxed future of its own and hyper reuses its read buffer in place, as for the inline case.
const CEILING_H1_ASYNC: f64 = 8.0;
/// The same with a handler that is not done at its first poll (it yields once): 4 more. The
/// response is a boxed future of the host's (`exchange::Exchange::Later`), polled again at
/// once with its task's waker; hyper reserves its read buffer again (2) while the request
/// lives on in that future; and the waker the handler keeps to be woken is a clone across the
/// boundary (async-ffi boxes it).
const CEILING_H1_ASYNC_WAITING: f64 = 12.0;

// ---------------------------------------------------------------------------------------------
// The counting allocator.

/// The system allocator, counting the allocations of threads that asked for it.
struct Counting;

#[global_allocator]
static COUNTING: Counting = Counting;

thread_local! {
    /// Whether this thread's allocations are counted now.
    static ON: Cell<bool> = const { Cell::new(false) };
    /// New blocks (`alloc`, `alloc_zeroed`) while on.
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    /// `realloc` calls while on (reported, not part of the ceilings: how often a growing buffer
    /// moves can depend on the length of the worker's pid in the request id).
    static REALLOCS: Cell<u64> = const { Cell::new(0) };
    /// Keep a backtrace of each counted allocation (`ALLOC_BACKTRACES`).
    static TRACING: Cell<bool> = const { Cell::new(false) };
    static TRACES: RefCell<Vec<(&'static str, Backtrace)>> = const { RefCell::new(Vec::new()) };
}

fn note(kind: &'static str) {
    // `try_with`: never panic in the allocator, even while the thread's locals are torn down.
    let _ = ON.try_with(|on| {
        if !on.get() {
            return;
        }
        let counter = if kind == "realloc" {
            &REALLOCS
        } else {
            &ALLOCS
        };
        let _ = counter.try_with(|n| n.set(n.get() + 1));
        if TRACING.try_with(Cell::get).unwrap_or(false) {
            // Capturing and keeping the backtrace allocates: not counted.
            on.set(false);
            let trace = Backtrace::force_capture();
            let _ = TRACES.try_with(|t| t.borrow_mut().push((kind, trace)));
            on.set(true);
        }
    });
}

// SAFETY: every call is passed to the system allocator unchanged; `note` only touches
// thread-locals that need no allocation (const-initialized `Cell`s), or allocates with
// counting off (the backtraces), which does not recurse into `note`'s work.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note("alloc");
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note("alloc");
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note("realloc");
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

/// What this thread allocated while `f` ran: (allocations, reallocations).
async fn count<F: std::future::Future>(f: F) -> (u64, u64) {
    let before = (ALLOCS.with(Cell::get), REALLOCS.with(Cell::get));
    ON.with(|on| on.set(true));
    f.await;
    ON.with(|on| on.set(false));
    (
        ALLOCS.with(Cell::get) - before.0,
        REALLOCS.with(Cell::get) - before.1,
    )
}

// ---------------------------------------------------------------------------------------------
// The plugin: hello's handler, as a sync plugin that never blocks and as an async one. One type
// for both, since plugin-api's glue keeps one started instance per process.

struct Hello {
    greeting: String,
}

impl plugin_api::Plugin for Hello {
    const BLOCKING: bool = false;

    fn on_start(_: &Context) -> Result<Self, plugin_api::Error> {
        Ok(Hello {
            greeting: "Hello".into(),
        })
    }

    fn handle(&self, _req: &Request) -> Response {
        Response::text(200, format!("{} from hello v1\n", self.greeting))
    }
}

impl AsyncPlugin for Hello {
    async fn on_start(ctx: &Context) -> Result<Self, plugin_api::Error> {
        <Hello as plugin_api::Plugin>::on_start(ctx)
    }

    async fn handle(&self, req: Request) -> Response {
        if req.path() == WAIT_PATH {
            // Pending once (its wake-up goes to the first poll's waker), ready at the next poll.
            tokio::task::yield_now().await;
        }
        plugin_api::Plugin::handle(self, &req)
    }
}

#[derive(Clone, Copy, Debug)]
enum Handler {
    Inline,
    Async,
    /// Async, on a path where the handler is not done at its first poll.
    AsyncWaiting,
}

fn plugin(handler: Handler) -> Plugin {
    static INLINE: OnceLock<PluginModRef> = OnceLock::new();
    static ASYNC: OnceLock<PluginModRef> = OnceLock::new();
    static STARTED: OnceLock<()> = OnceLock::new();
    let inline =
        *INLINE.get_or_init(|| plugin_api::__private::root_module::<Hello>("alloc-count", "0.0.0"));
    let asynchronous = *ASYNC
        .get_or_init(|| plugin_api::__private::async_root_module::<Hello>("alloc-count", "0.0.0"));
    STARTED.get_or_init(|| {
        // Either module's start keeps the one instance both modules' handlers look up. The
        // start installs the plugin's panic hook, which in a library of its own replaces only
        // the plugin's copy of std's hook, but here the test binary's: put that one back, or a
        // failing test's message would go to the (absent) worker log.
        let hook = std::panic::take_hook();
        let started = (inline.start())(super::plugin::context(&spec(None)));
        std::panic::set_hook(hook);
        assert!(started.is_ok(), "the test plugin did not start");
    });
    Plugin::Current(match handler {
        Handler::Inline => inline,
        Handler::Async | Handler::AsyncWaiting => asynchronous,
    })
}

fn spec(access_log: Option<AccessLogFormat>) -> WorkerSpec {
    WorkerSpec {
        role: Default::default(),
        service: "alloc-count".into(),
        slot: 0,
        plugin_path: "alloc-count.so".into(),
        plugin_source: "alloc-count.so".into(),
        plugin_version: "3879408".into(),
        listen: vec!["127.0.0.1:0".into()],
        config_toml: String::new(),
        config: vec![],
        max_body_bytes: 1 << 20,
        max_stream_bytes: 1 << 30,
        idle_grace_ms: 1000,
        drain_timeout_ms: 30_000,
        heartbeat_ms: 1000,
        handler_timeout_ms: 60_000,
        max_requests: 0,
        header_timeout_ms: 30_000,
        body_timeout_ms: 30_000,
        keepalive_timeout_ms: 75_000,
        max_connections: 10_000,
        run_as: None,
        tls: None,
        host_routes: true,
        access_log,
        balance_fd: None,
        master_pid: std::process::id(),
        check_only: false,
    }
}

fn shared(handler: Handler, access_log: Option<AccessLogFormat>) -> Arc<Shared> {
    let (draining, _) = watch::channel(false);
    let (close_idle, _) = watch::channel(false);
    let (link, _master) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    Arc::new(Shared {
        plugin: plugin(handler),
        spec: spec(access_log),
        toward_max_requests: AtomicU64::new(0),
        connections: AtomicU64::new(0),
        connection_slots: Arc::new(tokio::sync::Semaphore::new(10_000)),
        draining,
        draining_now: AtomicBool::new(false),
        close_idle,
        started: Instant::now(),
        warned_inline: AtomicBool::new(false),
        replacement_asked: AtomicBool::new(false),
        link: Link::unregistered(link),
        tls: None,
        stats: Default::default(),
        access_log: access_log.map(|format| {
            AccessLog::start(tempfile::tempfile().expect("a temporary file"), format)
        }),
        balance: None,
    })
}

// ---------------------------------------------------------------------------------------------
// The clients: raw bytes on one keep-alive connection, read into a buffer on the stack.

const PATH: &str = "/alloc-count";
/// Where the async handler waits once (HTTP/1.1 only).
const WAIT_PATH: &str = "/alloc-count-wait";
const BODY: &[u8] = b"Hello from hello v1\n";

struct Client {
    stream: TcpStream,
    buf: [u8; 32 * 1024],
    filled: usize,
    h2: bool,
    /// HTTP/1.1 to [`WAIT_PATH`] rather than [`PATH`].
    wait: bool,
    /// The next HTTP/2 stream id.
    next_stream: u32,
}

impl Client {
    async fn connect(addr: SocketAddr, h2: bool, wait: bool) -> Client {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let mut client = Client {
            stream,
            buf: [0; 32 * 1024],
            filled: 0,
            h2,
            wait,
            next_stream: 1,
        };
        if h2 {
            let mut start = [0u8; 24 + 9 + 13];
            start[..24].copy_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
            // An empty SETTINGS, then a connection window large enough for every response.
            start[24..33].copy_from_slice(&frame_head(0, 0x4, 0, 0));
            start[33..42].copy_from_slice(&frame_head(4, 0x8, 0, 0));
            start[42..].copy_from_slice(&0x3fff_0000u32.to_be_bytes());
            client.stream.write_all(&start).await.expect("write");
        }
        client
    }

    /// One GET, and its whole response (checked: a 200 with hello's body).
    async fn get(&mut self) {
        if self.h2 {
            self.get_h2().await
        } else {
            self.get_h1().await
        }
    }

    async fn get_h1(&mut self) {
        // Each in one write, as a client sends a small request.
        let request: &[u8] = if self.wait {
            b"GET /alloc-count-wait HTTP/1.1\r\nhost: localhost\r\n\
              user-agent: alloc-count\r\naccept: */*\r\n\r\n"
        } else {
            b"GET /alloc-count HTTP/1.1\r\nhost: localhost\r\n\
              user-agent: alloc-count\r\naccept: */*\r\n\r\n"
        };
        self.stream.write_all(request).await.expect("write");
        loop {
            self.read().await;
            let data = &self.buf[..self.filled];
            let Some(head) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head_len = head + 4;
            let length = content_length(&data[..head]);
            if data.len() < head_len + length {
                continue;
            }
            assert!(data.starts_with(b"HTTP/1.1 200 "), "{}", lossy(data));
            assert_eq!(&data[head_len..], BODY, "{}", lossy(data));
            self.filled = 0;
            return;
        }
    }

    async fn get_h2(&mut self) {
        let stream_id = self.next_stream;
        self.next_stream += 2;
        // HPACK: :method GET, :scheme http (static table), then literals without indexing
        // with the name from the static table (:path 4, :authority 1, user-agent 58,
        // accept 19).
        let mut block = [0u8; 64];
        let mut n = 0;
        for part in [
            &[0x82, 0x86, 0x04, PATH.len() as u8][..],
            PATH.as_bytes(),
            &[0x01, 9],
            b"localhost",
            &[0x0f, 58 - 15, 11],
            b"alloc-count",
            &[0x0f, 19 - 15, 3],
            b"*/*",
        ] {
            block[n..n + part.len()].copy_from_slice(part);
            n += part.len();
        }
        let mut frame = [0u8; 9 + 64];
        // END_STREAM | END_HEADERS
        frame[..9].copy_from_slice(&frame_head(n, 0x1, 0x5, stream_id));
        frame[9..9 + n].copy_from_slice(&block[..n]);
        self.stream.write_all(&frame[..9 + n]).await.expect("write");
        let mut status_ok = false;
        loop {
            while self.filled >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.filled < 9 + len {
                    break;
                }
                let (kind, flags) = (self.buf[3], self.buf[4]);
                let id = u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]]);
                let payload = &self.buf[9..9 + len];
                let mut done = false;
                match kind {
                    // SETTINGS: acknowledged.
                    0x4 if flags & 0x1 == 0 => {
                        self.stream
                            .write_all(&frame_head(0, 0x4, 0x1, 0))
                            .await
                            .expect("write");
                    }
                    // HEADERS of our stream: :status 200 is static entry 8.
                    0x1 if id == stream_id => {
                        status_ok = payload.first() == Some(&0x88);
                        done = flags & 0x1 != 0;
                    }
                    0x0 if id == stream_id => {
                        assert_eq!(payload, BODY);
                        done = flags & 0x1 != 0;
                    }
                    // RST_STREAM, GOAWAY
                    0x3 | 0x7 => panic!("the server ended the stream or the connection ({kind})"),
                    _ => {}
                }
                self.buf.copy_within(9 + len..self.filled, 0);
                self.filled -= 9 + len;
                if done {
                    assert!(status_ok, "the response's status was not 200");
                    assert_eq!(self.filled, 0, "more frames than expected");
                    return;
                }
            }
            self.read().await;
        }
    }

    async fn read(&mut self) {
        let n = self
            .stream
            .read(&mut self.buf[self.filled..])
            .await
            .expect("read");
        assert!(n > 0, "the server closed the connection");
        self.filled += n;
    }
}

fn frame_head(len: usize, kind: u8, flags: u8, stream: u32) -> [u8; 9] {
    let len = (len as u32).to_be_bytes();
    let stream = stream.to_be_bytes();
    [
        len[1], len[2], len[3], kind, flags, stream[0], stream[1], stream[2], stream[3],
    ]
}

fn content_length(head: &[u8]) -> usize {
    head.split(|b| *b == b'\n')
        .find_map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let colon = line.iter().position(|b| *b == b':')?;
            let (name, value) = line.split_at(colon);
            name.eq_ignore_ascii_case(b"content-length").then(|| {
                std::str::from_utf8(&value[1..])
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .expect("a content-length")
            })
        })
        .expect("a content-length")
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ---------------------------------------------------------------------------------------------
// The cases.

struct Case {
    name: &'static str,
    handler: Handler,
    h2: bool,
    access_log: Option<AccessLogFormat>,
    /// Allocations per request.
    ceiling: f64,
}

/// What one measurement counted.
struct Counted {
    allocs: u64,
    reallocs: u64,
    /// Wall-clock seconds that began during the counted requests (see [`measure`]).
    new_seconds: u64,
}

/// Serves the case's requests and counts the allocations of [`REQUESTS`] of them.
///
/// hyper keeps the `Date` header it sends in a per-thread cache and renders it again at the
/// first response of each wall-clock second, which allocates (once; HTTP/2 also promotes the
/// new value to a shared one on its first use: twice). So that this depends on the request
/// rate in no way, the counted requests start just after a second began, with the cache
/// refreshed by the last warm-up request; each second that still begins during them (a very
/// slow machine) is allowed its [`DATE_RENDER`] allocations.
fn measure(case: &Case) -> Counted {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let shared = shared(case.handler, case.access_log);
    let traced = std::env::var_os("ALLOC_BACKTRACES").is_some();
    runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local_addr");
        let (stopped_tx, _stopped_rx) = oneshot::channel();
        tokio::spawn(http::serve(vec![listener], shared.clone(), stopped_tx));
        let wait = matches!(case.handler, Handler::AsyncWaiting);
        let mut client = Client::connect(addr, case.h2, wait).await;
        for _ in 1..WARM_UP {
            client.get().await;
        }
        let into_second = unix_time().subsec_nanos() as u64;
        tokio::time::sleep(Duration::from_nanos(
            1_000_000_000 - into_second + 1_000_000,
        ))
        .await;
        let first_second = unix_time().as_secs();
        client.get().await;
        let (allocs, reallocs) = count(async {
            for _ in 0..REQUESTS {
                client.get().await;
            }
        })
        .await;
        let new_seconds = unix_time().as_secs().saturating_sub(first_second);
        if traced {
            TRACING.with(|t| t.set(true));
            let (allocs, reallocs) = count(client.get()).await;
            TRACING.with(|t| t.set(false));
            let traces = TRACES.with(|t| std::mem::take(&mut *t.borrow_mut()));
            eprintln!(
                "{}: {allocs} allocations and {reallocs} reallocations in one request:",
                case.name
            );
            for (i, (kind, trace)) in traces.iter().enumerate() {
                eprintln!("--- {} #{i}: {kind}\n{trace}", case.name);
            }
        }
        Counted {
            allocs,
            reallocs,
            new_seconds,
        }
    })
}

/// Allocations each new wall-clock second may add (hyper's cached `Date`; see [`measure`]).
const DATE_RENDER: u64 = 2;

fn unix_time() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

fn check(case: Case) {
    let Counted {
        allocs,
        reallocs,
        new_seconds,
    } = measure(&case);
    let per_request = allocs as f64 / REQUESTS as f64;
    let ceiling = (case.ceiling * REQUESTS as f64).round() as u64;
    let allowed = ceiling + new_seconds * DATE_RENDER;
    println!(
        "{}: {per_request} allocations per request ({allocs} over {REQUESTS} requests; \
         {reallocs} reallocations); ceiling {}{}",
        case.name,
        case.ceiling,
        match new_seconds {
            0 => String::new(),
            n => format!(
                " (+{} for the {n} second(s) that began meanwhile)",
                n * DATE_RENDER
            ),
        }
    );
    assert!(
        allocs <= allowed,
        "{name}: the host's request path now makes {per_request} heap allocations per request, \
         more than this case's ceiling of {ceiling} (counted exactly over {REQUESTS} identical \
         keep-alive requests after a warm-up, on the serving thread only: this is not noise, the \
         count is the same on every run). A change added allocations to the path every request \
         takes. Find them (`ALLOC_BACKTRACES=1 cargo test -p host --lib alloc_count -- \
         --nocapture --test-threads=1` prints a backtrace of each allocation of one request) and \
         remove the new ones if they can go; if they are worth their cost, raise the ceiling in \
         host/src/worker/alloc_count.rs on purpose, with the reason in the commit message, and \
         update docs/benchmarks.md.",
        name = case.name,
        ceiling = case.ceiling,
    );
    if allocs + REQUESTS <= ceiling {
        println!(
            "{}: at least one allocation per request under the ceiling: lower it to \
             {per_request} to keep the guard tight",
            case.name
        );
    }
}

#[test]
fn allocations_per_request_http1_inline() {
    check(Case {
        name: "HTTP/1.1, inline handler",
        handler: Handler::Inline,
        h2: false,
        access_log: None,
        ceiling: CEILING_H1_INLINE,
    })
}

#[test]
fn allocations_per_request_http2_inline() {
    check(Case {
        name: "HTTP/2, inline handler",
        handler: Handler::Inline,
        h2: true,
        access_log: None,
        ceiling: CEILING_H2_INLINE,
    })
}

#[test]
fn allocations_per_request_http1_inline_access_log_json() {
    check(Case {
        name: "HTTP/1.1, inline handler, access log (json)",
        handler: Handler::Inline,
        h2: false,
        access_log: Some(AccessLogFormat::Json),
        ceiling: CEILING_H1_INLINE_LOG_JSON,
    })
}

#[test]
fn allocations_per_request_http1_inline_access_log_combined() {
    check(Case {
        name: "HTTP/1.1, inline handler, access log (combined)",
        handler: Handler::Inline,
        h2: false,
        access_log: Some(AccessLogFormat::Combined),
        ceiling: CEILING_H1_INLINE_LOG_COMBINED,
    })
}

#[test]
fn allocations_per_request_http1_async_waiting() {
    check(Case {
        name: "HTTP/1.1, async handler that waits",
        handler: Handler::AsyncWaiting,
        h2: false,
        access_log: None,
        ceiling: CEILING_H1_ASYNC_WAITING,
    })
}

#[test]
fn allocations_per_request_http1_async() {
    check(Case {
        name: "HTTP/1.1, async handler",
        handler: Handler::Async,
        h2: false,
        access_log: None,
        ceiling: CEILING_H1_ASYNC,
    })
}

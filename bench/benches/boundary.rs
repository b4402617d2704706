//! Plugin boundary cost: one request through the plugin ABI (the FFI request passed in, the
//! panic guard, the response converted to FFI types and back out), against a direct call of the
//! same handler linked statically. Run: `cargo bench -p bench --bench boundary` (the suite runs
//! it as one of its figures).
//!
//! Criterion times both sides in rounds, interleaved: ABI round 1, direct round 1, ABI round 2,
//! ... so that the ratio is taken per round, like every other figure. A round's time per call
//! is the total of every timed batch criterion ran in it (warm-up included) divided by the calls.
//!
//! Environment (set by the suite; all optional): `BENCH_MODE` (quick, default, full: rounds and
//! times), `BENCH_HELLO_SO` (the hello build to load; otherwise it builds one),
//! `BENCH_BOUNDARY_MD` (where to write the figure's Markdown table).

use std::{
    hint::black_box,
    path::PathBuf,
    time::{Duration, Instant},
};

use bench::report::RoundTable;
use criterion::{BenchmarkId, Criterion};
use host::{protocol::WorkerSpec, worker::plugin::Plugin as Loaded};
use plugin_api::{
    ffi::{FfiBody, FfiRequestRef},
    Context, Plugin, Request,
};

fn main() {
    let mode = std::env::var("BENCH_MODE")
        .ok()
        .map(|m| bench::Mode::from_name(&m).expect("BENCH_MODE: quick, default or full"))
        .unwrap_or(bench::DEFAULT);
    let hello: PathBuf = match std::env::var_os("BENCH_HELLO_SO") {
        Some(p) => p.into(),
        None => bench::build().hello_v1,
    };
    let spec = WorkerSpec {
        role: Default::default(),
        service: "bench".into(),
        slot: 0,
        plugin_path: hello.clone(),
        plugin_source: hello,
        plugin_version: "bench".into(),
        listen: vec![],
        config_toml: String::new(),
        config: vec![],
        max_body_bytes: 1 << 20,
        max_stream_bytes: 1 << 30,
        idle_grace_ms: 0,
        drain_timeout_ms: 0,
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
        balance_fd: None,
        access_log: None,
        master_pid: std::process::id(),
        check_only: true,
    };
    let loaded = Loaded::load_and_start(&spec, &spec.plugin_path, || {}).expect("load hello");
    let ffi_request = FfiRequestRef {
        method: "GET".into(),
        path: "/".into(),
        query: "".into(),
        headers: Default::default(),
        client_addr: "127.0.0.1:1".into(),
        tls: false,
        http_version: "HTTP/1.1".into(),
        request_id: "bench".into(),
    };
    let direct = hello::Hello::on_start(&Context::for_tests("bench")).unwrap();
    let request = Request::new("GET", "/");

    let mut c = Criterion::default()
        .warm_up_time(mode.boundary_warmup)
        .measurement_time(mode.boundary_measure)
        // Criterion's smallest; the rounds give the spread that matters here.
        .sample_size(10);
    let mut group = c.benchmark_group("one hello request");
    let (mut abi_ns, mut direct_ns) = (Vec::new(), Vec::new());
    for round in 1..=mode.boundary_rounds {
        // (total time, calls) over every batch criterion timed in this round.
        let mut abi = (Duration::ZERO, 0u64);
        group.bench_function(BenchmarkId::new("through the plugin ABI", round), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    let _ = black_box(
                        loaded.handle(black_box(&ffi_request), FfiBody::full(Default::default())),
                    );
                }
                let d = t.elapsed();
                abi = (abi.0 + d, abi.1 + iters);
                d
            })
        });
        let mut dir = (Duration::ZERO, 0u64);
        group.bench_function(BenchmarkId::new("direct call (baseline)", round), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    black_box(direct.handle(black_box(&request)));
                }
                let d = t.elapsed();
                dir = (dir.0 + d, dir.1 + iters);
                d
            })
        });
        abi_ns.push(abi.0.as_nanos() as f64 / abi.1 as f64);
        direct_ns.push(dir.0.as_nanos() as f64 / dir.1 as f64);
    }
    group.finish();

    let mut t = RoundTable::new(mode.boundary_rounds);
    t.compare(
        "ns per call",
        ("through the plugin ABI", &abi_ns),
        ("direct call", &direct_ns),
        None,
    );
    // The difference is what the boundary adds to each request.
    let added: Vec<f64> = abi_ns.iter().zip(&direct_ns).map(|(a, d)| a - d).collect();
    t.values("ns added per request by the boundary", &added);
    let md = t.render();
    println!("\n{md}");
    if let Some(path) = std::env::var_os("BENCH_BOUNDARY_MD") {
        std::fs::write(path, md).expect("could not write BENCH_BOUNDARY_MD");
    }
}

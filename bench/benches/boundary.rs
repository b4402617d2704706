//! Plugin boundary cost: one request through the plugin ABI (the FFI request passed in, the
//! panic guard, the response converted to FFI types and back out), against a direct call of the
//! same handler linked statically. Run: `cargo bench -p bench --bench boundary`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use host::{protocol::WorkerSpec, worker::plugin::Plugin as Loaded};
use plugin_api::{ffi::FfiRequest, Context, Plugin, Request};

fn boundary(c: &mut Criterion) {
    let build = bench::build();
    let spec = WorkerSpec {
        service: "bench".into(),
        slot: 0,
        plugin_path: build.hello_v1.clone(),
        plugin_source: build.hello_v1.clone(),
        plugin_version: "bench".into(),
        listen: vec![],
        config_toml: String::new(),
        config: vec![],
        max_body_bytes: 1 << 20,
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
        master_pid: std::process::id(),
        check_only: true,
    };
    let loaded = Loaded::load_and_start(&spec, &build.hello_v1, || {}).expect("load hello");
    let ffi_request = FfiRequest {
        method: "GET".into(),
        path: "/".into(),
        query: "".into(),
        headers: Default::default(),
        body: Default::default(),
    };
    let direct = hello::Hello::on_start(&Context::for_tests("bench")).unwrap();
    let request = Request::new("GET", "/");

    let mut group = c.benchmark_group("one hello request");
    group.bench_function("through the plugin ABI", |b| {
        b.iter(|| loaded.handle(black_box(&ffi_request)))
    });
    group.bench_function("direct call (baseline)", |b| {
        b.iter(|| direct.handle(black_box(&request)))
    });
    group.finish();
}

criterion_group!(benches, boundary);
criterion_main!(benches);

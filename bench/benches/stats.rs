//! The per-request cost of the host's metrics counting, in isolation. `host::worker::stats` is
//! private, so this measures an equivalent written to match it line for line (its `Stats`, one
//! set of counters per thread, and `Stats::record`, and what `worker/exchange.rs` does around
//! them for every request), with the host's own bucket bounds
//! (`host::protocol::DURATION_BUCKETS`, 14 of them):
//!
//! - **record**: `Stats::record`: this thread's shard, the status class, 4 relaxed
//!   `fetch_add`s (requests, class, duration bucket, duration sum), `as_secs_f64` and a
//!   `partition_point` over the 14 bounds;
//! - **per request**: what a request pays for it in `exchange.rs`: `Instant::now()` at the
//!   start, `elapsed()` at the end, and `record` (the `max_requests` count is added to only when
//!   `max_requests` is set, and it is not by default);
//! - **per request, 2 threads**: the same on two threads at once, each in its own shard, as a
//!   worker's two runtime threads (one per core here) count. ns per request per thread, both
//!   busy;
//! - **per request, 2 threads, one set**: the same with both threads in one shard, as the host
//!   counted before 2026-12-01: the counters' cache lines move between the cores.
//!
//! Criterion times them in interleaved rounds (record, per request, 2 threads, record, ...);
//! a round's ns per request is the total of every batch criterion timed in it (warm-up
//! included) divided by the requests. Run: `cargo bench -p bench --bench stats` (the suite runs
//! it as figure 12 and puts the result beside the host's CPU per request).
//!
//! Environment (set by the suite; all optional): `BENCH_MODE` (quick, default, full: rounds and
//! times), `BENCH_STATS_JSON` (where to write the per-round values for the suite).

use std::{
    hint::black_box,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Barrier,
    },
    thread,
    time::{Duration, Instant},
};

use bench::report::RoundTable;
use criterion::{BenchmarkId, Criterion};
use host::protocol::DURATION_BUCKETS;

/// host/src/worker/stats.rs's shard count.
const SHARDS: usize = 16;

/// host/src/worker/stats.rs's `Stats`, field for field.
#[derive(Default)]
struct Stats {
    shards: Box<[Shard; SHARDS]>,
}

#[derive(Default)]
#[repr(align(128))]
struct Shard {
    requests: AtomicU64,
    by_class: [AtomicU64; 5],
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

/// `shard_index`, line for line.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    INDEX.try_with(|i| *i).unwrap_or(0)
}

impl Stats {
    /// `Stats::record`, line for line.
    fn record(&self, status: u16, took: Duration) {
        self.record_in(&self.shards[shard_index()], status, took)
    }

    fn record_in(&self, shard: &Shard, status: u16, took: Duration) {
        shard.requests.fetch_add(1, Ordering::Relaxed);
        let class = (status / 100).clamp(1, 5) as usize - 1;
        shard.by_class[class].fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let bucket = DURATION_BUCKETS.partition_point(|upper| *upper < secs);
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        shard
            .sum_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// What exchange.rs does per request for the counting: the clock at the start, the elapsed
/// time at the end, and `record` (in this thread's shard, or in `one` shard for all threads).
#[inline(never)]
fn per_request(stats: &Stats, one: Option<&Shard>) {
    let started = Instant::now();
    // (the request is served here)
    let took = started.elapsed();
    match one {
        None => stats.record(black_box(200), took),
        Some(shard) => stats.record_in(shard, black_box(200), took),
    }
}

/// Each of two threads counts `iters` requests at once (both start together); the slower
/// thread's time (each thread's time per request, both busy).
fn two_threads(stats: &Stats, one: Option<&Shard>, iters: u64) -> Duration {
    let start = Barrier::new(2);
    thread::scope(|s| {
        let threads: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    let t = Instant::now();
                    for _ in 0..iters {
                        per_request(stats, one);
                    }
                    t.elapsed()
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .max()
            .unwrap()
    })
}

fn main() {
    let mode = std::env::var("BENCH_MODE")
        .ok()
        .map(|m| bench::Mode::from_name(&m).expect("BENCH_MODE: quick, default or full"))
        .unwrap_or(bench::DEFAULT);
    let stats = Stats::default();
    // A hello request takes tens of microseconds from head to response: the first bucket
    // (under 0.5 ms), as nearly every request of the figures' load.
    let took = Duration::from_micros(40);

    let mut c = Criterion::default()
        .warm_up_time(mode.stats_warmup)
        .measurement_time(mode.stats_measure)
        .sample_size(10);
    let mut group = c.benchmark_group("metrics counting per request");
    let (mut record_ns, mut request_ns, mut two_ns, mut shared_ns) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 1..=mode.stats_rounds {
        // (total time, requests) over every batch criterion timed in this round.
        let mut rec = (Duration::ZERO, 0u64);
        group.bench_function(BenchmarkId::new("record", round), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    stats.record(black_box(200), black_box(took));
                }
                let d = t.elapsed();
                rec = (rec.0 + d, rec.1 + iters);
                d
            })
        });
        let mut req = (Duration::ZERO, 0u64);
        group.bench_function(BenchmarkId::new("per request", round), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    per_request(&stats, None);
                }
                let d = t.elapsed();
                req = (req.0 + d, req.1 + iters);
                d
            })
        });
        let mut two = (Duration::ZERO, 0u64);
        group.bench_function(BenchmarkId::new("per request, 2 threads", round), |b| {
            b.iter_custom(|iters| {
                let d = two_threads(&stats, None, iters);
                two = (two.0 + d, two.1 + iters);
                d
            })
        });
        let mut shared = (Duration::ZERO, 0u64);
        group.bench_function(
            BenchmarkId::new("per request, 2 threads, one set", round),
            |b| {
                b.iter_custom(|iters| {
                    let d = two_threads(&stats, Some(&stats.shards[0]), iters);
                    shared = (shared.0 + d, shared.1 + iters);
                    d
                })
            },
        );
        let per = |(d, n): (Duration, u64)| d.as_nanos() as f64 / n as f64;
        record_ns.push(per(rec));
        request_ns.push(per(req));
        two_ns.push(per(two));
        shared_ns.push(per(shared));
    }
    group.finish();
    black_box(&stats);

    let mut t = RoundTable::new(mode.stats_rounds);
    t.values("ns: record (4 adds, partition_point)", &record_ns);
    t.values("ns: per request (clock, record)", &request_ns);
    t.values("ns: per request, 2 threads (each)", &two_ns);
    t.values("ns: per request, 2 threads in one set (each)", &shared_ns);
    println!("\n{}", t.render());
    if let Some(path) = std::env::var_os("BENCH_STATS_JSON") {
        let json = serde_json::json!({
            "record_ns": record_ns,
            "per_request_ns": request_ns,
            "two_threads_ns": two_ns,
            "one_set_ns": shared_ns,
        });
        std::fs::write(path, json.to_string()).expect("could not write BENCH_STATS_JSON");
    }
}

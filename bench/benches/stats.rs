//! The per-request cost of the host's metrics counting, in isolation. `host::worker::stats` is
//! private, so this measures an equivalent written to match it line for line (its `Stats` and
//! `Stats::record`, and what `worker/conn.rs` does around them for every request), with the
//! host's own bucket bounds (`host::protocol::DURATION_BUCKETS`, 14 of them):
//!
//! - **record**: `Stats::record`: the status class, 3 relaxed `fetch_add`s (class, duration
//!   bucket, duration sum), `as_secs_f64` and a `partition_point` over the 14 bounds;
//! - **per request**: what a request pays for it in `conn.rs`: `Instant::now()` at the start,
//!   `elapsed()` at the end, `record`, and the relaxed add of the served-requests counter
//!   (`max_requests`; it is counted with or without metrics, but it is the fourth atomic add on
//!   the path);
//! - **per request, 2 threads**: the same on two threads at once on one shared `Stats`, as a
//!   worker's two runtime threads (one per core here) count into one: the counters' cache lines
//!   move between the cores. ns per request per thread, both busy.
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
        atomic::{AtomicU64, Ordering},
        Barrier,
    },
    thread,
    time::{Duration, Instant},
};

use bench::report::RoundTable;
use criterion::{BenchmarkId, Criterion};
use host::protocol::DURATION_BUCKETS;

/// host/src/worker/stats.rs's `Stats`, field for field.
struct Stats {
    by_class: [AtomicU64; 5],
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            by_class: Default::default(),
            buckets: Default::default(),
            sum_ns: AtomicU64::new(0),
        }
    }

    /// `Stats::record`, line for line.
    fn record(&self, status: u16, took: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let bucket = DURATION_BUCKETS.partition_point(|upper| *upper < secs);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// What conn.rs does per request for the counting: the clock at the start, the elapsed time
/// at the end, `record`, and the served-requests add.
#[inline(never)]
fn per_request(stats: &Stats, served: &AtomicU64) {
    let started = Instant::now();
    // (the request is served here)
    let took = started.elapsed();
    stats.record(black_box(200), took);
    black_box(served.fetch_add(1, Ordering::Relaxed));
}

fn main() {
    let mode = std::env::var("BENCH_MODE")
        .ok()
        .map(|m| bench::Mode::from_name(&m).expect("BENCH_MODE: quick, default or full"))
        .unwrap_or(bench::DEFAULT);
    let stats = Stats::new();
    let served = AtomicU64::new(0);
    // A hello request takes tens of microseconds from head to response: the first bucket
    // (under 0.5 ms), as nearly every request of the figures' load.
    let took = Duration::from_micros(40);

    let mut c = Criterion::default()
        .warm_up_time(mode.stats_warmup)
        .measurement_time(mode.stats_measure)
        .sample_size(10);
    let mut group = c.benchmark_group("metrics counting per request");
    let (mut record_ns, mut request_ns, mut shared_ns) = (Vec::new(), Vec::new(), Vec::new());
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
                    per_request(&stats, &served);
                }
                let d = t.elapsed();
                req = (req.0 + d, req.1 + iters);
                d
            })
        });
        let mut two = (Duration::ZERO, 0u64);
        group.bench_function(BenchmarkId::new("per request, 2 threads", round), |b| {
            b.iter_custom(|iters| {
                // Both threads start together and each counts `iters` requests; the time is
                // the slower thread's (each thread's time per request, both busy).
                let start = Barrier::new(2);
                let times: Vec<Duration> = thread::scope(|s| {
                    let threads: Vec<_> = (0..2)
                        .map(|_| {
                            s.spawn(|| {
                                start.wait();
                                let t = Instant::now();
                                for _ in 0..iters {
                                    per_request(&stats, &served);
                                }
                                t.elapsed()
                            })
                        })
                        .collect();
                    threads.into_iter().map(|t| t.join().unwrap()).collect()
                });
                let d = times.into_iter().max().unwrap();
                two = (two.0 + d, two.1 + iters);
                d
            })
        });
        let per = |(d, n): (Duration, u64)| d.as_nanos() as f64 / n as f64;
        record_ns.push(per(rec));
        request_ns.push(per(req));
        shared_ns.push(per(two));
    }
    group.finish();
    black_box(&stats);

    let mut t = RoundTable::new(mode.stats_rounds);
    t.values("ns: record (3 adds, partition_point)", &record_ns);
    t.values("ns: per request (clock, record, served add)", &request_ns);
    t.values("ns: per request, 2 threads on one Stats (each)", &shared_ns);
    println!("\n{}", t.render());
    if let Some(path) = std::env::var_os("BENCH_STATS_JSON") {
        let json = serde_json::json!({
            "record_ns": record_ns,
            "per_request_ns": request_ns,
            "two_threads_ns": shared_ns,
        });
        std::fs::write(path, json.to_string()).expect("could not write BENCH_STATS_JSON");
    }
}

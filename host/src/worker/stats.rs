//! What a worker counts about the requests it serves, for the master's metrics: responses by
//! status class and a duration histogram, all atomics (a few adds per request), sent with every
//! heartbeat as totals since the worker started. The master turns those into counters that
//! never go backwards when workers are replaced (`admin::metrics`).

use std::{
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
    time::Duration,
};

use crate::protocol::{RequestStats, DURATION_BUCKETS};

/// Counters apart per runtime thread: one set written by every thread made each request's adds
/// wait for the cache line to come over from the other core, several times a request. The
/// first `SHARDS - 1` threads that count each own a shard; any later ones share shard 0.
const SHARDS: usize = 16;

#[derive(Default)]
pub struct Stats {
    shards: Box<[Shard; SHARDS]>,
}

/// One thread's counters, on cache lines of their own.
#[derive(Default)]
#[repr(align(128))]
struct Shard {
    requests: AtomicU64,
    by_class: [AtomicU64; 5],
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

/// Which shard this thread counts in: threads take shards 1 to `SHARDS - 1` in turn as they
/// first count, each its own; later threads (and a thread whose locals are being destroyed)
/// share shard 0.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    thread_local! {
        static INDEX: usize = match NEXT.fetch_add(1, Ordering::Relaxed) {
            i if i < SHARDS => i,
            _ => 0,
        };
    }
    INDEX.try_with(|i| *i).unwrap_or(0)
}

/// Adds `n` to a counter. Only this thread writes an owned shard, so a load and a store do:
/// an atomic add is a locked instruction (about 8 ns each here, four a request). Shard 0 is
/// shared, and adds atomically. Readers (the heartbeat) see every value a store wrote.
fn add(counter: &AtomicU64, n: u64, owned: bool) {
    if owned {
        counter.store(counter.load(Ordering::Relaxed) + n, Ordering::Relaxed);
    } else {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl Stats {
    pub fn record(&self, status: u16, took: Duration) {
        let index = shard_index();
        let (shard, owned) = (&self.shards[index], index != 0);
        add(&shard.requests, 1, owned);
        let class = (status / 100).clamp(1, 5) as usize - 1;
        add(&shard.by_class[class], 1, owned);
        let secs = took.as_secs_f64();
        let bucket = DURATION_BUCKETS.partition_point(|upper| *upper < secs);
        add(&shard.buckets[bucket], 1, owned);
        add(&shard.sum_ns, took.as_nanos() as u64, owned);
    }

    /// Requests served (answered) so far.
    pub fn requests(&self) -> u64 {
        self.sum(|s| &s.requests)
    }

    pub fn snapshot(&self) -> RequestStats {
        RequestStats {
            by_class: std::array::from_fn(|i| self.sum(|s| &s.by_class[i])),
            buckets: (0..=DURATION_BUCKETS.len())
                .map(|i| self.sum(|s| &s.buckets[i]))
                .collect(),
            duration_sum_ns: self.sum(|s| &s.sum_ns),
        }
    }

    fn sum(&self, counter: impl Fn(&Shard) -> &AtomicU64) -> u64 {
        self.shards
            .iter()
            .map(|s| counter(s).load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_land_in_their_class_and_bucket() {
        let stats = Stats::default();
        stats.record(204, Duration::from_micros(300));
        stats.record(503, Duration::from_secs(30));
        let s = stats.snapshot();
        assert_eq!(stats.requests(), 2);
        assert_eq!(s.by_class, [0, 1, 0, 0, 1]);
        assert_eq!(s.buckets[0], 1, "under 0.5 ms");
        assert_eq!(*s.buckets.last().unwrap(), 1, "over 10 s");
    }

    /// Threads count apart, and every count is in the totals.
    #[test]
    fn counts_from_many_threads_add_up() {
        let stats = Stats::default();
        std::thread::scope(|scope| {
            for _ in 0..SHARDS + 3 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        stats.record(200, Duration::from_millis(2));
                    }
                });
            }
        });
        let total = (SHARDS as u64 + 3) * 1000;
        assert_eq!(stats.requests(), total);
        let s = stats.snapshot();
        assert_eq!(s.by_class[1], total);
        assert_eq!(s.buckets[2], total, "2 ms: under 2.5 ms");
        assert_eq!(s.duration_sum_ns, total * 2_000_000);
    }
}

//! What a worker counts about the requests it serves, for the master's metrics: responses by
//! status class and a duration histogram, all atomics (a few adds per request), sent with every
//! heartbeat as totals since the worker started. The master turns those into counters that
//! never go backwards when workers are replaced (`admin::metrics`).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use crate::protocol::{RequestStats, DURATION_BUCKETS};

pub struct Stats {
    by_class: [AtomicU64; 5],
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            by_class: Default::default(),
            buckets: Default::default(),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl Stats {
    pub fn record(&self, status: u16, took: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let bucket = DURATION_BUCKETS.partition_point(|upper| *upper < secs);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> RequestStats {
        RequestStats {
            by_class: std::array::from_fn(|i| self.by_class[i].load(Ordering::Relaxed)),
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            duration_sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
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
        assert_eq!(s.by_class, [0, 1, 0, 0, 1]);
        assert_eq!(s.buckets[0], 1, "under 0.5 ms");
        assert_eq!(*s.buckets.last().unwrap(), 1, "over 10 s");
    }
}

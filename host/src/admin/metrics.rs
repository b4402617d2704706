//! The master's metrics (`GET /metrics`, OpenMetrics text through prometheus-client), and the
//! short time series the admin page charts.
//!
//! Workers count their requests (`worker::stats`) and send the totals with every heartbeat, and
//! once more when they exit. The master adds what changed since the worker's previous heartbeat
//! to its own counters, so a counter never goes backwards when a worker is replaced: the
//! requests a worker served stay counted after it is gone. Gauges (workers by state, open
//! connections, plugin versions, uptime) are computed when the metrics are read.

use std::{
    collections::{HashMap, VecDeque},
    sync::{atomic::AtomicU64, Mutex},
    time::{Duration, Instant, SystemTime},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
        MetricType, TypedMetric,
    },
    registry::Registry,
};
use serde::Serialize;

use crate::protocol::{epoch_secs, RequestStats, DURATION_BUCKETS};

/// How many samples the page's chart keeps (five minutes), and how often one is taken.
const SERIES_LEN: usize = 300;
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    service: String,
    class: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    service: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExitLabels {
    service: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RolloutLabels {
    service: String,
    kind: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    service: String,
    version: String,
}

/// A histogram made of counts the workers bucketed themselves (the buckets of
/// [`DURATION_BUCKETS`]): prometheus-client's own histogram only observes single values.
#[derive(Debug, Default)]
struct Merged {
    inner: Mutex<(f64, Vec<u64>)>,
}

impl Merged {
    fn add(&self, sum_secs: f64, counts: &[u64]) {
        let mut inner = self.inner.lock().unwrap();
        inner.0 += sum_secs;
        if inner.1.len() < counts.len() {
            inner.1.resize(counts.len(), 0);
        }
        for (total, n) in inner.1.iter_mut().zip(counts) {
            *total += n;
        }
    }
}

impl TypedMetric for Merged {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Merged {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = self.inner.lock().unwrap();
        let bounds = DURATION_BUCKETS.iter().copied().chain([f64::MAX]);
        let buckets: Vec<(f64, u64)> = bounds
            .zip(inner.1.iter().copied().chain(std::iter::repeat(0)))
            .collect();
        let count = inner.1.iter().sum();
        encoder.encode_histogram::<NoLabelSet>(inner.0, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// One second of one service on the page's chart.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Seconds since the Unix epoch.
    pub t: u64,
    /// Requests per second over the last three seconds.
    pub rps: f64,
    /// The 99th percentile request duration over the same seconds (ms), from the histogram
    /// buckets.
    pub p99_ms: Option<f64>,
}

/// Requests and buckets since the last sample, and the samples.
type Series = (u64, Vec<u64>, VecDeque<Point>, VecDeque<(u64, Vec<u64>)>);

/// Samples a chart point is computed over: workers report once a second at most, so one
/// sample may catch no report from a worker and the next two; a window of three evens that
/// out.
const WINDOW: usize = 3;

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<ServiceLabels, Merged>,
    connections: Family<ServiceLabels, Gauge>,
    workers: Family<StateLabels, Gauge>,
    exits: Family<ExitLabels, Counter>,
    rollouts: Family<RolloutLabels, Counter>,
    rollout_duration: Family<ServiceLabels, Histogram>,
    versions: Family<VersionLabels, Gauge>,
    uptime: Gauge<f64, AtomicU64>,
    /// Each live worker's totals at its last heartbeat.
    last: Mutex<HashMap<u32, RequestStats>>,
    /// Per service: requests and buckets since the last sample, and the samples.
    series: Mutex<HashMap<String, Series>>,
    started: Instant,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("host");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests served, by service, status class and plugin version",
            requests.clone(),
        );
        let duration = Family::<ServiceLabels, Merged>::default();
        registry.register(
            "request_duration_seconds",
            "Time from a request's head to its response, by service",
            duration.clone(),
        );
        let connections = Family::<ServiceLabels, Gauge>::default();
        registry.register(
            "open_connections",
            "Connections open in the service's workers, at their last heartbeat",
            connections.clone(),
        );
        let workers = Family::<StateLabels, Gauge>::default();
        registry.register(
            "workers",
            "Worker processes by service and state (starting, ready, draining)",
            workers.clone(),
        );
        let exits = Family::<ExitLabels, Counter>::default();
        registry.register(
            "worker_exits",
            "Worker exits by service and reason (drained, crash, liveness, killed, start_failed)",
            exits.clone(),
        );
        let rollouts = Family::<RolloutLabels, Counter>::default();
        registry.register(
            "rollouts",
            "Reloads and rollbacks by service, kind and outcome",
            rollouts.clone(),
        );
        let rollout_duration = Family::<ServiceLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 14))
        });
        registry.register(
            "rollout_duration_seconds",
            "How long reloads and rollbacks took, by service",
            rollout_duration.clone(),
        );
        let versions = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "plugin_version_info",
            "The plugin version each service's new workers load (always 1)",
            versions.clone(),
        );
        let uptime = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "master_uptime_seconds",
            "Seconds since this master started",
            uptime.clone(),
        );
        Metrics {
            registry,
            requests,
            duration,
            connections,
            workers,
            exits,
            rollouts,
            rollout_duration,
            versions,
            uptime,
            last: Mutex::default(),
            series: Mutex::default(),
            started: Instant::now(),
        }
    }

    /// A worker's heartbeat: what it counted since its previous one goes into the counters.
    pub fn worker_totals(&self, pid: u32, service: &str, version: &str, now: &RequestStats) {
        let mut last = self.last.lock().unwrap();
        let before = last.entry(pid).or_default();
        const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        for (i, class) in CLASSES.iter().enumerate() {
            let delta = now.by_class[i].saturating_sub(before.by_class[i]);
            if delta > 0 {
                self.requests
                    .get_or_create(&RequestLabels {
                        service: service.to_string(),
                        class: class.to_string(),
                        version: version.to_string(),
                    })
                    .inc_by(delta);
            }
        }
        let buckets: Vec<u64> = now
            .buckets
            .iter()
            .enumerate()
            .map(|(i, n)| n.saturating_sub(before.buckets.get(i).copied().unwrap_or(0)))
            .collect();
        let sum = now.duration_sum_ns.saturating_sub(before.duration_sum_ns) as f64 / 1e9;
        if buckets.iter().any(|n| *n > 0) {
            let labels = ServiceLabels {
                service: service.to_string(),
            };
            self.duration.get_or_create(&labels).add(sum, &buckets);
        }
        // Every service that reports has a series, from its first heartbeat (idle is 0).
        let mut series = self.series.lock().unwrap();
        let entry = series.entry(service.to_string()).or_default();
        entry.0 += buckets.iter().sum::<u64>();
        if entry.1.len() < buckets.len() {
            entry.1.resize(buckets.len(), 0);
        }
        for (total, n) in entry.1.iter_mut().zip(&buckets) {
            *total += n;
        }
        *before = now.clone();
    }

    /// A worker exited (after its final heartbeat): forget its totals, count the exit.
    pub fn worker_exit(&self, pid: u32, service: &str, reason: &str) {
        self.last.lock().unwrap().remove(&pid);
        self.exits
            .get_or_create(&ExitLabels {
                service: service.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// A reload or rollback ended (`kind` and `outcome` as the history names them: "automatic
    /// rollback", "rolled back" become `automatic_rollback`, `rolled_back`).
    pub fn rollout(&self, service: &str, kind: &str, outcome: &str, took: Duration) {
        self.rollouts
            .get_or_create(&RolloutLabels {
                service: service.to_string(),
                kind: kind.replace(' ', "_"),
                outcome: outcome.replace(' ', "_"),
            })
            .inc();
        self.rollout_duration
            .get_or_create(&ServiceLabels {
                service: service.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// The text `/metrics` answers, after setting the gauges from `view`.
    pub fn encode(&self, view: &View) -> String {
        self.workers.clear();
        self.connections.clear();
        self.versions.clear();
        for (service, state, n) in &view.workers {
            self.workers
                .get_or_create(&StateLabels {
                    service: service.clone(),
                    state: state.clone(),
                })
                .set(*n);
        }
        for (service, n) in &view.connections {
            self.connections
                .get_or_create(&ServiceLabels {
                    service: service.clone(),
                })
                .set(*n);
        }
        for (service, version) in &view.versions {
            self.versions
                .get_or_create(&VersionLabels {
                    service: service.clone(),
                    version: version.clone(),
                })
                .set(1);
        }
        self.uptime.set(self.started.elapsed().as_secs_f64());
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!("could not encode the metrics: {e}");
        }
        text
    }

    /// Takes a sample for the page's chart (called every [`SAMPLE_EVERY`]).
    pub fn sample(&self) {
        let every = SAMPLE_EVERY;
        let t = epoch_secs(SystemTime::now());
        let mut series = self.series.lock().unwrap();
        for (requests, buckets, points, recent) in series.values_mut() {
            recent.push_back((*requests, buckets.clone()));
            if recent.len() > WINDOW {
                recent.pop_front();
            }
            let total: u64 = recent.iter().map(|(n, _)| n).sum();
            let mut merged = vec![0; buckets.len()];
            for (_, b) in recent.iter() {
                for (m, n) in merged.iter_mut().zip(b) {
                    *m += n;
                }
            }
            points.push_back(Point {
                t,
                rps: total as f64 / (every.as_secs_f64() * recent.len() as f64),
                p99_ms: percentile(&merged, 0.99).map(|s| s * 1000.0),
            });
            while points.len() > SERIES_LEN {
                points.pop_front();
            }
            *requests = 0;
            buckets.iter_mut().for_each(|n| *n = 0);
        }
    }

    /// The samples of every service, oldest first.
    pub fn series(&self) -> HashMap<String, Vec<Point>> {
        self.series
            .lock()
            .unwrap()
            .iter()
            .map(|(name, (_, _, points, _))| (name.clone(), points.iter().cloned().collect()))
            .collect()
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

/// What the gauges show, read from the master when the metrics are read.
#[derive(Default)]
pub struct View {
    /// (service, state, workers)
    pub workers: Vec<(String, String, i64)>,
    /// (service, open connections)
    pub connections: Vec<(String, i64)>,
    /// (service, live plugin version)
    pub versions: Vec<(String, String)>,
}

/// The `q` quantile (seconds) of requests counted per bucket, interpolated within its bucket.
fn percentile(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil() as u64;
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        if seen + n >= rank {
            let lower = if i == 0 { 0.0 } else { DURATION_BUCKETS[i - 1] };
            let upper = DURATION_BUCKETS
                .get(i)
                .copied()
                .unwrap_or(DURATION_BUCKETS[DURATION_BUCKETS.len() - 1] * 2.0);
            let within = (rank - seen) as f64 / (*n).max(1) as f64;
            return Some(lower + (upper - lower) * within);
        }
        seen += n;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(two_xx: u64, bucket0: u64) -> RequestStats {
        let mut buckets = vec![0; DURATION_BUCKETS.len() + 1];
        buckets[0] = bucket0;
        RequestStats {
            by_class: [0, two_xx, 0, 0, 0],
            buckets,
            duration_sum_ns: 1000 * bucket0,
        }
    }

    #[test]
    fn counters_add_deltas_and_survive_a_worker_exit() {
        let m = Metrics::new();
        m.worker_totals(1, "web", "abc", &stats(5, 5));
        m.worker_totals(1, "web", "abc", &stats(8, 8));
        m.worker_exit(1, "web", "drained");
        m.worker_totals(2, "web", "abc", &stats(2, 2));
        let text = m.encode(&View::default());
        assert!(
            text.contains("host_requests_total{service=\"web\",class=\"2xx\",version=\"abc\"} 10"),
            "{text}"
        );
        assert!(
            text.contains("host_request_duration_seconds_count{service=\"web\"} 10"),
            "{text}"
        );
        assert!(text.contains("host_worker_exits_total{service=\"web\",reason=\"drained\"} 1"));
    }

    #[test]
    fn percentiles_come_from_the_buckets() {
        let mut b = vec![0; DURATION_BUCKETS.len() + 1];
        b[1] = 99; // 0.5-1 ms
        b[6] = 1; // 25-50 ms
        let p99 = percentile(&b, 0.99).unwrap();
        assert!(p99 > 0.0005 && p99 <= 0.001, "{p99}");
        assert!(percentile(&b, 1.0).unwrap() > 0.025);
    }
}

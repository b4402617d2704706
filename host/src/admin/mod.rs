//! The admin listener: the page operators steer the host from, its JSON API, the health checks
//! a load balancer or Kubernetes asks, and the Prometheus metrics. Off unless `[admin]` is
//! configured; its own listener, never a service's.
//!
//! - `metrics`: the counters the workers' heartbeats feed, and the page's short time series.

pub mod metrics;

pub use metrics::Metrics;

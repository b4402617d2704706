//! The scaling curves (`--full` only, or when named; docs/benchmarks.md, "Scaling curves"): how
//! a figure the default mode measures at one point moves when one thing grows. This module owns
//! the curves' settings per mode and what they share (a reload timed, a curve's points and its
//! chart); each curve is a submodule that measures and returns its tables, and the suite
//! (`bin/suite.rs`) registers them in `FULL_ONLY` and writes their sections.
//!
//! - [`reload_time`]: `host reload` wall time by worker count and by plugin size;
//! - [`conns`]: reload under load by keep-alive connection count;
//! - [`memory`]: RSS, PSS and USS of every process by idle keep-alive connections, host and
//!   baseline;
//! - [`edit_live`]: from a one-line source edit to the first response with the new answer,
//!   through `host dev` and through `cargo build && host reload`.

pub mod conns;
pub mod edit_live;
pub mod figures;
pub mod idle;
pub mod memory;
pub mod reload_time;

use crate::{chart, report};

/// Points, rounds and run lengths of the curves in one mode.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Rounds of every curve (a round measures every point once, the points in turn).
    pub rounds: usize,
    /// Worker counts of the reload-time curve.
    pub workers: &'static [usize],
    /// Padding (MiB) of the plugin-size curve.
    pub sizes_mib: &'static [usize],
    /// Keep-alive connections of the reload-under-load curve, and the length of its runs.
    pub conns: &'static [u32],
    pub conns_secs: u32,
    /// Idle keep-alive connections at which the memory curve samples every process.
    pub idle_conns: &'static [usize],
}

/// Quick: fewer points and shorter runs, still 5 rounds (docs/benchmarks.md: at least 5 in every
/// mode).
pub const QUICK: Settings = Settings {
    rounds: 5,
    workers: &[1, 4, 16],
    sizes_mib: &[1, 10],
    conns: &[64, 1_000],
    // One reload a run, at 2 s.
    conns_secs: 3,
    idle_conns: &[0, 1_000],
};

/// The default's settings, which `--full` runs (and a curve named without `--quick`).
pub const DEFAULT: Settings = Settings {
    // 5, not figure 1's 7: `scale-conns` alone is 30 runs of 10 s a round set.
    rounds: 5,
    workers: &[1, 2, 4, 8, 16, 32],
    sizes_mib: &[1, 10, 50],
    conns: &[64, 1_000, 10_000],
    // Reloads at 2, 4, 6 and 8 s.
    conns_secs: 10,
    idle_conns: &[0, 1_000, 10_000],
};

/// A curve's measured points: x, and the value of each round there.
pub type Points = Vec<(f64, Vec<f64>)>;

/// The chart line of measured points: the median and [min-max] at each x.
pub fn curve(name: &str, points: &Points) -> chart::Curve {
    chart::Curve {
        name: name.to_string(),
        points: points
            .iter()
            .map(|(x, v)| (*x, report::spread(v)))
            .collect(),
    }
}

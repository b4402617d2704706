//! Reload under load by connection count: figure 2's host runs (wrk with keep-alive
//! connections, with a `host reload` every 2 s against without) at 64, 1,000 and 10,000
//! connections: the failed requests and the requests/s with reloads / without at each.
//!
//! One host (2 workers, the host's default probation, as figure 2) for every point. A round
//! runs every point, both runs each (which goes first alternates from round to round), so that
//! a drift of the machine spreads over every point. The host alone: nginx's config in the bench
//! allows 4,096 connections per worker (`bench::nginx`), fewer than the 10,000 point needs.

use std::{path::Path, thread, time::Duration};

use super::{curve, Points};
use crate::{
    chart, replace,
    report::{ratios, Goal, RoundTable},
    wrk, Build, Master, Mode, Service,
};

const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// Between runs: the last run's connections closed, its drained workers gone.
const SETTLE: Duration = Duration::from_millis(500);

/// A wrk run of `secs` with `conns` connections; with `reload`, a `host reload` at 2 s, 4 s, ...
/// while before the end. Returns wrk's report and the reloads done.
fn run(url: &str, conns: u32, secs: u32, reload: Option<&mut dyn FnMut()>) -> (wrk::Report, usize) {
    let (report, moments) =
        wrk::run_calling(url, conns, secs, None, reload.map(|r| (RELOAD_EVERY, r)));
    thread::sleep(SETTLE);
    (report, moments.len())
}

/// The curve's table; its chart goes to `svg`.
pub fn run_curve(b: &Build, m: &Mode, workers: usize, svg: &Path) -> RoundTable {
    crate::prefork::raise_fd_limit();
    let s = m.scaling;
    let host = Master::serving(&b.host, &Service::new(&b.hello_v1, workers), "info");
    let url = format!("http://{}/", host.addr());
    for &c in s.conns {
        wrk::run(&url, c, m.warmup_secs, None);
    }
    let mut swaps = 0usize;
    let mut failed_reloads = 0usize;
    let mut reload = || {
        replace(b.next_hello(&mut swaps), &host.plugin_path());
        failed_reloads += usize::from(!host.cli(&["reload"]).status.success());
    };
    // [point] -> (without, with, reloads) per round.
    let mut calm = vec![Vec::new(); s.conns.len()];
    let mut busy = vec![Vec::new(); s.conns.len()];
    let mut reloads = vec![Vec::new(); s.conns.len()];
    for round in 0..s.rounds {
        for (i, &c) in s.conns.iter().enumerate() {
            let with_first = round % 2 == 1;
            for with in [with_first, !with_first] {
                if with {
                    let (r, n) = run(&url, c, s.conns_secs, Some(&mut reload));
                    busy[i].push(r);
                    reloads[i].push(n as f64);
                } else {
                    calm[i].push(run(&url, c, s.conns_secs, None).0);
                }
            }
        }
    }
    drop(host);

    let col =
        |v: &[wrk::Report], f: fn(&wrk::Report) -> f64| -> Vec<f64> { v.iter().map(f).collect() };
    let failed = |r: &wrk::Report| r.failed() as f64;
    let mut t = RoundTable::new(s.rounds);
    for (i, &c) in s.conns.iter().enumerate() {
        t.values(&format!("{c} connections: reloads in the run"), &reloads[i]);
        t.values_with_goal(
            &format!("{c} connections: failed requests with reloads"),
            &col(&busy[i], failed),
            Goal::None,
        );
        t.values(
            &format!("{c} connections: failed requests without"),
            &col(&calm[i], failed),
        );
        t.values(
            &format!("{c} connections: of which timeouts (5 s), with reloads"),
            &col(&busy[i], |r| r.timeouts as f64),
        );
        t.compare(
            &format!("{c} connections: requests/s"),
            ("with reloads", &col(&busy[i], |r| r.rps)),
            ("without", &col(&calm[i], |r| r.rps)),
            None,
        );
        t.compare(
            &format!("{c} connections: p99 latency (ms)"),
            ("with reloads", &col(&busy[i], |r| r.p99_ms)),
            ("without", &col(&calm[i], |r| r.p99_ms)),
            None,
        );
    }
    let reloads_failed = failed_reloads as f64;
    t.values(
        "`host reload` that exited non-zero (all rounds)",
        &vec![reloads_failed; s.rounds],
    );
    // log10 of the connections on x: 64, 1,000 and 10,000 evenly apart.
    let x = |c: u32| f64::from(c).log10();
    let ratio_points: Points = s
        .conns
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            (
                x(c),
                ratios(&col(&busy[i], |r| r.rps), &col(&calm[i], |r| r.rps)),
            )
        })
        .collect();
    let failed_points = |v: &Vec<Vec<wrk::Report>>| -> Points {
        s.conns
            .iter()
            .enumerate()
            .map(|(i, &c)| (x(c), col(&v[i], failed)))
            .collect()
    };
    chart::draw_curves(
        svg,
        &[
            chart::CurvePanel {
                caption: format!(
                    "requests/s with a reload every {} s / without, by keep-alive connections (host)",
                    RELOAD_EVERY.as_secs()
                ),
                x_desc: "log10 connections (1.8 = 64, 3 = 1,000, 4 = 10,000)",
                y_desc: "with / without",
                curves: vec![curve("host", &ratio_points)],
            },
            chart::CurvePanel {
                caption: "failed requests per run (host)".into(),
                x_desc: "log10 connections (1.8 = 64, 3 = 1,000, 4 = 10,000)",
                y_desc: "failed requests",
                curves: vec![
                    curve("with reloads", &failed_points(&busy)),
                    curve("without", &failed_points(&calm)),
                ],
            },
        ],
    )
    .expect("could not draw the chart");
    t
}

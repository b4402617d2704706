//! The memory curve: RSS, PSS and USS (from smaps_rollup: `procs::memory`) of every process of
//! the host (master, workers) and of the baseline (parent, children), with 0, 1,000 and 10,000
//! idle keep-alive connections open ([`super::idle`]).
//!
//! As figure 13's memory per connection: in each round a fresh host and a fresh baseline in
//! turn (the order alternating), since a server's allocator keeps what the last round's
//! connections freed; on each, the connections are opened up to each point in turn and every
//! process sampled 0.5 s after.

use std::{path::Path, thread, time::Duration};

use super::{curve, idle::Idle, Points};
use crate::{chart, prefork::Prefork, procs, report::RoundTable, Build, Master, Mode, Service};

/// Before a sample: the server done with the connections' setup.
const SETTLE: Duration = Duration::from_millis(500);

/// Every process's memory at each point: `[point][process]`, the master or parent first.
type Samples = Vec<Vec<procs::Memory>>;

/// One of RSS, PSS, USS, read from a sample.
type Metric = fn(&procs::Memory) -> f64;

const SIDES: [&str; 2] = ["host", "baseline"];

fn sample(pids: &[u32]) -> Vec<procs::Memory> {
    pids.iter().map(|p| procs::memory(*p)).collect()
}

/// One fresh server of `side`, sampled at each point of `points`; returns the samples and the
/// connections that did not open.
fn run_side(b: &Build, workers: usize, side: usize, points: &[usize]) -> (Samples, u64) {
    let (addr, pids, _host, _base): (String, Vec<u32>, Option<Master>, Option<Prefork>) =
        if side == 0 {
            let h = Master::serving(&b.host, &Service::new(&b.hello_v1, workers), "info");
            (h.addr(), h.pids(), Some(h), None)
        } else {
            let p = Prefork::start(&b.baseline, workers, &[]);
            (p.addr.clone(), p.pids(), None, Some(p))
        };
    assert_eq!(
        pids.len(),
        workers + 1,
        "{}: a master and its workers",
        SIDES[side]
    );
    let mut idle = Idle::new();
    let mut out = Vec::new();
    for &n in points {
        idle.grow_to(&addr, n);
        thread::sleep(SETTLE);
        out.push(sample(&pids));
    }
    (out, idle.refused)
}

/// The curve's table; its chart goes to `svg`.
pub fn run(b: &Build, m: &Mode, workers: usize, svg: &Path) -> RoundTable {
    crate::prefork::raise_fd_limit();
    let s = m.scaling;
    let mut runs: [Vec<Samples>; 2] = Default::default();
    let mut refused = [vec![], vec![]];
    for round in 0..s.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let (samples, r) = run_side(b, workers, side, s.idle_conns);
            runs[side].push(samples);
            refused[side].push(r as f64);
        }
    }
    // Per round: a value of the point's sample.
    let per_round = |side: usize, point: usize, f: &dyn Fn(&[procs::Memory]) -> f64| -> Vec<f64> {
        runs[side].iter().map(|r| f(&r[point])).collect()
    };
    let workers_mean = |p: &[procs::Memory], get: Metric| {
        p[1..].iter().map(get).sum::<f64>() / (p.len() - 1) as f64
    };
    let mut t = RoundTable::new(s.rounds);
    let metrics: [(&str, Metric); 3] = [("RSS", |m| m.rss), ("PSS", |m| m.pss), ("USS", |m| m.uss)];
    for (point, &n) in s.idle_conns.iter().enumerate() {
        for (name, get) in metrics {
            for (side, first) in [(0, "master"), (1, "parent")] {
                t.values(
                    &format!("{n} connections: {} {first} {name} (MiB)", SIDES[side]),
                    &per_round(side, point, &|p| get(&p[0])),
                );
            }
            t.compare(
                &format!("{n} connections: worker {name} (MiB, mean of {workers})"),
                ("host", &per_round(0, point, &|p| workers_mean(p, get))),
                ("baseline", &per_round(1, point, &|p| workers_mean(p, get))),
                None,
            );
        }
        t.compare(
            &format!("{n} connections: PSS of every process (MiB)"),
            (
                "host",
                &per_round(0, point, &|p| p.iter().map(|m| m.pss).sum()),
            ),
            (
                "baseline",
                &per_round(1, point, &|p| p.iter().map(|m| m.pss).sum()),
            ),
            None,
        );
    }
    for (side, r) in refused.iter().enumerate() {
        t.values(&format!("connections refused: {}", SIDES[side]), r);
    }
    let points = |side: usize, f: &dyn Fn(&[procs::Memory]) -> f64| -> Points {
        s.idle_conns
            .iter()
            .enumerate()
            .map(|(i, &n)| (n as f64, per_round(side, i, f)))
            .collect()
    };
    let uss_w = |p: &[procs::Memory]| workers_mean(p, |m| m.uss);
    let pss_all = |p: &[procs::Memory]| p.iter().map(|m| m.pss).sum::<f64>();
    let uss_master = |p: &[procs::Memory]| p[0].uss;
    chart::draw_curves(
        svg,
        &[
            chart::CurvePanel {
                caption: format!("worker USS by idle keep-alive connections (mean of {workers})"),
                x_desc: "idle connections",
                y_desc: "MiB",
                curves: vec![
                    curve("host worker", &points(0, &uss_w)),
                    curve("baseline worker", &points(1, &uss_w)),
                ],
            },
            chart::CurvePanel {
                caption: "master / parent USS by idle keep-alive connections".into(),
                x_desc: "idle connections",
                y_desc: "MiB",
                curves: vec![
                    curve("host master", &points(0, &uss_master)),
                    curve("baseline parent", &points(1, &uss_master)),
                ],
            },
            chart::CurvePanel {
                caption: "PSS of every process by idle keep-alive connections".into(),
                x_desc: "idle connections",
                y_desc: "MiB",
                curves: vec![
                    curve("host", &points(0, &pss_all)),
                    curve("baseline", &points(1, &pss_all)),
                ],
            },
        ],
    )
    .expect("could not draw the chart");
    t
}

//! Figure 15: what the start priority (host/src/priority.rs) does for the latency of a reload
//! under load. Two masters of the same build, one as it comes (a starting worker runs 10 nice
//! steps below the master until it is ready) and one with `HOST_START_NICE=0` (starts at the
//! master's priority), each measured with and without a `host reload` every 2 s, in
//! interleaved rounds: the p99 with reloads over the p99 without, for each, and the p99 with
//! reloads of one over the other's.

use std::{path::Path, thread, time::Duration};

use crate::{
    replace,
    report::{Goal, Results, RoundTable},
    wrk, Build, Master, Mode, Service,
};

/// Worker processes per master, keep-alive connections, and the reload period: figure 2's.
const WORKERS: usize = 2;
const CONNS: u32 = 32;
const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// Between two runs: the last run's connections close.
const SETTLE: Duration = Duration::from_millis(200);

/// One side: a master, and its runs without and with reloads.
struct Side {
    master: Master,
    url: String,
    calm: Vec<wrk::Report>,
    busy: Vec<wrk::Report>,
    swaps: usize,
}

impl Side {
    fn start(b: &Build, env: &[(&str, &str)]) -> Side {
        let master =
            Master::serving_with_env(&b.host, &Service::new(&b.hello_v1, WORKERS), "info", env);
        let url = format!("http://{}/", master.addr());
        Side {
            master,
            url,
            calm: Vec::new(),
            busy: Vec::new(),
            swaps: 0,
        }
    }

    fn run(&mut self, b: &Build, seconds: u32, reloads: bool) {
        if !reloads {
            let (r, _) = wrk::run_calling(&self.url, CONNS, seconds, None, None);
            self.calm.push(r);
        } else {
            let (master, swaps) = (&self.master, &mut self.swaps);
            let mut reload = || {
                // v1, v2, v1, ...: every reload loads a different build than the last.
                *swaps += 1;
                let plugin: &Path = if *swaps % 2 == 1 {
                    &b.hello_v2
                } else {
                    &b.hello_v1
                };
                replace(plugin, &master.plugin_path());
                let out = master.cli(&["reload"]);
                assert!(
                    out.status.success(),
                    "reload failed: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
            };
            let (r, _) = wrk::run_calling(
                &self.url,
                CONNS,
                seconds,
                None,
                Some((RELOAD_EVERY, &mut reload)),
            );
            self.busy.push(r);
        }
        thread::sleep(SETTLE);
    }
}

pub fn figure(b: &Build, mode: &Mode, out: &mut Results) {
    let (rounds, seconds) = (mode.reload_rounds, mode.reload_secs);
    let mut on = Side::start(b, &[]);
    let mut off = Side::start(b, &[("HOST_START_NICE", "0")]);
    wrk::run(&on.url, CONNS, mode.warmup_secs, None);
    wrk::run(&off.url, CONNS, mode.warmup_secs, None);
    for round in 0..rounds {
        // Alternate who goes first, as figure 2 does.
        let order: [(bool, bool); 4] = [(true, false), (true, true), (false, false), (false, true)];
        let mut order = order.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        for (start_priority, reloads) in order {
            let side = if start_priority { &mut on } else { &mut off };
            side.run(b, seconds, reloads);
        }
    }
    let col = |runs: &[wrk::Report], f: fn(&wrk::Report) -> f64| -> Vec<f64> {
        runs.iter().map(f).collect()
    };
    let p99 = |r: &wrk::Report| r.p99_ms;
    let rps = |r: &wrk::Report| r.rps;
    let failed = |r: &wrk::Report| r.failed() as f64;
    let mut t = RoundTable::new(rounds);
    t.compare(
        "p99 (ms), start priority on",
        ("with reloads", &col(&on.busy, p99)),
        ("without", &col(&on.calm, p99)),
        Some(Goal::AtMost(1.5)),
    );
    t.compare(
        "p99 (ms), start priority off",
        ("with reloads", &col(&off.busy, p99)),
        ("without", &col(&off.calm, p99)),
        Some(Goal::AtMost(1.5)),
    );
    t.ratios(
        "**p99 with reloads: on / off**",
        &crate::report::ratios(&col(&on.busy, p99), &col(&off.busy, p99)),
        None,
    );
    t.ratios(
        "**requests/s with reloads: on / off**",
        &crate::report::ratios(&col(&on.busy, rps), &col(&off.busy, rps)),
        None,
    );
    t.values_with_goal(
        "failed requests with reloads, start priority on",
        &col(&on.busy, failed),
        Goal::AtMost(0.0),
    );
    t.values_with_goal(
        "failed requests with reloads, start priority off",
        &col(&off.busy, failed),
        Goal::AtMost(0.0),
    );
    out.section(
        "15. start priority",
        format!(
            "## 15. Start priority and the latency of reloads under load\n\n\
             `bash bench/run.sh priority`. Two masters of the same build, {WORKERS} workers each: \
             one as it comes (a starting worker runs 10 nice steps below the master until it is \
             ready, `host/src/priority.rs`), one with `HOST_START_NICE=0`. A round runs wrk \
             ({CONNS} keep-alive connections, {seconds} s) on each without reloads and with a \
             `host reload` every {} s (hello v1 and v2 in turn); the order reverses every other \
             round. {rounds} rounds.\n\n{}\n",
            RELOAD_EVERY.as_secs(),
            t.render()
        ),
        &t.goals,
    );
}

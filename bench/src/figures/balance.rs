//! Figure 17 (by name: `balance`): what accept balancing (host/src/balance.rs) does for the
//! latency of a reload under load. Two masters of the same build, one as it comes and one with
//! `balance_accepts = false`, each measured with and without a `host reload` every 2 s, in
//! interleaved rounds; and how the connections split over the workers, counted from the
//! workers' own connection counts in the middle of each run without reloads.

use std::{thread, time::Duration};

use crate::{
    replace,
    report::{ratios, Goal, Results, RoundTable},
    wrk, Master, Service,
};

use super::{col, reload::under_load, Ctx, CONNS, RELOAD_EVERY, WORKERS};

/// One side: a master, its runs without and with reloads, and the share of the connections
/// its busiest worker held in each run without.
struct Side {
    master: Master,
    url: String,
    calm: Vec<wrk::Report>,
    busy: Vec<wrk::Report>,
    busiest: Vec<f64>,
    swaps: usize,
}

impl Side {
    fn start(cx: &Ctx, balance: bool) -> Side {
        let b = &cx.b;
        let mut config = Service::new(&b.hello_v1, WORKERS).toml();
        if !balance {
            config += "balance_accepts = false\n";
        }
        let master = Master::with_config(&b.host, &config, &b.hello_v1, "info", None);
        let url = format!("http://{}/", master.addr());
        Side {
            master,
            url,
            calm: Vec::new(),
            busy: Vec::new(),
            busiest: Vec::new(),
            swaps: 0,
        }
    }

    fn run(&mut self, cx: &Ctx, script: &std::path::Path, reloads: bool) {
        let seconds = cx.mode.reload_secs;
        if !reloads {
            // The split, from the workers' heartbeats (once a second) half-way through.
            let master = &self.master;
            let split = thread::scope(|s| {
                let sampler = s.spawn(|| {
                    thread::sleep(Duration::from_secs(u64::from(seconds)) / 2);
                    busiest_share(master)
                });
                let (r, _) = under_load(&self.url, script, seconds, false, || {});
                self.calm.push(r);
                sampler.join().unwrap()
            });
            self.busiest.push(split);
            return;
        }
        let (master, swaps, b) = (&self.master, &mut self.swaps, &cx.b);
        let (r, _) = under_load(&self.url, script, seconds, true, || {
            replace(b.next_hello(swaps), &master.plugin_path());
            let out = master.cli(&["reload"]);
            assert!(
                out.status.success(),
                "reload failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        });
        self.busy.push(r);
    }
}

/// The busiest worker's share of the service's open connections (0.5: an even split of 2).
fn busiest_share(master: &Master) -> f64 {
    let status = master.status();
    let counts: Vec<f64> = status["services"][0]["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .filter_map(|w| w["connections"].as_f64())
                .collect()
        })
        .unwrap_or_default();
    let total: f64 = counts.iter().sum();
    if total == 0.0 {
        return f64::NAN;
    }
    counts.iter().cloned().fold(0.0, f64::max) / total
}

pub fn balance(cx: &Ctx, out: &mut Results) {
    let (rounds, seconds) = (cx.mode.reload_rounds, cx.mode.reload_secs);
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), wrk::BUCKET_SCRIPT).unwrap();
    let mut on = Side::start(cx, true);
    let mut off = Side::start(cx, false);
    wrk::run(&on.url, CONNS, cx.mode.warmup_secs, None);
    wrk::run(&off.url, CONNS, cx.mode.warmup_secs, None);
    for round in 0..rounds {
        // Alternate who goes first, as figure 2 does.
        let mut order = [(true, false), (true, true), (false, false), (false, true)];
        if round % 2 == 1 {
            order.reverse();
        }
        for (balanced, reloads) in order {
            let side = if balanced { &mut on } else { &mut off };
            side.run(cx, script.path(), reloads);
        }
    }
    let p99 = |r: &wrk::Report| r.p99_ms;
    let rps = |r: &wrk::Report| r.rps;
    let failed = |r: &wrk::Report| r.failed() as f64;
    let mut t = RoundTable::new(rounds);
    t.compare(
        "p99 (ms), balancing on",
        ("with reloads", &col(&on.busy, p99)),
        ("without", &col(&on.calm, p99)),
        Some(Goal::AtMost(1.5)),
    );
    t.compare(
        "p99 (ms), balancing off",
        ("with reloads", &col(&off.busy, p99)),
        ("without", &col(&off.calm, p99)),
        None,
    );
    t.ratios(
        "**p99 with reloads: on / off**",
        &ratios(&col(&on.busy, p99), &col(&off.busy, p99)),
        None,
    );
    t.ratios(
        "**p99 without reloads: on / off**",
        &ratios(&col(&on.calm, p99), &col(&off.calm, p99)),
        None,
    );
    t.ratios(
        "**requests/s with reloads: on / off**",
        &ratios(&col(&on.busy, rps), &col(&off.busy, rps)),
        None,
    );
    t.ratios(
        "**requests/s without reloads: on / off**",
        &ratios(&col(&on.calm, rps), &col(&off.calm, rps)),
        None,
    );
    t.values(
        "busiest worker's share of the connections, without reloads: on",
        &on.busiest,
    );
    t.values(
        "busiest worker's share of the connections, without reloads: off",
        &off.busiest,
    );
    t.values_with_goal(
        "failed requests with reloads, balancing on",
        &col(&on.busy, failed),
        Goal::AtMost(0.0),
    );
    t.values_with_goal(
        "failed requests with reloads, balancing off",
        &col(&off.busy, failed),
        Goal::AtMost(0.0),
    );
    out.section(
        "17. accept balancing",
        format!(
            "## 17. Accept balancing and the latency of reloads under load\n\n\
             `bash bench/run.sh balance`. Two masters of the same build, {WORKERS} workers \
             each: one as it comes (a worker holding more than one connection above the mean of \
             its service's waits 1 ms before it accepts, so that another takes the connection: \
             `host/src/balance.rs`), one with `balance_accepts = false`. A round runs wrk \
             ({CONNS} keep-alive connections, {seconds} s) on each without reloads and with a \
             `host reload` every {} s (hello v1 and v2 in turn); the order reverses every other \
             round. {rounds} rounds. The busiest worker's share is read from `host status` \
             half-way through each run without reloads (0.5 is an even split).\n\n{}\n",
            RELOAD_EVERY.as_secs(),
            t.render()
        ),
        &t.goals,
    );
}

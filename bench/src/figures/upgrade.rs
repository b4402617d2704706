//! Figure 9: replacing the master (`host upgrade`), its wall time with no load by worker count,
//! then runs under keep-alive load with upgrades against runs without; the upgrades themselves
//! (and waiting for the old master to exit) are [`crate::upgrade`]'s.

use std::{
    thread,
    time::{Duration, Instant},
};

use crate::{
    procs,
    report::{self, ratios, Goal, Results, RoundTable},
    upgrade::Masters,
    wrk, Master, Probation, Service,
};

use super::{col, Ctx, CONNS, SETTLE, WORKERS};

/// When the upgrades of a run under load start: at 1 s, then every 2 s, while one can still
/// finish (a canary probation and the starts) before the run ends.
const UPGRADE_FIRST: Duration = Duration::from_secs(1);
const UPGRADE_EVERY: Duration = Duration::from_secs(2);

/// Figure 9: `host upgrade` (the master replaced by a new one from the same executable) with
/// no load, by worker count, with the host's default canary probation (the new master waits
/// for it before it starts the other workers) and with 0; then under keep-alive load, runs with
/// upgrades against runs without, interleaved.
pub fn upgrade(cx: &Ctx, out: &mut Results) {
    let (b, m) = (&cx.b, &cx.mode);
    let variants = [Probation::Default, Probation::Zero];
    let mut time = RoundTable::new(m.upgrade_time_rounds);
    let mut slow_exits = 0usize;
    let mut upgrades = 0usize;
    for &workers in m.upgrade_time_workers {
        let mut masters: Vec<Masters> = variants
            .iter()
            .map(|&p| {
                let service = Service {
                    probation: p,
                    ..Service::new(&b.hello_v1, workers)
                };
                Masters::new(Master::serving(&b.host, &service, "info"))
            })
            .collect();
        let mut walls = vec![Vec::new(); masters.len()];
        for r in 0..m.upgrade_time_rounds {
            let mut order: Vec<usize> = (0..masters.len()).collect();
            if r % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let u = masters[i].upgrade();
                walls[i].push(u.ms);
                upgrades += 1;
                // The next upgrade starts once the old master is gone, as an operator's would;
                // one that takes long is counted, not waited for forever.
                slow_exits += usize::from(!masters[i].wait_gone(u.old_pid));
            }
        }
        for (i, p) in variants.iter().enumerate() {
            time.values(
                &format!("{workers} workers, {}: `host upgrade` (ms)", p.label()),
                &walls[i],
            );
        }
        time.ratios(
            &format!("**{workers} workers: default probation / probation 0**"),
            &ratios(&walls[0], &walls[1]),
            None,
        );
        drop(masters);
    }

    // Under load: the default probation, as a user's `host upgrade` runs.
    let rounds = m.upgrade_load_rounds;
    let secs = m.upgrade_load_secs;
    let mut host = Masters::new(Master::serving(
        &b.host,
        &Service::new(&b.hello_v1, WORKERS),
        "info",
    ));
    let url = format!("http://{}/", host.master.addr());
    wrk::run(&url, CONNS, m.warmup_secs, None);
    let (mut calm, mut busy) = (Vec::new(), Vec::new());
    let (mut per_run, mut upgrade_ms) = (Vec::new(), Vec::new());
    let mut load_slow_exits = 0usize;
    for round in 0..rounds {
        let with_first = round % 2 == 1;
        for with in [with_first, !with_first] {
            if !with {
                calm.push(wrk::run(&url, CONNS, secs, None));
                thread::sleep(SETTLE);
                continue;
            }
            let load = {
                let url = url.clone();
                thread::spawn(move || wrk::run(&url, CONNS, secs, None))
            };
            let start = Instant::now();
            let length = Duration::from_secs(u64::from(secs));
            let (mut at, mut done) = (UPGRADE_FIRST, Vec::new());
            while at + UPGRADE_EVERY <= length {
                thread::sleep(at.saturating_sub(start.elapsed()));
                done.push(host.upgrade());
                at += UPGRADE_EVERY;
            }
            busy.push(load.join().unwrap());
            for u in &done {
                load_slow_exits += usize::from(!host.wait_gone(u.old_pid));
            }
            per_run.push(done.len() as f64);
            upgrade_ms.push(report::spread(&done.iter().map(|u| u.ms).collect::<Vec<_>>()).median);
            thread::sleep(SETTLE);
        }
    }
    let masters_seen = host.seen.len();
    drop(host);
    // Every master the figure started (and every worker of theirs) is gone: anything still
    // running the bench's host binary now was left behind.
    thread::sleep(Duration::from_millis(200));
    let left = procs::running(&b.host);

    let rps = |r: &wrk::Report| r.rps;
    let p99 = |r: &wrk::Report| r.p99_ms;
    let failed = |r: &wrk::Report| r.failed() as f64;
    let timeouts = |r: &wrk::Report| r.timeouts as f64;
    let mut t = RoundTable::new(rounds);
    t.values("upgrades in the run", &per_run);
    t.values(
        "`host upgrade` under load, median of the run (ms)",
        &upgrade_ms,
    );
    t.values_with_goal(
        "failed requests: with upgrades",
        &col(&busy, failed),
        Goal::None,
    );
    t.values("failed requests: without", &col(&calm, failed));
    t.values(
        "of which timeouts (5 s): with upgrades",
        &col(&busy, timeouts),
    );
    t.compare(
        "requests/s",
        ("with upgrades", &col(&busy, rps)),
        ("without", &col(&calm, rps)),
        None,
    );
    t.compare(
        "p99 latency (ms)",
        ("with upgrades", &col(&busy, p99)),
        ("without", &col(&calm, p99)),
        None,
    );
    let mut goals = time.goals.clone();
    goals.extend(t.goals.iter().cloned());
    out.section(
        "9. upgrade",
        format!(
            "## 9. Upgrade\n\n`host upgrade` to the executable the master runs (a new master \
             inherits the listening sockets, starts its workers with the canary rule, takes \
             over; the old master drains its workers and exits), wall time with no load, \
             {rounds_t} rounds per worker count. Each worker count runs two masters, one with \
             the host's default canary probation (which the new master waits for before it \
             starts the other workers) and one with `canary_probation = \"0s\"` and \
             `probation = \"0s\"`, upgraded in turn.\n\n{time}\n\
             Under keep-alive load ({WORKERS} workers, default probation): {rounds} \
             interleaved rounds of a {secs} s wrk run without upgrades and one with a \
             `host upgrade` at 1 s and every 2 s after while it can finish in the run. Failed \
             requests are wrk's socket errors plus non-2xx responses.\n\n{load}\n\
             {upgrades} upgrades with no load and {under} under load; old masters that had not \
             exited {OLD} s after handing over: {slow_exits} with no load, {load_slow_exits} \
             under load. Processes still running the bench's host binary after the figure \
             killed every master it saw ({masters_seen} under load) with its workers' process \
             groups: {left}.\n\n",
            rounds_t = m.upgrade_time_rounds,
            time = time.render(),
            load = t.render(),
            under = per_run.iter().sum::<f64>(),
            OLD = crate::upgrade::OLD_MASTER_EXIT.as_secs(),
            left = left.len(),
        ),
        &goals,
    );
}

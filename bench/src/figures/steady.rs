//! The figures under steady keep-alive load, the host against the baseline in interleaved
//! rounds of one measured wrk run per server: figure 1 (throughput, latency, CPU per request)
//! with figure 4 (memory, sampled around and during figure 1's runs), figure 14 (an async
//! handler against the same handler called inline), figure 16 (`--full`: figure 1 with one
//! worker per server) and figure 18 (`--full`: figure 1 beside a baseline whose split is even).

use crate::{
    prefork::Prefork,
    procs,
    report::{self, Goal, Results, RoundTable, Table},
    wrk, Master, Service,
};

use super::{baseline, col, interleaved, pair, Ctx, Steady, CONNS, WORKERS};

/// Figure 1 (throughput, latency, CPU per request) and figure 4 (memory).
pub fn steady(cx: &Ctx, out: &mut Results) {
    let (b, m) = (&cx.b, &cx.mode);
    let host = Master::serving(&b.host, &Service::new(&b.hello_v1, WORKERS), "info");
    let baseline = baseline(b, None);
    let host_url = format!("http://{}/", host.addr());
    let base_url = format!("http://{}/", baseline.addr);
    // Server CPU is the CPU time of these processes (master and workers, parent and children),
    // never the load generator's.
    let host_pids = host.pids();
    let base_pids = procs::tree(baseline.child.id());
    assert_eq!(
        host_pids.len(),
        WORKERS + 1,
        "host: a master and its workers"
    );
    assert_eq!(
        base_pids.len(),
        WORKERS + 1,
        "baseline: a parent and its children"
    );
    let idle = |pids: &[u32]| pids.iter().map(|p| procs::memory(*p)).collect::<Vec<_>>();
    let (host_idle, base_idle) = (idle(&host_pids), idle(&base_pids));
    wrk::run(&host_url, CONNS, m.warmup_secs, None);
    wrk::run(&base_url, CONNS, m.warmup_secs, None);
    // Figure 4's idle samples between runs: every process of both servers before each round's
    // runs, with no connection open (the last run's closed during SETTLE).
    let (mut host_between, mut base_between) = (Vec::new(), Vec::new());
    let [h, s] = interleaved(
        [(&host_url, &host_pids), (&base_url, &base_pids)],
        m.steady_rounds,
        m.steady_secs,
        || {
            host_between.push(idle(&host_pids));
            base_between.push(idle(&base_pids));
        },
    );
    let mut t = RoundTable::new(m.steady_rounds);
    let rps = |r: &Steady| r.report.rps;
    let p50 = |r: &Steady| r.report.p50_ms;
    let p99 = |r: &Steady| r.report.p99_ms;
    let cpu_us = Steady::cpu_us;
    let failed = |r: &Steady| r.report.failed() as f64;
    cx.host_cpu_us.set(Some((
        report::spread(&col(&h, cpu_us)).median,
        "figure 1 (steady, plain HTTP/1.1)",
    )));
    t.compare(
        "server CPU per request (µs)",
        ("host", &col(&h, cpu_us)),
        ("baseline", &col(&s, cpu_us)),
        Some(Goal::AtMost(1.05)),
    );
    t.compare(
        "requests/s",
        ("host", &col(&h, rps)),
        ("baseline", &col(&s, rps)),
        Some(Goal::AtLeast(0.95)),
    );
    t.compare(
        "p50 latency (ms)",
        ("host", &col(&h, p50)),
        ("baseline", &col(&s, p50)),
        None,
    );
    t.compare(
        "p99 latency (ms)",
        ("host", &col(&h, p99)),
        ("baseline", &col(&s, p99)),
        Some(Goal::AtMost(1.10)),
    );
    t.values("failed requests: host", &col(&h, failed));
    t.values("failed requests: baseline", &col(&s, failed));
    // What decides much of a round's ratio (docs/benchmarks.md, "Why figure 1's spread is
    // wide"): the host balances its accepts, the baseline's split is the kernel's.
    t.values(
        "busiest worker's share of the connections: host",
        &col(&h, Steady::busiest_share),
    );
    t.values(
        "busiest worker's share of the connections: baseline",
        &col(&s, Steady::busiest_share),
    );
    out.section(
        "1. steady",
        format!(
            "## 1. Steady throughput, latency, CPU per request\n\n\
             {} interleaved rounds of {} s per server; host / baseline within each round.\n\n{}\n",
            m.steady_rounds,
            m.steady_secs,
            t.render()
        ),
        &t.goals,
    );

    // Figure 4: RSS, PSS and USS per process, idle (before the load); USS idle between the
    // rounds, against the goal (a host worker within 1 MiB of a baseline worker); RSS
    // half-way through each round.
    let mut idle_t = Table::new(&["process", "RSS (MiB)", "PSS (MiB)", "USS (MiB)"]);
    let mut mem = RoundTable::new(m.steady_rounds);
    let role = |server: &str, i: usize| match i {
        0 if server == "host" => "host master".to_string(),
        0 => format!("{server} parent"),
        i => format!("{server} worker {i}"),
    };
    for (server, pids_idle, runs) in [("host", &host_idle, &h), ("baseline", &base_idle, &s)] {
        for (i, v) in pids_idle.iter().enumerate() {
            idle_t.row(vec![
                role(server, i),
                report::value(v.rss),
                report::value(v.pss),
                report::value(v.uss),
            ]);
            mem.values(
                &format!("{} under load (MiB)", role(server, i)),
                &col(runs, |r| r.rss_loaded.get(i).copied().unwrap_or(0.0)),
            );
        }
    }
    // A worker's USS, the mean over the server's workers (index 0 is the master or parent).
    let worker_uss = |between: &[Vec<procs::Memory>]| -> Vec<f64> {
        between
            .iter()
            .map(|procs| {
                let w = &procs[1..];
                w.iter().map(|m| m.uss).sum::<f64>() / w.len() as f64
            })
            .collect()
    };
    let mut uss = RoundTable::new(m.steady_rounds);
    for (server, between) in [("host", &host_between), ("baseline", &base_between)] {
        for i in 0..=WORKERS {
            uss.values(
                &format!("{} USS, idle (MiB)", role(server, i)),
                &col(between, |p| p[i].uss),
            );
        }
    }
    uss.difference(
        "worker USS, idle (MiB, mean of the workers)",
        ("host", &worker_uss(&host_between)),
        ("baseline", &worker_uss(&base_between)),
        Some(Goal::DifferenceAtMost(1.0, "MiB")),
    );
    uss.values(
        "host worker PSS, idle (MiB, mean of the workers)",
        &col(&host_between, |p| {
            p[1..].iter().map(|m| m.pss).sum::<f64>() / WORKERS as f64
        }),
    );
    uss.values(
        "baseline worker PSS, idle (MiB, mean of the workers)",
        &col(&base_between, |p| {
            p[1..].iter().map(|m| m.pss).sum::<f64>() / WORKERS as f64
        }),
    );
    let total = |r: &Steady| r.rss_loaded.iter().sum::<f64>();
    mem.compare(
        "all processes under load (MiB)",
        ("host", &col(&h, total)),
        ("baseline", &col(&s, total)),
        None,
    );
    out.section(
        "4. memory",
        format!(
            "## 4. Memory (RSS, PSS, USS)\n\nFrom /proc/PID/smaps_rollup: RSS, PSS (shared pages \
             divided among the processes that map them) and USS (Private_Clean + \
             Private_Dirty: what only that process holds). Idle before any load:\n\n{}\n\
             Idle between the rounds of figure 1 (before each round's runs, no connection \
             open), the goal on a worker's USS, host - baseline:\n\n{}\n\
             RSS half-way through each round of figure 1:\n\n{}\n",
            idle_t.render(),
            uss.render(),
            mem.render()
        ),
        &uss.goals,
    );
}

/// Figure 14: the CPU cost per request of an async handler (polled through an FFI-safe future
/// on the host's thread) against the same handler called inline (sync, `BLOCKING = false`) and
/// against the baseline: hello, hello-async and the baseline, measured in interleaved rounds.
pub fn async_path(cx: &Ctx, out: &mut Results) {
    let (b, m) = (&cx.b, &cx.mode);
    let sync = Master::serving(&b.host, &Service::new(&b.hello_v1, WORKERS), "info");
    let asyn = Master::serving(&b.host, &Service::new(&b.hello_async, WORKERS), "info");
    let (sync_url, async_url) = (
        format!("http://{}/", sync.addr()),
        format!("http://{}/", asyn.addr()),
    );
    let (sync_pids, async_pids) = (sync.pids(), asyn.pids());
    // The baseline too: an async plugin is what `host new` writes, the handler mode a new
    // plugin gets, and the goal for it is against the baseline.
    let baseline = baseline(b, None);
    let base_url = format!("http://{}/", baseline.addr);
    let base_pids = procs::tree(baseline.child.id());
    wrk::run(&sync_url, CONNS, m.warmup_secs, None);
    wrk::run(&async_url, CONNS, m.warmup_secs, None);
    wrk::run(&base_url, CONNS, m.warmup_secs, None);
    let [a, s, base] = interleaved(
        [
            (&async_url, &async_pids),
            (&sync_url, &sync_pids),
            (&base_url, &base_pids),
        ],
        m.async_rounds,
        m.async_secs,
        || {},
    );
    let mut t = RoundTable::new(m.async_rounds);
    let cpu_us = Steady::cpu_us;
    let rps = |r: &Steady| r.report.rps;
    let failed = |r: &Steady| r.report.failed() as f64;
    t.compare(
        "server CPU per request (µs)",
        ("async", &col(&a, cpu_us)),
        ("inline sync", &col(&s, cpu_us)),
        None,
    );
    t.ratios(
        "**server CPU per request: async / baseline**",
        &report::ratios(&col(&a, cpu_us), &col(&base, cpu_us)),
        Some(Goal::AtMost(1.15)),
    );
    t.ratios(
        "**server CPU per request: inline sync / baseline**",
        &report::ratios(&col(&s, cpu_us), &col(&base, cpu_us)),
        None,
    );
    t.ratios(
        "**requests/s: async / baseline**",
        &report::ratios(&col(&a, rps), &col(&base, rps)),
        None,
    );
    t.compare(
        "requests/s",
        ("async", &col(&a, rps)),
        ("inline sync", &col(&s, rps)),
        None,
    );
    t.values("failed requests: async", &col(&a, failed));
    t.values("failed requests: inline sync", &col(&s, failed));
    t.values("failed requests: baseline", &col(&base, failed));
    out.section(
        "14. async",
        format!(
            "## 14. Async handlers: CPU per request against the inline sync path\n\n\
             hello-async and hello (the same handler), {} workers each, and the baseline, {} \
             interleaved rounds of {} s per server (who goes first rotates); the ratios within \
             each round.\n\n{}\n",
            WORKERS,
            m.async_rounds,
            m.async_secs,
            t.render()
        ),
        &t.goals,
    );
}

/// Figure 16 (`--full` or by name): figure 1's comparison with one worker per server, where
/// no split of the connections between two workers moves the result (docs/benchmarks.md,
/// "Why figure 1's spread is wide").
pub fn steady_one_worker(cx: &Ctx, out: &mut Results) {
    let (b, m) = (&cx.b, &cx.mode);
    let host = Master::serving(&b.host, &Service::new(&b.hello_v1, 1), "info");
    let baseline = Prefork::start(&b.baseline, 1, &[]);
    let host_url = format!("http://{}/", host.addr());
    let base_url = format!("http://{}/", baseline.addr);
    let (host_pids, base_pids) = (host.pids(), procs::tree(baseline.child.id()));
    let t = pair(
        cx,
        ("host", &host_url, &host_pids),
        ("baseline", &base_url, &base_pids),
        [Some(Goal::AtMost(1.05)), Some(Goal::AtLeast(0.95))],
    );
    out.section(
        "16. steady, one worker",
        format!(
            "## 16. Steady, one worker per server\n\nFigure 1 with `workers = 1` and \
             `baseline --workers 1`: {} interleaved rounds of {} s per server; host / baseline \
             within each round.\n\n{}\n",
            m.steady_rounds,
            m.steady_secs,
            t.render()
        ),
        &t.goals,
    );
}

/// Figure 18 (`--full` or by name): figure 1 with a second baseline beside the first, whose
/// children each listen with `SO_REUSEPORT` (`baseline --reuseport`), so that the kernel
/// splits the connections about evenly, as the host's accept balancing does; the first
/// baseline's split is whatever the accept wake-ups give, and one worker holding every
/// connection is the cheapest way to serve on 2 cores (docs/benchmarks.md, "Why figure 1's
/// spread is wide"). The busiest worker's share of the connections, per run, says which split
/// each round measured.
pub fn steady_even(cx: &Ctx, out: &mut Results) {
    let (b, m) = (&cx.b, &cx.mode);
    let host = Master::serving(&b.host, &Service::new(&b.hello_v1, WORKERS), "info");
    let shared = baseline(b, None);
    let even = Prefork::start(&b.baseline, WORKERS, &["--reuseport"]);
    let urls = [
        format!("http://{}/", host.addr()),
        format!("http://{}/", shared.addr),
        format!("http://{}/", even.addr),
    ];
    let pids = [
        host.pids(),
        procs::tree(shared.child.id()),
        procs::tree(even.child.id()),
    ];
    for url in &urls {
        wrk::run(url, CONNS, m.warmup_secs, None);
    }
    let [h, s, e] = interleaved(
        [
            (&urls[0], &pids[0]),
            (&urls[1], &pids[1]),
            (&urls[2], &pids[2]),
        ],
        m.steady_rounds,
        m.steady_secs,
        || {},
    );
    let mut t = RoundTable::new(m.steady_rounds);
    let cpu_us = Steady::cpu_us;
    let rps = |r: &Steady| r.report.rps;
    t.values("server CPU per request (µs): host", &col(&h, cpu_us));
    t.values(
        "server CPU per request (µs): baseline, one listener",
        &col(&s, cpu_us),
    );
    t.values(
        "server CPU per request (µs): baseline, SO_REUSEPORT",
        &col(&e, cpu_us),
    );
    t.ratios(
        "**server CPU per request: host / baseline, SO_REUSEPORT**",
        &report::ratios(&col(&h, cpu_us), &col(&e, cpu_us)),
        Some(Goal::AtMost(1.05)),
    );
    t.ratios(
        "server CPU per request: host / baseline, one listener (figure 1)",
        &report::ratios(&col(&h, cpu_us), &col(&s, cpu_us)),
        None,
    );
    t.ratios(
        "requests/s: host / baseline, SO_REUSEPORT",
        &report::ratios(&col(&h, rps), &col(&e, rps)),
        Some(Goal::AtLeast(0.95)),
    );
    t.ratios(
        "requests/s: host / baseline, one listener",
        &report::ratios(&col(&h, rps), &col(&s, rps)),
        None,
    );
    let p99 = |r: &Steady| r.report.p99_ms;
    t.ratios(
        "p99 latency: host / baseline, SO_REUSEPORT",
        &report::ratios(&col(&h, p99), &col(&e, p99)),
        Some(Goal::AtMost(1.10)),
    );
    t.ratios(
        "p99 latency: host / baseline, one listener",
        &report::ratios(&col(&h, p99), &col(&s, p99)),
        None,
    );
    let sides = [
        ("host", &h),
        ("baseline, one listener", &s),
        ("baseline, SO_REUSEPORT", &e),
    ];
    for (name, runs) in sides {
        t.values(
            &format!("busiest worker's share of the connections: {name}"),
            &col(runs, Steady::busiest_share),
        );
    }
    for (name, runs) in sides {
        t.values(&format!("p99 latency (ms): {name}"), &col(runs, p99));
    }
    for (name, runs) in sides {
        t.values(
            &format!("failed requests: {name}"),
            &col(runs, |r| r.report.failed() as f64),
        );
    }
    out.section(
        "18. steady, even baseline",
        format!(
            "## 18. Steady, against a baseline whose split is even

Figure 1 (host and \
             baseline, {} workers each) with a second baseline whose children listen with \
             `SO_REUSEPORT` (`baseline --reuseport`): {} interleaved rounds of {} s per server \
             (who goes first rotates); the ratios within each round.\n\n{}\n",
            WORKERS,
            m.steady_rounds,
            m.steady_secs,
            t.render()
        ),
        &t.goals,
    );
}

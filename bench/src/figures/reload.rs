//! The figures of replacing a service's workers with a new build of its plugin: figure 2
//! (reload under load, the host against nginx) with its chart (figure 6) and its long runs
//! (figure 8, `--full`), figure 3 (`host reload` wall time, and where a new worker's start
//! goes), and figure 7 (rebuild latency with `--watch`, measured by [`crate::rebuild`]).

use std::{
    collections::HashSet,
    fs,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use crate::{
    chart,
    nginx::Nginx,
    procs, replace,
    report::{ratios, Goal, Results, RoundTable, Table},
    wrk, Master, Probation, Service,
};

use super::{col, Ctx, CONNS, RELOAD_EVERY, SETTLE, WORKERS};

/// Figure 2 (reload under load, host and nginx) and figure 6 (the chart).
pub fn reload(cx: &Ctx, out: &mut Results) {
    reload_under_load(
        cx,
        out,
        ("2. Reload under load", "2. reload under load"),
        "reload",
        cx.mode.reload_rounds,
        cx.mode.reload_secs,
    );
}

/// `--full` only: figure 2 with 60 s runs, where a slow leak or a late failure would show.
pub fn reload_long(cx: &Ctx, out: &mut Results) {
    reload_under_load(
        cx,
        out,
        (
            "8. Reload under load, long runs",
            "8. reload under load, long",
        ),
        "reload-long",
        5,
        60,
    );
}

#[derive(Clone, Copy)]
enum Run {
    HostCalm,
    HostBusy,
    NginxCalm,
    NginxBusy,
}

fn reload_under_load(
    cx: &Ctx,
    out: &mut Results,
    (title, figure): (&str, &str),
    chart_name: &str,
    rounds: usize,
    seconds: u32,
) {
    let b = &cx.b;
    let script = tempfile::NamedTempFile::new().unwrap();
    fs::write(script.path(), wrk::BUCKET_SCRIPT).unwrap();
    let host = Master::serving(&b.host, &Service::new(&b.hello_v1, WORKERS), "info");
    let nginx = Nginx::start(WORKERS);
    let host_url = format!("http://{}/", host.addr());
    let nginx_url = format!("http://{}/", nginx.addr);
    wrk::run(&host_url, CONNS, cx.mode.warmup_secs, None);
    wrk::run(&nginx_url, CONNS, cx.mode.warmup_secs, None);

    let mut swaps = 0usize;
    let (mut replaced_all, mut host_reloads) = (0usize, 0usize);
    let (mut nginx_changed, mut nginx_reloads) = (0usize, 0usize);
    let (mut hc, mut hb, mut nc, mut nb) = (vec![], vec![], vec![], vec![]);
    let (mut host_moments, mut nginx_moments) = (vec![], vec![]);
    for round in 0..rounds {
        let mut order = [Run::HostCalm, Run::HostBusy, Run::NginxCalm, Run::NginxBusy];
        if round % 2 == 1 {
            order.reverse();
        }
        for run in order {
            match run {
                Run::HostCalm => {
                    hc.push(under_load(&host_url, script.path(), seconds, false, || {}).0)
                }
                Run::HostBusy => {
                    let (r, moments) = under_load(&host_url, script.path(), seconds, true, || {
                        replace(b.next_hello(&mut swaps), &host.plugin_path());
                        let out = host.cli(&["reload"]);
                        let text = String::from_utf8_lossy(&out.stdout).into_owned();
                        assert!(out.status.success(), "reload failed: {text}");
                        host_reloads += 1;
                        replaced_all += usize::from(replaced_every_worker(&text));
                    });
                    hb.push(r);
                    host_moments.push(moments);
                }
                Run::NginxCalm => {
                    nc.push(under_load(&nginx_url, script.path(), seconds, false, || {}).0)
                }
                Run::NginxBusy => {
                    let (r, moments) = under_load(&nginx_url, script.path(), seconds, true, || {
                        let before = procs::tree(nginx.pid);
                        nginx.reload();
                        nginx_reloads += 1;
                        // `nginx -s reload` only signals nginx's master and returns: wait (up to
                        // 1 s, well inside the 2 s between reloads) for its set of processes to
                        // change, or count this reload as one that changed nothing.
                        let start = Instant::now();
                        while procs::tree(nginx.pid) == before {
                            if start.elapsed() > Duration::from_secs(1) {
                                return;
                            }
                            thread::sleep(Duration::from_millis(10));
                        }
                        nginx_changed += 1;
                    });
                    nb.push(r);
                    nginx_moments.push(moments);
                }
            }
        }
    }
    drop(host);
    drop(nginx);

    let rps = |r: &wrk::Report| r.rps;
    let p99 = |r: &wrk::Report| r.p99_ms;
    let failed = |r: &wrk::Report| r.failed() as f64;
    let timeouts = |r: &wrk::Report| r.timeouts as f64;
    let mut t = RoundTable::new(rounds);
    t.values(
        "reloads in the run: host",
        &col(&host_moments, |m| m.len() as f64),
    );
    t.values_with_goal(
        "failed requests: host with reloads",
        &col(&hb, failed),
        Goal::None,
    );
    t.values("failed requests: host without", &col(&hc, failed));
    t.values(
        "of which timeouts (5 s): host with reloads",
        &col(&hb, timeouts),
    );
    t.values("of which timeouts (5 s): host without", &col(&hc, timeouts));
    t.compare(
        "requests/s, host",
        ("with reloads", &col(&hb, rps)),
        ("without", &col(&hc, rps)),
        Some(Goal::AtLeast(0.95)),
    );
    t.compare(
        "p99 latency (ms), host",
        ("with reloads", &col(&hb, p99)),
        ("without", &col(&hc, p99)),
        Some(Goal::AtMost(1.5)),
    );
    t.values(
        "fewest responses in 100 ms: host with reloads",
        &col(&hb, min_bucket),
    );
    t.values("failed requests: nginx with reloads", &col(&nb, failed));
    t.values("failed requests: nginx without", &col(&nc, failed));
    t.values(
        "of which timeouts (5 s): nginx with reloads",
        &col(&nb, timeouts),
    );
    t.compare(
        "requests/s, nginx",
        ("with reloads", &col(&nb, rps)),
        ("without", &col(&nc, rps)),
        None,
    );
    t.compare(
        "p99 latency (ms), nginx",
        ("with reloads", &col(&nb, p99)),
        ("without", &col(&nc, p99)),
        None,
    );
    t.values(
        "fewest responses in 100 ms: nginx with reloads",
        &col(&nb, min_bucket),
    );
    t.ratios(
        "**requests/s with reloads: host / nginx**",
        &ratios(&col(&hb, rps), &col(&nb, rps)),
        None,
    );

    // Figure 6: the last round's runs with reloads, drawn beside the results (not into docs/:
    // a chart goes there with the figures of a quiet machine).
    let svg = cx.out_dir.join(format!("{}-{chart_name}.svg", cx.stem));
    let last = rounds - 1;
    chart::draw(
        &svg,
        &format!(
            "responses per 100 ms, a reload every {} s",
            RELOAD_EVERY.as_secs()
        ),
        &[
            chart::Series {
                name: "host (hello plugin)",
                buckets: &hb[last].buckets,
                reloads: &host_moments[last],
            },
            chart::Series {
                name: "nginx (fixed 200)",
                buckets: &nb[last].buckets,
                reloads: &nginx_moments[last],
            },
        ],
    )
    .expect("could not draw the chart");

    out.section(
        figure,
        format!(
            "## {title}\n\n{rounds} interleaved rounds; in each, 4 runs of {seconds} s of \
             keep-alive load: host without and with a reload every {every} s (`host reload`, \
             the hello v1 and v2 builds in turn), nginx without and with `nginx -s reload` at \
             the same pace. Ratios are with / without within a round. Failed requests are wrk's \
             socket errors (connect, read, write, timeout) plus non-2xx responses.\n\n{table}\n\
             Every host reload replaced every worker in {replaced_all} of {host_reloads} reloads \
             (one `old pid -> new pid` line per worker, no pid kept); nginx's set of processes \
             changed within 1 s of {nginx_changed} of its {nginx_reloads} reloads.\n\n\
             Chart of the last round's runs with reloads (responses per 100 ms, vertical lines \
             at reloads): {svg}\n\n",
            every = RELOAD_EVERY.as_secs(),
            table = t.render(),
            svg = svg.display(),
        ),
        &t.goals,
    );
}

/// A wrk run of `seconds` with the bucket script in a thread, calling `reload` at 2 s, 4 s, ...
/// (while before the end) if `reloads`. Returns wrk's report and the reload moments (unix ms).
pub(super) fn under_load(
    url: &str,
    script: &Path,
    seconds: u32,
    reloads: bool,
    mut reload: impl FnMut(),
) -> (wrk::Report, Vec<u64>) {
    let calls = reloads.then_some((RELOAD_EVERY, &mut reload as &mut dyn FnMut()));
    let run = wrk::run_calling(url, CONNS, seconds, Some(script), calls);
    thread::sleep(SETTLE);
    run
}

/// The fewest responses in a 100 ms bucket, leaving out the first and last (partial) ones.
fn min_bucket(r: &wrk::Report) -> f64 {
    if r.buckets.len() < 3 {
        return 0.0;
    }
    let inner = &r.buckets[1..r.buckets.len() - 1];
    inner.iter().map(|b| b.1).min().unwrap_or(0) as f64
}

/// True if `host reload` printed one `old pid -> new pid` line per worker and no pid was kept.
fn replaced_every_worker(reload_stdout: &str) -> bool {
    // "hello: worker 0: 123 -> 456 (plugin ..., ready in 5 ms)"
    let pairs: Vec<(u32, u32)> = reload_stdout
        .lines()
        .filter(|l| l.contains(" ready in "))
        .filter_map(|l| {
            let (_, rest) = l.split_once(": worker ")?;
            let (_, pids) = rest.split_once(": ")?;
            let (old, rest) = pids.split_once(" -> ")?;
            Some((
                old.parse().ok()?,
                rest.split_whitespace().next()?.parse().ok()?,
            ))
        })
        .collect();
    let old: HashSet<u32> = pairs.iter().map(|p| p.0).collect();
    pairs.len() == WORKERS && pairs.iter().all(|p| !old.contains(&p.1))
}

/// Figure 3: `host reload` wall time by worker count (with the host's default probation and
/// with probation 0, interleaved), and where a worker's start goes.
pub fn reload_time(cx: &Ctx, out: &mut Results) {
    let (b, m) = (&cx.b, &cx.mode);
    let variants: &[Probation] = &[Probation::Zero, Probation::Default];
    let mut t = RoundTable::new(m.reload_time_reloads);
    let mut phases_t = Table::new(&[
        "workers",
        "probation",
        "exec",
        "plugin load",
        "on_start",
        "serve setup",
        "READY report",
        "start total",
        "drain",
    ]);
    for &workers in m.reload_time_workers {
        let masters: Vec<(Probation, Master)> = variants
            .iter()
            .map(|&p| {
                let service = Service {
                    probation: p,
                    ..Service::new(&b.hello_v1, workers)
                };
                (p, Master::serving(&b.host, &service, "host=debug"))
            })
            .collect();
        let mut walls = vec![Vec::new(); masters.len()];
        for r in 0..m.reload_time_reloads {
            let plugin = if r % 2 == 0 { &b.hello_v2 } else { &b.hello_v1 };
            let mut order: Vec<usize> = (0..masters.len()).collect();
            if r % 2 == 1 {
                order.reverse();
            }
            for i in order {
                walls[i].push(masters[i].1.timed_reload(plugin));
            }
        }
        // Let the last drains finish so that their lines are in the log.
        thread::sleep(Duration::from_millis(500));
        for (i, (p, master)) in masters.iter().enumerate() {
            t.values(
                &format!("{workers} workers, {}: `host reload` (ms)", p.label()),
                &walls[i],
            );
            let mut row = vec![workers.to_string(), p.label().to_string()];
            row.extend(
                phases(&master.log(), workers)
                    .iter()
                    .map(|v| format!("{v:.2}")),
            );
            phases_t.row(row);
        }
        if walls.len() == 2 {
            t.ratios(
                &format!("**{workers} workers: default probation / probation 0**"),
                &ratios(&walls[1], &walls[0]),
                None,
            );
        }
    }
    let probation = "Each worker count runs two masters, one with the host's default probation \
                     and one with `canary_probation = \"0s\"` and `probation = \"0s\"` (as \
                     `host dev`), reloaded in turn.";
    out.section(
        "3. reload time",
        format!(
            "## 3. Reload time\n\n`host reload` wall time, {} reloads per worker count (the hello \
             v1 and v2 builds in turn), each reload a round. {probation}\n\n{}\n\
             Where a new worker's start goes (ms, averaged over every worker the reloads \
             started, from the phases each worker logs at debug level with its READY; drain is \
             from `Drain` to the old worker's exit):\n\n{}\n",
            m.reload_time_reloads,
            t.render(),
            phases_t.render()
        ),
        &t.goals,
    );
}

/// The averages of the start phases (exec, plugin load, on_start, serve setup, READY report,
/// total) of the workers that reloads started, and of the drains, from a master's debug log.
fn phases(log: &str, workers: usize) -> [f64; 7] {
    let starts: Vec<Vec<f64>> = log
        .lines()
        .filter_map(|l| l.split_once("start phases (ms): ").map(|(_, rest)| rest))
        .skip(workers) // the initial start
        .map(|rest| {
            rest.split(", ")
                .filter_map(|kv| kv.rsplit_once(' ')?.1.parse().ok())
                .collect()
        })
        .collect();
    let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let drains: Vec<f64> = log
        .lines()
        .filter_map(|l| {
            l.split_once("after draining for ")
                .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
        })
        .collect();
    let mut out = [0.0; 7];
    for (i, o) in out.iter_mut().take(6).enumerate() {
        *o = avg(&starts
            .iter()
            .filter_map(|p| p.get(i).copied())
            .collect::<Vec<_>>());
    }
    out[6] = avg(&drains);
    out
}

/// Figure 7: rebuild latency with `--watch` against swap + `host reload` (`bench::rebuild`).
pub fn rebuild(cx: &Ctx, out: &mut Results) {
    let rounds = cx.mode.rebuild_rounds;
    let t = crate::rebuild::run(&cx.b, rounds);
    out.section(
        "7. rebuild latency",
        format!(
            "## 7. Rebuild latency (`--watch`)\n\nFrom the rebuilt plugin file appearing to the \
             first response from the new code, 4 workers, the watcher's default debounce; \
             against the same swap followed by `host reload` on a second master; {rounds} \
             interleaved rounds.\n\n{}\n",
            t.render()
        ),
        &t.goals,
    );
}

//! The benchmark suite of docs/benchmarks.md: every figure, in one of three modes.
//!
//! `suite [--quick | --full] [FIGURE...]` (`bash bench/run.sh [--quick | --full]` installs wrk,
//! h2load and nginx first, then runs this). Every comparison runs both sides in the same run,
//! interleaved round by round (the order alternates between rounds), and reports the ratio per
//! round, then the median ratio and its spread [min-max] over the rounds, with a verdict against
//! its goal (`bench::report`). The results are printed and written as Markdown to
//! `<target>/bench-results/<mode>-<date>.md`.

use std::{
    cell::Cell,
    collections::HashSet,
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use bench::{
    build, build_boundary, cargo_command, chart,
    nginx::Nginx,
    prefork::Prefork,
    procs, replace,
    report::{self, ratios, Goal, Results, RoundTable, Table},
    root,
    scaling::figures as scaling,
    target_dir,
    tls::Certs,
    upgrade::Masters,
    wrk, Build, Master, Mode, Probation, Service,
};

/// Worker processes for the host, the baseline and nginx alike.
const WORKERS: usize = 2;
/// wrk's keep-alive connections (one wrk thread: it takes about one of the two cores).
const CONNS: u32 = 32;
/// The reload-under-load goal's pace.
const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// Pause between two measured runs, so that the last run's connections are closed and its
/// drained workers gone before the next one starts.
const SETTLE: Duration = Duration::from_millis(200);

/// What every figure gets: the builds, the mode, and where to put files beside the results.
struct Ctx {
    b: Build,
    mode: Mode,
    out_dir: PathBuf,
    /// `<mode>-<date>`: the results file's name without `.md`, the prefix of the others.
    stem: String,
    /// The host's median server CPU per request (µs) measured earlier in this run, and by which
    /// figure: figure 12 puts the metrics counting's ns beside it.
    host_cpu_us: Cell<Option<(f64, &'static str)>>,
}

struct Figure {
    name: &'static str,
    run: fn(&Ctx, &mut Results),
    /// Whether `--quick` without figure names runs it (a figure named on the command line runs
    /// in any mode). The figures that quick leaves out would take it past its 3 min budget.
    quick: bool,
}

/// The figures of the default mode (and of `--quick`, with fewer and shorter runs, those marked
/// `quick`).
const FIGURES: &[Figure] = &[
    Figure {
        name: "steady",
        run: steady,
        quick: true,
    },
    Figure {
        name: "reload",
        run: reload,
        quick: true,
    },
    Figure {
        name: "time",
        run: reload_time,
        quick: true,
    },
    Figure {
        name: "upgrade",
        run: upgrade,
        quick: true,
    },
    Figure {
        name: "boundary",
        run: boundary,
        quick: true,
    },
    Figure {
        name: "rebuild",
        run: rebuild,
        quick: true,
    },
    Figure {
        name: "tls",
        run: tls,
        quick: false,
    },
    Figure {
        name: "accesslog",
        run: access_log,
        quick: false,
    },
    Figure {
        name: "stats",
        run: stats,
        quick: false,
    },
    Figure {
        name: "async",
        run: async_path,
        quick: false,
    },
];

/// The figures only `--full` runs, after the default ones (or any mode when they are named):
/// the long runs; figure 13 (gateway), which would take the default mode past its 20 min
/// (docs/benchmarks.md, "Modes"); and the scaling curves (`bench::scaling`: reload time by
/// workers and by plugin size, reload under load by connections, memory by idle connections,
/// edit -> live); figure 16, figure 1 with one worker per server. Each gets its name here and a function below or in `bench::scaling`.
const FULL_ONLY: &[Figure] = &[
    Figure {
        name: "reload-long",
        run: reload_long,
        quick: false,
    },
    Figure {
        name: "gateway",
        run: gateway,
        quick: false,
    },
    Figure {
        name: "scale-workers",
        run: |cx, out| scaling::workers(&cx.scaling(), out),
        quick: false,
    },
    Figure {
        name: "scale-size",
        run: |cx, out| scaling::size(&cx.scaling(), out),
        quick: false,
    },
    Figure {
        name: "scale-conns",
        run: |cx, out| scaling::conns(&cx.scaling(), out),
        quick: false,
    },
    Figure {
        name: "scale-memory",
        run: |cx, out| scaling::memory(&cx.scaling(), out),
        quick: false,
    },
    Figure {
        name: "edit-live",
        run: |cx, out| scaling::edit_live(&cx.scaling(), out),
        quick: false,
    },
    Figure {
        name: "steady-1",
        run: steady_one_worker,
        quick: false,
    },
];

impl Ctx {
    /// What the scaling curves get from the suite.
    fn scaling(&self) -> scaling::Ctx<'_> {
        scaling::Ctx {
            b: &self.b,
            mode: &self.mode,
            out_dir: &self.out_dir,
            stem: &self.stem,
            workers: WORKERS,
        }
    }
}

fn usage() -> ! {
    let names: Vec<&str> = FIGURES.iter().chain(FULL_ONLY).map(|f| f.name).collect();
    let not_quick: Vec<&str> = FIGURES
        .iter()
        .filter(|f| !f.quick)
        .map(|f| f.name)
        .collect();
    eprintln!(
        "usage: suite [--quick | --full] [FIGURE...]\n  figures: {} (the last {} only with \
         --full or when named; {} only when named with --quick)",
        names.join(", "),
        FULL_ONLY.len(),
        not_quick.join(", ")
    );
    std::process::exit(2);
}

fn main() {
    let mut mode = bench::DEFAULT;
    let mut only = Vec::new();
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--quick" => mode = bench::QUICK,
            "--full" => mode = bench::FULL,
            "--default" => mode = bench::DEFAULT,
            name if !name.starts_with('-')
                && FIGURES.iter().chain(FULL_ONLY).any(|f| f.name == name) =>
            {
                only.push(name.to_string())
            }
            _ => usage(),
        }
    }
    let figures: Vec<&Figure> = FIGURES
        .iter()
        // A figure named on the command line runs in any mode, with that mode's settings.
        .chain(if mode.name == "full" || !only.is_empty() {
            FULL_ONLY
        } else {
            &[]
        })
        .filter(|f| {
            if only.is_empty() {
                f.quick || mode.name != "quick"
            } else {
                only.iter().any(|o| o == f.name)
            }
        })
        .collect();
    if figures.is_empty() {
        usage();
    }

    let started = Instant::now();
    let b = build();
    if figures
        .iter()
        .any(|f| f.name == "boundary" || f.name == "stats")
    {
        build_boundary();
    }
    let build_time = started.elapsed();

    let measuring = Instant::now();
    let stem = format!("{}-{}", mode.name, report::utc_now("+%Y-%m-%dT%H%M%SZ"));
    let out_dir = target_dir().join("bench-results");
    let cx = Ctx {
        b,
        mode,
        out_dir: out_dir.clone(),
        stem: stem.clone(),
        host_cpu_us: Cell::new(None),
    };
    let mut results = Results::new(out_dir.join(format!("{stem}.md")), header(&cx, &figures));
    let mut per_figure = Table::new(&["figure", "took"]);
    for f in &figures {
        let start = Instant::now();
        (f.run)(&cx, &mut results);
        per_figure.row(vec![f.name.to_string(), duration(start.elapsed())]);
    }
    let took = measuring.elapsed();
    // The goals table heads the file; printed here too, after the figures scrolled by.
    print!("\n{}", results.summary());
    let budget = match mode.budget {
        Some(b) if took <= b => format!("within its budget of {}", duration(b)),
        Some(b) => format!("**over its budget of {}**", duration(b)),
        None => "no budget".to_string(),
    };
    results.footer(format!(
        "## Time\n\nMode {}: the measurements took {} ({budget}); the build before them {}.\n\n\
         {}",
        mode.name,
        duration(took),
        duration(build_time),
        per_figure.render()
    ));
    println!("\nResults written to {}", results.path.display());
}

fn duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{} min {} s", s / 60, s % 60)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

fn header(cx: &Ctx, figures: &[&Figure]) -> String {
    let m = &cx.mode;
    let machine = report::machine();
    let names: Vec<&str> = figures.iter().map(|f| f.name).collect();
    format!(
        "# Benchmark results: {mode} mode\n\n\
         - date: {date}\n\
         - commit: {commit}\n\
         - machine: {cores} cores (available_parallelism), {cpu}, kernel {kernel}\n\
         - load tool: {wrk}, 1 thread, {CONNS} keep-alive connections, to 127.0.0.1\n\
         - workers: {WORKERS} worker processes per server (host with the hello plugin, \
           baseline, {nginx})\n\
         - mode: {mode}: steady {sr} rounds of {ss} s per server; reload under load {rr} rounds \
           of {rs} s per run, a reload every {every} s; reload time {rt} reloads at {rw:?} \
           workers; upgrade time {ut} rounds at {uw:?} workers; upgrades under load {ul} rounds \
           of {us} s per run; rebuild latency {rb} rounds; plugin boundary {br} rounds; HTTPS \
           {tr} rounds of {ts} s per run; access log {ar} rounds of {as_} s per run; metrics \
           counting {mr} rounds; WebSocket gateway {gr} rounds of {gs} s per run, {gn} idle \
           connections\n\
         {https}{websocket}\
         - figures: {names}\n\
         - probation keys: {probation}\n\n",
        mode = m.name,
        date = report::utc_now("+%Y-%m-%d %H:%M:%S UTC"),
        commit = report::commit(&root()),
        cores = machine.cores,
        cpu = machine.cpu,
        kernel = machine.kernel,
        wrk = machine.wrk,
        nginx = machine.nginx,
        sr = m.steady_rounds,
        ss = m.steady_secs,
        rr = m.reload_rounds,
        rs = m.reload_secs,
        every = RELOAD_EVERY.as_secs(),
        rt = m.reload_time_reloads,
        rw = m.reload_time_workers,
        rb = m.rebuild_rounds,
        ut = m.upgrade_time_rounds,
        uw = m.upgrade_time_workers,
        ul = m.upgrade_load_rounds,
        us = m.upgrade_load_secs,
        br = m.boundary_rounds,
        tr = m.tls_rounds,
        ts = m.tls_secs,
        ar = m.access_log_rounds,
        as_ = m.access_log_secs,
        mr = m.stats_rounds,
        gr = m.gateway_rounds,
        gs = m.gateway_secs,
        gn = m.gateway_idle_conns,
        https = if names.contains(&"tls") {
            format!(
                "- HTTPS: {} for HTTP/2 ({H2_CONNS} connections, {H2_STREAMS} streams each), wrk \
                 for HTTP/1.1, the bench's own client ({HANDSHAKE_CLIENTS} threads) for a new \
                 connection per request\n",
                bench::tls::h2load_version()
            )
        } else {
            String::new()
        },
        websocket = if names.contains(&"gateway") {
            format!(
                "- WebSocket: the bench's own client (tokio-tungstenite, 1 thread, {} \
                 connections for the echo runs)\n",
                bench::gateway::CONNS
            )
        } else {
            String::new()
        },
        names = names.join(", "),
        probation = "reload time with the host's defaults and with 0 s",
    )
}

/// The baseline server (bench/src/bin/baseline.rs); with `tls`, it serves HTTPS (HTTP/2 or
/// HTTP/1.1 by ALPN) with that certificate.
fn baseline(b: &Build, tls: Option<&Certs>) -> Prefork {
    let tls_args = tls.map(|c| {
        [
            "--tls-cert".to_string(),
            c.cert.display().to_string(),
            "--tls-key".to_string(),
            c.key.display().to_string(),
        ]
    });
    let args: Vec<&str> = tls_args.iter().flatten().map(String::as_str).collect();
    Prefork::start(&b.baseline, WORKERS, &args)
}

/// One measured steady run: wrk's report, server CPU seconds, and RSS (MiB) per process
/// sampled half-way through.
struct Steady {
    report: wrk::Report,
    cpu: f64,
    rss_loaded: Vec<f64>,
}

fn measure(url: &str, pids: &[u32], seconds: u32) -> Steady {
    let cpu0 = procs::cpu_seconds(pids);
    let sampler = {
        let pids = pids.to_vec();
        thread::spawn(move || {
            thread::sleep(Duration::from_secs(u64::from(seconds)) / 2);
            pids.iter().map(|p| procs::rss_mib(*p)).collect::<Vec<_>>()
        })
    };
    let report = wrk::run(url, CONNS, seconds, None);
    let cpu = procs::cpu_seconds(pids) - cpu0;
    thread::sleep(SETTLE);
    Steady {
        report,
        cpu,
        rss_loaded: sampler.join().unwrap(),
    }
}

fn col<T>(runs: &[T], f: impl Fn(&T) -> f64) -> Vec<f64> {
    runs.iter().map(f).collect()
}

/// Figure 14: the CPU cost per request of an async handler (polled through an FFI-safe future
/// on the host's thread) against the same handler called inline (sync, `BLOCKING = false`) and
/// against the baseline: hello, hello-async and the baseline, measured in interleaved rounds.
fn async_path(cx: &Ctx, out: &mut Results) {
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
    let (mut s, mut a, mut base) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..m.async_rounds {
        let mut order = [
            (&async_url, &async_pids, &mut a),
            (&sync_url, &sync_pids, &mut s),
            (&base_url, &base_pids, &mut base),
        ];
        // Who goes first rotates, so that a drift within a round favours no one side.
        order.rotate_left(round % 3);
        for (url, pids, runs) in order {
            runs.push(measure(url, pids, m.async_secs));
        }
    }
    let mut t = RoundTable::new(m.async_rounds);
    let cpu_us = |r: &Steady| r.cpu / r.report.requests as f64 * 1e6;
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
fn steady_one_worker(cx: &Ctx, out: &mut Results) {
    let (b, m) = (&cx.b, &cx.mode);
    let host = Master::serving(&b.host, &Service::new(&b.hello_v1, 1), "info");
    let baseline = Prefork::start(&b.baseline, 1, &[]);
    let host_url = format!("http://{}/", host.addr());
    let base_url = format!("http://{}/", baseline.addr);
    let (host_pids, base_pids) = (host.pids(), procs::tree(baseline.child.id()));
    wrk::run(&host_url, CONNS, m.warmup_secs, None);
    wrk::run(&base_url, CONNS, m.warmup_secs, None);
    let (mut h, mut s) = (Vec::new(), Vec::new());
    for round in 0..m.steady_rounds {
        if round % 2 == 0 {
            h.push(measure(&host_url, &host_pids, m.steady_secs));
            s.push(measure(&base_url, &base_pids, m.steady_secs));
        } else {
            s.push(measure(&base_url, &base_pids, m.steady_secs));
            h.push(measure(&host_url, &host_pids, m.steady_secs));
        }
    }
    let mut t = RoundTable::new(m.steady_rounds);
    let cpu_us = |r: &Steady| r.cpu / r.report.requests as f64 * 1e6;
    t.compare(
        "server CPU per request (µs)",
        ("host", &col(&h, cpu_us)),
        ("baseline", &col(&s, cpu_us)),
        Some(Goal::AtMost(1.05)),
    );
    t.compare(
        "requests/s",
        ("host", &col(&h, |r| r.report.rps)),
        ("baseline", &col(&s, |r| r.report.rps)),
        Some(Goal::AtLeast(0.95)),
    );
    t.values(
        "failed requests: host",
        &col(&h, |r| r.report.failed() as f64),
    );
    t.values(
        "failed requests: baseline",
        &col(&s, |r| r.report.failed() as f64),
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

/// Figure 1 (throughput, latency, CPU per request) and figure 4 (memory).
fn steady(cx: &Ctx, out: &mut Results) {
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
    let (mut h, mut s) = (Vec::new(), Vec::new());
    // Figure 4's idle samples between runs: every process of both servers before each round's
    // runs, with no connection open (the last run's closed during SETTLE).
    let (mut host_between, mut base_between) = (Vec::new(), Vec::new());
    for round in 0..m.steady_rounds {
        host_between.push(idle(&host_pids));
        base_between.push(idle(&base_pids));
        // Alternate who goes first, so that a drift within a round (the other engineer's build
        // starting, a clock change) does not always land on the same server.
        if round % 2 == 0 {
            h.push(measure(&host_url, &host_pids, m.steady_secs));
            s.push(measure(&base_url, &base_pids, m.steady_secs));
        } else {
            s.push(measure(&base_url, &base_pids, m.steady_secs));
            h.push(measure(&host_url, &host_pids, m.steady_secs));
        }
    }
    let mut t = RoundTable::new(m.steady_rounds);
    let rps = |r: &Steady| r.report.rps;
    let p50 = |r: &Steady| r.report.p50_ms;
    let p99 = |r: &Steady| r.report.p99_ms;
    let cpu_us = |r: &Steady| r.cpu / r.report.requests as f64 * 1e6;
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

/// A wrk run of `seconds` with the bucket script in a thread, calling `reload` at 2 s, 4 s, ...
/// (while before the end) if `reloads`. Returns wrk's report and the reload moments (unix ms).
fn under_load(
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

/// Figure 2 (reload under load, host and nginx) and figure 6 (the chart).
fn reload(cx: &Ctx, out: &mut Results) {
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
fn reload_long(cx: &Ctx, out: &mut Results) {
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

/// Figure 3: `host reload` wall time by worker count (with the host's default probation and
/// with probation 0, interleaved), and where a worker's start goes.
fn reload_time(cx: &Ctx, out: &mut Results) {
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

/// When the upgrades of a run under load start: at 1 s, then every 2 s, while one can still
/// finish (a canary probation and the starts) before the run ends.
const UPGRADE_FIRST: Duration = Duration::from_secs(1);
const UPGRADE_EVERY: Duration = Duration::from_secs(2);

/// Figure 9: `host upgrade` (the master replaced by a new one from the same executable) with
/// no load, by worker count, with the host's default canary probation (the new master waits
/// for it before it starts the other workers) and with 0; then under keep-alive load, runs with
/// upgrades against runs without, interleaved.
fn upgrade(cx: &Ctx, out: &mut Results) {
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
            OLD = bench::upgrade::OLD_MASTER_EXIT.as_secs(),
            left = left.len(),
        ),
        &goals,
    );
}

/// Figure 5: the criterion microbenchmark in benches/boundary.rs, run as its own process.
fn boundary(cx: &Ctx, out: &mut Results) {
    let m = &cx.mode;
    let md = cx.out_dir.join(format!("{}-boundary.md", cx.stem));
    let log_path = cx.out_dir.join(format!("{}-boundary.log", cx.stem));
    let log = fs::File::create(&log_path).unwrap();
    let ok = cargo_command()
        .args([
            "bench",
            "-p",
            "bench",
            "--bench",
            "boundary",
            "--target-dir",
        ])
        .arg(bench::boundary_target())
        .current_dir(root())
        // Criterion's own files next to the results, not in a target/ below bench/.
        .env("CRITERION_HOME", cx.out_dir.join("criterion"))
        .env("BENCH_MODE", m.name)
        .env("BENCH_HELLO_SO", &cx.b.hello_v1)
        .env("BENCH_BOUNDARY_MD", &md)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap()
        .success();
    assert!(
        ok,
        "the boundary benchmark failed: see {}",
        log_path.display()
    );
    let table = fs::read_to_string(&md).unwrap();
    let _ = fs::remove_file(&md);
    out.section(
        "5. boundary",
        format!(
            "## 5. Plugin boundary cost\n\n`cargo bench -p bench --bench boundary` (criterion): \
             one hello request through the plugin ABI against a direct call of the same handler \
             linked statically, {} interleaved rounds of {} ms warm-up and {} ms measurement \
             each; criterion's own report: {}\n\n{table}\n",
            m.boundary_rounds,
            m.boundary_warmup.as_millis(),
            m.boundary_measure.as_millis(),
            log_path.display()
        ),
        &[],
    );
}

/// Figure 7: rebuild latency with `--watch` against swap + `host reload` (`bench::rebuild`).
fn rebuild(cx: &Ctx, out: &mut Results) {
    let rounds = cx.mode.rebuild_rounds;
    let t = bench::rebuild::run(&cx.b, rounds);
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

/// h2load's connections and concurrent streams on each: 32 requests in flight, as wrk's 32
/// connections, 4 streams at a time on each connection (HTTP/2's multiplexing).
const H2_CONNS: u32 = 8;
const H2_STREAMS: u32 = 4;
/// Threads of the new-connection-per-request client (each one connection at a time).
const HANDSHAKE_CLIENTS: usize = 4;

/// Runs `f` and returns what it returned with the server CPU seconds of `pids` meanwhile, then
/// lets the connections close.
fn with_cpu<T>(pids: &[u32], f: impl FnOnce() -> T) -> (T, f64) {
    let cpu0 = procs::cpu_seconds(pids);
    let r = f();
    let cpu = procs::cpu_seconds(pids) - cpu0;
    thread::sleep(SETTLE);
    (r, cpu)
}

/// Figure 10: HTTPS and HTTP/2, host against the baseline with the same TLS (rustls with
/// ring, the same certificate, ALPN h2 and http/1.1), interleaved: HTTP/1.1 over TLS with
/// keep-alive (wrk), HTTP/2 (h2load), and a new TLS connection for every request (the bench's
/// client: a full handshake each), whose server CPU less the keep-alive CPU per request is the
/// handshake's.
fn tls(cx: &Ctx, out: &mut Results) {
    let (b, m) = (&cx.b, &cx.mode);
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(certs_dir.path());
    let host = Master::serving(
        &b.host,
        &Service {
            tls: Some((&certs.cert, &certs.key)),
            ..Service::new(&b.hello_v1, WORKERS)
        },
        "info",
    );
    let baseline = baseline(b, Some(&certs));
    let addrs = [host.addr(), baseline.addr.clone()];
    let pids = [host.pids(), procs::tree(baseline.child.id())];
    assert!(pids.iter().all(|p| p.len() == WORKERS + 1));
    let urls = addrs.clone().map(|a| format!("https://{a}/"));
    let client = certs.client_config();
    let secs = m.tls_secs;
    let run_for = Duration::from_secs(u64::from(secs));
    for i in 0..2 {
        wrk::run(&urls[i], CONNS, m.warmup_secs, None);
        bench::tls::h2load(&urls[i], H2_CONNS, H2_STREAMS, m.warmup_secs);
        bench::tls::handshakes(
            &addrs[i],
            &client,
            HANDSHAKE_CLIENTS,
            Duration::from_secs(u64::from(m.warmup_secs)),
        );
    }
    let mut h1: [Vec<(wrk::Report, f64)>; 2] = Default::default();
    let mut h2: [Vec<(bench::tls::H2Report, f64)>; 2] = Default::default();
    let mut hs: [Vec<(bench::tls::Handshakes, f64)>; 2] = Default::default();
    for round in 0..m.tls_rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            h1[i].push(with_cpu(&pids[i], || wrk::run(&urls[i], CONNS, secs, None)));
        }
        for i in order {
            h2[i].push(with_cpu(&pids[i], || {
                bench::tls::h2load(&urls[i], H2_CONNS, H2_STREAMS, secs)
            }));
        }
        for i in order {
            hs[i].push(with_cpu(&pids[i], || {
                bench::tls::handshakes(&addrs[i], &client, HANDSHAKE_CLIENTS, run_for)
            }));
        }
    }
    let negotiated = hs[0]
        .iter()
        .map(|h| h.0.negotiated.clone())
        .find(|n| !n.is_empty())
        .unwrap_or_default();
    drop(host);
    drop(baseline);

    let us = |cpu: f64, n: f64| cpu / n * 1e6;
    let h1_cpu = |i: usize| col(&h1[i], |(r, c)| us(*c, r.requests as f64));
    let h2_cpu = |i: usize| col(&h2[i], |(r, c)| us(*c, r.ok as f64));
    let hs_cpu = |i: usize| col(&hs[i], |(r, c)| us(*c, r.done as f64));
    // What a new connection costs the server beyond its one request: the handshake (and the
    // TCP accept and close), against the keep-alive CPU per request of the same round.
    let handshake = |i: usize| -> Vec<f64> {
        hs_cpu(i)
            .iter()
            .zip(h1_cpu(i))
            .map(|(conn, req)| conn - req)
            .collect()
    };
    let mut t = RoundTable::new(m.tls_rounds);
    let sides = |f: &dyn Fn(usize) -> Vec<f64>| (f(0), f(1));
    let cmp = |t: &mut RoundTable, what: &str, (a, b): (Vec<f64>, Vec<f64>)| {
        t.compare(what, ("host", &a), ("baseline", &b), None)
    };
    cmp(
        &mut t,
        "HTTP/1.1 over TLS, keep-alive: server CPU per request (µs)",
        sides(&h1_cpu),
    );
    cmp(
        &mut t,
        "HTTP/1.1 over TLS, keep-alive: requests/s",
        sides(&|i| col(&h1[i], |(r, _)| r.rps)),
    );
    cmp(
        &mut t,
        "HTTP/1.1 over TLS, keep-alive: p50 latency (ms)",
        sides(&|i| col(&h1[i], |(r, _)| r.p50_ms)),
    );
    cmp(
        &mut t,
        "HTTP/1.1 over TLS, keep-alive: p99 latency (ms)",
        sides(&|i| col(&h1[i], |(r, _)| r.p99_ms)),
    );
    cmp(
        &mut t,
        "HTTP/2: server CPU per request (µs)",
        sides(&h2_cpu),
    );
    cmp(
        &mut t,
        "HTTP/2: requests/s",
        sides(&|i| col(&h2[i], |(r, _)| r.rps)),
    );
    cmp(
        &mut t,
        "HTTP/2: mean latency (ms)",
        sides(&|i| col(&h2[i], |(r, _)| r.mean_ms)),
    );
    cmp(
        &mut t,
        "new TLS connection per request: server CPU per connection (µs)",
        sides(&hs_cpu),
    );
    cmp(
        &mut t,
        "new TLS connection per request: connections/s",
        sides(&|i| col(&hs[i], |(r, _)| r.per_second())),
    );
    cmp(
        &mut t,
        "handshake (CPU per new connection − per keep-alive request, µs)",
        sides(&handshake),
    );
    for (i, side) in ["host", "baseline"].iter().enumerate() {
        t.values(
            &format!("failed requests, HTTP/1.1 over TLS: {side}"),
            &col(&h1[i], |(r, _)| r.failed() as f64),
        );
        t.values(
            &format!("failed requests, HTTP/2: {side}"),
            &col(&h2[i], |(r, _)| r.failed as f64),
        );
        t.values(
            &format!("failed connections, new connection per request: {side}"),
            &col(&hs[i], |(r, _)| r.failed as f64),
        );
    }
    out.section(
        "10. https",
        format!(
            "## 10. HTTPS and HTTP/2\n\nThe host with `tls = {{ cert, key }}` against the \
             baseline with the same TLS (rustls with ring, the same certificate: ECDSA P-256 \
             signed by a CA made for this run; ALPN `h2`, `http/1.1`), {rounds} interleaved \
             rounds; in each, per server: {secs} s of HTTP/1.1 over TLS with keep-alive (wrk, \
             {CONNS} connections), {secs} s of HTTP/2 (h2load, {H2_CONNS} connections of \
             {H2_STREAMS} concurrent streams), {secs} s of a new connection per request (the \
             bench's client, {HANDSHAKE_CLIENTS} threads: connect, full handshake with no \
             session resumption, `GET /` with `Connection: close`, read the response, close). \
             Server CPU is every process of the server, as in figure 1; the handshake's is a new \
             connection's less a keep-alive request's of the same round. Negotiated by the \
             new connections: {negotiated}.\n\n{table}\n",
            rounds = m.tls_rounds,
            table = t.render(),
        ),
        &t.goals,
    );
}

/// Figure 11: the access log's cost on the request path: the host with no access log, with a
/// JSON access log to a file on disk, and to /dev/null, interleaved.
fn access_log(cx: &Ctx, out: &mut Results) {
    let (b, m) = (&cx.b, &cx.mode);
    // The system's temp dir: on this machine's disk (the root file system), not tmpfs.
    let log_dir = tempfile::tempdir().unwrap();
    let file = log_dir.path().join("access.log");
    let variants: [(&str, Option<&Path>); 3] = [
        ("off", None),
        ("json to a file", Some(&file)),
        ("json to /dev/null", Some(Path::new("/dev/null"))),
    ];
    let masters = variants.map(|(_, log)| {
        Master::serving(
            &b.host,
            &Service {
                access_log: log,
                ..Service::new(&b.hello_v1, WORKERS)
            },
            "info",
        )
    });
    let urls = masters.each_ref().map(|h| format!("http://{}/", h.addr()));
    let pids = masters.each_ref().map(|h| h.pids());
    assert!(pids.iter().all(|p| p.len() == WORKERS + 1));
    for url in &urls {
        wrk::run(url, CONNS, m.warmup_secs, None);
    }
    let truncate = || {
        fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(0)
            .unwrap()
    };
    thread::sleep(SETTLE);
    truncate();
    let mut runs: [Vec<Steady>; 3] = Default::default();
    let mut lines_per_request = Vec::new();
    for round in 0..m.access_log_rounds {
        // Each variant goes first, second and third in turn.
        for k in 0..3 {
            let i = (round + k) % 3;
            runs[i].push(measure(&urls[i], &pids[i], m.access_log_secs));
            if i == 1 {
                // `measure` waited SETTLE after the run: the writer thread has emptied its queue.
                let lines = fs::read(&file)
                    .unwrap()
                    .iter()
                    .filter(|c| **c == b'\n')
                    .count();
                let requests = runs[1].last().unwrap().report.requests;
                lines_per_request.push(lines as f64 / requests as f64);
                truncate();
            }
        }
    }
    // The host logs how many lines a worker dropped when its writer fell behind (at each power
    // of two); the largest count in a master's log.
    let dropped = |h: &Master| {
        h.log()
            .lines()
            .filter_map(|l| {
                let (_, rest) = l.split_once("access log: the writer is behind; ")?;
                rest.split_whitespace().next()?.parse::<u64>().ok()
            })
            .max()
            .unwrap_or(0)
    };
    let dropped = masters.each_ref().map(dropped);
    drop(masters);

    let cpu_us = |r: &Steady| r.cpu / r.report.requests as f64 * 1e6;
    let cpu = runs.each_ref().map(|r| col(r, cpu_us));
    if cx.host_cpu_us.get().is_none() {
        cx.host_cpu_us.set(Some((
            report::spread(&cpu[0]).median,
            "figure 11 (access log off)",
        )));
    }
    let mut t = RoundTable::new(m.access_log_rounds);
    let three = |t: &mut RoundTable, what: &str, v: [Vec<f64>; 3], ratio_what: &str| {
        for (k, (name, _)) in variants.iter().enumerate() {
            t.values(&format!("{what}: access log {name}"), &v[k]);
        }
        for k in 1..3 {
            t.ratios(
                &format!("**{ratio_what}: {} / off**", variants[k].0),
                &ratios(&v[k], &v[0]),
                None,
            );
        }
    };
    three(
        &mut t,
        "server CPU per request (µs)",
        cpu.clone(),
        "server CPU per request",
    );
    three(
        &mut t,
        "requests/s",
        runs.each_ref().map(|r| col(r, |s| s.report.rps)),
        "requests/s",
    );
    three(
        &mut t,
        "p99 latency (ms)",
        runs.each_ref().map(|r| col(r, |s| s.report.p99_ms)),
        "p99 latency",
    );
    for k in 1..3 {
        t.values(
            &format!("server CPU added per request (ns): {}", variants[k].0),
            &cpu[k]
                .iter()
                .zip(&cpu[0])
                .map(|(on, off)| (on - off) * 1000.0)
                .collect::<Vec<_>>(),
        );
    }
    t.values(
        "lines in the file per request wrk counted",
        &lines_per_request,
    );
    for (k, (name, _)) in variants.iter().enumerate() {
        t.values(
            &format!("failed requests: access log {name}"),
            &col(&runs[k], |s| s.report.failed() as f64),
        );
    }
    out.section(
        "11. access log",
        format!(
            "## 11. Access log\n\nThree hosts ({WORKERS} workers, the hello plugin): no access \
             log, `access_log = {{ path, format = \"json\" }}` to a file in the system's temp \
             dir (on disk), and the same to /dev/null; {rounds} interleaved rounds of a {secs} s \
             wrk run per host ({CONNS} keep-alive connections), each host first, second and \
             third in turn. Server CPU is every process of the host (the workers' log writer \
             threads included). The file is emptied after each of its runs, once its lines are \
             counted. Lines the workers dropped because their writer fell behind (the host's \
             own count, from its log): {d_file} to the file, {d_null} to /dev/null.\n\n\
             {table}\n",
            rounds = m.access_log_rounds,
            secs = m.access_log_secs,
            d_file = dropped[1],
            d_null = dropped[2],
            table = t.render(),
        ),
        &t.goals,
    );
}

/// Figure 12: the metrics counting's cost per request, from the criterion microbenchmark in
/// benches/stats.rs (an equivalent of the host's private `worker::stats`), beside the host's
/// server CPU per request measured earlier in this run.
fn stats(cx: &Ctx, out: &mut Results) {
    let m = &cx.mode;
    let json_path = cx.out_dir.join(format!("{}-stats.json", cx.stem));
    let log_path = cx.out_dir.join(format!("{}-stats.log", cx.stem));
    let log = fs::File::create(&log_path).unwrap();
    let ok = cargo_command()
        .args(["bench", "-p", "bench", "--bench", "stats", "--target-dir"])
        .arg(bench::boundary_target())
        .current_dir(root())
        .env("CRITERION_HOME", cx.out_dir.join("criterion"))
        .env("BENCH_MODE", m.name)
        .env("BENCH_STATS_JSON", &json_path)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap()
        .success();
    assert!(ok, "the stats benchmark failed: see {}", log_path.display());
    let v: serde_json::Value = serde_json::from_slice(&fs::read(&json_path).unwrap()).unwrap();
    let _ = fs::remove_file(&json_path);
    let get = |k: &str| -> Vec<f64> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let (record, per_request, two) = (
        get("record_ns"),
        get("per_request_ns"),
        get("two_threads_ns"),
    );
    let mut t = RoundTable::new(m.stats_rounds);
    t.values(
        "ns per request: record (3 relaxed adds, partition_point)",
        &record,
    );
    t.values(
        "ns per request: clock at start and end, record, served add",
        &per_request,
    );
    t.values(
        "ns per request: the same, 2 threads on one Stats (each)",
        &two,
    );
    let share = match cx.host_cpu_us.get() {
        Some((cpu_us, from)) => {
            let pct = |ns: &[f64]| -> Vec<f64> {
                ns.iter().map(|n| n / (cpu_us * 1000.0) * 100.0).collect()
            };
            t.values(
                "% of the host's CPU per request: clock, record, served add",
                &pct(&per_request),
            );
            t.values(
                "% of the host's CPU per request: the same, 2 threads",
                &pct(&two),
            );
            format!(
                "The shares are of the host's median server CPU per request in {from} of this \
                 run: {} µs.",
                report::value(cpu_us)
            )
        }
        None => "Run it with the steady or accesslog figure for its share of the host's CPU \
                 per request."
            .to_string(),
    };
    out.section(
        "12. metrics counting",
        format!(
            "## 12. Metrics counting per request\n\n`cargo bench -p bench --bench stats` \
             (criterion): an equivalent of the worker's private `Stats::record` (status class, \
             3 relaxed atomic adds, a `partition_point` over the host's 14 duration bounds) and \
             of what each request does around it, {} interleaved rounds of {} ms warm-up and {} \
             ms measurement each; criterion's own report: {}. {share}\n\n{}\n",
            m.stats_rounds,
            m.stats_warmup.as_millis(),
            m.stats_measure.as_millis(),
            log_path.display(),
            t.render()
        ),
        &[],
    );
}

/// Figure 13: the WebSocket gateway (`bench::gateway`): echo round trips through the chat
/// plugin's `echo` against a plain tokio-tungstenite echo server, the host again with a reload
/// every 2 s, and memory per idle connection.
fn gateway(cx: &Ctx, out: &mut Results) {
    let m = &cx.mode;
    let svg = cx.out_dir.join(format!("{}-gateway-memory.svg", cx.stem));
    let f = bench::gateway::run(&cx.b, m, WORKERS, &svg);
    let mut goals = f.echo.goals.clone();
    goals.extend(f.memory.goals.iter().cloned());
    out.section(
        "13. websocket gateway",
        format!(
            "## 13. WebSocket gateway\n\nThe host's WebSocket service (`kind = \"websocket\"`, \
             {WORKERS} gateways, {WORKERS} business workers, the chat plugin, default probation) \
             against `ws_baseline` (tokio-tungstenite echo, {WORKERS} child processes). \
             {rounds} interleaved rounds; in each, a {secs} s run of the bench's client \
             (tokio-tungstenite, one thread, {conns} connections, each sending `echo N` and \
             waiting for the answer with N) on the host, on the host with a `host reload` every \
             {every} s (the chat v1 and v2 builds in turn), and on the baseline. Server CPU is \
             every process of the server over the round trips, as in figure 1. {reloads} reloads \
             in all, {failed} failed.\n\n{echo}\n\
             Memory per idle connection: in each round a fresh host and a fresh baseline in \
             turn, {n} connections opened to each and left idle; the server's memory (every \
             process, from /proc: VmRSS, and Pss from smaps_rollup) before and after, divided by \
             the connections.\n\n{memory}\n\
             Chart of the servers' RSS as {n} idle connections are opened in steps (a fresh \
             server each, after the rounds): {svg}\n\n",
            rounds = m.gateway_rounds,
            secs = m.gateway_secs,
            conns = bench::gateway::CONNS,
            every = bench::gateway::RELOAD_EVERY.as_secs(),
            reloads = f.reloads,
            failed = f.failed_reloads,
            echo = f.echo.render(),
            n = m.gateway_idle_conns,
            memory = f.memory.render(),
            svg = svg.display(),
        ),
        &goals,
    );
}

//! The benchmark suite of docs/benchmarks.md: every figure, in one of three modes.
//!
//! `suite [--quick | --full] [FIGURE...]` (`bash bench/run.sh [--quick | --full]` installs wrk
//! and nginx first, then runs this). Every comparison runs both sides in the same run,
//! interleaved round by round (the order alternates between rounds), and reports the ratio per
//! round, then the median ratio and its spread [min-max] over the rounds, with a verdict against
//! its goal (`bench::report`). The results are printed and written as Markdown to
//! `<target>/bench-results/<mode>-<date>.md`.

use std::{
    collections::HashSet,
    fs,
    io::{BufRead, BufReader},
    net::{TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bench::{
    build, build_boundary, cargo_command, chart,
    nginx::Nginx,
    procs, replace,
    report::{self, ratios, Goal, Results, RoundTable, Table},
    root, target_dir, wrk, Build, Master, Mode, Probation, Service,
};
use nix::{
    sys::signal::{killpg, Signal},
    unistd::Pid,
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
}

struct Figure {
    name: &'static str,
    run: fn(&Ctx, &mut Results),
}

/// The figures of the default mode (and of `--quick`, with fewer and shorter runs).
const FIGURES: &[Figure] = &[
    Figure {
        name: "steady",
        run: steady,
    },
    Figure {
        name: "reload",
        run: reload,
    },
    Figure {
        name: "time",
        run: reload_time,
    },
    Figure {
        name: "boundary",
        run: boundary,
    },
    Figure {
        name: "rebuild",
        run: rebuild,
    },
    Figure {
        name: "async",
        run: async_path,
    },
];

/// The figures only `--full` runs, after the default ones: the long runs, and the place for the
/// scaling curves (requests/s and CPU per request by connection count and by worker count) when
/// they are written. Each gets its name here and a function below.
const FULL_ONLY: &[Figure] = &[Figure {
    name: "reload-long",
    run: reload_long,
}];

fn usage() -> ! {
    let names: Vec<&str> = FIGURES.iter().chain(FULL_ONLY).map(|f| f.name).collect();
    eprintln!(
        "usage: suite [--quick | --full] [FIGURE...]\n  figures: {} (the last {} only with --full)",
        names.join(", "),
        FULL_ONLY.len()
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
        .chain(if mode.name == "full" { FULL_ONLY } else { &[] })
        .filter(|f| only.is_empty() || only.iter().any(|o| o == f.name))
        .collect();
    if figures.is_empty() {
        usage();
    }

    let started = Instant::now();
    let b = build();
    if figures.iter().any(|f| f.name == "boundary") {
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
    };
    let mut results = Results::new(out_dir.join(format!("{stem}.md")), header(&cx, &figures));
    for f in &figures {
        (f.run)(&cx, &mut results);
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
        "## Time\n\nMode {}: the measurements took {} ({budget}); the build before them {}.\n",
        mode.name,
        duration(took),
        duration(build_time)
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
           workers; rebuild latency {rb} rounds; plugin boundary {br} rounds\n\
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
        br = m.boundary_rounds,
        names = names.join(", "),
        probation = "reload time with the host's defaults and with 0 s",
    )
}

/// The baseline server (bench/src/bin/baseline.rs), in its own process group.
struct Baseline {
    child: Child,
    addr: String,
}

impl Baseline {
    fn start(b: &Build) -> Baseline {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(&b.baseline)
            .args(["--listen", &addr, "--workers", &WORKERS.to_string()])
            .stdout(Stdio::piped())
            // Its children log each start ("Info: hello v1 started"), which would mix with the
            // results; a baseline that fails to start still says so through its stdout.
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let baseline = Baseline { child, addr };
        assert_eq!(line.trim(), "ready", "baseline did not start");
        let start = Instant::now();
        while TcpStream::connect(&baseline.addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "baseline never listened"
            );
            thread::sleep(Duration::from_millis(10));
        }
        baseline
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A free port: bind to 0, read it, let it go (the baseline takes the number on its command line).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

/// Figure 9: the CPU cost per request of an async handler (a task on the plugin's runtime,
/// awaited through an FFI-safe future) against the same handler called inline (sync,
/// `BLOCKING = false`): hello and hello-async, on two masters measured in interleaved rounds.
fn async_path(cx: &Ctx, out: &mut Results) {
    let (b, m) = (&cx.b, &cx.mode);
    let sync = Master::serving(&b.host, &Service::new(&b.hello_v1, WORKERS), "info");
    let asyn = Master::serving(&b.host, &Service::new(&b.hello_async, WORKERS), "info");
    let (sync_url, async_url) = (
        format!("http://{}/", sync.addr()),
        format!("http://{}/", asyn.addr()),
    );
    let (sync_pids, async_pids) = (sync.pids(), asyn.pids());
    wrk::run(&sync_url, CONNS, m.warmup_secs, None);
    wrk::run(&async_url, CONNS, m.warmup_secs, None);
    let (mut s, mut a) = (Vec::new(), Vec::new());
    for round in 0..m.steady_rounds {
        if round % 2 == 0 {
            a.push(measure(&async_url, &async_pids, m.steady_secs));
            s.push(measure(&sync_url, &sync_pids, m.steady_secs));
        } else {
            s.push(measure(&sync_url, &sync_pids, m.steady_secs));
            a.push(measure(&async_url, &async_pids, m.steady_secs));
        }
    }
    let mut t = RoundTable::new(m.steady_rounds);
    let cpu_us = |r: &Steady| r.cpu / r.report.requests as f64 * 1e6;
    let rps = |r: &Steady| r.report.rps;
    let failed = |r: &Steady| r.report.failed() as f64;
    t.compare(
        "server CPU per request (µs)",
        ("async", &col(&a, cpu_us)),
        ("inline sync", &col(&s, cpu_us)),
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
    out.section(
        "9. async",
        format!(
            "## 9. Async handlers: CPU per request against the inline sync path\n\n\
             hello-async and hello (the same handler), {} workers each, {} interleaved rounds \
             of {} s per server; async / inline sync within each round.\n\n{}\n",
            WORKERS,
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
    let baseline = Baseline::start(b);
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
    let idle = |pids: &[u32]| pids.iter().map(|p| procs::rss_mib(*p)).collect::<Vec<_>>();
    let (host_idle, base_idle) = (idle(&host_pids), idle(&base_pids));
    wrk::run(&host_url, CONNS, m.warmup_secs, None);
    wrk::run(&base_url, CONNS, m.warmup_secs, None);
    let (mut h, mut s) = (Vec::new(), Vec::new());
    for round in 0..m.steady_rounds {
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

    // Figure 4: RSS per process, idle (before the load) and half-way through each round.
    let mut idle_t = Table::new(&["process", "idle (MiB)"]);
    let mut mem = RoundTable::new(m.steady_rounds);
    let role = |server: &str, i: usize| match i {
        0 if server == "host" => "host master".to_string(),
        0 => format!("{server} parent"),
        i => format!("{server} worker {i}"),
    };
    for (server, pids_idle, runs) in [("host", &host_idle, &h), ("baseline", &base_idle, &s)] {
        for (i, v) in pids_idle.iter().enumerate() {
            idle_t.row(vec![role(server, i), report::value(*v)]);
            mem.values(
                &format!("{} under load (MiB)", role(server, i)),
                &col(runs, |r| r.rss_loaded.get(i).copied().unwrap_or(0.0)),
            );
        }
    }
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
            "## 4. Memory (RSS)\n\nFrom /proc, idle before the first round and half-way \
             through each round of figure 1.\n\n{}\n{}\n",
            idle_t.render(),
            mem.render()
        ),
        &mem.goals,
    );
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
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
    let load = {
        let (url, script) = (url.to_string(), script.to_path_buf());
        thread::spawn(move || wrk::run(&url, CONNS, seconds, Some(&script)))
    };
    let start = Instant::now();
    let length = Duration::from_secs(u64::from(seconds));
    let mut moments = Vec::new();
    let mut next = RELOAD_EVERY;
    while reloads && next < length {
        thread::sleep(next.saturating_sub(start.elapsed()));
        moments.push(now_ms());
        reload();
        next += RELOAD_EVERY;
    }
    let report = load.join().unwrap();
    thread::sleep(SETTLE);
    (report, moments)
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
                        // v1, v2, v1, ...: every reload loads a different build than the last.
                        swaps += 1;
                        let plugin = if swaps % 2 == 1 {
                            &b.hello_v2
                        } else {
                            &b.hello_v1
                        };
                        replace(plugin, &host.plugin_path());
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
                let master = &masters[i].1;
                replace(plugin, &master.plugin_path());
                let start = Instant::now();
                let out = master.cli(&["reload"]);
                walls[i].push(start.elapsed().as_secs_f64() * 1000.0);
                assert!(
                    out.status.success(),
                    "reload failed: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
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

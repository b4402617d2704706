//! The suite's numbered figures (docs/benchmarks.md; the scaling curves are in
//! [`crate::scaling`]): each is a function that measures its comparison and writes its section
//! of the results file, and the suite (`bin/suite.rs`) lists them in `FIGURES` and `FULL_ONLY`,
//! in the order they run. This module owns what the figures share, so that they measure alike
//! and their numbers compare from one figure to the next: the context the suite hands each one
//! ([`Ctx`]), the servers' workers and wrk's connections, the pause between runs, the baseline
//! server, and one measured steady run.
//!
//! - [`steady`]: keep-alive load against the baseline: figure 1 (throughput, latency, CPU per
//!   request) with figure 4 (memory), figure 14 (async handlers), figure 16 (one worker);
//! - [`reload`]: replacing the workers with a new build: figure 2 (reload under load) with its
//!   chart (6) and its long runs (8), figure 3 (reload time), figure 7 (rebuild latency);
//! - [`balance`]: accept balancing on and off under reloads: figure 17;
//! - [`upgrade`]: replacing the master: figure 9;
//! - [`boundary`]: the plugin boundary's microbenchmark: figure 5;
//! - [`ops`]: what TLS, the access log and the metrics cost: figures 10, 11 and 12;
//! - [`websocket`]: the WebSocket gateway: figure 13 (measured by [`crate::gateway`]);
//! - [`ab`]: this tree's host against another commit's (by name, with `BENCH_AB_REV`).

pub mod ab;
pub mod balance;
pub mod boundary;
pub mod ops;
pub mod reload;
pub mod steady;
pub mod upgrade;
pub mod websocket;

use std::{
    cell::Cell,
    fs,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use crate::{
    cargo_command,
    prefork::Prefork,
    procs,
    report::{Goal, RoundTable},
    root,
    scaling::figures as scaling,
    tls::Certs,
    wrk, Build, Mode,
};

/// Worker processes for the host, the baseline and nginx alike.
pub const WORKERS: usize = 2;
/// wrk's keep-alive connections (one wrk thread: it takes about one of the two cores).
pub const CONNS: u32 = 32;
/// The reload-under-load goal's pace.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// Pause between two measured runs, so that the last run's connections are closed and its
/// drained workers gone before the next one starts.
const SETTLE: Duration = Duration::from_millis(200);

/// What every figure gets: the builds, the mode, and where to put files beside the results.
pub struct Ctx {
    pub b: Build,
    pub mode: Mode,
    pub out_dir: PathBuf,
    /// `<mode>-<date>`: the results file's name without `.md`, the prefix of the others.
    pub stem: String,
    /// The host's median server CPU per request (µs) measured earlier in this run, and by which
    /// figure: figure 12 puts the metrics counting's ns beside it.
    pub host_cpu_us: Cell<Option<(f64, &'static str)>>,
}

impl Ctx {
    /// What the scaling curves get from the suite.
    pub fn scaling(&self) -> scaling::Ctx<'_> {
        scaling::Ctx {
            b: &self.b,
            mode: &self.mode,
            out_dir: &self.out_dir,
            stem: &self.stem,
            workers: WORKERS,
        }
    }
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

/// One measured steady run: wrk's report, server CPU seconds, and, sampled half-way through,
/// RSS (MiB) and the connections held (sockets more than before the run) per process.
struct Steady {
    report: wrk::Report,
    cpu: f64,
    rss_loaded: Vec<f64>,
    conns: Vec<usize>,
}

impl Steady {
    /// Server CPU per request (µs): the unit every CPU comparison of the figures is in.
    fn cpu_us(&self) -> f64 {
        self.cpu / self.report.requests as f64 * 1e6
    }

    /// The share of the run's connections that its busiest worker held (0.5: an even split of
    /// 2 workers, 1: one worker held them all). Index 0 is the master or parent, which holds
    /// none.
    fn busiest_share(&self) -> f64 {
        let workers = self.conns.get(1..).unwrap_or_default();
        let total: usize = workers.iter().sum();
        let busiest = workers.iter().copied().max().unwrap_or(0);
        busiest as f64 / total.max(1) as f64
    }
}

fn measure(url: &str, pids: &[u32], seconds: u32) -> Steady {
    let sockets = |pids: &[u32]| pids.iter().map(|p| procs::sockets(*p)).collect::<Vec<_>>();
    let before = sockets(pids);
    let cpu0 = procs::cpu_seconds(pids);
    let sampler = {
        let pids = pids.to_vec();
        thread::spawn(move || {
            thread::sleep(Duration::from_secs(u64::from(seconds)) / 2);
            let rss = pids.iter().map(|p| procs::rss_mib(*p)).collect::<Vec<_>>();
            (rss, sockets(&pids))
        })
    };
    let report = wrk::run(url, CONNS, seconds, None);
    let cpu = procs::cpu_seconds(pids) - cpu0;
    thread::sleep(SETTLE);
    let (rss_loaded, during) = sampler.join().unwrap();
    Steady {
        report,
        cpu,
        rss_loaded,
        conns: during
            .iter()
            .zip(&before)
            .map(|(d, b)| d.saturating_sub(*b))
            .collect(),
    }
}

/// `rounds` rounds of one measured run of `seconds` per server (its URL and the pids whose CPU
/// counts), who goes first rotating from round to round so that a drift within a round favours
/// no side; `before` runs at the start of each round. Each server's runs, in `servers`' order.
fn interleaved<const N: usize>(
    servers: [(&str, &[u32]); N],
    rounds: usize,
    seconds: u32,
    mut before: impl FnMut(),
) -> [Vec<Steady>; N] {
    let mut runs: [Vec<Steady>; N] = std::array::from_fn(|_| Vec::new());
    for round in 0..rounds {
        before();
        let mut order: [usize; N] = std::array::from_fn(|i| i);
        order.rotate_left(round % N);
        for i in order {
            runs[i].push(measure(servers[i].0, servers[i].1, seconds));
        }
    }
    runs
}

/// Two servers (a label, a URL, the pids whose CPU counts) in figure 16's shape: an unmeasured
/// warm-up run each, the interleaved rounds, then CPU per request and requests/s, first / second
/// within each round (with `goals` for the two), and each side's failed requests.
fn pair(
    cx: &Ctx,
    first: (&str, &str, &[u32]),
    second: (&str, &str, &[u32]),
    goals: [Option<Goal>; 2],
) -> RoundTable {
    let m = &cx.mode;
    wrk::run(first.1, CONNS, m.warmup_secs, None);
    wrk::run(second.1, CONNS, m.warmup_secs, None);
    let [a, b] = interleaved(
        [(first.1, first.2), (second.1, second.2)],
        m.steady_rounds,
        m.steady_secs,
        || {},
    );
    let mut t = RoundTable::new(m.steady_rounds);
    let [cpu_goal, rps_goal] = goals;
    t.compare(
        "server CPU per request (µs)",
        (first.0, &col(&a, Steady::cpu_us)),
        (second.0, &col(&b, Steady::cpu_us)),
        cpu_goal,
    );
    t.compare(
        "requests/s",
        (first.0, &col(&a, |r| r.report.rps)),
        (second.0, &col(&b, |r| r.report.rps)),
        rps_goal,
    );
    for (label, runs) in [(first.0, &a), (second.0, &b)] {
        t.values(
            &format!("failed requests: {label}"),
            &col(runs, |r| r.report.failed() as f64),
        );
    }
    t
}

fn col<T>(runs: &[T], f: impl Fn(&T) -> f64) -> Vec<f64> {
    runs.iter().map(f).collect()
}

/// Runs `cargo bench -p bench --bench NAME` (figures 5 and 12) with the mode and `env` set, in
/// the target dir the suite built it in before the measurements ([`crate::build_boundary`]), its
/// output to `<stem>-NAME.log` beside the results; returns that log's path for the section.
fn criterion(cx: &Ctx, name: &str, env: &[(&str, &Path)]) -> PathBuf {
    let log_path = cx.out_dir.join(format!("{}-{name}.log", cx.stem));
    let log = fs::File::create(&log_path).unwrap();
    let ok = cargo_command()
        .args(["bench", "-p", "bench", "--bench", name, "--target-dir"])
        .arg(crate::boundary_target())
        .current_dir(root())
        // Criterion's own files next to the results, not in a target/ below bench/.
        .env("CRITERION_HOME", cx.out_dir.join("criterion"))
        .env("BENCH_MODE", cx.mode.name)
        .envs(env.iter().copied())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap()
        .success();
    assert!(
        ok,
        "the {name} benchmark failed: see {}",
        log_path.display()
    );
    log_path
}

//! The benchmark suite of docs/benchmarks.md, figures 1-4 and 6 (figure 5 is
//! `cargo bench -p bench --bench boundary`). Every figure runs the host and its baseline or peer
//! side by side in the same run, interleaved where it can, and reports ratios.
//!
//! Run everything with `bash bench/run.sh` (it installs wrk and nginx first).

use std::{
    collections::HashSet,
    io::{BufRead, BufReader},
    net::{TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bench::{build, chart, nginx::Nginx, procs, replace, root, summary, wrk, Build, Master};
use nix::{
    sys::signal::{killpg, Signal},
    unistd::Pid,
};

/// Worker processes for the host, the baseline and nginx alike.
const WORKERS: usize = 2;
/// wrk's keep-alive connections.
const CONNS: u32 = 32;
const STEADY_SECONDS: u32 = 10;
const STEADY_ROUNDS: usize = 5;
const RELOAD_RUN_SECONDS: u32 = 30;
const RELOAD_EVERY: Duration = Duration::from_secs(2);

fn main() {
    // `suite [steady] [reload] [time]`: the named figures only (default: all).
    let only: Vec<String> = std::env::args().skip(1).collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let b = build();
    println!("# Results\n");
    println!("{} cores; {WORKERS} worker processes per server; wrk with 1 thread and {CONNS} keep-alive connections.\n", thread::available_parallelism().map_or(0, |n| n.get()));
    if wanted("steady") {
        steady(&b);
    }
    if wanted("reload") {
        reload_under_load(&b);
    }
    if wanted("time") {
        reload_time(&b);
    }
}

/// The baseline server (bench/src/bin/baseline.rs), in its own process group.
struct Baseline {
    child: Child,
    addr: String,
}

impl Baseline {
    fn start(b: &Build) -> Baseline {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut child = Command::new(&b.baseline)
            .args(["--listen", &addr, "--workers", &WORKERS.to_string()])
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "baseline did not start");
        let start = Instant::now();
        while TcpStream::connect(&addr).is_err() {
            assert!(start.elapsed() < Duration::from_secs(10));
            thread::sleep(Duration::from_millis(10));
        }
        Baseline { child, addr }
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// One measured steady run: wrk's report, server CPU seconds, and RSS (MiB) per process
/// sampled half-way through.
struct Steady {
    report: wrk::Report,
    cpu: f64,
    rss_loaded: Vec<f64>,
}

fn measure(url: &str, pids: &[u32]) -> Steady {
    let cpu0 = procs::cpu_seconds(pids);
    let sampler = {
        let pids = pids.to_vec();
        thread::spawn(move || {
            thread::sleep(Duration::from_secs(u64::from(STEADY_SECONDS) / 2));
            pids.iter().map(|p| procs::rss_mib(*p)).collect::<Vec<_>>()
        })
    };
    let report = wrk::run(url, CONNS, STEADY_SECONDS, None);
    let cpu = procs::cpu_seconds(pids) - cpu0;
    Steady {
        report,
        cpu,
        rss_loaded: sampler.join().unwrap(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    summary(&mut v).0
}

/// Figure 1 (throughput, latency, CPU per request) and figure 4 (memory).
fn steady(b: &Build) {
    let host = Master::serving(&b.host, &b.hello_v1, WORKERS, &[], "info");
    let baseline = Baseline::start(b);
    let host_url = format!("http://{}/", host.addr());
    let base_url = format!("http://{}/", baseline.addr);
    let host_pids = host.pids();
    let base_pids = procs::tree(baseline.child.id());
    let idle = |pids: &[u32]| pids.iter().map(|p| procs::rss_mib(*p)).collect::<Vec<_>>();
    let (host_idle, base_idle) = (idle(&host_pids), idle(&base_pids));
    wrk::run(&host_url, CONNS, 2, None);
    wrk::run(&base_url, CONNS, 2, None);
    let (mut h, mut s) = (Vec::new(), Vec::new());
    for _ in 0..STEADY_ROUNDS {
        h.push(measure(&host_url, &host_pids));
        s.push(measure(&base_url, &base_pids));
    }
    let stat = |runs: &[Steady], f: &dyn Fn(&Steady) -> f64| median(runs.iter().map(f).collect());
    let rps = |r: &Steady| r.report.rps;
    let p50 = |r: &Steady| r.report.p50_ms;
    let p99 = |r: &Steady| r.report.p99_ms;
    let cpu_us = |r: &Steady| r.cpu / r.report.requests as f64 * 1e6;
    println!(
        "## 1. Steady throughput (median of {STEADY_ROUNDS} interleaved {STEADY_SECONDS} s runs)\n"
    );
    println!("| | host (hello plugin) | baseline (static hyper) | host / baseline | goal |");
    println!("|---|---|---|---|---|");
    for (name, f, goal) in [
        ("requests/s", &rps as &dyn Fn(&Steady) -> f64, ">= 0.95"),
        ("p50 latency (ms)", &p50, ""),
        ("p99 latency (ms)", &p99, "<= 1.10"),
        ("server CPU per request (µs)", &cpu_us, "<= 1.05"),
    ] {
        let (hv, sv) = (stat(&h, f), stat(&s, f));
        println!("| {name} | {hv:.3} | {sv:.3} | {:.3} | {goal} |", hv / sv);
    }
    let failed: u64 = h.iter().chain(&s).map(|r| r.report.failed()).sum();
    println!("\nFailed requests in these runs: {failed}.\n");

    println!("## 4. Memory (RSS, MiB)\n");
    println!("| process | idle | under load |");
    println!("|---|---|---|");
    let loaded = &h[h.len() / 2].rss_loaded;
    for (i, pid) in host_pids.iter().enumerate() {
        let role = if i == 0 {
            "host master".to_string()
        } else {
            format!("host worker {pid}")
        };
        println!(
            "| {role} | {:.1} | {:.1} |",
            host_idle[i],
            loaded.get(i).copied().unwrap_or(0.0)
        );
    }
    let loaded = &s[s.len() / 2].rss_loaded;
    for (i, pid) in base_pids.iter().enumerate() {
        let role = if i == 0 {
            "baseline parent".to_string()
        } else {
            format!("baseline worker {pid}")
        };
        println!(
            "| {role} | {:.1} | {:.1} |",
            base_idle[i],
            loaded.get(i).copied().unwrap_or(0.0)
        );
    }
    println!();
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A wrk run with the bucket script in a thread, while `reload` is called every 2 s.
/// Returns wrk's report and the reload moments (unix ms).
fn under_load(
    url: &str,
    script: &Path,
    reloads: bool,
    mut reload: impl FnMut(usize),
) -> (wrk::Report, Vec<u64>) {
    let load = {
        let (url, script) = (url.to_string(), script.to_path_buf());
        thread::spawn(move || wrk::run(&url, CONNS, RELOAD_RUN_SECONDS, Some(&script)))
    };
    let start = Instant::now();
    let mut moments = Vec::new();
    if reloads {
        let mut n = 0;
        while start.elapsed() + RELOAD_EVERY < Duration::from_secs(u64::from(RELOAD_RUN_SECONDS)) {
            thread::sleep(RELOAD_EVERY.saturating_sub(start.elapsed() - RELOAD_EVERY * n as u32));
            moments.push(now_ms());
            reload(n);
            n += 1;
        }
    }
    (load.join().unwrap(), moments)
}

/// Figure 2 (reload under load, host and nginx) and figure 6 (the chart).
fn reload_under_load(b: &Build) {
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), wrk::BUCKET_SCRIPT).unwrap();

    let host = Master::serving(&b.host, &b.hello_v1, WORKERS, &[], "info");
    let url = format!("http://{}/", host.addr());
    wrk::run(&url, CONNS, 2, None);
    let (host_calm, _) = under_load(&url, script.path(), false, |_| {});
    let mut replaced_all = 0;
    let (host_busy, host_moments) = under_load(&url, script.path(), true, |n| {
        replace(
            if n % 2 == 0 { &b.hello_v2 } else { &b.hello_v1 },
            &host.plugin_path(),
        );
        let out = host.cli(&["reload"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "reload failed: {text}");
        // "hello: worker 0: 123 -> 456 (plugin ..., ready in 5 ms)": every slot, a new pid.
        let pairs: Vec<(u32, u32)> = text
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
        if pairs.len() == WORKERS && pairs.iter().all(|p| !old.contains(&p.1)) {
            replaced_all += 1;
        }
    });
    drop(host);

    let nginx = Nginx::start(WORKERS);
    let url = format!("http://{}/", nginx.addr);
    wrk::run(&url, CONNS, 2, None);
    let (nginx_calm, _) = under_load(&url, script.path(), false, |_| {});
    let mut nginx_workers = vec![procs::tree(nginx.pid)];
    let (nginx_busy, nginx_moments) = under_load(&url, script.path(), true, |_| {
        nginx.reload();
        nginx_workers.push(procs::tree(nginx.pid));
    });
    drop(nginx);

    let min_bucket = |r: &wrk::Report| {
        let inner = &r.buckets[1..r.buckets.len().saturating_sub(1)];
        inner.iter().map(|b| b.1).min().unwrap_or(0)
    };
    println!("## 2. Reload under load ({RELOAD_RUN_SECONDS} s of keep-alive load, a reload every {} s)\n", RELOAD_EVERY.as_secs());
    println!("| | host: no reload | host: reloads | nginx: no reload | nginx: reloads |");
    println!("|---|---|---|---|---|");
    println!(
        "| reloads | 0 | {} | 0 | {} |",
        host_moments.len(),
        nginx_moments.len()
    );
    println!(
        "| failed requests (socket errors + non-2xx) | {} | {} | {} | {} |",
        host_calm.failed(),
        host_busy.failed(),
        nginx_calm.failed(),
        nginx_busy.failed()
    );
    println!(
        "| requests/s | {:.0} | {:.0} | {:.0} | {:.0} |",
        host_calm.rps, host_busy.rps, nginx_calm.rps, nginx_busy.rps
    );
    println!(
        "| p99 latency (ms) | {:.2} | {:.2} | {:.2} | {:.2} |",
        host_calm.p99_ms, host_busy.p99_ms, nginx_calm.p99_ms, nginx_busy.p99_ms
    );
    println!(
        "| fewest responses in a 100 ms bucket | {} | {} | {} | {} |",
        min_bucket(&host_calm),
        min_bucket(&host_busy),
        min_bucket(&nginx_calm),
        min_bucket(&nginx_busy)
    );
    println!(
        "\nThroughput with reloads / without: host {:.3}, nginx {:.3}. p99 with / without: host {:.2}, nginx {:.2}.",
        host_busy.rps / host_calm.rps,
        nginx_busy.rps / nginx_calm.rps,
        host_busy.p99_ms / host_calm.p99_ms,
        nginx_busy.p99_ms / nginx_calm.p99_ms
    );
    let nginx_changes = nginx_workers.windows(2).filter(|w| w[0] != w[1]).count();
    println!(
        "Every host reload replaced every worker: {replaced_all} of {} reloads printed {WORKERS} lines `old pid -> new pid` with no pid kept; \
         nginx's process set changed after {nginx_changes} of {} reloads.\n",
        host_moments.len(),
        nginx_moments.len()
    );

    let svg = root().join("docs/bench-reload-under-load.svg");
    chart::draw(
        &svg,
        "responses per 100 ms, a reload every 2 s",
        &[
            chart::Series {
                name: "host (hello plugin)",
                buckets: &host_busy.buckets,
                reloads: &host_moments,
            },
            chart::Series {
                name: "nginx (fixed 200)",
                buckets: &nginx_busy.buckets,
                reloads: &nginx_moments,
            },
        ],
    )
    .expect("could not draw the chart");
    println!("## 6. Chart\n\nWritten to {}.\n", svg.display());
}

/// Figure 3: `host reload` wall time by worker count, and where a worker's start goes.
fn reload_time(b: &Build) {
    println!("## 3. Reload time (5 reloads per worker count, hello plugin)\n");
    println!("| workers | `host reload` p50 (ms) | exec | plugin load | on_start | serve setup | READY report | start total | drain |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for workers in [1usize, 2, 4, 8] {
        let host = Master::serving(&b.host, &b.hello_v1, workers, &[], "host=debug");
        let mut walls = Vec::new();
        for n in 0..5 {
            replace(
                if n % 2 == 0 { &b.hello_v2 } else { &b.hello_v1 },
                &host.plugin_path(),
            );
            let t = Instant::now();
            assert!(host.cli(&["reload"]).status.success());
            walls.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        // Let the last drains finish so their lines are in the log.
        thread::sleep(Duration::from_millis(500));
        let log = host.log();
        let phases: Vec<Vec<f64>> = log
            .lines()
            .filter_map(|l| l.split_once("start phases (ms): ").map(|(_, rest)| rest))
            .skip(workers) // the initial start
            .map(|rest| {
                rest.split(", ")
                    .filter_map(|kv| kv.rsplit_once(' ')?.1.parse().ok())
                    .collect()
            })
            .collect();
        let avg = |i: usize| {
            phases.iter().filter_map(|p| p.get(i)).sum::<f64>() / phases.len().max(1) as f64
        };
        let drains: Vec<f64> = log
            .lines()
            .filter_map(|l| {
                l.split_once("after draining for ")
                    .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
            })
            .collect();
        let drain = drains.iter().sum::<f64>() / drains.len().max(1) as f64;
        println!(
            "| {workers} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {drain:.1} |",
            median(walls),
            avg(0),
            avg(1),
            avg(2),
            avg(3),
            avg(4),
            avg(5)
        );
    }
    println!(
        "\nPhases are per new worker, in ms, averaged over every worker the reloads started.\n"
    );
}

//! The soak benchmark (docs/benchmarks.md, "Soak"): many reloads under keep-alive load, with
//! faults injected between them, each followed by a good reload.
//!
//! `soak [RELOADS] [FAULTS] [--conns N] [--workers N]` (`bash bench/run.sh soak 1000 100`).
//! RELOADS good reloads (`host reload` of the `fixture-versioned` v1 and v2 builds in turn);
//! before FAULTS of them, spread evenly, one fault, the kinds in turn:
//!
//! - `abort`, `segv`: a build whose handler aborts / segfaults on its first request; the canary
//!   crashes on its trial and the reload rolls back;
//! - `exit`: a build that exits `exit_after_ms` (500 ms) after `on_start`, after `host reload`
//!   returned: the master rolls back by itself, during probation;
//! - `truncated`: the first half of a good build; the canary cannot load it, the reload is
//!   rejected;
//! - `wedge`: `/spin` requests (an inline handler that never returns) to one worker until every
//!   runtime thread is stuck and its heartbeat stops; liveness kills it;
//! - `stop`: SIGSTOP to one worker; liveness kills it.
//!
//! Failed requests (the load client's, `bench::load`) are counted against the fault they
//! happened in (from the injection until every worker is ready on the good version again) or
//! against "outside faults", where none is expected. The results go to stdout and to
//! `<target>/bench-results/soak-<date>.md`, the master's log beside it.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use bench::{
    build_fixtures, build_host,
    load::{self, Load},
    procs, replace, report, root, target_dir, Master,
};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use serde_json::Value;

/// Small probations, so that a fault is caught by the trial within a second or so (the
/// defaults are 1 s and 30 s).
const CANARY_PROBATION: &str = "200ms";
const PROBATION: &str = "1s";
/// Small, so that a wedged or stopped worker is found within a second (default 10 s).
const LIVENESS_TIMEOUT: &str = "1s";
/// When the `exit` build exits after its start: past the canary probation, within probation.
const EXIT_AFTER_MS: u64 = 500;
/// A fault the host has not recovered from within this is reported as such, and the soak goes
/// on with the next good reload.
const HEALTHY_WITHIN: Duration = Duration::from_secs(30);
/// Longest a `host` command may take before it counts as hung (and is killed by its pid).
const CLI_DEADLINE: Duration = Duration::from_secs(60);
/// How often the driver asks `host status` while it waits for a recovery.
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Abort,
    Segv,
    Exit,
    Truncated,
    Wedge,
    Stop,
}

impl Fault {
    const ALL: [Fault; 6] = [
        Fault::Abort,
        Fault::Segv,
        Fault::Exit,
        Fault::Truncated,
        Fault::Wedge,
        Fault::Stop,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::Abort => "abort",
            Fault::Segv => "segv",
            Fault::Exit => "exit",
            Fault::Truncated => "truncated",
            Fault::Wedge => "wedge",
            Fault::Stop => "stop",
        }
    }

    fn what(self) -> String {
        match self {
            Fault::Abort => "reload of a build whose handler aborts on its first request".into(),
            Fault::Segv => "reload of a build whose handler segfaults on its first request".into(),
            Fault::Exit => format!(
                "reload of a build that exits {EXIT_AFTER_MS} ms after on_start (on probation)"
            ),
            Fault::Truncated => "reload of a truncated build (half the file)".into(),
            Fault::Wedge => "`/spin` requests wedge one worker's runtime threads".into(),
            Fault::Stop => "SIGSTOP to one worker".into(),
        }
    }

    /// What the host should do about it.
    fn expected(self) -> &'static str {
        match self {
            Fault::Abort | Fault::Segv => "rollback (the canary crashes in its trial)",
            Fault::Exit => "rollback (a worker exits on probation)",
            Fault::Truncated => "reload rejected",
            Fault::Wedge | Fault::Stop => "liveness kill, the slot restarts",
        }
    }

    /// The load's phase index of this fault (0 is "outside faults").
    fn phase(self) -> usize {
        1 + self as usize
    }
}

/// Phase 0 of the load: everything outside a fault's window.
const OUTSIDE: usize = 0;

struct Args {
    reloads: usize,
    faults: usize,
    conns: usize,
    workers: usize,
    /// Requests/s of the load in all; None: back to back.
    rate: Option<f64>,
    /// Where the master's temp dir (its state dir) goes.
    tmp: Option<PathBuf>,
}

fn usage() -> ! {
    eprintln!(
        "usage: soak [RELOADS] [FAULTS] [--conns N] [--workers N] [--rate R] [--tmp DIR]\n  \
         RELOADS good reloads (default 100), FAULTS injected faults between them (default \
         RELOADS / 10); --conns keep-alive connections (default 32); --workers (default 2); \
         --rate requests/s in all (default 0: back to back); --tmp where the master's state \
         dir goes (default /dev/shm; `--tmp disk` for the system's temp dir)"
    );
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut positional = Vec::new();
    let (mut conns, mut workers, mut rate) = (32, 2, 0);
    // tmpfs: the master fsyncs its history file on its event loop at every reload, and on a
    // disk busy with other builds one fsync can take seconds (docs/benchmarks.md, "Soak").
    let mut tmp = Some(PathBuf::from("/dev/shm")).filter(|p| p.is_dir());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let number = |a: Option<String>| {
            a.and_then(|v| v.parse::<usize>().ok())
                .unwrap_or_else(|| usage())
        };
        match a.as_str() {
            "--conns" => conns = number(args.next()),
            "--workers" => workers = number(args.next()),
            "--rate" => rate = number(args.next()),
            "--tmp" => {
                tmp = match args.next().as_deref() {
                    Some("disk") => None,
                    Some(dir) => Some(PathBuf::from(dir)),
                    None => usage(),
                }
            }
            _ if !a.starts_with('-') => positional.push(number(Some(a))),
            _ => usage(),
        }
    }
    if positional.len() > 2 || workers == 0 || conns == 0 {
        usage();
    }
    let reloads = positional.first().copied().unwrap_or(100);
    let faults = positional.get(1).copied().unwrap_or(reloads / 10);
    if reloads == 0 {
        usage();
    }
    Args {
        reloads,
        faults,
        conns,
        workers,
        rate: (rate > 0).then_some(rate as f64),
        tmp,
    }
}

/// The builds the soak reloads.
struct Plugins {
    good: [PathBuf; 2],
    abort: PathBuf,
    segv: PathBuf,
    exit: PathBuf,
    truncated: PathBuf,
}

fn build_plugins() -> Plugins {
    let built = build_fixtures(&[
        ("soak-v1", "v1", ""),
        ("soak-v2", "v2", ""),
        ("soak-abort", "v3-abort", "abort"),
        ("soak-segv", "v3-segv", "segv"),
        ("soak-exit", "v3-exit", "exit"),
    ]);
    // Half of a good build: an ELF header the master's check accepts, and a library the
    // canary cannot load.
    let truncated = built[0].with_file_name("soak-truncated.so");
    let bytes = fs::read(&built[0]).unwrap();
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    Plugins {
        good: [built[0].clone(), built[1].clone()],
        abort: built[2].clone(),
        segv: built[3].clone(),
        exit: built[4].clone(),
        truncated,
    }
}

fn config(workers: usize) -> String {
    format!(
        "[[service]]\nname = \"soak\"\nlisten = [\"127.0.0.1:0\"]\nplugin = \"plugin.so\"\n\
         workers = {workers}\ncanary_probation = \"{CANARY_PROBATION}\"\n\
         probation = \"{PROBATION}\"\nliveness_timeout = \"{LIVENESS_TIMEOUT}\"\n\
         [service.config]\nexit_after_ms = \"{EXIT_AFTER_MS}\"\n"
    )
}

/// A `host` client command with a deadline: (exit code, stdout + stderr).
fn cli(master: &Master, args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(&master.host)
        .args(args)
        .arg("--state-dir")
        .arg(master.dir.path().join(".host"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut text = String::new();
        let _ = out.read_to_string(&mut text);
        let _ = err.read_to_string(&mut text);
        let _ = tx.send(text);
    });
    let text = match rx.recv_timeout(CLI_DEADLINE) {
        Ok(text) => text,
        Err(_) => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            format!("host {args:?} did not finish within {CLI_DEADLINE:?}; killed")
        }
    };
    let code = child.wait().ok().and_then(|s| s.code());
    (code, text)
}

fn status(master: &Master) -> Option<Value> {
    let (code, text) = cli(master, &["status", "--json"]);
    if code != Some(0) {
        return None;
    }
    serde_json::from_str(&text).ok()
}

fn service(status: &Value) -> &Value {
    &status["services"][0]
}

fn workers_of(status: &Value) -> Vec<(u32, String, String)> {
    service(status)["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .map(|w| {
                    (
                        w["pid"].as_u64().unwrap_or(0) as u32,
                        w["state"].as_str().unwrap_or("").to_string(),
                        w["version"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Healthy on `version`: it is live, not on trial, and every slot holds a ready worker running
/// it (draining workers of other versions may still be finishing).
fn healthy_on(status: &Value, version: &str, workers: usize) -> bool {
    let svc = service(status);
    let ws = workers_of(status);
    svc["version"] == version
        && svc["probation_fallback"].is_null()
        && ws
            .iter()
            .filter(|(_, state, v)| state == "ready" && v == version)
            .count()
            == workers
        && ws
            .iter()
            .all(|(_, state, v)| state == "draining" || (state == "ready" && v == version))
}

/// Settled: healthy and past probation (the version is marked healthy), so that the next fault
/// is judged against a version that passed its trial.
fn settled(status: &Value, workers: usize) -> bool {
    let svc = service(status);
    let version = svc["version"].as_str().unwrap_or("");
    healthy_on(status, version, workers)
        && svc["version_healthy"] == true
        && svc["probation_left_ms"].is_null()
}

/// Polls `host status` until `cond` holds; returns the status and the time it answered.
fn wait_for(
    master: &Master,
    within: Duration,
    mut cond: impl FnMut(&Value) -> bool,
) -> Option<(Value, Instant)> {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Some(s) = status(master) {
            if cond(&s) {
                return Some((s, Instant::now()));
            }
        }
        thread::sleep(POLL);
    }
    None
}

/// The process counts and open fds of the host.
#[derive(Debug, Clone)]
struct Snapshot {
    master_fds: usize,
    /// What they are (`procs::fd_kinds`).
    master_fd_kinds: Vec<String>,
    master_rss_mib: f64,
    /// (pid, fds) of each worker.
    workers: Vec<(u32, usize)>,
    /// Processes running the host binary, wherever they are in the process tree.
    host_processes: usize,
    /// The master's children that are zombies (exited, not reaped).
    zombies: usize,
}

fn snapshot(master: &Master) -> Snapshot {
    let kids = procs::children(master.pid);
    Snapshot {
        master_fds: procs::fd_count(master.pid).unwrap_or(0),
        master_fd_kinds: procs::fd_kinds(master.pid),
        master_rss_mib: procs::rss_mib(master.pid),
        workers: kids
            .iter()
            .filter(|p| procs::state(**p) != Some('Z'))
            .map(|p| (*p, procs::fd_count(*p).unwrap_or(0)))
            .collect(),
        host_processes: procs::running(&master.host).len(),
        zombies: kids
            .iter()
            .filter(|p| procs::state(**p) == Some('Z'))
            .count(),
    }
}

/// What happened to one injected fault.
struct FaultRun {
    kind: Fault,
    /// The good reload it came before (1-based).
    before_reload: usize,
    /// From the injection until healthy on the good version again; None if not within
    /// `HEALTHY_WITHIN`.
    to_healthy: Option<Duration>,
    failed: u64,
    /// What the reload printed last, or what happened to the worker.
    outcome: String,
    /// The new rollout events (`kind: outcome`) `host status` lists after it.
    events: Vec<String>,
    /// A problem seen with it (a rollback that did not happen, a worker still alive...).
    problem: Option<String>,
    /// Unix ms of the injection and of the end of its window.
    window_ms: (u64, u64),
}

/// `GET path` on a connection, reading one response; `None` if there is none within `wait`.
fn get_on(stream: &mut TcpStream, path: &str, wait: Duration) -> Option<String> {
    stream.set_read_timeout(Some(wait)).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if body.len() >= length {
                return Some(body.to_string());
            }
        }
    }
}

/// Wedges `target`: new connections ask `/pid` until one lands on it, which then gets `/spin`
/// (an inline handler that never returns), until every runtime thread of it is stuck (its
/// `/pid` goes unanswered) or it is gone. Returns the `/spin` connections, to be closed once
/// the fault is over (their requests are the fault, not part of the load).
fn wedge(addr: SocketAddr, target: u32) -> Vec<TcpStream> {
    // The worker's runtime has a thread per core; twice as many `/spin`s leave none free even
    // if some land on a thread that another already blocked.
    let threads = thread::available_parallelism().map_or(2, |n| n.get());
    let mut held = Vec::new();
    let start = Instant::now();
    while held.len() < threads * 2
        && procs::alive(target)
        && start.elapsed() < Duration::from_secs(10)
    {
        let Ok(mut conn) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
            continue;
        };
        match get_on(&mut conn, "/pid", Duration::from_millis(500)) {
            Some(body) if body.trim() == target.to_string() => {
                if write!(conn, "GET /spin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").is_ok() {
                    held.push(conn);
                }
            }
            Some(_) => {}
            // No answer: this connection landed on a worker whose threads are all stuck.
            None => {
                held.push(conn);
                break;
            }
        }
    }
    held
}

fn main() {
    let args = parse_args();
    let started = Instant::now();
    let host = build_host();
    let plugins = build_plugins();
    let build_time = started.elapsed();

    let date = report::utc_now("+%Y-%m-%d %H:%M:%S UTC");
    let stem = format!("soak-{}", report::utc_now("+%Y-%m-%dT%H%M%SZ"));
    let out_dir = target_dir().join("bench-results");
    fs::create_dir_all(&out_dir).unwrap();
    let commit = report::commit(&root());
    let machine = report::machine();

    let master = Master::with_config(
        &host,
        &config(args.workers),
        &plugins.good[0],
        "info",
        args.tmp.as_deref(),
    );
    let addr: SocketAddr = master.addr().parse().unwrap();
    let before = snapshot(&master);

    // Which good reloads a fault comes before: spread evenly, the kinds in turn.
    let mut schedule: BTreeMap<usize, Vec<Fault>> = BTreeMap::new();
    for j in 0..args.faults {
        let at = ((j as f64 + 0.5) * args.reloads as f64 / args.faults as f64) as usize;
        schedule
            .entry(at.min(args.reloads - 1))
            .or_default()
            .push(Fault::ALL[j % Fault::ALL.len()]);
    }

    eprintln!(
        "soak: {} good reloads, {} faults, {} connections, {} workers; master {}, {addr}",
        args.reloads, args.faults, args.conns, args.workers, master.pid
    );
    let load = Load::start(addr, args.conns, 1 + Fault::ALL.len(), args.rate);
    thread::sleep(Duration::from_secs(1));
    let soak_start = Instant::now();

    let mut runs: Vec<FaultRun> = Vec::new();
    let mut reload_ms: Vec<f64> = Vec::new();
    let mut bad_reloads: Vec<String> = Vec::new();
    let mut next_good = 1usize; // v2 first: plugin.so holds v1
    let mut fault_count = 0usize;
    for i in 0..args.reloads {
        for &kind in schedule.get(&i).map(Vec::as_slice).unwrap_or(&[]) {
            let mut run = inject(&master, &load, addr, &plugins, kind, fault_count, &args);
            run.before_reload = i + 1;
            eprintln!(
                "soak: fault {} ({}) before reload {}: {} in {}, {} failed requests{}",
                fault_count + 1,
                kind.name(),
                i + 1,
                run.outcome,
                run.to_healthy
                    .map_or("never".into(), |d| format!("{} ms", d.as_millis())),
                run.failed,
                run.problem
                    .as_deref()
                    .map_or(String::new(), |p| format!("; PROBLEM: {p}"))
            );
            runs.push(run);
            fault_count += 1;
        }
        replace(&plugins.good[next_good], &master.plugin_path());
        next_good = 1 - next_good;
        let t = Instant::now();
        let (code, text) = cli(&master, &["reload"]);
        reload_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if code != Some(0) || !text.contains(": done in ") {
            let line = format!("reload {}: exit {code:?}: {}", i + 1, text.trim());
            eprintln!("soak: {line}");
            bad_reloads.push(line);
        }
        if (i + 1) % 50 == 0 {
            eprintln!(
                "soak: {} reloads, {} faults, {:.0} s; {} answered, {} failed",
                i + 1,
                fault_count,
                soak_start.elapsed().as_secs_f64(),
                load.answered(),
                load.failed()
            );
        }
    }
    let soak_time = soak_start.elapsed();
    let totals = load.stop();

    // Let the last drains finish and the last version pass its probation before looking at
    // processes and fds.
    let settle = wait_for(&master, Duration::from_secs(30), |s| {
        settled(s, args.workers) && workers_of(s).len() == args.workers
    });
    thread::sleep(Duration::from_millis(500));
    let after = snapshot(&master);
    let final_status = status(&master);
    let log = master.log();
    let log_path = out_dir.join(format!("{stem}-host.log"));
    fs::write(&log_path, &log).unwrap();
    let history_bytes =
        fs::metadata(master.dir.path().join(".host/plugins/history.json")).map_or(0, |m| m.len());
    drop(master);
    let leftover = procs::running(&host);

    let text = render(&Rendered {
        args: &args,
        date,
        commit,
        machine,
        build_time,
        soak_time,
        runs: &runs,
        reload_ms: &reload_ms,
        bad_reloads: &bad_reloads,
        totals: &totals,
        before: &before,
        after: &after,
        settled: settle.is_some(),
        final_status: final_status.as_ref(),
        log: &log,
        log_path: &log_path,
        history_bytes,
        leftover: &leftover,
    });
    print!("{text}");
    let path = out_dir.join(format!("{stem}.md"));
    fs::write(&path, text).unwrap();
    println!("\nResults written to {}", path.display());
}

/// Injects one fault and waits until the service is healthy on the good version again.
fn inject(
    master: &Master,
    load: &Load,
    addr: SocketAddr,
    plugins: &Plugins,
    kind: Fault,
    nth: usize,
    args: &Args,
) -> FaultRun {
    let mut run = FaultRun {
        kind,
        before_reload: 0,
        to_healthy: None,
        failed: 0,
        outcome: String::new(),
        events: Vec::new(),
        problem: None,
        window_ms: (0, 0),
    };
    // Each fault starts from a version that passed its probation.
    let Some((before, _)) = wait_for(master, HEALTHY_WITHIN, |s| settled(s, args.workers)) else {
        run.problem = Some("the service did not settle before the fault".into());
        return run;
    };
    let good = service(&before)["version"].as_str().unwrap().to_string();
    let events_before = service(&before)["recent"].clone();
    // Alternate the slot a wedge or a stop hits.
    let mut ready: Vec<(u32, String, String)> = workers_of(&before)
        .into_iter()
        .filter(|(_, state, _)| state == "ready")
        .collect();
    ready.sort();
    let target = ready[nth % ready.len()].0;

    let failed_before = load.failed();
    load.set_phase(kind.phase());
    let t0 = Instant::now();
    run.window_ms.0 = load::now_ms();
    let mut held = Vec::new();
    match kind {
        Fault::Abort | Fault::Segv | Fault::Exit | Fault::Truncated => {
            let build = match kind {
                Fault::Abort => &plugins.abort,
                Fault::Segv => &plugins.segv,
                Fault::Exit => &plugins.exit,
                _ => &plugins.truncated,
            };
            replace(build, &master.plugin_path());
            let (code, text) = cli(master, &["reload"]);
            // The service's own verdict ("reload rejected", "... rolled back to X", "done in"),
            // not the CLI's closing line.
            let lines: Vec<&str> = text.trim().lines().collect();
            let last = lines
                .iter()
                .rev()
                .find(|l| {
                    ["rejected", "rolled back", ": done in "]
                        .iter()
                        .any(|w| l.contains(w))
                })
                .or(lines.last())
                .unwrap_or(&"")
                .to_string();
            run.outcome = format!("reload exit {}: {last}", code.unwrap_or(-1));
        }
        Fault::Wedge => {
            held = wedge(addr, target);
            run.outcome = format!("{} /spin requests to worker {target}", held.len());
        }
        Fault::Stop => {
            let _ = kill(Pid::from_raw(target as i32), Signal::SIGSTOP);
            run.outcome = format!("SIGSTOP to worker {target}");
        }
    }
    let healthy = wait_for(master, HEALTHY_WITHIN, |s| {
        healthy_on(s, &good, args.workers)
            && (!matches!(kind, Fault::Wedge | Fault::Stop)
                || !workers_of(s).iter().any(|w| w.0 == target))
    });
    run.to_healthy = healthy.as_ref().map(|(_, at)| at.duration_since(t0));
    drop(held);
    load.set_phase(OUTSIDE);
    run.window_ms.1 = load::now_ms();
    run.failed = load.failed() - failed_before;

    let after = healthy.map(|h| h.0).or_else(|| status(master));
    if let Some(after) = &after {
        let old: Vec<&Value> = events_before.as_array().into_iter().flatten().collect();
        run.events = service(after)["recent"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| !old.contains(e))
            .map(|e| {
                format!(
                    "{}: {}",
                    e["kind"].as_str().unwrap_or("?"),
                    e["outcome"].as_str().unwrap_or("?")
                )
            })
            .collect();
        run.events.reverse(); // oldest first
    }
    let rolled_back = run
        .events
        .iter()
        .any(|e| e.ends_with(": rolled back") || e.starts_with("automatic rollback"));
    run.problem = match kind {
        _ if run.to_healthy.is_none() => {
            Some(format!("not healthy on {good} within {HEALTHY_WITHIN:?}"))
        }
        Fault::Abort | Fault::Segv | Fault::Exit if !rolled_back => {
            Some(format!("no rollback recorded (events: {:?})", run.events))
        }
        Fault::Truncated if !run.events.iter().any(|e| e.ends_with(": rejected")) => {
            Some(format!("no rejection recorded (events: {:?})", run.events))
        }
        Fault::Truncated if run.failed > 0 => Some("requests failed on a rejected reload".into()),
        Fault::Wedge | Fault::Stop if procs::alive(target) => Some(format!(
            "worker {target} is still alive after its slot restarted"
        )),
        _ => None,
    };
    run
}

struct Rendered<'a> {
    args: &'a Args,
    date: String,
    commit: String,
    machine: report::Machine,
    build_time: Duration,
    soak_time: Duration,
    runs: &'a [FaultRun],
    reload_ms: &'a [f64],
    bad_reloads: &'a [String],
    totals: &'a load::Totals,
    before: &'a Snapshot,
    after: &'a Snapshot,
    settled: bool,
    final_status: Option<&'a Value>,
    log: &'a str,
    log_path: &'a Path,
    history_bytes: u64,
    leftover: &'a [u32],
}

fn spread_ms(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let s = report::spread(v);
    format!(
        "{} [{}-{}]",
        report::value(s.median),
        report::value(s.min),
        report::value(s.max)
    )
}

fn render(r: &Rendered) -> String {
    let a = r.args;
    let m = &r.machine;
    let mut t = String::new();
    let _ = write!(
        t,
        "# Soak: {} reloads, {} faults\n\n\
         - date: {}\n- commit: {}\n\
         - machine: {} cores (available_parallelism), {}, kernel {}\n\
         - load: the soak's own client (`bench/src/load.rs`), {} keep-alive connections, \
         `GET /` {}, to 127.0.0.1\n\
         - the master's state dir in: {}\n\
         - service: `fixture-versioned`, {} workers, canary_probation = \"{CANARY_PROBATION}\", \
         probation = \"{PROBATION}\", liveness_timeout = \"{LIVENESS_TIMEOUT}\"\n\
         - took: {} of soak (builds before it: {})\n\n",
        a.reloads,
        a.faults,
        r.date,
        r.commit,
        m.cores,
        m.cpu,
        m.kernel,
        a.conns,
        a.rate.map_or("back to back".to_string(), |r| format!(
            "paced to {} requests/s in all",
            report::value(r)
        )),
        a.tmp
            .as_ref()
            .map_or("the system's temp dir".to_string(), |p| p
                .display()
                .to_string()),
        a.workers,
        duration(r.soak_time),
        duration(r.build_time),
    );

    let done = r.reload_ms.len() - r.bad_reloads.len();
    let n = r.reload_ms.len();
    let tenth = (n / 10).max(1);
    let _ = write!(
        t,
        "## Reloads\n\n\
         Good reloads done: **{done} of {}**. `host reload` wall time (ms), median [min-max]: \
         all {}; first tenth {}; last tenth {}.\n\n",
        n,
        spread_ms(r.reload_ms),
        spread_ms(&r.reload_ms[..tenth.min(n)]),
        spread_ms(&r.reload_ms[n.saturating_sub(tenth)..]),
    );
    for b in r.bad_reloads {
        let _ = writeln!(t, "- not done: {b}");
    }

    // Per fault kind.
    let mut table = report::Table::new(&[
        "fault",
        "injected",
        "host did (expected)",
        "rollbacks / rejections seen",
        "healthy again (ms), median [min-max]",
        "failed requests: total",
        "per fault, median [min-max]",
        "failed at (ms after injection)",
        "problems",
    ]);
    for kind in Fault::ALL {
        let runs: Vec<&FaultRun> = r.runs.iter().filter(|f| f.kind == kind).collect();
        if runs.is_empty() {
            continue;
        }
        let seen = runs
            .iter()
            .filter(|f| {
                f.events.iter().any(|e| {
                    e.ends_with(": rolled back")
                        || e.starts_with("automatic rollback")
                        || e.ends_with(": rejected")
                })
            })
            .count();
        let healthy: Vec<f64> = runs
            .iter()
            .filter_map(|f| f.to_healthy)
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect();
        let failed: Vec<f64> = runs.iter().map(|f| f.failed as f64).collect();
        // When in its window each failure happened: at the crash or kill, or spread out?
        let at: Vec<f64> = runs
            .iter()
            .flat_map(|f| {
                r.totals
                    .failures
                    .iter()
                    .filter(move |x| x.at_ms >= f.window_ms.0 && x.at_ms <= f.window_ms.1)
                    .map(move |x| (x.at_ms - f.window_ms.0) as f64)
            })
            .collect();
        let problems = runs.iter().filter(|f| f.problem.is_some()).count();
        let not_healthy = runs.len() - healthy.len();
        table.row(vec![
            kind.name().to_string(),
            runs.len().to_string(),
            kind.expected().to_string(),
            seen.to_string(),
            format!(
                "{}{}",
                spread_ms(&healthy),
                if not_healthy > 0 {
                    format!(" ({not_healthy} never)")
                } else {
                    String::new()
                }
            ),
            report::value(failed.iter().sum()),
            spread_ms(&failed),
            spread_ms(&at),
            problems.to_string(),
        ]);
    }
    let _ = write!(
        t,
        "## Faults\n\n{} faults, the kinds in turn, each before a good reload and after the \
         service passed its last probation. \"Healthy again\" is from the injection to the \
         first `host status` (polled every {} ms; while a worker is wedged a status takes up \
         to 500 ms, the master's wait for its request count) that shows every slot ready on the \
         version that served before the fault, nothing on trial. Failed requests are the load \
         client's in that window: only requests in flight on a worker that crashed or was \
         killed may fail.\n\n{}\n",
        r.runs.len(),
        POLL.as_millis(),
        table.render()
    );
    for kind in Fault::ALL {
        let _ = writeln!(t, "- {}: {}", kind.name(), kind.what());
    }
    t.push('\n');
    let problems: Vec<&FaultRun> = r.runs.iter().filter(|f| f.problem.is_some()).collect();
    if !problems.is_empty() {
        t += "Problems:\n\n";
        for f in problems {
            let _ = writeln!(
                t,
                "- {} before reload {}: {} ({}; events {:?})",
                f.kind.name(),
                f.before_reload,
                f.problem.as_deref().unwrap_or(""),
                f.outcome,
                f.events
            );
        }
        t.push('\n');
    }

    // Requests.
    let tot = r.totals;
    let answered: u64 = tot.ok.iter().sum();
    let failed: u64 = tot.failed.iter().sum();
    let _ = write!(
        t,
        "## Requests\n\n{} answered, {} failed ({} in fault windows, **{} outside them**), \
         {:.0} requests/s over {:.0} s, {} connections opened; {} idle keep-alive \
         connections were found closed by the server before a request was sent on them (a \
         worker that crashed or was killed between two requests; the client reconnected, as a \
         pooling client does: wrk would count each as a failed request).\n\n",
        report::value(answered as f64),
        report::value(failed as f64),
        report::value(failed.saturating_sub(tot.failed[OUTSIDE]) as f64),
        tot.failed[OUTSIDE],
        answered as f64 / tot.seconds,
        tot.seconds,
        report::value(tot.connects as f64),
        report::value(tot.closed_idle as f64),
    );
    let mut kinds: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for f in &tot.failures {
        let phase = if f.phase == OUTSIDE {
            "outside faults"
        } else {
            Fault::ALL[f.phase - 1].name()
        };
        *kinds.entry((phase, f.kind)).or_default() += 1;
    }
    if !kinds.is_empty() {
        let mut k = report::Table::new(&["window", "how it failed", "requests"]);
        for ((phase, kind), n) in &kinds {
            k.row(vec![phase.to_string(), kind.to_string(), n.to_string()]);
        }
        t += &k.render();
        t.push('\n');
    }
    let outside: Vec<&load::Failure> = tot.failures.iter().filter(|f| f.phase == OUTSIDE).collect();
    if !outside.is_empty() {
        t += "Failures outside fault windows (up to 20; unix ms, phase when sent):\n\n";
        for f in outside.iter().take(20) {
            let _ = writeln!(
                t,
                "- {} {} (sent in phase {}): {}",
                f.at_ms, f.kind, f.sent_in, f.detail
            );
        }
        t.push('\n');
    }

    // Processes and fds.
    let wfds = |s: &Snapshot| {
        s.workers
            .iter()
            .map(|w| w.1.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut p = report::Table::new(&["", "before", "after"]);
    p.row(vec![
        "master open fds".into(),
        r.before.master_fds.to_string(),
        r.after.master_fds.to_string(),
    ]);
    p.row(vec![
        "each worker's open fds".into(),
        wfds(r.before),
        wfds(r.after),
    ]);
    p.row(vec![
        "master's live children".into(),
        r.before.workers.len().to_string(),
        r.after.workers.len().to_string(),
    ]);
    p.row(vec![
        "master's zombie children".into(),
        r.before.zombies.to_string(),
        r.after.zombies.to_string(),
    ]);
    p.row(vec![
        "processes running the host binary".into(),
        r.before.host_processes.to_string(),
        r.after.host_processes.to_string(),
    ]);
    p.row(vec![
        "master RSS (MiB)".into(),
        report::value(r.before.master_rss_mib),
        report::value(r.after.master_rss_mib),
    ]);
    let _ = write!(
        t,
        "## Processes and file descriptors\n\nBefore the load started, and after it stopped \
         and the service {} (drains finished, last probation over).\n\n{}\n\
         After the master was killed: {} processes running the host binary{}. The history \
         file (`plugins/history.json`) was {} bytes at the end.\n\n",
        if r.settled {
            "settled"
        } else {
            "**did not settle within 30 s**"
        },
        p.render(),
        r.leftover.len(),
        if r.leftover.is_empty() {
            String::new()
        } else {
            format!(
                " (pids {:?}: not ours to kill, but worth a look)",
                r.leftover
            )
        },
        r.history_bytes,
    );

    let mut gained = r.after.master_fd_kinds.clone();
    for k in &r.before.master_fd_kinds {
        if let Some(i) = gained.iter().position(|g| g == k) {
            gained.remove(i);
        }
    }
    let mut lost = r.before.master_fd_kinds.clone();
    for k in &r.after.master_fd_kinds {
        if let Some(i) = lost.iter().position(|g| g == k) {
            lost.remove(i);
        }
    }
    if !gained.is_empty() || !lost.is_empty() {
        let _ = write!(
            t,
            "The master's fds after and not before: {gained:?}; before and not after: \
             {lost:?}.\n\n"
        );
    }

    // The log.
    let count = |needle: &str| r.log.lines().filter(|l| l.contains(needle)).count();
    let _ = write!(
        t,
        "## The master's log\n\n{} lines ({}). Lines that count failures and recoveries:\n\n\
         | line contains | count |\n|---|---|\n",
        r.log.lines().count(),
        r.log_path.display()
    );
    for needle in [
        "reload rejected",
        "; rolling back to",
        "failed on probation",
        "rolled back from",
        "; killing it",
        "starting a replacement",
        "before the next start",
        " ERROR ",
        " WARN ",
    ] {
        let _ = writeln!(t, "| `{needle}` | {} |", count(needle));
    }
    if let Some(s) = r.final_status {
        let _ = write!(
            t,
            "\nAt the end: version {} ({}), {} crashes in the last minute.\n",
            service(s)["version"].as_str().unwrap_or("?"),
            if service(s)["version_healthy"] == true {
                "healthy"
            } else {
                "not marked healthy"
            },
            service(s)["crashes_last_minute"]
        );
    }
    t
}

fn duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{} min {} s", s / 60, s % 60)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

//! Figure 13, the WebSocket gateway: echo round trips through the host's WebSocket service (the
//! chat plugin's `echo`) against `ws_baseline` (a plain tokio-tungstenite echo server with the
//! same process count), with the bench's client (`crate::ws`); the host again with a
//! `host reload` every 2 s, where no message may be lost, duplicated or reordered and no
//! connection dropped; and the servers' memory per idle connection, with a chart of their
//! memory as the idle connections grow.

use std::{
    path::Path,
    thread,
    time::{Duration, Instant},
};

use crate::{
    chart,
    prefork::Prefork,
    procs, replace,
    report::{Goal, RoundTable},
    ws::{Clients, Echo},
    Build, Master, Mode,
};

/// Echo connections, each with one message in flight (wrk's 32 in figure 1 are HTTP requests
/// in flight; a WebSocket server is there for many connections).
pub const CONNS: usize = 64;
/// The reload pace of figure 2.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// Pause between two runs (the last run's connections closed) and before a memory sample
/// (the servers done with the handshakes' and closes' work).
const SETTLE: Duration = Duration::from_millis(500);

/// The host's service: `workers` business workers and as many gateways, so that the host and
/// the baseline each accept in `workers` processes; the host's default probation.
pub fn config(workers: usize) -> String {
    format!(
        "[[service]]\nname = \"chat\"\nkind = \"websocket\"\nlisten = [\"127.0.0.1:0\"]\n\
         plugin = \"plugin.so\"\nworkers = {workers}\ngateways = {workers}\n"
    )
}

/// What the figure measured: the echo table (host, host with reloads, baseline) and the
/// memory table, each with a column per round.
pub struct Figure {
    pub echo: RoundTable,
    pub memory: RoundTable,
    /// Reloads done in all, and those that failed (`host reload` exited non-zero).
    pub reloads: usize,
    pub failed_reloads: usize,
}

/// A value from an echo run and the server CPU seconds it took.
type Measure = fn(&Echo, f64) -> f64;

#[derive(Clone, Copy)]
enum Run {
    Host,
    HostReloads,
    Baseline,
}

/// Steps of the memory chart: the idle connections opened in this many equal parts, the memory
/// read after each.
const CHART_STEPS: usize = 10;

/// Runs the figure with the mode's rounds and lengths; draws the memory chart at `svg`.
pub fn run(b: &Build, m: &Mode, workers: usize, svg: &Path) -> Figure {
    // The client holds up to 10,000 connections (the memory rounds): one file each.
    crate::prefork::raise_fd_limit();
    let length = Duration::from_secs(u64::from(m.gateway_secs));
    let host = Master::with_config(&b.host, &config(workers), &b.chat_v1, "info", None);
    let baseline = Prefork::start(&b.ws_baseline, workers, &[]);
    let host_addr = host.addr();
    let warmup = Duration::from_secs(u64::from(m.warmup_secs));
    for addr in [&host_addr, &baseline.addr] {
        Clients::connect(addr, CONNS).echo(warmup);
        thread::sleep(SETTLE);
    }

    // (echo, server CPU seconds) per run; the runs with reloads have no CPU figure (their
    // workers change under them).
    let (mut h, mut s, mut r) = (Vec::new(), Vec::new(), Vec::new());
    let (mut reloads_per_run, mut reloads, mut failed_reloads) = (Vec::new(), 0, 0);
    for round in 0..m.gateway_rounds {
        let mut order = [Run::Host, Run::HostReloads, Run::Baseline];
        if round % 2 == 1 {
            order.reverse();
        }
        for run in order {
            match run {
                Run::Host => h.push(measured(&host_addr, &host.pids(), length)),
                Run::Baseline => s.push(measured(&baseline.addr, &baseline.pids(), length)),
                Run::HostReloads => {
                    let clients = Clients::connect(&host_addr, CONNS);
                    let load = thread::spawn(move || clients.echo(length));
                    let start = Instant::now();
                    let mut done = 0;
                    let mut next = RELOAD_EVERY;
                    while next < length {
                        thread::sleep(next.saturating_sub(start.elapsed()));
                        // v2, v1, v2, ...: every reload loads a different build than the last.
                        reloads += 1;
                        let plugin = if reloads % 2 == 1 {
                            &b.chat_v2
                        } else {
                            &b.chat_v1
                        };
                        replace(plugin, &host.plugin_path());
                        failed_reloads += usize::from(!host.cli(&["reload"]).status.success());
                        done += 1;
                        next += RELOAD_EVERY;
                    }
                    r.push(load.join().unwrap());
                    reloads_per_run.push(f64::from(done));
                    thread::sleep(SETTLE);
                }
            }
        }
    }
    drop(host);
    drop(baseline);

    let col = |runs: &[(Echo, f64)], f: Measure| -> Vec<f64> {
        runs.iter().map(|(e, cpu)| f(e, *cpu)).collect()
    };
    let rps = |e: &Echo, _| e.per_second();
    let p50 = |e: &Echo, _| e.p50_ms;
    let p99 = |e: &Echo, _| e.p99_ms;
    let cpu_us = |e: &Echo, cpu: f64| cpu / e.answered as f64 * 1e6;
    let faults = |e: &Echo, _| e.faults() as f64;
    let busy: Vec<(Echo, f64)> = r.into_iter().map(|e| (e, 0.0)).collect();
    let mut t = RoundTable::new(m.gateway_rounds);
    t.compare(
        "round trips/s",
        ("host", &col(&h, rps)),
        ("baseline", &col(&s, rps)),
        None,
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
        None,
    );
    t.compare(
        "server CPU per message (µs)",
        ("host", &col(&h, cpu_us)),
        ("baseline", &col(&s, cpu_us)),
        None,
    );
    t.values("reloads in the run: host with reloads", &reloads_per_run);
    let counts: [(&str, Measure); 5] = [
        ("messages lost", |e, _| e.lost as f64),
        ("messages duplicated", |e, _| e.duplicated as f64),
        ("messages reordered", |e, _| e.reordered as f64),
        ("connections dropped", |e, _| e.dropped as f64),
        ("connections refused", |e, _| e.refused as f64),
    ];
    for (what, f) in counts {
        t.values_with_goal(
            &format!("{what}: host with reloads"),
            &col(&busy, f),
            Goal::None,
        );
    }
    t.values("all of those: host without reloads", &col(&h, faults));
    t.values("all of those: baseline", &col(&s, faults));
    t.compare(
        "round trips/s, host",
        ("with reloads", &col(&busy, rps)),
        ("without", &col(&h, rps)),
        None,
    );
    t.compare(
        "p99 latency (ms), host",
        ("with reloads", &col(&busy, p99)),
        ("without", &col(&h, p99)),
        None,
    );

    let memory = memory(b, m, workers);
    let n = m.gateway_idle_conns;
    let lines = [Side::Host, Side::Baseline].map(|side| {
        let server = Server::start(b, workers, side);
        (side.name().to_string(), growth(&server, n))
    });
    chart::draw_panels(
        svg,
        &[chart::Panel {
            caption: format!(
                "server memory (RSS, every process) by idle WebSocket connections, {n} in \
                 {CHART_STEPS} steps"
            ),
            x_desc: "idle connections",
            y_desc: "MiB",
            lines: lines.into(),
            marks: Vec::new(),
            marks_are: "",
        }],
    )
    .expect("could not draw the memory chart");
    Figure {
        echo: t,
        memory,
        reloads,
        failed_reloads,
    }
}

/// One echo run of `length` on [`CONNS`] new connections, with the server CPU seconds of
/// `pids` over the round trips alone (not the handshakes before them nor the closes after).
fn measured(addr: &str, pids: &[u32], length: Duration) -> (Echo, f64) {
    let clients = Clients::connect(addr, CONNS);
    let cpu0 = procs::cpu_seconds(pids);
    let echo = clients.echo(length);
    let cpu = procs::cpu_seconds(pids) - cpu0;
    thread::sleep(SETTLE);
    (echo, cpu)
}

/// The memory a server holds per idle connection: in each round, a fresh host and a fresh
/// baseline in turn (the order alternating), their memory summed over every process before and
/// after `m.gateway_idle_conns` connections are opened and left idle. Fresh servers, because a
/// server's allocator keeps what the last round's connections freed, and a second round on the
/// same server would find the memory already there.
fn memory(b: &Build, m: &Mode, workers: usize) -> RoundTable {
    let n = m.gateway_idle_conns;
    let mut sides: [Vec<Held>; 2] = Default::default();
    for round in 0..m.gateway_rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let side = [Side::Host, Side::Baseline][i];
            sides[i].push(hold(&Server::start(b, workers, side), n));
        }
    }
    let kib = |v: &[Held], f: fn(&Held) -> f64| -> Vec<f64> {
        v.iter().map(|h| f(h) * 1024.0 / h.opened as f64).collect()
    };
    let mut t = RoundTable::new(m.gateway_rounds);
    t.compare(
        &format!("RSS per idle connection (KiB), {n} connections"),
        ("host", &kib(&sides[0], |h| h.rss.1 - h.rss.0)),
        ("baseline", &kib(&sides[1], |h| h.rss.1 - h.rss.0)),
        None,
    );
    t.compare(
        "PSS per idle connection (KiB)",
        ("host", &kib(&sides[0], |h| h.pss.1 - h.pss.0)),
        ("baseline", &kib(&sides[1], |h| h.pss.1 - h.pss.0)),
        None,
    );
    t.values(
        "RSS per idle connection (KiB): host's gateways alone",
        &kib(&sides[0], |h| h.accepting.1 - h.accepting.0),
    );
    t.values(
        "RSS per idle connection (KiB): baseline's children alone",
        &kib(&sides[1], |h| h.accepting.1 - h.accepting.0),
    );
    let mib = |v: &[Held], f: fn(&Held) -> f64| -> Vec<f64> { v.iter().map(f).collect() };
    t.values("RSS before (MiB): host", &mib(&sides[0], |h| h.rss.0));
    t.values("RSS before (MiB): baseline", &mib(&sides[1], |h| h.rss.0));
    t.values(
        "connections refused: host",
        &mib(&sides[0], |h| h.refused as f64),
    );
    t.values(
        "connections refused: baseline",
        &mib(&sides[1], |h| h.refused as f64),
    );
    t
}

/// Memory (MiB) before and after the idle connections were opened: RSS and PSS summed over
/// every process of the server, and RSS of the processes that accept (gateways, children).
struct Held {
    rss: (f64, f64),
    pss: (f64, f64),
    accepting: (f64, f64),
    opened: usize,
    refused: u64,
}

fn hold(server: &Server, n: usize) -> Held {
    let sum = |pids: &[u32], f: fn(u32) -> f64| pids.iter().map(|p| f(*p)).sum::<f64>();
    let (pids, accepting) = (&server.pids, &server.accepting);
    thread::sleep(SETTLE);
    let before = (
        sum(pids, procs::rss_mib),
        sum(pids, procs::pss_mib),
        sum(accepting, procs::rss_mib),
    );
    let clients = Clients::connect(&server.addr, n);
    thread::sleep(SETTLE);
    let after = (
        sum(pids, procs::rss_mib),
        sum(pids, procs::pss_mib),
        sum(accepting, procs::rss_mib),
    );
    Held {
        rss: (before.0, after.0),
        pss: (before.1, after.1),
        accepting: (before.2, after.2),
        opened: clients.len().max(1),
        refused: clients.refused,
    }
}

#[derive(Clone, Copy)]
enum Side {
    Host,
    Baseline,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Host => "host",
            Side::Baseline => "baseline",
        }
    }
}

/// A fresh server of either side for the memory figures, with its processes: all of them, and
/// those that accept and hold the connections (the host's gateways, the baseline's children).
struct Server {
    addr: String,
    pids: Vec<u32>,
    accepting: Vec<u32>,
    // Whichever runs; killed (with every process it started) when dropped.
    _host: Option<Master>,
    _baseline: Option<Prefork>,
}

impl Server {
    fn start(b: &Build, workers: usize, side: Side) -> Server {
        match side {
            Side::Host => {
                let host = Master::with_config(&b.host, &config(workers), &b.chat_v1, "info", None);
                // The gateways hold the connections; the business workers run the plugin's
                // on_connect and keep nothing per client.
                let accepting = host.status()["services"][0]["workers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|w| w["role"] == "gateway")
                    .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
                    .collect();
                Server {
                    addr: host.addr(),
                    pids: host.pids(),
                    accepting,
                    _host: Some(host),
                    _baseline: None,
                }
            }
            Side::Baseline => {
                let baseline = Prefork::start(&b.ws_baseline, workers, &[]);
                Server {
                    addr: baseline.addr.clone(),
                    pids: baseline.pids(),
                    accepting: procs::children(baseline.child.id()),
                    _host: None,
                    _baseline: Some(baseline),
                }
            }
        }
    }
}

/// The server's RSS (MiB, every process) with 0 idle connections, then after each of
/// [`CHART_STEPS`] equal parts of `n` is opened: the points of the memory chart.
fn growth(server: &Server, n: usize) -> Vec<(f64, f64)> {
    let rss = || server.pids.iter().map(|p| procs::rss_mib(*p)).sum::<f64>();
    thread::sleep(SETTLE);
    let mut points = vec![(0.0, rss())];
    let mut held = Vec::new();
    for _ in 0..CHART_STEPS {
        held.push(Clients::connect(&server.addr, n / CHART_STEPS));
        thread::sleep(SETTLE);
        let open: usize = held.iter().map(Clients::len).sum();
        points.push((open as f64, rss()));
    }
    points
}

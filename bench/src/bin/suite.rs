//! The benchmark suite of docs/benchmarks.md: every figure, in one of three modes.
//!
//! `suite [--quick | --full] [FIGURE...]` (`bash bench/run.sh [--quick | --full]` installs wrk,
//! h2load and nginx first, then runs this). Every comparison runs both sides in the same run,
//! interleaved round by round (the order alternates between rounds), and reports the ratio per
//! round, then the median ratio and its spread [min-max] over the rounds, with a verdict against
//! its goal (`bench::report`). The results are printed and written as Markdown to
//! `<target>/bench-results/<mode>-<date>.md`.
//!
//! This file is the driver: the command line, which figures a mode runs and in what order
//! (`FIGURES`, `FULL_ONLY`), the results file's header and its time footer. The figures
//! themselves are in `bench::figures` (one module per concern) and `bench::scaling`.

use std::{
    cell::Cell,
    time::{Duration, Instant},
};

use bench::{
    build, build_boundary,
    figures::{
        ab, balance, boundary, ops,
        ops::{H2_CONNS, H2_STREAMS, HANDSHAKE_CLIENTS},
        reload, steady, upgrade, websocket, Ctx, CONNS, RELOAD_EVERY, WORKERS,
    },
    report::{self, Results, Table},
    root,
    scaling::figures as scaling,
    target_dir,
};

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
        run: steady::steady,
        quick: true,
    },
    Figure {
        name: "reload",
        run: reload::reload,
        quick: true,
    },
    Figure {
        name: "time",
        run: reload::reload_time,
        quick: true,
    },
    Figure {
        name: "upgrade",
        run: upgrade::upgrade,
        quick: true,
    },
    Figure {
        name: "boundary",
        run: boundary::boundary,
        quick: true,
    },
    Figure {
        name: "rebuild",
        run: reload::rebuild,
        quick: true,
    },
    Figure {
        name: "tls",
        run: ops::tls,
        quick: false,
    },
    Figure {
        name: "accesslog",
        run: ops::access_log,
        quick: false,
    },
    Figure {
        name: "stats",
        run: ops::stats,
        quick: false,
    },
    Figure {
        name: "async",
        run: steady::async_path,
        quick: false,
    },
];

/// The figures only `--full` runs, after the default ones (or any mode when they are named):
/// the long runs; figure 13 (gateway), which would take the default mode past its 20 min
/// (docs/benchmarks.md, "Modes"); and the scaling curves (`bench::scaling`: reload time by
/// workers and by plugin size, reload under load by connections, memory by idle connections,
/// edit -> live); figure 16, figure 1 with one worker per server; figure 17, accept balancing
/// on and off under reloads; figure 18, figure 1 beside a baseline whose connections split
/// evenly (`SO_REUSEPORT`); `ab`, this tree's host against another commit's (it says "not
/// run" without `BENCH_AB_REV`). Each gets its name here and a
/// function in `bench::figures` or `bench::scaling`.
const FULL_ONLY: &[Figure] = &[
    Figure {
        name: "reload-long",
        run: reload::reload_long,
        quick: false,
    },
    Figure {
        name: "gateway",
        run: websocket::gateway,
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
        run: steady::steady_one_worker,
        quick: false,
    },
    Figure {
        name: "balance",
        run: balance::balance,
        quick: false,
    },
    Figure {
        name: "steady-even",
        run: steady::steady_even,
        quick: false,
    },
    Figure {
        name: "ab",
        run: ab::ab,
        quick: false,
    },
];

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

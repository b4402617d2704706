//! What the host's operations features cost on the request path: figure 10 (HTTPS and
//! HTTP/2, the host against the baseline with the same TLS), figure 11 (the access log: off, to
//! a file, to /dev/null) and figure 12 (the metrics counting, a criterion microbenchmark, beside
//! the host's CPU per request that figure 1 or 11 measured earlier in the same run).

use std::{fs, path::Path, thread, time::Duration};

use crate::{
    procs,
    report::{self, ratios, Results, RoundTable},
    tls::Certs,
    wrk, Master, Service,
};

use super::{baseline, col, criterion, measure, Ctx, Steady, CONNS, SETTLE, WORKERS};

/// h2load's connections and concurrent streams on each: 32 requests in flight, as wrk's 32
/// connections, 4 streams at a time on each connection (HTTP/2's multiplexing).
pub const H2_CONNS: u32 = 8;
pub const H2_STREAMS: u32 = 4;
/// Threads of the new-connection-per-request client (each one connection at a time).
pub const HANDSHAKE_CLIENTS: usize = 4;

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
pub fn tls(cx: &Ctx, out: &mut Results) {
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
        crate::tls::h2load(&urls[i], H2_CONNS, H2_STREAMS, m.warmup_secs);
        crate::tls::handshakes(
            &addrs[i],
            &client,
            HANDSHAKE_CLIENTS,
            Duration::from_secs(u64::from(m.warmup_secs)),
        );
    }
    let mut h1: [Vec<(wrk::Report, f64)>; 2] = Default::default();
    let mut h2: [Vec<(crate::tls::H2Report, f64)>; 2] = Default::default();
    let mut hs: [Vec<(crate::tls::Handshakes, f64)>; 2] = Default::default();
    for round in 0..m.tls_rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            h1[i].push(with_cpu(&pids[i], || wrk::run(&urls[i], CONNS, secs, None)));
        }
        for i in order {
            h2[i].push(with_cpu(&pids[i], || {
                crate::tls::h2load(&urls[i], H2_CONNS, H2_STREAMS, secs)
            }));
        }
        for i in order {
            hs[i].push(with_cpu(&pids[i], || {
                crate::tls::handshakes(&addrs[i], &client, HANDSHAKE_CLIENTS, run_for)
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
pub fn access_log(cx: &Ctx, out: &mut Results) {
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

    let cpu_us = Steady::cpu_us;
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
pub fn stats(cx: &Ctx, out: &mut Results) {
    let m = &cx.mode;
    let json_path = cx.out_dir.join(format!("{}-stats.json", cx.stem));
    let log_path = criterion(cx, "stats", &[("BENCH_STATS_JSON", &json_path)]);
    let v: serde_json::Value = serde_json::from_slice(&fs::read(&json_path).unwrap()).unwrap();
    let _ = fs::remove_file(&json_path);
    let get = |k: &str| -> Vec<f64> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let (record, per_request, two, one_set) = (
        get("record_ns"),
        get("per_request_ns"),
        get("two_threads_ns"),
        get("one_set_ns"),
    );
    let mut t = RoundTable::new(m.stats_rounds);
    t.values(
        "ns per request: record (4 relaxed adds, partition_point)",
        &record,
    );
    t.values(
        "ns per request: clock at start and end, record",
        &per_request,
    );
    t.values(
        "ns per request: the same, 2 threads, each its own counters (each)",
        &two,
    );
    t.values(
        "ns per request: the same, 2 threads on one set of counters (each; the host before 2026-12-01)",
        &one_set,
    );
    let share = match cx.host_cpu_us.get() {
        Some((cpu_us, from)) => {
            let pct = |ns: &[f64]| -> Vec<f64> {
                ns.iter().map(|n| n / (cpu_us * 1000.0) * 100.0).collect()
            };
            t.values(
                "% of the host's CPU per request: clock, record",
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
             (criterion): an equivalent of the worker's private `Stats::record` (this \
             thread's counters, status class, 4 relaxed atomic adds, a `partition_point` over \
             the host's 14 duration bounds) and of what each request does around it, {} \
             interleaved rounds of {} ms warm-up and {} \
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

//! Running wrk (the load generator, from Debian's packages) and reading its report.

use std::{
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// What one wrk run reported.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub requests: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// connect + read + write + timeout errors.
    pub socket_errors: u64,
    /// The timeouts among them: no response within 5 s (`--timeout`), which an overloaded
    /// machine can cause, where the others are connections that failed or were closed.
    pub timeouts: u64,
    pub non_2xx: u64,
    /// Responses per 100 ms bucket: (unix ms of the bucket start, count). With the Lua script.
    pub buckets: Vec<(u64, u64)>,
}

impl Report {
    pub fn failed(&self) -> u64 {
        self.socket_errors + self.non_2xx
    }
}

/// Records responses per 100 ms (wall clock, through LuaJIT's FFI) and prints them at the end.
pub const BUCKET_SCRIPT: &str = r#"
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_usec; } bench_timeval;
int gettimeofday(bench_timeval *tv, void *tz);
]]
local tv = ffi.new("bench_timeval")
buckets = {}
function response(status, headers, body)
  ffi.C.gettimeofday(tv, nil)
  local b = math.floor((tonumber(tv.tv_sec) * 1000 + tonumber(tv.tv_usec) / 1000) / 100)
  buckets[b] = (buckets[b] or 0) + 1
end
local threads = {}
function setup(thread) table.insert(threads, thread) end
function done(summary, latency, requests)
  local all = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("buckets")) do all[k] = (all[k] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(all) do table.insert(parts, string.format("%.0f:%d", k * 100, v)) end
  io.write("BUCKETS " .. table.concat(parts, " ") .. "\n")
end
"#;

/// [`run`] in a thread, calling `call` every `every` while before the end (at `every`,
/// 2 x `every`, ...) if given. Returns wrk's report and the moments of the calls (unix ms).
pub fn run_calling(
    url: &str,
    conns: u32,
    seconds: u32,
    script: Option<&Path>,
    call: Option<(Duration, &mut dyn FnMut())>,
) -> (Report, Vec<u64>) {
    let load = {
        let (url, script) = (url.to_string(), script.map(Path::to_path_buf));
        thread::spawn(move || run(&url, conns, seconds, script.as_deref()))
    };
    let start = Instant::now();
    let length = Duration::from_secs(u64::from(seconds));
    let mut moments = Vec::new();
    if let Some((every, call)) = call {
        let mut next = every;
        while next < length {
            thread::sleep(next.saturating_sub(start.elapsed()));
            moments.push(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as u64,
            );
            call();
            next += every;
        }
    }
    (load.join().unwrap(), moments)
}

/// `wrk -t1 -cCONNS -dSECONDS --latency URL`, with `script` if given.
pub fn run(url: &str, conns: u32, seconds: u32, script: Option<&Path>) -> Report {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t1",
        &format!("-c{conns}"),
        &format!("-d{seconds}s"),
        "--timeout",
        "5s",
        "--latency",
    ]);
    if let Some(s) = script {
        cmd.arg("-s").arg(s);
    }
    let out = cmd
        .arg(url)
        .output()
        .expect("could not run wrk (bench/run.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "wrk failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(&text)
}

fn duration_ms(s: &str) -> f64 {
    let (n, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let n: f64 = n.parse().unwrap_or(0.0);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => n,
    }
}

pub fn parse(text: &str) -> Report {
    let mut r = Report::default();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => r.p50_ms = duration_ms(v),
            ["99%", v] => r.p99_ms = duration_ms(v),
            [n, "requests", "in", d, ..] => {
                r.requests = n.parse().unwrap_or(0);
                r.seconds = duration_ms(d.trim_end_matches(',')) / 1000.0;
            }
            ["Requests/sec:", v] => r.rps = v.parse().unwrap_or(0.0),
            ["Non-2xx", "or", "3xx", "responses:", n] => r.non_2xx = n.parse().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 3, write 1, timeout 0"
                for pair in rest.chunks(2) {
                    if let [kind, n] = pair {
                        let n: u64 = n.trim_end_matches(',').parse().unwrap_or(0);
                        r.socket_errors += n;
                        if *kind == "timeout" {
                            r.timeouts = n;
                        }
                    }
                }
            }
            ["BUCKETS", rest @ ..] => {
                r.buckets = rest
                    .iter()
                    .filter_map(|kv| kv.split_once(':'))
                    .filter_map(|(k, v)| Some((k.parse().ok()?, v.parse().ok()?)))
                    .collect();
                r.buckets.sort();
            }
            _ => {}
        }
    }
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_a_wrk_report() {
        let r = super::parse(
            "Running 2s test @ http://127.0.0.1:1/\n  1 threads and 8 connections\n  Latency Distribution\n     50%  205.00us\n     99%    1.20ms\n  24000 requests in 2.00s, 3.00MB read\n  Socket errors: connect 0, read 3, write 1, timeout 2\n  Non-2xx or 3xx responses: 5\nRequests/sec:  12000.50\nBUCKETS 1700000000000:10 1700000000100:12\n",
        );
        assert_eq!((r.p50_ms, r.p99_ms), (0.205, 1.2));
        assert_eq!((r.requests, r.seconds, r.rps), (24000, 2.0, 12000.5));
        assert_eq!((r.socket_errors, r.timeouts), (6, 2));
        assert_eq!((r.non_2xx, r.failed()), (5, 11));
        assert_eq!(r.buckets, vec![(1700000000000, 10), (1700000000100, 12)]);
    }
}

//! The access log: one line per request, written by the worker off the request path. A request
//! formats its line and appends it to a shared buffer (never waiting for the disk: past
//! `MAX_PENDING` bytes the line is dropped and counted, and the count is logged); a thread of
//! its own takes the buffer every `FLUSH_EVERY`, or as soon as it holds `BATCH` bytes, and
//! writes it to the file. The request path wakes no thread for a line: a queue that woke its
//! writer for each line cost about as much CPU as the request itself (benchmarks figure 11).
//! The file comes from the master (the worker may run as a user who cannot open it) and is
//! replaced the same way when `host reopen-logs` asks. A draining worker writes what is left
//! before it exits ([`AccessLog::finish`]); a worker that crashes loses at most its last
//! `FLUSH_EVERY` of lines.

use std::{
    cell::RefCell,
    fs::File,
    io::Write,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    time::{Duration, SystemTime},
};

use http::Version;
use serde::Serialize;

use crate::config::AccessLogFormat;

/// Bytes waiting to be written, at most.
const MAX_PENDING: usize = 4 * 1024 * 1024;
/// Bytes written at once, at most (whole lines); the writer is woken early once this much waits.
const BATCH: usize = 64 * 1024;
/// How long a line waits for the writer, at most (when the disk keeps up).
const FLUSH_EVERY: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// A new file (`host reopen-logs`), how many of `bytes` were logged before it came (those
    /// still go to the old file), and its number among the reopens.
    reopen: Option<(File, usize, u64)>,
    /// The worker is exiting: write everything, then stop.
    finishing: bool,
    finished: bool,
    /// Reopens asked for so far, and the number of the newest the writer has switched to
    /// ([`AccessLog::reopen`] waits for it).
    reopens: u64,
    switched: u64,
}

struct Queue {
    pending: Mutex<Pending>,
    /// Wakes the writer early (a full batch, a reopen, the finish).
    wake: Condvar,
    /// Tells [`AccessLog::finish`] the writer is done, and [`AccessLog::reopen`] that it
    /// switched files.
    done: Condvar,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits on `done` until `ready` says so, `within` at most; false if it never did.
    fn wait_done(
        &self,
        pending: MutexGuard<'_, Pending>,
        within: Duration,
        ready: impl Fn(&Pending) -> bool,
    ) -> bool {
        let (pending, _) = self
            .done
            .wait_timeout_while(pending, within, |p| !ready(p))
            .unwrap_or_else(|p| p.into_inner());
        ready(&pending)
    }
}

pub struct AccessLog {
    queue: Arc<Queue>,
    format: AccessLogFormat,
    dropped: AtomicU64,
}

/// What one line says.
pub struct Request<'a> {
    pub client: Option<SocketAddr>,
    pub method: &'a str,
    pub target: &'a str,
    pub version: Version,
    pub status: u16,
    pub bytes: u64,
    pub took: Duration,
    pub referer: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub plugin_version: &'a str,
}

thread_local! {
    /// Each runtime thread formats its lines here: no allocation per line for the line itself.
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl AccessLog {
    /// Starts the writer thread for `file`.
    pub fn start(file: File, format: AccessLogFormat) -> AccessLog {
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            done: Condvar::new(),
        });
        let writer = queue.clone();
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_all(file, &writer));
        if let Err(e) = spawned {
            tracing::warn!("could not start the access log writer: {e}");
        }
        AccessLog {
            queue,
            format,
            dropped: AtomicU64::new(0),
        }
    }

    /// Adds the line for `req`; never waits for the disk.
    pub fn log(&self, req: &Request<'_>) {
        LINE.with_borrow_mut(|line| {
            line.clear();
            match self.format {
                AccessLogFormat::Combined => combined(req, line),
                AccessLogFormat::Json => json(req, line),
            }
            let mut pending = self.queue.lock();
            if pending.bytes.len() + line.len() > MAX_PENDING {
                drop(pending);
                let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if dropped.is_power_of_two() {
                    tracing::warn!(
                        "access log: the writer is behind; {dropped} lines dropped so far (the \
                         disk is too slow for this request rate)"
                    );
                }
                return;
            }
            let before = pending.bytes.len();
            pending.bytes.extend_from_slice(line);
            if before < BATCH && pending.bytes.len() >= BATCH {
                self.queue.wake.notify_one();
            }
        });
    }

    /// Writes to `file` from now on (`host reopen-logs`). Returns once the writer has written
    /// what was logged before to the old file and switched, so that the old file gets nothing
    /// more (logrotate may compress it at once); false if that took longer than `within`.
    pub fn reopen(&self, file: File, within: Duration) -> bool {
        let mut pending = self.queue.lock();
        let before = pending.reopen.take().map(|(_, n, _)| n);
        // Two reopens before the writer woke: what came between goes to the newest file (and
        // the first one's caller is done when the writer switches to it).
        let at = before.unwrap_or(pending.bytes.len());
        pending.reopens += 1;
        let number = pending.reopens;
        pending.reopen = Some((file, at, number));
        self.queue.wake.notify_one();
        self.queue
            .wait_done(pending, within, |p| p.switched >= number)
    }

    /// Writes what is left and stops the writer, waiting for it `within` at most (the worker is
    /// about to exit).
    pub fn finish(&self, within: Duration) {
        let mut pending = self.queue.lock();
        pending.finishing = true;
        self.queue.wake.notify_one();
        if !self.queue.wait_done(pending, within, |p| p.finished) {
            tracing::warn!("access log: the last lines were not written in time");
        }
    }
}

/// The writer thread: takes the whole buffer at once, and writes it in blocks of whole lines
/// (every worker of a service appends to the same file, O_APPEND, and a line cut in two could
/// interleave with another worker's).
fn write_all(mut file: File, queue: &Queue) {
    let mut out = Vec::with_capacity(BATCH);
    loop {
        let (reopen, finishing) = {
            let mut pending = queue.lock();
            if pending.bytes.len() < BATCH && pending.reopen.is_none() && !pending.finishing {
                pending = queue
                    .wake
                    .wait_timeout(pending, FLUSH_EVERY)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            std::mem::swap(&mut pending.bytes, &mut out);
            (pending.reopen.take(), pending.finishing)
        };
        match reopen {
            Some((new, at, number)) => {
                write_lines(&mut file, &out[..at.min(out.len())]);
                file = new;
                queue.lock().switched = number;
                queue.done.notify_all();
                write_lines(&mut file, &out[at.min(out.len())..]);
            }
            None => write_lines(&mut file, &out),
        }
        out.clear();
        if finishing {
            let mut pending = queue.lock();
            if pending.bytes.is_empty() {
                pending.finished = true;
                queue.done.notify_all();
                return;
            }
        }
    }
}

/// Writes `bytes` (whole lines) in blocks of at most `BATCH` bytes cut after a newline (a
/// longer line goes whole).
fn write_lines(file: &mut File, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let cut = if bytes.len() <= BATCH {
            bytes.len()
        } else {
            match bytes[..BATCH].iter().rposition(|&b| b == b'\n') {
                Some(i) => i + 1,
                None => bytes
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(bytes.len(), |i| i + 1),
            }
        };
        if let Err(e) = file.write_all(&bytes[..cut]) {
            tracing::warn!("access log: could not write {cut} bytes: {e}");
        }
        bytes = &bytes[cut..];
    }
}

fn version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// Apache's combined format, then the duration in seconds, the worker's pid and the plugin
/// version: `1.2.3.4 - - [30/Nov/2026:10:00:00 +0000] "GET / HTTP/1.1" 200 18 "-" "curl/8"
/// 0.000412 pid=123 plugin=3879408`.
fn combined(r: &Request<'_>, out: &mut Vec<u8>) {
    // Written piece by piece into `out`: no string is made for a field (writing to a Vec cannot
    // fail).
    match r.client {
        Some(a) => _ = write!(out, "{}", a.ip()),
        None => out.push(b'-'),
    }
    let _ = write!(
        out,
        " - - [{}] \"{} ",
        httpdate_clf(SystemTime::now()),
        r.method
    );
    escaped(out, r.target, b"%22");
    let _ = write!(out, " {}\" {} {} \"", version(r.version), r.status, r.bytes);
    quoted(out, r.referer);
    out.extend_from_slice(b"\" \"");
    quoted(out, r.user_agent);
    let _ = writeln!(
        out,
        "\" {:.6} pid={} plugin={}",
        r.took.as_secs_f64(),
        std::process::id(),
        r.plugin_version
    );
}

/// `text` with each `"` written as `with`.
fn escaped(out: &mut Vec<u8>, text: &str, with: &[u8]) {
    for (i, part) in text.split('"').enumerate() {
        if i > 0 {
            out.extend_from_slice(with);
        }
        out.extend_from_slice(part.as_bytes());
    }
}

/// A quoted field of the combined format: `-` when absent.
fn quoted(out: &mut Vec<u8>, v: Option<&str>) {
    match v {
        Some(v) => escaped(out, v, b"\\\""),
        None => out.push(b'-'),
    }
}

#[derive(Serialize)]
struct JsonLine<'a> {
    #[serde(serialize_with = "display")]
    time: humantime::Rfc3339Timestamp,
    client: Option<IpAddr>,
    method: &'a str,
    target: &'a str,
    version: &'static str,
    status: u16,
    bytes: u64,
    duration_s: f64,
    referer: Option<&'a str>,
    user_agent: Option<&'a str>,
    pid: u32,
    plugin_version: &'a str,
}

fn display<S: serde::Serializer>(v: &humantime::Rfc3339Timestamp, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn json(r: &Request<'_>, out: &mut Vec<u8>) {
    let line = JsonLine {
        time: humantime::format_rfc3339_millis(SystemTime::now()),
        client: r.client.map(|a| a.ip()),
        method: r.method,
        target: r.target,
        version: version(r.version),
        status: r.status,
        bytes: r.bytes,
        duration_s: r.took.as_secs_f64(),
        referer: r.referer,
        user_agent: r.user_agent,
        pid: std::process::id(),
        plugin_version: r.plugin_version,
    };
    // Serializing these fields into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &line);
    out.push(b'\n');
}

/// `30/Nov/2026:10:00:00 +0000` (the common log format's time, in UTC).
fn httpdate_clf(t: SystemTime) -> String {
    // humantime gives RFC 3339 in UTC: 2026-11-30T10:00:00Z.
    let rfc = humantime::format_rfc3339_seconds(t).to_string();
    let (date, time) = rfc.split_once('T').unwrap_or((&rfc, "00:00:00Z"));
    let mut parts = date.split('-');
    let (year, month, day) = (
        parts.next().unwrap_or("1970"),
        parts.next().unwrap_or("01"),
        parts.next().unwrap_or("01"),
    );
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = month
        .parse::<usize>()
        .ok()
        .and_then(|m| MONTHS.get(m.wrapping_sub(1)))
        .unwrap_or(&"Jan");
    format!("{day}/{month}/{year}:{} +0000", time.trim_end_matches('Z'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request<'static> {
        Request {
            client: Some("127.0.0.1:5555".parse().unwrap()),
            method: "GET",
            target: "/a?b=1",
            version: Version::HTTP_11,
            status: 200,
            bytes: 18,
            took: Duration::from_micros(412),
            referer: None,
            user_agent: Some("curl/8"),
            plugin_version: "3879408",
        }
    }

    /// `host reopen-logs` relies on it: once `reopen` returns, every line logged before is in
    /// the old file and the next goes to the new one, with no wait for the writer's tick.
    #[test]
    fn reopen_returns_once_the_old_file_has_every_line_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.path().join(name))
                .unwrap()
        };
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        let log = AccessLog::start(open("old"), AccessLogFormat::Combined);
        for _ in 0..3 {
            log.log(&request());
        }
        assert!(log.reopen(open("new"), Duration::from_secs(10)));
        assert_eq!(read("old").lines().count(), 3, "every line before, at once");
        log.log(&request());
        log.finish(Duration::from_secs(10));
        assert_eq!(
            read("old").lines().count(),
            3,
            "nothing more in the old file"
        );
        assert_eq!(read("new").lines().count(), 1);
    }

    #[test]
    fn combined_lines_read_as_apache_writes_them() {
        let mut line = Vec::new();
        combined(&request(), &mut line);
        let line = String::from_utf8(line).unwrap();
        assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
        assert!(
            line.contains("] \"GET /a?b=1 HTTP/1.1\" 200 18 \"-\" \"curl/8\" 0.000412 pid="),
            "{line}"
        );
        assert!(line.ends_with("plugin=3879408\n"), "{line}");
    }

    #[test]
    fn quotes_in_combined_fields_are_escaped() {
        let mut req = request();
        req.target = "/a\"b";
        req.referer = Some("x\"y");
        req.client = None;
        let mut line = Vec::new();
        combined(&req, &mut line);
        let line = String::from_utf8(line).unwrap();
        assert!(line.starts_with("- - - ["), "{line}");
        assert!(line.contains("\"GET /a%22b HTTP/1.1\""), "{line}");
        assert!(line.contains(" \"x\\\"y\" \"curl/8\" "), "{line}");
    }

    #[test]
    fn json_lines_parse() {
        let mut line = Vec::new();
        json(&request(), &mut line);
        assert!(line.ends_with(b"}\n"));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["status"], 200);
        assert_eq!(v["client"], "127.0.0.1");
    }

    #[test]
    fn clf_time() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_032_800);
        assert_eq!(httpdate_clf(t), "30/Nov/2026:10:00:00 +0000");
    }
}

//! The access log: one line per request, written by the worker off the request path. A request
//! only formats its line and hands it to a bounded queue (never waiting: when the queue is full
//! the line is dropped and counted, and the count is logged); a thread of its own writes the
//! queue to the file through a buffer, flushed when the queue runs dry. The file comes from the
//! master (the worker may run as a user who cannot open it) and is replaced the same way when
//! `host reopen-logs` asks.

use std::{
    fs::File,
    io::Write,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError},
    },
    time::{Duration, SystemTime},
};

use http::Version;

use crate::config::AccessLogFormat;

/// Lines waiting to be written, at most.
const QUEUE: usize = 16 * 1024;
/// Bytes written at once, at most (whole lines).
const BATCH: usize = 64 * 1024;

enum Entry {
    Line(String),
    Reopen(File),
}

pub struct AccessLog {
    tx: SyncSender<Entry>,
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

impl AccessLog {
    /// Starts the writer thread for `file`.
    pub fn start(file: File, format: AccessLogFormat) -> AccessLog {
        let (tx, rx) = sync_channel(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_all(file, rx));
        if let Err(e) = spawned {
            tracing::warn!("could not start the access log writer: {e}");
        }
        AccessLog {
            tx,
            format,
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues the line for `req`; never blocks.
    pub fn log(&self, req: &Request<'_>) {
        let line = match self.format {
            AccessLogFormat::Combined => combined(req),
            AccessLogFormat::Json => json(req),
        };
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Entry::Line(line)) {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(
                    "access log: the writer is behind; {dropped} lines dropped so far (the disk \
                     is too slow for this request rate)"
                );
            }
        }
    }

    /// Writes to `file` from now on (`host reopen-logs`).
    pub fn reopen(&self, file: File) {
        let _ = self.tx.send(Entry::Reopen(file));
    }
}

/// Writes whole lines only, many at once: every worker of a service appends to the same file
/// (O_APPEND), and a line cut in two by a full buffer could interleave with another worker's.
fn write_all(mut file: File, rx: Receiver<Entry>) {
    let mut batch = Vec::with_capacity(BATCH);
    let write = |file: &mut File, batch: &mut Vec<u8>| {
        if !batch.is_empty() {
            if let Err(e) = file.write_all(batch) {
                tracing::warn!("access log: could not write {} bytes: {e}", batch.len());
            }
            batch.clear();
        }
    };
    loop {
        let entry = match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(entry) => entry,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        // Then everything queued meanwhile: lines reach the file within moments when the rate
        // is low, and a busy worker writes in large blocks.
        for entry in std::iter::once(entry).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            match entry {
                Entry::Line(line) => {
                    if batch.len() + line.len() > BATCH {
                        write(&mut file, &mut batch);
                    }
                    batch.extend_from_slice(line.as_bytes());
                }
                Entry::Reopen(new) => {
                    write(&mut file, &mut batch);
                    file = new;
                }
            }
        }
        write(&mut file, &mut batch);
    }
    write(&mut file, &mut batch);
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
fn combined(r: &Request<'_>) -> String {
    let time = httpdate_clf(SystemTime::now());
    let quoted = |v: Option<&str>| v.map_or("-".to_string(), |s| s.replace('"', "\\\""));
    format!(
        "{} - - [{time}] \"{} {} {}\" {} {} \"{}\" \"{}\" {:.6} pid={} plugin={}\n",
        r.client.map_or("-".to_string(), |a| a.ip().to_string()),
        r.method,
        r.target.replace('"', "%22"),
        version(r.version),
        r.status,
        r.bytes,
        quoted(r.referer),
        quoted(r.user_agent),
        r.took.as_secs_f64(),
        std::process::id(),
        r.plugin_version
    )
}

fn json(r: &Request<'_>) -> String {
    let line = serde_json::json!({
        "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        "client": r.client.map(|a| a.ip().to_string()),
        "method": r.method,
        "target": r.target,
        "version": version(r.version),
        "status": r.status,
        "bytes": r.bytes,
        "duration_s": r.took.as_secs_f64(),
        "referer": r.referer,
        "user_agent": r.user_agent,
        "pid": std::process::id(),
        "plugin_version": r.plugin_version,
    });
    line.to_string() + "\n"
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

    #[test]
    fn combined_lines_read_as_apache_writes_them() {
        let line = combined(&request());
        assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
        assert!(
            line.contains("] \"GET /a?b=1 HTTP/1.1\" 200 18 \"-\" \"curl/8\" 0.000412 pid="),
            "{line}"
        );
        assert!(line.ends_with("plugin=3879408\n"), "{line}");
    }

    #[test]
    fn json_lines_parse() {
        let v: serde_json::Value = serde_json::from_str(&json(&request())).unwrap();
        assert_eq!(v["status"], 200);
        assert_eq!(v["client"], "127.0.0.1");
    }

    #[test]
    fn clf_time() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_032_800);
        assert_eq!(httpdate_clf(t), "30/Nov/2026:10:00:00 +0000");
    }
}

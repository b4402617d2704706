//! A request's id: the client's `X-Request-Id` when it is short and printable, else the
//! worker's pid and a count (`4de7-1a`), which no other worker of this machine repeats while
//! it lives. The plugin gets it with the request, the host's and the plugin's log lines for
//! the request carry it, and the response sends it back in `X-Request-Id`. The counts never
//! repeat within a worker, but each runtime thread takes them in blocks of 1,024: ids do not
//! rise in the order the requests came, so sort log lines by their time, not their id.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use http::{HeaderName, HeaderValue};

/// The request id's header. By a static name: a `&str` name is parsed on every lookup, and
/// copied on every insert.
pub static HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// A client's `X-Request-Id` is used as the request's id when it is at most this long and
/// printable; otherwise the worker makes one.
const MAX_CLIENT_REQUEST_ID: usize = 64;

/// The next request number of this worker. Each thread takes them from a shared count in
/// blocks: one count that every thread adds to per request was slow (its cache line moves
/// between cores).
fn request_number() -> u64 {
    const BLOCK: u64 = 1024;
    static NEXT_BLOCK: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        /// This thread's block: the next number, and the end.
        static BLOCK_LEFT: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
    }
    BLOCK_LEFT
        .try_with(|left| {
            let (mut next, mut end) = left.get();
            if next == end {
                next = NEXT_BLOCK.fetch_add(BLOCK, Ordering::Relaxed);
                end = next + BLOCK;
            }
            left.set((next + 1, end));
            next
        })
        // While the thread's locals are being destroyed: a block of one.
        .unwrap_or_else(|_| NEXT_BLOCK.fetch_add(1, Ordering::Relaxed))
}

/// Writes `n` in lower-case hex (no leading zeros) at `at`; returns where it ended.
fn push_hex(out: &mut [u8], at: usize, n: u64) -> usize {
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
    for i in 0..digits {
        let nibble = (n >> (4 * (digits - 1 - i))) & 0xf;
        out[at + i] = b"0123456789abcdef"[nibble as usize];
    }
    at + digits
}

/// A request's id: at most `MAX_CLIENT_REQUEST_ID` printable ASCII bytes, on the stack.
pub struct RequestId {
    bytes: [u8; MAX_CLIENT_REQUEST_ID],
    len: usize,
    /// The client's header, when the id is the client's: the response sends it back as it
    /// came (a reference count, not a copy).
    given: Option<HeaderValue>,
}

impl RequestId {
    /// The request's id: the client's `X-Request-Id` when it is short and printable, else the
    /// worker's pid and a count, which no other worker of this machine repeats while it lives.
    /// Made on the stack: it is copied once, into the request the plugin gets.
    pub fn of(headers: &http::HeaderMap) -> RequestId {
        // Once: glibc no longer caches getpid(), which made it a syscall per request.
        static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        let given = headers.get(&HEADER).filter(|v| {
            let v = v.as_bytes();
            !v.is_empty() && v.len() <= MAX_CLIENT_REQUEST_ID && v.iter().all(u8::is_ascii_graphic)
        });
        let mut id = RequestId {
            bytes: [0; MAX_CLIENT_REQUEST_ID],
            len: 0,
            given: given.cloned(),
        };
        match given.map(HeaderValue::as_bytes) {
            Some(given) => {
                id.bytes[..given.len()].copy_from_slice(given);
                id.len = given.len();
            }
            None => {
                let pid = *PID.get_or_init(std::process::id);
                let next = request_number();
                // By hand: `write!` through core::fmt took ~80 ns a request (perf). At most
                // 8 + 1 + 16 bytes: it fits.
                id.len = push_hex(&mut id.bytes, 0, u64::from(pid));
                id.bytes[id.len] = b'-';
                id.len = push_hex(&mut id.bytes, id.len + 1, next);
            }
        }
        id
    }

    pub fn as_str(&self) -> &str {
        // Printable ASCII only (checked above, or written so): always UTF-8.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }

    /// The id for the response's `X-Request-Id`. Marked sensitive, which keeps HTTP/2's header
    /// compression from indexing it: a value new on every request gains nothing from the
    /// table, and an entry there would hold the buffer the value was cut from.
    pub fn header_value(&self) -> Option<HeaderValue> {
        let mut value = match &self.given {
            Some(given) => given.clone(),
            None => cut_value(self.as_str())?,
        };
        value.set_sensitive(true);
        Some(value)
    }
}

/// A header value of `id`, cut from a block this thread shares among the ids it makes: a value
/// of its own (`HeaderValue::from_str`) was an allocation and a free per request. A block is
/// freed once the last response that holds a value of it has been written.
fn cut_value(id: &str) -> Option<HeaderValue> {
    const BLOCK: usize = 4096;
    thread_local! {
        static BLOCK_LEFT: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
    }
    let cut = BLOCK_LEFT.try_with(|left| {
        let mut left = left.borrow_mut();
        if left.capacity() < id.len() {
            // Not `reserve`: it would grow this block in place only if no value held it.
            *left = BytesMut::with_capacity(BLOCK.max(id.len()));
        }
        left.extend_from_slice(id.as_bytes());
        left.split().freeze()
    });
    match cut {
        // The same `Bytes` inside: no copy.
        Ok(bytes) => HeaderValue::from_maybe_shared(bytes).ok(),
        // While the thread's locals are being destroyed.
        Err(_) => HeaderValue::from_str(id).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_as_format_writes_it() {
        for n in [0, 1, 0xf, 0x10, 0xabc, u64::from(u32::MAX), u64::MAX] {
            let mut out = [0u8; 20];
            let end = push_hex(&mut out, 2, n);
            assert_eq!(&out[2..end], format!("{n:x}").as_bytes());
        }
    }

    /// Values cut from one block are each their own id, and a block that runs out is replaced.
    #[test]
    fn header_values_cut_from_blocks_are_the_ids() {
        let values: Vec<(String, HeaderValue)> = (0..2000)
            .map(|n| {
                let id = format!("{n:x}-{}", "y".repeat(n % 70));
                let value = cut_value(&id).unwrap();
                (id, value)
            })
            .collect();
        for (id, value) in &values {
            assert_eq!(value.to_str().unwrap(), id);
        }
    }

    #[test]
    fn a_request_id_is_the_clients_when_fit_else_pid_and_count() {
        let mut headers = http::HeaderMap::new();
        let made = RequestId::of(&headers);
        let (pid, count) = made.as_str().split_once('-').unwrap();
        assert_eq!(pid, format!("{:x}", std::process::id()));
        assert!(u64::from_str_radix(count, 16).is_ok(), "{}", made.as_str());
        headers.insert("x-request-id", HeaderValue::from_static("abc-123"));
        assert_eq!(RequestId::of(&headers).as_str(), "abc-123");
        // Too long, or not printable: the worker makes one.
        let long = "x".repeat(MAX_CLIENT_REQUEST_ID + 1);
        for refused in [long.as_str(), "a b"] {
            headers.insert("x-request-id", HeaderValue::from_str(refused).unwrap());
            let id = RequestId::of(&headers);
            let (pid, _) = id.as_str().split_once('-').unwrap();
            assert_eq!(pid, format!("{:x}", std::process::id()), "{refused:?}");
        }
    }
}

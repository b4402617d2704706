//! [`Request`]: what a handler receives. For an async handler the host's request head is
//! copied out of the FFI struct once, when the call starts (into two buffers and a header list,
//! see `Copied`), so the handler owns its request and may keep it across `.await` points. A sync
//! handler is only lent its request for the length of the call, so that request reads the
//! host's FFI struct in place (`Head::Lent`) and copies nothing. The body is either all here
//! (sync handlers, small bodies) or read in chunks from the host as the handler asks for them.

use std::net::SocketAddr;

use abi_stable::std_types::RVec;

use crate::{
    body::{BodyError, Incoming},
    ffi::{FfiBody, FfiRequestRef},
};

/// An HTTP request.
pub struct Request {
    head: Head,
    tls: bool,
    version: &'static str,
    params: Vec<(String, String)>,
    body: Incoming,
    /// Bytes of a body read whole that [`Request::body`] hands out.
    whole: Vec<u8>,
    max_body_bytes: u64,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method())
            .field("path", &self.path())
            .field("query", &self.query())
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

impl Request {
    /// A request, for unit tests of a plugin: `Request::new("GET", "/hello?name=x")`.
    pub fn new(method: &str, path_and_query: &str) -> Request {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        Request {
            head: Head::Copied(Copied::new([method, path, query, "test", ""], (0, 0, 0))),
            tls: false,
            version: "HTTP/1.1",
            params: Vec::new(),
            body: Incoming::whole(Vec::new()),
            whole: Vec::new(),
            max_body_bytes: u64::MAX,
        }
    }

    /// Adds a header (for unit tests).
    pub fn with_header(mut self, name: &str, value: &str) -> Request {
        self.head
            .copied()
            .push_header(&name.to_ascii_lowercase(), value.as_bytes());
        self
    }

    /// Sets the body (for unit tests).
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.whole = body.into();
        self.body = Incoming::whole(Vec::new());
        self
    }

    /// Sets the client address (for unit tests).
    pub fn with_client_addr(mut self, addr: SocketAddr) -> Request {
        let head = self.head.copied();
        head.client = head.push_text(&addr.to_string());
        self
    }

    /// Copies the host's request; `limits` are the service's (max_body_bytes, max_stream_bytes).
    pub(crate) fn from_ffi(req: &FfiRequestRef<'_>, body: FfiBody, limits: (u64, u64)) -> Request {
        Request::from_head(Head::Copied(Copied::from_ffi(req)), req, body, limits)
    }

    /// The host's request, its head read in place rather than copied: for a sync handler,
    /// which only borrows the request for the length of the call (about 400 instructions a
    /// call less than [`Request::from_ffi`] for hello's request under callgrind, over a third
    /// of what the boundary added).
    ///
    /// # Safety
    ///
    /// The request must be dropped before `req`'s borrow ends, and never handed out by value
    /// (only as `&Request`): its head points into `req`. Nothing makes a `Request` out of a
    /// `&Request` (it is not `Clone`; what takes `&mut` or `self` cannot be reached through a
    /// shared borrow), so a handler that is lent it cannot keep it.
    pub(crate) unsafe fn lent(
        req: &FfiRequestRef<'_>,
        body: FfiBody,
        limits: (u64, u64),
    ) -> Request {
        // SAFETY: only the lifetime changes (the same type otherwise, so the same layout); the
        // caller keeps the request within `req`'s borrow, as this function's contract says.
        let head =
            unsafe { std::mem::transmute::<FfiRequestRef<'_>, FfiRequestRef<'static>>(*req) };
        Request::from_head(Head::Lent(head), req, body, limits)
    }

    /// The request around `head`, with the rest of the host's request and the body.
    fn from_head(
        head: Head,
        req: &FfiRequestRef<'_>,
        body: FfiBody,
        limits: (u64, u64),
    ) -> Request {
        let (whole, incoming) = match body.rest.into_option() {
            None => (owned(body.bytes), Incoming::whole(Vec::new())),
            Some(rest) => (
                Vec::new(),
                Incoming {
                    first: Some(owned(body.bytes)),
                    rest: Some(rest),
                    read: 0,
                    limit: limits.1,
                },
            ),
        };
        Request {
            head,
            tls: req.tls,
            version: req.http_version.as_str(),
            params: Vec::new(),
            body: incoming,
            whole,
            max_body_bytes: limits.0,
        }
    }

    /// The method: `GET`, `POST`, ...
    pub fn method(&self) -> &str {
        self.head.field(|c| c.method, |r| r.method.as_str())
    }

    /// The path, without the query string: `/hello`.
    pub fn path(&self) -> &str {
        self.head.field(|c| c.path, |r| r.path.as_str())
    }

    /// The raw query string, without `?`; empty when there is none.
    pub fn query(&self) -> &str {
        self.head.field(|c| c.query, |r| r.query.as_str())
    }

    /// The raw value of the first query parameter `name` (not percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query()
            .split('&')
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// A parameter of the route that matched (see [`crate::Router`]): `{id}` in `/users/{id}`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn set_params(&mut self, params: Vec<(String, String)>) {
        self.params = params;
    }

    /// All headers, names in lower case, values as bytes.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        let (copied, lent) = match &self.head {
            Head::Copied(c) => (Some(c), &[][..]),
            Head::Lent(r) => (None, r.headers.as_slice()),
        };
        let copied = copied
            .into_iter()
            .flat_map(|c| c.headers.iter().map(move |&(n, v)| (c.text(n), c.value(v))));
        let lent = lent.iter().map(|h| (h.name.as_str(), h.value.as_slice()));
        copied.chain(lent)
    }

    /// The first value of header `name` (any case), if it is present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// The value of cookie `name`, from the `Cookie` headers.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.headers()
            .filter(|(n, _)| *n == "cookie")
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
            .flat_map(cookie::Cookie::split_parse)
            .filter_map(Result::ok)
            .find(|c| c.name() == name)
            .map(|c| c.value().to_string())
    }

    /// The client's address (the peer of the connection; behind a proxy, the proxy's).
    pub fn client_addr(&self) -> Option<SocketAddr> {
        // Parsed when asked for: most handlers never do, and parsing took ~40 ns a request.
        self.head
            .field(|c| c.client, |r| r.client_addr.as_str())
            .parse()
            .ok()
    }

    /// Whether the request came over TLS (HTTPS).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// `HTTP/1.1`, `HTTP/2.0`, ...
    pub fn http_version(&self) -> &str {
        self.version
    }

    /// The request's id: the host's log lines for this request carry it, and so do the
    /// plugin's own lines logged while its handler runs. It is the client's `X-Request-Id`
    /// when that is short and printable, else one the host made.
    pub fn id(&self) -> &str {
        self.head.field(|c| c.id, |r| r.request_id.as_str())
    }

    /// The whole body, in a sync handler (the host read it first, up to `max_body_bytes`).
    /// In an async handler the body may still be on its way: read it with
    /// [`Request::bytes`] or [`Request::chunk`]; this gives only what was read whole.
    pub fn body(&self) -> &[u8] {
        &self.whole
    }

    /// Reads the whole body into memory: at most `max_body_bytes` (a longer one is a
    /// [`BodyError`] that converts into a 413).
    pub async fn bytes(&mut self) -> Result<Vec<u8>, BodyError> {
        if self.body.is_whole() {
            return Ok(std::mem::take(&mut self.whole));
        }
        let limit = self.max_body_bytes;
        if let Some(declared) = self
            .header("content-length")
            .and_then(|v| v.parse::<u64>().ok())
        {
            if declared > limit {
                return Err(too_large(limit));
            }
        }
        let mut all = Vec::new();
        while let Some(chunk) = self.body.next().await? {
            if all.len() as u64 + chunk.len() as u64 > limit {
                return Err(too_large(limit));
            }
            all.extend_from_slice(&chunk);
        }
        Ok(all)
    }

    /// The next chunk of the body, `None` at its end: reads a body of any size up to
    /// `max_stream_bytes` in constant memory. The client sends the next part only as the
    /// handler reads (backpressure).
    pub async fn chunk(&mut self) -> Result<Option<Vec<u8>>, BodyError> {
        if self.body.is_whole() {
            let whole = std::mem::take(&mut self.whole);
            return Ok(Some(whole).filter(|w| !w.is_empty()));
        }
        self.body.next().await
    }

    /// Parses the body as JSON (at most `max_body_bytes`); an error converts into a 400 or 413.
    #[cfg(feature = "json")]
    pub async fn json<T: serde::de::DeserializeOwned>(&mut self) -> Result<T, BodyError> {
        let bytes = self.bytes().await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| BodyError::new(400, format!("the request body is not valid JSON: {e}")))
    }
}

/// Where a request's head is read from.
enum Head {
    /// Copied into buffers the request owns: an async handler's request, which may outlive the
    /// call that brought it, and the requests of unit tests.
    Copied(Copied),
    /// The host's, borrowed for the length of a sync call ([`Request::lent`]; the lifetime is
    /// erased, and that function's contract keeps the request within it).
    Lent(FfiRequestRef<'static>),
}

impl Head {
    /// One field: where a copied head keeps it, or the lent head's.
    fn field(
        &self,
        copied: impl FnOnce(&Copied) -> Span,
        lent: impl FnOnce(&FfiRequestRef<'static>) -> &'static str,
    ) -> &str {
        match self {
            Head::Copied(c) => c.text(copied(c)),
            Head::Lent(r) => lent(r),
        }
    }

    /// The head as a copy this request owns, copying a lent one first (the unit-test builders
    /// change a head; a lent request never reaches them, since they take it by value).
    fn copied(&mut self) -> &mut Copied {
        if let Head::Lent(r) = self {
            *self = Head::Copied(Copied::from_ffi(r));
        }
        let Head::Copied(c) = self else {
            unreachable!("copied just above")
        };
        c
    }
}

/// The request head's text in two buffers, one allocation each rather than one per field and
/// header (a third holds the header list): method, path, query, id, client address and header
/// names in `text`, header values (bytes, not always UTF-8) in `values`.
struct Copied {
    text: String,
    values: Vec<u8>,
    method: Span,
    path: Span,
    query: Span,
    id: Span,
    /// `ip:port`, empty when unknown.
    client: Span,
    /// Each header's name (in `text`) and value (in `values`), in the order received.
    headers: Vec<(Span, Span)>,
}

/// Where a field is in its buffer: `start..end`.
type Span = (usize, usize);

/// Appends `part` to `text`; where it went.
fn push(text: &mut String, part: &str) -> Span {
    let start = text.len();
    text.push_str(part);
    (start, text.len())
}

/// The buffers of a dropped [`Copied`], kept for the next request on the same thread.
type Spare = (String, Vec<u8>, Vec<(Span, Span)>);

/// Buffers are kept for reuse only up to this many bytes of text and of values, and this many
/// headers, so that one request with a large head does not pin its memory for the life of the
/// thread.
const SPARE_MAX_BYTES: usize = 4096;
const SPARE_MAX_HEADERS: usize = 128;

thread_local! {
    /// The last small `Copied` dropped on this thread. A worker's thread handles one request
    /// after another, so the next request's head is copied into these buffers instead of new
    /// ones: an allocation and a free less for the text, and two more for a request with
    /// headers (values, header list). At most about 12 KiB held per thread that made one.
    static SPARE: std::cell::Cell<Option<Spare>> = const { std::cell::Cell::new(None) };
}

impl Copied {
    /// A copy of the host's head.
    fn from_ffi(req: &FfiRequestRef<'_>) -> Copied {
        let mut head = Copied::new(
            [
                req.method.as_str(),
                req.path.as_str(),
                req.query.as_str(),
                req.request_id.as_str(),
                req.client_addr.as_str(),
            ],
            (
                req.headers.len(),
                req.headers.iter().map(|h| h.name.len()).sum(),
                req.headers.iter().map(|h| h.value.len()).sum(),
            ),
        );
        for h in req.headers.iter() {
            head.push_header(h.name.as_str(), h.value.as_slice());
        }
        head
    }

    /// `fields`: method, path, query, id, client address. `headers`: how many headers, and
    /// the lengths of their names and values, so that adding them allocates nothing more.
    fn new(fields: [&str; 5], headers: (usize, usize, usize)) -> Copied {
        let (count, names, values) = headers;
        // `try_with`: a request may be made while the thread's locals are being destroyed.
        let (mut text, mut value_buf, mut header_buf) = SPARE
            .try_with(std::cell::Cell::take)
            .ok()
            .flatten()
            .unwrap_or_default();
        text.reserve(fields.iter().map(|f| f.len()).sum::<usize>() + names);
        value_buf.reserve(values);
        header_buf.reserve(count);
        let [method, path, query, id, client] = fields.map(|f| push(&mut text, f));
        Copied {
            text,
            values: value_buf,
            method,
            path,
            query,
            id,
            client,
            headers: header_buf,
        }
    }

    fn push_text(&mut self, part: &str) -> Span {
        push(&mut self.text, part)
    }

    fn push_header(&mut self, name: &str, value: &[u8]) {
        let name = self.push_text(name);
        let start = self.values.len();
        self.values.extend_from_slice(value);
        self.headers.push((name, (start, self.values.len())));
    }

    fn text(&self, (start, end): Span) -> &str {
        &self.text[start..end]
    }

    fn value(&self, (start, end): Span) -> &[u8] {
        &self.values[start..end]
    }
}

impl Drop for Copied {
    fn drop(&mut self) {
        let small = self.text.capacity() <= SPARE_MAX_BYTES
            && self.values.capacity() <= SPARE_MAX_BYTES
            && self.headers.capacity() <= SPARE_MAX_HEADERS;
        if small {
            let mut spare: Spare = (
                std::mem::take(&mut self.text),
                std::mem::take(&mut self.values),
                std::mem::take(&mut self.headers),
            );
            spare.0.clear();
            spare.1.clear();
            spare.2.clear();
            // Fails only while the thread's locals are being destroyed: then it is freed.
            let _ = SPARE.try_with(|slot| slot.set(Some(spare)));
        }
    }
}

/// The host's bytes as a `Vec`. `RVec::into_vec` takes the buffer over only after asking both
/// libraries' vtables whether it came from this one's allocator (it did not: the host made
/// it), then copies it and frees the host's through its vtable: for the empty body of most
/// requests, which owns no memory (no capacity), that is all work for nothing.
fn owned(bytes: RVec<u8>) -> Vec<u8> {
    if bytes.capacity() == 0 {
        // Nothing to free, so nothing leaks.
        std::mem::forget(bytes);
        return Vec::new();
    }
    bytes.into_vec()
}

fn too_large(limit: u64) -> BodyError {
    BodyError::new(
        413,
        format!("the request body is larger than this service's limit of {limit} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use abi_stable::std_types::{RSlice, RStr};

    use super::*;
    use crate::ffi::FfiHeaderRef;

    /// What a handler can read of a request.
    fn seen(req: &Request) -> Vec<String> {
        let mut seen = vec![
            req.method().to_string(),
            req.path().to_string(),
            req.query().to_string(),
            req.id().to_string(),
            format!("{:?}", req.client_addr()),
            format!("{:?}", req.header("X-Two")),
            format!("{:?}", req.cookie("b")),
            format!(
                "{:?} {} {:?}",
                req.query_param("q"),
                req.is_tls(),
                req.body()
            ),
        ];
        seen.extend(req.headers().map(|(n, v)| format!("{n}={v:?}")));
        seen
    }

    #[test]
    fn a_lent_head_reads_as_its_copy_does() {
        let headers = [
            FfiHeaderRef {
                name: RStr::from_str("x-two"),
                value: RSlice::from_slice(b"2"),
            },
            FfiHeaderRef {
                name: RStr::from_str("cookie"),
                value: RSlice::from_slice(b"a=1; b=2"),
            },
            FfiHeaderRef {
                name: RStr::from_str("x-bytes"),
                value: RSlice::from_slice(&[0xff, 0]),
            },
        ];
        let ffi = FfiRequestRef {
            method: RStr::from_str("POST"),
            path: RStr::from_str("/p"),
            query: RStr::from_str("q=1"),
            headers: RSlice::from_slice(&headers),
            client_addr: RStr::from_str("127.0.0.1:9"),
            tls: true,
            http_version: RStr::from_str("HTTP/1.1"),
            request_id: RStr::from_str("id-1"),
        };
        let body = || FfiBody::full(b"body".to_vec().into());
        let copied = Request::from_ffi(&ffi, body(), (10, 10));
        // SAFETY: `lent` is dropped at the end of this function, before `ffi` and `headers`.
        let lent = unsafe { Request::lent(&ffi, body(), (10, 10)) };
        assert_eq!(seen(&lent), seen(&copied));
        assert_eq!(seen(&lent).len(), 11);
        // A builder copies a lent head before it changes it.
        let more = lent.with_header("X-More", "m");
        assert_eq!(more.header("x-more"), Some("m"));
        assert_eq!(more.header("x-two"), Some("2"));
        assert_eq!(more.id(), "id-1");
    }
}

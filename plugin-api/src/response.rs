//! [`Response`]: what a handler returns, whole or streamed.

use std::cell::Cell;

use abi_stable::std_types::ROption;

use crate::{
    body::{self, BodySender, SseSender},
    ffi::{FfiBody, FfiChunks, FfiHeader, FfiResponse},
};

/// An HTTP response, built with `Response::text(200, "hi")` or
/// `Response::new(204).with_header("x-a", "b")`.
pub struct Response {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    stream: Option<FfiChunks>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &String::from_utf8_lossy(&self.body))
            .field("streamed", &self.stream.is_some())
            .finish()
    }
}

/// A header list longer than this is not kept for the next response (its memory is freed).
const SPARE_MAX_HEADERS: usize = 16;

std::thread_local! {
    /// The header list of the last response this thread handed to the host, emptied, for the
    /// next response it builds: the host takes a response's headers as another list (FFI
    /// types), and the one the handler filled would otherwise be freed after every request and
    /// allocated again by the next one's first header.
    static SPARE_HEADERS: Cell<Vec<(String, Vec<u8>)>> = const { Cell::new(Vec::new()) };
}

impl Response {
    /// An empty response with this status code.
    pub fn new(status: u16) -> Response {
        Response {
            status,
            // `try_with`: a response may be made while the thread's locals are being destroyed.
            headers: SPARE_HEADERS.try_with(Cell::take).unwrap_or_default(),
            body: Vec::new(),
            stream: None,
        }
    }

    /// A `text/plain; charset=utf-8` response.
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response::new(status)
            .with_header("content-type", "text/plain; charset=utf-8")
            .with_body(body.into())
    }

    /// An `application/json` response; `body` must already be JSON (see also
    /// [`Response::json_value`] with the `json` feature).
    pub fn json(status: u16, body: impl Into<String>) -> Response {
        Response::new(status)
            .with_header("content-type", "application/json")
            .with_body(body.into())
    }

    /// An `application/json` response serialized from `value`.
    #[cfg(feature = "json")]
    pub fn json_value<T: serde::Serialize + ?Sized>(status: u16, value: &T) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response::new(status)
                .with_header("content-type", "application/json")
                .with_body(body),
            Err(e) => Response::text(500, format!("could not serialize the response: {e}\n")),
        }
    }

    /// A streamed response: the body is what the returned sender sends, until it is dropped
    /// (HTTP/1.1 chunked encoding, or HTTP/2 DATA frames). Send from a task (see
    /// [`crate::spawn`]) and return the response at once.
    pub fn stream(status: u16) -> (Response, BodySender) {
        let (tx, source) = body::channel();
        let mut response = Response::new(status);
        response.stream = Some(source);
        (response, tx)
    }

    /// A server-sent event stream (`text/event-stream`, not cached). End it when
    /// [`crate::shutdown`] resolves, so the client reconnects to a new worker after a reload.
    pub fn sse() -> (Response, SseSender) {
        let (response, tx) = Response::stream(200);
        let response = response
            .with_header("content-type", "text/event-stream")
            .with_header("cache-control", "no-cache");
        (response, body::sse_sender(tx))
    }

    /// Adds a header. The host rejects (with a 500) names or values that are not valid HTTP.
    pub fn with_header(mut self, name: &str, value: impl AsRef<[u8]>) -> Response {
        self.headers
            .push((name.to_string(), value.as_ref().to_vec()));
        self
    }

    /// Adds a `Set-Cookie` header: `Response::new(204).with_cookie(Cookie::new("a", "b"))`.
    pub fn with_cookie(self, cookie: cookie::Cookie<'_>) -> Response {
        let value = cookie.encoded().to_string();
        self.with_header("set-cookie", value)
    }

    /// Sets the body.
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Response {
        self.body = body.into();
        self
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The headers set so far.
    pub fn headers(&self) -> &[(String, Vec<u8>)] {
        &self.headers
    }

    /// The first value of header `name` (any case), if it is valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// The body (empty for a streamed response).
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    pub(crate) fn into_ffi(self) -> FfiResponse {
        let mut headers = self.headers;
        let ffi_headers = headers
            .drain(..)
            .map(|(name, value)| FfiHeader {
                name: name.into(),
                value: value.into(),
            })
            .collect();
        if headers.capacity() <= SPARE_MAX_HEADERS {
            let _ = SPARE_HEADERS.try_with(|spare| spare.set(headers));
        }
        FfiResponse {
            status: self.status,
            headers: ffi_headers,
            body: FfiBody {
                bytes: self.body.into(),
                rest: ROption::from(self.stream),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_response_reuses_the_header_list_handed_over_emptied() {
        let ffi = Response::text(200, "a").with_header("x-a", "1").into_ffi();
        assert_eq!(ffi.headers.len(), 2);
        assert_eq!(ffi.headers[1].name.as_str(), "x-a");
        let next = Response::new(204);
        assert!(next.headers().is_empty());
        assert!(next.headers.capacity() >= 2);
    }

    #[test]
    fn a_long_header_list_is_freed_not_kept() {
        let mut response = Response::new(200);
        for i in 0..=SPARE_MAX_HEADERS {
            response = response.with_header(&format!("x-{i}"), "v");
        }
        assert_eq!(response.into_ffi().headers.len(), SPARE_MAX_HEADERS + 1);
        assert_eq!(Response::new(200).headers.capacity(), 0);
    }
}

//! The plain Rust types plugin authors use: [`Request`], [`Response`], [`Context`].
//!
//! `Request` and `Context` are transparent wrappers over their FFI types, so the host's data is
//! read in place, without a copy per request; their methods hand out `&str` and `&[u8]`.

use abi_stable::std_types::{RStr, RString, RVec, Tuple2};

use crate::ffi::{FfiContext, FfiHeader, FfiRequest, FfiResponse};

/// An HTTP request, body included (the host reads the whole body before calling the plugin,
/// up to the service's body limit).
#[repr(transparent)]
#[derive(Debug, Clone)]
pub struct Request(FfiRequest);

impl Request {
    /// A request, for unit tests of a plugin: `Request::new("GET", "/hello?name=x")`.
    pub fn new(method: &str, path_and_query: &str) -> Request {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        Request(FfiRequest {
            method: method.into(),
            path: path.into(),
            query: query.into(),
            headers: RVec::new(),
            body: RVec::new(),
        })
    }

    /// Adds a header (for unit tests).
    pub fn with_header(mut self, name: &str, value: &str) -> Request {
        self.0.headers.push(FfiHeader {
            name: name.to_ascii_lowercase().into(),
            value: value.as_bytes().into(),
        });
        self
    }

    /// Sets the body (for unit tests).
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.0.body = body.into().into();
        self
    }

    pub(crate) fn from_ffi(req: &FfiRequest) -> &Request {
        // SAFETY: `Request` is `#[repr(transparent)]` over `FfiRequest`, so both have the same
        // layout, and the returned reference borrows `req` for the same lifetime.
        unsafe { &*(req as *const FfiRequest as *const Request) }
    }

    /// The method: `GET`, `POST`, ...
    pub fn method(&self) -> &str {
        &self.0.method
    }

    /// The path, without the query string: `/hello`.
    pub fn path(&self) -> &str {
        &self.0.path
    }

    /// The raw query string, without `?`; empty when there is none.
    pub fn query(&self) -> &str {
        &self.0.query
    }

    /// The raw value of the first query parameter `name` (not percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query()
            .split('&')
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// All headers, names in lower case, values as bytes.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.0
            .headers
            .iter()
            .map(|h| (h.name.as_str(), h.value.as_slice()))
    }

    /// The first value of header `name` (any case), if it is present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// The request body.
    pub fn body(&self) -> &[u8] {
        &self.0.body
    }
}

/// An HTTP response, built with `Response::text(200, "hi")` or
/// `Response::new(204).with_header("x-a", "b")`.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Response {
    /// An empty response with this status code.
    pub fn new(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A `text/plain; charset=utf-8` response.
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response::new(status)
            .with_header("content-type", "text/plain; charset=utf-8")
            .with_body(body.into())
    }

    /// An `application/json` response; `body` must already be JSON.
    pub fn json(status: u16, body: impl Into<String>) -> Response {
        Response::new(status)
            .with_header("content-type", "application/json")
            .with_body(body.into())
    }

    /// Adds a header. The host rejects (with a 500) names or values that are not valid HTTP.
    pub fn with_header(mut self, name: &str, value: impl AsRef<[u8]>) -> Response {
        self.headers
            .push((name.to_string(), value.as_ref().to_vec()));
        self
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

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    pub(crate) fn into_ffi(self) -> FfiResponse {
        FfiResponse {
            status: self.status,
            headers: self
                .headers
                .into_iter()
                .map(|(name, value)| FfiHeader {
                    name: name.into(),
                    value: value.into(),
                })
                .collect(),
            body: self.body.into(),
        }
    }
}

/// What a plugin learns about where it runs, in [`crate::Plugin::on_start`].
#[repr(transparent)]
pub struct Context(FfiContext);

impl Context {
    /// A context for unit tests of a plugin, with no configuration; log lines go to stderr.
    pub fn for_tests(service: &str) -> Context {
        extern "C" fn to_stderr(level: u8, message: RStr<'_>) {
            eprintln!("{:?}: {message}", crate::Level::from_u8(level));
        }
        Context(FfiContext {
            service: service.into(),
            worker_id: 0,
            plugin_version: RString::from("test"),
            config: RVec::new(),
            config_toml: RString::new(),
            log: to_stderr,
        })
    }

    /// Adds a configuration value (for unit tests).
    pub fn with_config(mut self, key: &str, value: &str) -> Context {
        self.0.config.push(Tuple2(key.into(), value.into()));
        self
    }

    pub(crate) fn from_ffi(ctx: &FfiContext) -> &Context {
        // SAFETY: `Context` is `#[repr(transparent)]` over `FfiContext`, so both have the same
        // layout, and the returned reference borrows `ctx` for the same lifetime.
        unsafe { &*(ctx as *const FfiContext as *const Context) }
    }

    /// The name of the service this worker serves.
    pub fn service(&self) -> &str {
        &self.0.service
    }

    /// The worker's slot within its service (0-based); a reload keeps slot numbers.
    pub fn worker_id(&self) -> u32 {
        self.0.worker_id
    }

    /// The short content hash of the loaded plugin library, as `host status` shows it.
    pub fn plugin_version(&self) -> &str {
        &self.0.plugin_version
    }

    /// A top-level value of the service's `[service.config]` table; strings as they are,
    /// numbers and booleans as written in TOML, nested tables and arrays in TOML syntax.
    pub fn config(&self, key: &str) -> Option<&str> {
        self.0
            .config
            .iter()
            .find(|Tuple2(k, _)| k == key)
            .map(|Tuple2(_, v)| v.as_str())
    }

    /// The whole `[service.config]` table as TOML text, for plugins that parse it themselves.
    pub fn config_toml(&self) -> &str {
        &self.0.config_toml
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_accessors() {
        let req = Request::new("GET", "/a/b?x=1&flag&y=2").with_header("X-Name", "v");
        assert_eq!(req.path(), "/a/b");
        assert_eq!(req.query(), "x=1&flag&y=2");
        assert_eq!(req.query_param("y"), Some("2"));
        assert_eq!(req.query_param("flag"), Some(""));
        assert_eq!(req.query_param("z"), None);
        assert_eq!(req.header("x-name"), Some("v"));
    }

    #[test]
    fn response_into_ffi_keeps_everything() {
        let ffi = Response::text(201, "hi").with_header("x-a", "b").into_ffi();
        assert_eq!(ffi.status, 201);
        assert_eq!(ffi.headers.len(), 2);
        assert_eq!(ffi.body.as_slice(), b"hi");
    }

    #[test]
    fn context_config_lookup() {
        let ctx = Context::for_tests("svc").with_config("greeting", "hey");
        assert_eq!(ctx.service(), "svc");
        assert_eq!(ctx.config("greeting"), Some("hey"));
        assert_eq!(ctx.config("missing"), None);
    }
}

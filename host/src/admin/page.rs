//! The admin page: one HTML file, its script and its style sheet, embedded in the binary (no
//! build step, no CDN: the page works on a machine with no way out). The chart is drawn by the
//! script on a canvas.
//!
//! The page holds no secret of its own: it asks for the token (or takes it from the URL
//! fragment, `/#token=...`, which browsers never send to the server), keeps it in
//! sessionStorage and sends it as a bearer token with each API call. No cookies, so no other
//! site can make a browser act on the API (a cross-origin request cannot carry the
//! Authorization header without a CORS preflight, which this listener never grants).

use http::{header, HeaderMap, HeaderValue};

const HTML: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/admin.js");
const STYLE: &str = include_str!("page/admin.css");

/// The content type and body of a page asset, if `path` names one.
pub fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/" | "/index.html" => Some(("text/html; charset=utf-8", HTML)),
        "/admin.js" => Some(("text/javascript; charset=utf-8", SCRIPT)),
        "/admin.css" => Some(("text/css; charset=utf-8", STYLE)),
        _ => None,
    }
}

/// Headers that keep the page to itself: only its own script runs, it is never framed, and it
/// tells no other site where it was.
pub fn harden(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

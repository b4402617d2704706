//! The FFI-safe types that cross the library boundary, and the root module a plugin exports.
//!
//! How each type may change without breaking plugins built earlier:
//! - [`PluginMod`], [`FfiContext`] and [`HostApi`] are abi_stable *prefix types*, made once per
//!   worker: new fields go at the end, each with `#[sabi(missing_field(option))]` (the default
//!   here), so that a reader built after the field was added gets `None` for it from a
//!   struct made before (by an older library or host). abi_stable's
//!   check at load refuses a library whose prefix type has *fewer* fields than the loader's, so
//!   a version that appends to one freezes the previous layout (`compat/plugin-api-0.2.0` for
//!   the root module of 0.2.0): the host checks a plugin that declares that version against
//!   it, then reads the appended fields through this type, whose accessors answer `None` for
//!   them (host `worker::plugin::load`). A newer plugin in an older host needs nothing: it has
//!   more fields, which that host does not read. (Prefix-type accessors copy their field, so
//!   these hold only `Copy` values: `'static` strings and slices the host keeps for the life of
//!   the worker, function pointers, numbers.)
//! - [`FfiRequestRef`], [`FfiRequest`], [`FfiResponse`], [`FfiBody`], [`FfiHeader`] and
//!   [`FfiBodyError`], made per request, are plain structs, checked field by field at load
//!   time. They are *versioned*: a request or response that must carry more (or differently)
//!   is a new type with a new handler entry appended to [`PluginMod`], and the host calls the
//!   newest entry the plugin has. 0.2.1 added [`FfiRequestRef`] (the head borrowed from the
//!   host's buffers: for an inline or async call the host copies nothing; the blocking pool
//!   gets a copy, since its thread outlives the borrow) and the `handle_ref` entries; 0.2.0's owned
//!   [`FfiRequest`] and its entries stay, for plugins built against 0.2.0 (the host copies the
//!   head into one for them) and for hosts built against 0.2.0 (this crate's glue exports
//!   both).
//!
//! The 0.1 ABI (a sync handler taking `FfiRequest` by reference) is frozen in
//! `compat/plugin-api-0.1`, 0.2.0's root module in `compat/plugin-api-0.2.0`; the host loads
//! all three.

// The `sabi_trait` expansion puts trait impls inside a `const` block, which rustc now lints.
#![allow(non_local_definitions)]

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec, Tuple2},
    StableAbi,
};
pub use async_ffi::FfiFuture;

/// One HTTP header; the value is bytes because HTTP allows non-UTF-8 header values.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct FfiHeader {
    /// Header name, lower case.
    pub name: RString,
    /// Header value, as received or as to be sent.
    pub value: RVec<u8>,
}

/// Why a body stream ended early.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct FfiBodyError {
    /// The HTTP status that fits: 413 (over a limit), 408 (stalled), 400 (the client broke off).
    pub status: u16,
    /// One sentence for the client and the log.
    pub message: RString,
}

/// The next chunk of a body: `ROk(RSome(bytes))`, `ROk(RNone)` at the end, or an error.
pub type FfiChunk = RResult<ROption<RVec<u8>>, FfiBodyError>;

/// A body that arrives in parts: the host streams a request body to the plugin with one, the
/// plugin streams a response body to the host with another. Each `next_chunk` future resolves
/// when the producer has the next part, so a slow reader slows the producer (backpressure).
/// Dropping the source tells the producer that nobody reads any more.
#[sabi_trait]
pub trait ChunkSource: Send + Unpin + 'static {
    /// The next chunk. Call it again only after the previous future resolved.
    #[sabi(last_prefix_field)]
    fn next_chunk(&mut self) -> FfiFuture<FfiChunk>;
}

/// A boxed [`ChunkSource`], as it crosses the boundary.
pub type FfiChunks = ChunkSource_TO<RBox<()>>;

/// A request or response body: the bytes at hand, and the rest when it is streamed.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiBody {
    /// The whole body when `rest` is `RNone`; else what came before `rest` (often empty).
    pub bytes: RVec<u8>,
    /// The remaining chunks of a streamed body.
    pub rest: ROption<FfiChunks>,
}

impl FfiBody {
    /// A body that is all here.
    pub fn full(bytes: RVec<u8>) -> FfiBody {
        FfiBody {
            bytes,
            rest: ROption::RNone,
        }
    }
}

/// One request header, borrowed for the length of a call.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct FfiHeaderRef<'a> {
    /// Header name, lower case.
    pub name: RStr<'a>,
    /// Header value, as received.
    pub value: RSlice<'a, u8>,
}

/// A request's head as the host passes it to a plugin (0.2.1 and later), borrowed from the
/// host's own buffers for the length of the call: the plugin copies what it keeps. The body is
/// passed beside it.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct FfiRequestRef<'a> {
    /// `GET`, `POST`, ...
    pub method: RStr<'a>,
    /// The path, without the query string.
    pub path: RStr<'a>,
    /// The raw query string, without the `?` (empty when there is none).
    pub query: RStr<'a>,
    /// Request headers in the order received.
    pub headers: RSlice<'a, FfiHeaderRef<'a>>,
    /// The client's address, `ip:port` (empty if unknown).
    pub client_addr: RStr<'a>,
    /// Whether the request came over TLS.
    pub tls: bool,
    /// `HTTP/1.1`, `HTTP/2.0`, ...
    pub http_version: RStr<'static>,
    /// The request's id, as the host's log lines for it show it.
    pub request_id: RStr<'a>,
}

impl FfiRequestRef<'_> {
    /// An owned copy, for a plugin built against plugin-api 0.2.0 (whose handler entries take
    /// [`FfiRequest`]).
    pub fn to_owned_request(&self) -> FfiRequest {
        FfiRequest {
            method: self.method.into(),
            path: self.path.into(),
            query: self.query.into(),
            headers: self
                .headers
                .iter()
                .map(|h| FfiHeader {
                    name: h.name.into(),
                    value: h.value.to_vec().into(),
                })
                .collect(),
            client_addr: self.client_addr.into(),
            tls: self.tls,
            http_version: self.http_version,
            request_id: self.request_id.into(),
        }
    }
}

/// A request's head as plugin-api 0.2.0 passed it, every field owned (see [`FfiRequestRef`]
/// for the one hosts of 0.2.1 and later pass), by reference, for the length of the call. The
/// body is passed beside it.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct FfiRequest {
    /// `GET`, `POST`, ...
    pub method: RString,
    /// The path, without the query string.
    pub path: RString,
    /// The raw query string, without the `?` (empty when there is none).
    pub query: RString,
    /// Request headers in the order received.
    pub headers: RVec<FfiHeader>,
    /// The client's address, `ip:port` (empty if unknown).
    pub client_addr: RString,
    /// Whether the request came over TLS.
    pub tls: bool,
    /// `HTTP/1.1`, `HTTP/2.0`, ...
    pub http_version: RStr<'static>,
    /// The request's id, as the host's log lines for it show it.
    pub request_id: RString,
}

impl FfiRequest {
    /// Calls `f` with a borrowed view of this request: how the glue answers a host built
    /// against plugin-api 0.2.0.
    pub fn with_ref<R>(&self, f: impl FnOnce(&FfiRequestRef<'_>) -> R) -> R {
        let headers: Vec<FfiHeaderRef<'_>> = self
            .headers
            .iter()
            .map(|h| FfiHeaderRef {
                name: h.name.as_rstr(),
                value: h.value.as_rslice(),
            })
            .collect();
        f(&FfiRequestRef {
            method: self.method.as_rstr(),
            path: self.path.as_rstr(),
            query: self.query.as_rstr(),
            headers: RSlice::from_slice(&headers),
            client_addr: self.client_addr.as_rstr(),
            tls: self.tls,
            http_version: self.http_version,
            request_id: self.request_id.as_rstr(),
        })
    }
}

/// A response as a plugin returns it to the host.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiResponse {
    /// HTTP status code.
    pub status: u16,
    /// Response headers.
    pub headers: RVec<FfiHeader>,
    /// The body, whole or streamed.
    pub body: FfiBody,
}

/// The host's log callback: a [`crate::Level`] as `u8`, and the message.
pub type LogFn = extern "C" fn(level: u8, message: RStr<'_>);

/// What the host offers a plugin for the life of its worker. A prefix type: the host may add
/// services; a plugin asks for one through its `Option` accessor.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = HostApiRef)))]
#[sabi(missing_field(option))]
pub struct HostApi {
    /// Where [`crate::info!`] and friends send their messages ([`LogFn`]; written out because
    /// the StableAbi derive reads function pointer types from the field, not through aliases).
    pub log: extern "C" fn(level: u8, message: RStr<'_>),
    /// The same for a line logged while a handler runs: the host adds the request's id.
    #[sabi(last_prefix_field)]
    pub log_for_request: extern "C" fn(level: u8, request_id: RStr<'_>, message: RStr<'_>),
    /// The host's key/value store (see [`crate::kv`]): one operation, answered by a future
    /// that waits on a channel only, so any executor may poll it.
    pub kv: extern "C" fn(op: FfiKvOp) -> FfiFuture<RResult<FfiKvReply, RString>>,
}

/// Operations on the host's key/value store ([`FfiKvOp::op`]).
pub mod kv_ops {
    /// Reads `key`.
    pub const GET: u8 = 1;
    /// Sets `key` to `value` (with `ttl_ms`).
    pub const SET: u8 = 2;
    /// Deletes `key`.
    pub const DELETE: u8 = 3;
    /// Adds `by` to the whole number `key` holds.
    pub const INCREMENT: u8 = 4;
    /// Sets `value` (`RNone`: deletes) if the current value is `expected` (`RNone`: missing).
    pub const COMPARE_AND_SWAP: u8 = 5;
    /// Sets `key`'s time to live (`ttl_ms`).
    pub const EXPIRE: u8 = 6;
}

/// One key/value operation. Versioned like requests.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct FfiKvOp {
    /// One of [`kv_ops`].
    pub op: u8,
    /// The key (per service: services never share keys).
    pub key: RString,
    /// The value to set.
    pub value: ROption<RVec<u8>>,
    /// The value compare-and-swap expects.
    pub expected: ROption<RVec<u8>>,
    /// What increment adds.
    pub by: i64,
    /// Time to live in milliseconds (`SET`, `COMPARE_AND_SWAP`, `EXPIRE`); `RNone`: none.
    pub ttl_ms: ROption<u64>,
}

/// What a key/value operation gives back.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct FfiKvReply {
    /// The value `GET` found.
    pub value: ROption<RVec<u8>>,
    /// The number `INCREMENT` made.
    pub number: i64,
    /// Whether the operation changed something (always true for `GET` and `INCREMENT`).
    pub done: bool,
}

/// What the host tells a plugin when it starts it; the host keeps it alive for the life of the
/// worker, so the plugin may keep the reference.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = FfiContextRef)))]
#[sabi(missing_field(option))]
pub struct FfiContext {
    /// The name of the service this worker belongs to.
    pub service: RStr<'static>,
    /// The worker's slot number within its service (0-based), stable across reloads.
    pub worker_id: u32,
    /// The short content hash of the plugin library the worker loaded.
    pub plugin_version: RStr<'static>,
    /// The service's `[service.config]` table, flattened: top-level keys with their values
    /// (strings as they are, other values in TOML syntax).
    pub config: RSlice<'static, Tuple2<RStr<'static>, RStr<'static>>>,
    /// The same table, as TOML text.
    pub config_toml: RStr<'static>,
    /// The service's `max_body_bytes`: a body read whole is refused past this.
    pub max_body_bytes: u64,
    /// The service's `max_stream_bytes`: a body read as a stream is cut past this.
    pub max_stream_bytes: u64,
    /// The host's services.
    #[sabi(last_prefix_field)]
    pub host: HostApiRef,
}

/// How a plugin wants its handler called ([`PluginMod::calls`]).
pub mod calls {
    /// A synchronous handler that may block: on the host's blocking pool.
    pub const BLOCKING: u8 = 0;
    /// A synchronous handler that never blocks: inline on the host's async threads.
    pub const INLINE: u8 = 1;
    /// An async handler; the host awaits an `FfiFuture`, polled on its own threads inside the
    /// plugin runtime's context.
    pub const ASYNC: u8 = 2;
}

/// The root module every plugin exports (through [`crate::export_plugin!`] or
/// [`crate::export_async_plugin!`]).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(option))]
pub struct PluginMod {
    /// The plugin crate's name (`CARGO_PKG_NAME`).
    pub name: RStr<'static>,
    /// The plugin crate's version (`CARGO_PKG_VERSION`).
    pub version: RStr<'static>,
    /// How the host calls the handler: one of [`calls`].
    pub calls: u8,
    /// Creates the plugin instance (and, for async plugins, its runtime); an error is the
    /// reason the start failed.
    pub start: extern "C" fn(FfiContextRef) -> RResult<(), RString>,
    /// Handles one request synchronously (`calls` is `BLOCKING` or `INLINE`); an error is a
    /// panic message (the host answers 500). Hosts of 0.2.1 and later call `handle_ref` when
    /// the plugin has it.
    pub handle: extern "C" fn(&FfiRequest, FfiBody) -> RResult<FfiResponse, RString>,
    /// Handles one request (`calls` is `ASYNC`): each poll of the future polls the handler on
    /// the caller's thread, inside the plugin runtime's context (plugin-api's glue; plugins
    /// built with plugin-api 0.2.0 before 2026-11-30 spawned the handler on the runtime and
    /// waited for it). Dropping it cancels the handler. Hosts of 0.2.1 and later call
    /// `handle_async_ref` when the plugin has it.
    pub handle_async:
        extern "C" fn(&FfiRequest, FfiBody) -> FfiFuture<RResult<FfiResponse, RString>>,
    /// Resolves once the plugin's runtime has run a task: the host's liveness check.
    pub ping: extern "C" fn() -> FfiFuture<()>,
    /// The worker starts draining: [`crate::shutdown`] resolves from now on.
    pub drain: extern "C" fn(),
    /// The worker stops: runs `on_stop`, then waits up to `timeout_ms` for the plugin's
    /// background tasks; an error says what did not finish.
    #[sabi(last_prefix_field)]
    pub stop: extern "C" fn(timeout_ms: u64) -> RResult<(), RString>,
    /// `handle` with the head borrowed from the host (0.2.1): no copy of it on the host's side.
    pub handle_ref: extern "C" fn(&FfiRequestRef<'_>, FfiBody) -> RResult<FfiResponse, RString>,
    /// `handle_async` with the head borrowed from the host (0.2.1); the plugin copies it before
    /// this returns.
    pub handle_async_ref:
        extern "C" fn(&FfiRequestRef<'_>, FfiBody) -> FfiFuture<RResult<FfiResponse, RString>>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "plugin";
    const NAME: &'static str = "plugin-api";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

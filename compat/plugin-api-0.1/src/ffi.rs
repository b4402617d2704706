//! The FFI-safe types that cross the library boundary, and the root module a plugin exports.
//!
//! Append-only: new fields go at the end of [`PluginMod`] (a prefix type, so older plugins keep
//! loading), each with `#[sabi(missing_field(option))]`, so that its accessor gives `None` for a
//! plugin built before the field existed. Every other type here is checked
//! field by field by abi_stable when a plugin is loaded; changing one means plugins must be
//! rebuilt, and the host says so in its load error.

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{RResult, RStr, RString, RVec, Tuple2},
    StableAbi,
};

/// One HTTP header; the value is bytes because HTTP allows non-UTF-8 header values.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct FfiHeader {
    /// Header name, lower case.
    pub name: RString,
    /// Header value, as received or as to be sent.
    pub value: RVec<u8>,
}

/// A request as the host passes it to a plugin.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiRequest {
    /// `GET`, `POST`, ...
    pub method: RString,
    /// The path, without the query string.
    pub path: RString,
    /// The raw query string, without the `?` (empty when there is none).
    pub query: RString,
    /// Request headers in the order received.
    pub headers: RVec<FfiHeader>,
    /// The whole request body.
    pub body: RVec<u8>,
}

/// A response as a plugin returns it to the host.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiResponse {
    /// HTTP status code.
    pub status: u16,
    /// Response headers.
    pub headers: RVec<FfiHeader>,
    /// The whole response body.
    pub body: RVec<u8>,
}

/// The host's log callback: a [`crate::Level`] as `u8`, and the message.
pub type LogFn = extern "C" fn(level: u8, message: RStr<'_>);

/// What the host tells a plugin when it starts it.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiContext {
    /// The name of the service this worker belongs to.
    pub service: RString,
    /// The worker's slot number within its service (0-based), stable across reloads.
    pub worker_id: u32,
    /// The short content hash of the plugin library the worker loaded.
    pub plugin_version: RString,
    /// The service's `[service.config]` table, flattened: top-level keys with their values
    /// (strings as they are, other values in TOML syntax).
    pub config: RVec<Tuple2<RString, RString>>,
    /// The same table, as TOML text.
    pub config_toml: RString,
    /// Where [`crate::info!`] and friends send their messages ([`LogFn`]; written out because
    /// the StableAbi derive reads function pointer types from the field, not through aliases).
    pub log: extern "C" fn(level: u8, message: RStr<'_>),
}

/// The root module every plugin exports (through [`crate::export_plugin!`]).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// The plugin crate's name (`CARGO_PKG_NAME`).
    pub name: RStr<'static>,
    /// The plugin crate's version (`CARGO_PKG_VERSION`).
    pub version: RStr<'static>,
    /// Creates the plugin instance; an error is the reason the start failed.
    pub start: extern "C" fn(&FfiContext) -> RResult<(), RString>,
    /// Handles one request; an error is a panic message (the host answers 500).
    pub handle: extern "C" fn(&FfiRequest) -> RResult<FfiResponse, RString>,
    /// Tells the plugin that the worker stops.
    #[sabi(last_prefix_field)]
    pub stop: extern "C" fn(),
    /// [`crate::Plugin::BLOCKING`]. Added after the prefix: a plugin built before it existed
    /// reads as `None`, which the host treats as `true`.
    #[sabi(missing_field(option))]
    pub blocking: bool,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "plugin";
    const NAME: &'static str = "plugin-api";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

//! The FFI-safe types of a WebSocket plugin's boundary, and its root module.
//!
//! Append-only, as [`crate::ffi`]: new fields of [`WsPluginMod`] go at its end with
//! `#[sabi(missing_field(option))]`.

use std::ffi::c_void;

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{ROption, RResult, RSlice, RStr, RString, RVec, Tuple2},
    StableAbi,
};

use crate::ffi::{FfiContextRef, FfiHeader};

/// A client's session: keys and values, as the gateway keeps them.
pub type FfiSession = RVec<Tuple2<RString, RString>>;

/// The WebSocket handshake request a client sent.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiConnect {
    /// The path of the request line.
    pub path: RString,
    /// The raw query string, without `?`.
    pub query: RString,
    /// The client's address, `ip:port`.
    pub peer: RString,
    /// Request headers, names in lower case.
    pub headers: RVec<FfiHeader>,
    /// The handshake came over TLS.
    pub tls: bool,
}

/// What a plugin asks of the gateways: one of the `OP_*` kinds, with the fields it uses.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct FfiOp<'a> {
    /// One of the `OP_*` constants.
    pub kind: u8,
    /// The clients it is about.
    pub clients: RSlice<'a, u64>,
    /// The group it is about.
    pub group: RStr<'a>,
    /// A session key.
    pub key: RStr<'a>,
    /// A session value (none: remove the key).
    pub value: ROption<RStr<'a>>,
    /// A message to send is text (else binary).
    pub text: bool,
    /// A message to send.
    pub data: RSlice<'a, u8>,
}

/// Send `data` to `clients`.
pub const OP_SEND_CLIENTS: u8 = 1;
/// Send `data` to the members of `group`.
pub const OP_SEND_GROUP: u8 = 2;
/// Send `data` to every client of the service.
pub const OP_SEND_ALL: u8 = 3;
/// Add `clients[0]` to `group`.
pub const OP_JOIN: u8 = 4;
/// Remove `clients[0]` from `group`.
pub const OP_LEAVE: u8 = 5;
/// Close `clients[0]` (code 1000).
pub const OP_CLOSE: u8 = 6;
/// Set (`value`) or remove (no `value`) `key` in the session of `clients[0]`.
pub const OP_SET_SESSION: u8 = 7;
/// The members of `group`, in [`FfiAnswer::clients`].
pub const OP_GROUP_CLIENTS: u8 = 8;
/// The session of `clients[0]`, in [`FfiAnswer::session`].
pub const OP_GET_SESSION: u8 = 9;

/// The gateways' answer to an [`FfiOp`].
#[repr(C)]
#[derive(StableAbi, Debug, Default)]
pub struct FfiAnswer {
    /// Why the operation could not be done.
    pub error: ROption<RString>,
    /// The clients asked for.
    pub clients: RVec<u64>,
    /// The session asked for.
    pub session: FfiSession,
}

/// The host's side of one event: how the plugin reaches the gateways, which client the event
/// is about, and that client's session as it was when the event left its gateway.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiGateway {
    /// The host's state for this event, handed back to `call`; valid while the event runs.
    pub host: *const c_void,
    /// Does what an [`FfiOp`] asks.
    pub call: extern "C" fn(host: *const c_void, op: &FfiOp<'_>) -> FfiAnswer,
    /// The client the event is about.
    pub client: u64,
    /// That client's session.
    pub session: FfiSession,
}

/// The root module every WebSocket plugin exports (through [`crate::export_ws_plugin!`]).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = WsPluginModRef)))]
#[sabi(missing_field(panic))]
pub struct WsPluginMod {
    /// The plugin crate's name (`CARGO_PKG_NAME`).
    pub name: RStr<'static>,
    /// The plugin crate's version (`CARGO_PKG_VERSION`).
    pub version: RStr<'static>,
    /// Creates the plugin instance; an error is the reason the start failed.
    pub start: extern "C" fn(FfiContextRef) -> RResult<(), RString>,
    /// A client asks to connect: `Ok(None)` accepts it, `Ok(Some(reason))` refuses it; an
    /// error is a panic message (the client is refused).
    pub connect: extern "C" fn(&FfiGateway, &FfiConnect) -> RResult<ROption<RString>, RString>,
    /// A message from a client; an error is a panic message.
    pub message:
        extern "C" fn(&FfiGateway, text: bool, data: RSlice<'_, u8>) -> RResult<(), RString>,
    /// A client is gone; an error is a panic message.
    pub close: extern "C" fn(&FfiGateway) -> RResult<(), RString>,
    /// Tells the plugin that the worker stops.
    #[sabi(last_prefix_field)]
    pub stop: extern "C" fn(),
}

impl RootModule for WsPluginModRef {
    declare_root_module_statics! {WsPluginModRef}
    const BASE_NAME: &'static str = "ws-plugin";
    const NAME: &'static str = "plugin-api-ws";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

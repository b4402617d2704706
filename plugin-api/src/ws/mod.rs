//! WebSocket plugins: the events of a `kind = "websocket"` service, and what a plugin can do
//! from them.
//!
//! The host keeps the client connections in gateway processes that never run plugin code and
//! are never replaced by a reload; the plugin runs in business workers, which a reload replaces.
//! So a client stays connected while the code that answers it changes, and its groups and
//! session live on. The names follow Workerman's GatewayWorker (`sendToClient` is
//! [`Gateway::send_to_client`], `joinGroup` is [`Gateway::join_group`], ...).
//!
//! Events of one client come to the plugin one at a time, in order; events of different
//! clients may come from different workers at once. A handler's sends, group changes and
//! session writes are applied before the client's next event is handled.
//!
//! ```no_run
//! use plugin_api::ws::{ClientId, Gateway, Message, WsPlugin};
//! use plugin_api::Context;
//!
//! struct Echo;
//!
//! impl WsPlugin for Echo {
//!     fn on_start(_ctx: &Context) -> Result<Self, plugin_api::Error> {
//!         Ok(Echo)
//!     }
//!     fn on_message(&self, gw: &Gateway, client: ClientId, msg: Message<'_>) {
//!         gw.send_to_client(client, msg);
//!     }
//! }
//!
//! plugin_api::export_ws_plugin!(Echo);
//! ```

pub mod ffi;
#[doc(hidden)]
pub mod glue;

use std::{cell::RefCell, fmt};

use abi_stable::std_types::{ROption, RSlice, RStr};

use crate::{Context, Error};
use ffi::{FfiConnect, FfiGateway, FfiOp};

/// The most session data one client may have, keys and values together.
pub const MAX_SESSION_BYTES: usize = 64 * 1024;

/// A client of the service: which gateway holds its connection, and its number there. Stable
/// for the life of the connection, across reloads.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ClientId(pub u64);

impl ClientId {
    /// The gateway process that holds the connection.
    pub fn gateway(self) -> u32 {
        (self.0 >> 48) as u32
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.gateway(), self.0 & ((1 << 48) - 1))
    }
}

/// A WebSocket message: text or binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// A text message (valid UTF-8).
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
}

impl<'a> Message<'a> {
    /// The message's bytes (a text message's UTF-8).
    pub fn as_bytes(&self) -> &'a [u8] {
        match self {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b,
        }
    }

    /// The text of a text message.
    pub fn as_text(&self) -> Option<&'a str> {
        match self {
            Message::Text(t) => Some(t),
            Message::Binary(_) => None,
        }
    }
}

impl<'a> From<&'a str> for Message<'a> {
    fn from(t: &'a str) -> Message<'a> {
        Message::Text(t)
    }
}

impl<'a> From<&'a String> for Message<'a> {
    fn from(t: &'a String) -> Message<'a> {
        Message::Text(t)
    }
}

impl<'a> From<&'a [u8]> for Message<'a> {
    fn from(b: &'a [u8]) -> Message<'a> {
        Message::Binary(b)
    }
}

/// The handshake request of a client that connects.
#[repr(transparent)]
pub struct ConnectRequest(FfiConnect);

impl ConnectRequest {
    pub(crate) fn from_ffi(req: &FfiConnect) -> &ConnectRequest {
        // SAFETY: `ConnectRequest` is `#[repr(transparent)]` over `FfiConnect`: same layout,
        // and the reference keeps `req`'s lifetime.
        unsafe { &*(req as *const FfiConnect as *const ConnectRequest) }
    }

    /// The path the client asked for: `/chat`.
    pub fn path(&self) -> &str {
        &self.0.path
    }

    /// The raw query string, without `?`.
    pub fn query(&self) -> &str {
        &self.0.query
    }

    /// The first header `name` (lower case), if it is valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.0
            .headers
            .iter()
            .find(|h| h.name.as_str() == name)
            .and_then(|h| std::str::from_utf8(&h.value).ok())
    }

    /// The client's address, `ip:port`.
    pub fn peer_addr(&self) -> &str {
        &self.0.peer
    }

    /// Whether the connection is TLS (`wss://`).
    pub fn is_tls(&self) -> bool {
        self.0.tls
    }
}

/// Why a client is refused in [`WsPlugin::on_connect`]; the client gets a 403 with it.
#[derive(Debug)]
pub struct Refuse(pub String);

impl<T: Into<String>> From<T> for Refuse {
    fn from(reason: T) -> Refuse {
        Refuse(reason.into())
    }
}

/// What a plugin does from an event: send to clients, groups or all, manage groups, close
/// clients, read and write sessions. Sends to a client that is gone are dropped silently (it
/// may have left while the event was on its way), as GatewayWorker does.
pub struct Gateway<'a> {
    ffi: &'a FfiGateway,
    /// The event's client's session, as this handler changed it.
    session: RefCell<Vec<(String, String)>>,
}

impl<'a> Gateway<'a> {
    pub(crate) fn new(ffi: &'a FfiGateway) -> Gateway<'a> {
        Gateway {
            ffi,
            session: RefCell::new(
                ffi.session
                    .iter()
                    .map(|kv| (kv.0.to_string(), kv.1.to_string()))
                    .collect(),
            ),
        }
    }

    fn call(&self, op: FfiOp<'_>) -> ffi::FfiAnswer {
        (self.ffi.call)(self.ffi.host, &op)
    }

    fn op<'o>(kind: u8) -> FfiOp<'o> {
        FfiOp {
            kind,
            clients: RSlice::from_slice(&[]),
            group: RStr::from_str(""),
            key: RStr::from_str(""),
            value: ROption::RNone,
            text: false,
            data: RSlice::from_slice(&[]),
        }
    }

    fn message_op<'o>(kind: u8, msg: Message<'o>) -> FfiOp<'o> {
        FfiOp {
            text: matches!(msg, Message::Text(_)),
            data: RSlice::from_slice(msg.as_bytes()),
            ..Gateway::op(kind)
        }
    }

    /// The client this event is about.
    pub fn client(&self) -> ClientId {
        ClientId(self.ffi.client)
    }

    /// Sends a message to one client (GatewayWorker's `sendToClient`).
    pub fn send_to_client<'m>(&self, client: ClientId, msg: impl Into<Message<'m>>) {
        self.send_to_clients(&[client], msg);
    }

    /// Sends a message to each of `clients`.
    pub fn send_to_clients<'m>(&self, clients: &[ClientId], msg: impl Into<Message<'m>>) {
        let ids: Vec<u64> = clients.iter().map(|c| c.0).collect();
        self.call(FfiOp {
            clients: RSlice::from_slice(&ids),
            ..Gateway::message_op(ffi::OP_SEND_CLIENTS, msg.into())
        });
    }

    /// Sends a message to every member of `group` (`sendToGroup`).
    pub fn send_to_group<'m>(&self, group: &str, msg: impl Into<Message<'m>>) {
        self.call(FfiOp {
            group: RStr::from_str(group),
            ..Gateway::message_op(ffi::OP_SEND_GROUP, msg.into())
        });
    }

    /// Sends a message to every client of the service (`sendToAll`).
    pub fn send_to_all<'m>(&self, msg: impl Into<Message<'m>>) {
        self.call(Gateway::message_op(ffi::OP_SEND_ALL, msg.into()));
    }

    fn client_op(&self, kind: u8, client: ClientId, group: &str) {
        let ids = [client.0];
        self.call(FfiOp {
            clients: RSlice::from_slice(&ids),
            group: RStr::from_str(group),
            ..Gateway::op(kind)
        });
    }

    /// Adds a client to a group (`joinGroup`); groups live in the gateways and survive reloads.
    pub fn join_group(&self, client: ClientId, group: &str) {
        self.client_op(ffi::OP_JOIN, client, group);
    }

    /// Removes a client from a group (`leaveGroup`).
    pub fn leave_group(&self, client: ClientId, group: &str) {
        self.client_op(ffi::OP_LEAVE, client, group);
    }

    /// Closes a client's connection (`closeClient`); its `on_close` follows.
    pub fn close_client(&self, client: ClientId) {
        self.client_op(ffi::OP_CLOSE, client, "");
    }

    /// The clients in a group, on every gateway (`getClientIdListByGroup`).
    pub fn client_ids_by_group(&self, group: &str) -> Vec<ClientId> {
        let answer = self.call(FfiOp {
            group: RStr::from_str(group),
            ..Gateway::op(ffi::OP_GROUP_CLIENTS)
        });
        answer.clients.iter().map(|c| ClientId(*c)).collect()
    }

    /// A value of a client's session (`getSession`). The event's own client's session came
    /// with the event; another client's is asked of its gateway.
    pub fn get_session(&self, client: ClientId, key: &str) -> Option<String> {
        if client == self.client() {
            return self
                .session
                .borrow()
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone());
        }
        let ids = [client.0];
        let answer = self.call(FfiOp {
            clients: RSlice::from_slice(&ids),
            ..Gateway::op(ffi::OP_GET_SESSION)
        });
        answer
            .session
            .iter()
            .find(|kv| kv.0.as_str() == key)
            .map(|kv| kv.1.to_string())
    }

    /// Sets (`Some`) or removes (`None`) a value of a client's session (`updateSession`). The
    /// session lives in the client's gateway, survives reloads, and holds at most
    /// [`MAX_SESSION_BYTES`]; past that, the write is refused with an error.
    pub fn set_session(
        &self,
        client: ClientId,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), Error> {
        if client == self.client() {
            let mut session = self.session.borrow_mut();
            let others: usize = session
                .iter()
                .filter(|(k, _)| k != key)
                .map(|(k, v)| k.len() + v.len())
                .sum();
            let size = others + value.map_or(0, |v| key.len() + v.len());
            if size > MAX_SESSION_BYTES {
                return Err(format!(
                    "the session of client {client} would hold {size} bytes, more than \
                     {MAX_SESSION_BYTES}"
                )
                .into());
            }
            session.retain(|(k, _)| k != key);
            if let Some(v) = value {
                session.push((key.to_string(), v.to_string()));
            }
        }
        let ids = [client.0];
        let answer = self.call(FfiOp {
            clients: RSlice::from_slice(&ids),
            key: RStr::from_str(key),
            value: value.map(RStr::from_str).into(),
            ..Gateway::op(ffi::OP_SET_SESSION)
        });
        match answer.error {
            ROption::RSome(e) => Err(e.to_string().into()),
            ROption::RNone => Ok(()),
        }
    }
}

/// A WebSocket service's handler, loaded by each business worker in its on-start hook.
///
/// One value per worker, shared by the threads that handle events, hence `Send + Sync`. State
/// that must outlive a reload belongs in sessions, groups, or an external store.
pub trait WsPlugin: Send + Sync + Sized + 'static {
    /// Called once when a worker starts; an error (or a panic) fails its start, and in a
    /// reload, the reload.
    fn on_start(ctx: &Context) -> Result<Self, Error>;

    /// A client asks to connect (`onConnect`, with the handshake request: check an Origin or a
    /// token here). `Err` refuses it with a 403. The default accepts everyone.
    fn on_connect(
        &self,
        gw: &Gateway,
        client: ClientId,
        req: &ConnectRequest,
    ) -> Result<(), Refuse> {
        let _ = (gw, client, req);
        Ok(())
    }

    /// A message from a client (`onMessage`).
    fn on_message(&self, gw: &Gateway, client: ClientId, msg: Message<'_>);

    /// A client is gone (`onClose`): it closed, was closed, or its connection broke. Its
    /// groups are left already; its session is readable until this returns.
    fn on_close(&self, gw: &Gateway, client: ClientId) {
        let _ = (gw, client);
    }

    /// Called once when the worker stops.
    fn on_stop(&self) {}
}

/// Exports a [`WsPlugin`] implementation as this library's root module (a crate exports either
/// this or [`crate::export_plugin!`]).
#[macro_export]
macro_rules! export_ws_plugin {
    ($plugin:ty) => {
        // See `export_plugin!` for the symbol name.
        #[doc(hidden)]
        #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
        pub static __PLUGIN_API_ROOT_MODULE: $crate::__private::LibHeader = {
            fn module() -> $crate::ws::ffi::WsPluginModRef {
                $crate::ws::glue::root_module::<$plugin>(
                    env!("CARGO_PKG_NAME"),
                    env!("CARGO_PKG_VERSION"),
                )
            }
            extern "C" fn constructor() -> $crate::__private::RootModuleResult {
                $crate::__private::call_root_module_loader(module)
            }
            // SAFETY: as in `export_plugin!`, for the module type `WsPluginModRef`.
            unsafe {
                $crate::__private::LibHeader::from_constructor::<$crate::ws::ffi::WsPluginModRef>(
                    constructor,
                    $crate::__private::CheckTypeLayout::Yes,
                )
            }
        };
    };
}

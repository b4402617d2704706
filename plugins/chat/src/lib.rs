//! A chat server as a WebSocket plugin (`kind = "websocket"`): rooms are groups, a client's
//! nickname and room are in its session, and every reply says which version of the plugin
//! wrote it, so a reload shows: the clients stay connected, the replies change version.
//!
//! What a client sends (text messages):
//!
//! - `/nick NAME`: sets the nickname (`NAME (v1)` back);
//! - `/join ROOM`: joins a room (and leaves the previous one); the room hears `* NAME joined`;
//! - `/who`: how many are in the room;
//! - `echo TEXT`: `v1 echo TEXT` back to the sender alone;
//! - anything else: said in the room, to everyone in it: `[ROOM] NAME: TEXT (v1)`.
//!
//! `[service.config] allowed_origin = "https://example.com"` refuses browsers from elsewhere.
//! The version comes from `CHAT_VERSION` at build time (default `v1`), as the tests build two.

use plugin_api::{
    ws::{ClientId, ConnectRequest, Gateway, Message, Refuse, WsPlugin},
    Context, Error,
};

/// The version in every reply.
pub const VERSION: &str = match option_env!("CHAT_VERSION") {
    Some(v) => v,
    None => "v1",
};

pub struct Chat {
    allowed_origin: Option<String>,
}

impl Chat {
    fn nick(gw: &Gateway, client: ClientId) -> String {
        gw.get_session(client, "nick")
            .unwrap_or_else(|| format!("guest-{client}"))
    }
}

impl WsPlugin for Chat {
    fn on_start(ctx: &Context) -> Result<Self, Error> {
        plugin_api::info!("chat {VERSION} started as worker {}", ctx.worker_id());
        Ok(Chat {
            allowed_origin: ctx.config("allowed_origin").map(str::to_string),
        })
    }

    fn on_connect(
        &self,
        _gw: &Gateway,
        _client: ClientId,
        req: &ConnectRequest,
    ) -> Result<(), Refuse> {
        match (&self.allowed_origin, req.header("origin")) {
            (Some(allowed), Some(origin)) if origin != allowed => {
                Err(format!("origin {origin} is not allowed").into())
            }
            _ => Ok(()),
        }
    }

    fn on_message(&self, gw: &Gateway, client: ClientId, msg: Message<'_>) {
        let Some(text) = msg.as_text() else {
            return gw.send_to_client(client, "text messages only");
        };
        let room = gw.get_session(client, "room");
        if let Some(name) = text.strip_prefix("/nick ") {
            let _ = gw.set_session(client, "nick", Some(name));
            gw.send_to_client(client, &format!("{name} ({VERSION})"));
        } else if let Some(new) = text.strip_prefix("/join ") {
            if let Some(old) = &room {
                gw.leave_group(client, old);
            }
            gw.join_group(client, new);
            let _ = gw.set_session(client, "room", Some(new));
            let line = format!("[{new}] * {} joined ({VERSION})", Chat::nick(gw, client));
            gw.send_to_group(new, &line);
        } else if text == "/who" {
            let line = match &room {
                Some(room) => {
                    let n = gw.client_ids_by_group(room).len();
                    format!("[{room}] {n} here ({VERSION})")
                }
                None => format!("in no room ({VERSION})"),
            };
            gw.send_to_client(client, &line);
        } else if let Some(rest) = text.strip_prefix("echo ") {
            gw.send_to_client(client, &format!("{VERSION} echo {rest}"));
        } else if text == "/panic" {
            panic!("asked to panic");
        } else if text == "/crash" {
            std::process::abort();
        } else {
            match &room {
                Some(room) => {
                    let line = format!("[{room}] {}: {text} ({VERSION})", Chat::nick(gw, client));
                    gw.send_to_group(room, &line);
                }
                None => gw.send_to_client(
                    client,
                    &format!("join a room first: /join NAME ({VERSION})"),
                ),
            }
        }
    }

    fn on_close(&self, gw: &Gateway, client: ClientId) {
        if let Some(room) = gw.get_session(client, "room") {
            let line = format!("[{room}] * {} left ({VERSION})", Chat::nick(gw, client));
            gw.send_to_group(&room, &line);
        }
    }
}

plugin_api::export_ws_plugin!(Chat);

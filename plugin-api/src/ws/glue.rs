//! The `extern "C"` functions behind [`crate::export_ws_plugin!`]: they own the plugin
//! instance, convert between FFI and plain types, and stop panics at the boundary.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    sync::OnceLock,
};

use abi_stable::{
    prefix_type::PrefixTypeTrait,
    std_types::{RErr, RNone, ROk, ROption, RResult, RSlice, RSome, RStr, RString},
};

use super::{
    ffi::{FfiConnect, FfiGateway, WsPluginMod, WsPluginModRef},
    ConnectRequest, Gateway, Message, WsPlugin,
};
use crate::{ffi::FfiContextRef, glue::panic_message};

/// The object-safe part of [`WsPlugin`].
trait Instance: Send + Sync {
    fn connect(&self, gw: &Gateway, req: &ConnectRequest) -> Result<(), String>;
    fn message(&self, gw: &Gateway, msg: Message<'_>);
    fn close(&self, gw: &Gateway);
    fn stop(&self);
}

impl<P: WsPlugin> Instance for P {
    fn connect(&self, gw: &Gateway, req: &ConnectRequest) -> Result<(), String> {
        self.on_connect(gw, gw.client(), req).map_err(|r| r.0)
    }
    fn message(&self, gw: &Gateway, msg: Message<'_>) {
        self.on_message(gw, gw.client(), msg)
    }
    fn close(&self, gw: &Gateway) {
        self.on_close(gw, gw.client())
    }
    fn stop(&self) {
        self.on_stop()
    }
}

static INSTANCE: OnceLock<Box<dyn Instance>> = OnceLock::new();

/// Builds the root module for plugin type `P`.
pub fn root_module<P: WsPlugin>(name: &'static str, version: &'static str) -> WsPluginModRef {
    WsPluginMod {
        name: RStr::from_str(name),
        version: RStr::from_str(version),
        start: start::<P>,
        connect,
        message,
        close,
        stop,
    }
    .leak_into_prefix()
}

extern "C" fn start<P: WsPlugin>(ctx: FfiContextRef) -> RResult<(), RString> {
    let ctx = crate::glue::prepare(ctx);
    crate::glue::keep_with(
        catch_unwind(AssertUnwindSafe(|| P::on_start(&ctx))),
        |plugin| INSTANCE.set(Box::new(plugin)).is_ok(),
    )
}

/// Runs `f` on the instance, turning a panic into its message.
fn guarded<T>(what: &str, f: impl FnOnce(&dyn Instance) -> T) -> Result<T, RString> {
    let Some(plugin) = INSTANCE.get() else {
        return Err("the plugin was not started".into());
    };
    catch_unwind(AssertUnwindSafe(|| f(&**plugin)))
        .map_err(|panic| format!("{what} panicked: {}", panic_message(&*panic)).into())
}

extern "C" fn connect(gw: &FfiGateway, req: &FfiConnect) -> RResult<ROption<RString>, RString> {
    let gateway = Gateway::new(gw);
    match guarded("on_connect", |p| {
        p.connect(&gateway, ConnectRequest::from_ffi(req))
    }) {
        Ok(Ok(())) => ROk(RNone),
        Ok(Err(reason)) => ROk(RSome(reason.into())),
        Err(panic) => RErr(panic),
    }
}

extern "C" fn message(gw: &FfiGateway, text: bool, data: RSlice<'_, u8>) -> RResult<(), RString> {
    let gateway = Gateway::new(gw);
    let msg = if text {
        // The gateway passes only valid UTF-8 as text (tungstenite checks it).
        match std::str::from_utf8(data.as_slice()) {
            Ok(t) => Message::Text(t),
            Err(_) => Message::Binary(data.as_slice()),
        }
    } else {
        Message::Binary(data.as_slice())
    };
    guarded("on_message", |p| p.message(&gateway, msg)).into()
}

extern "C" fn close(gw: &FfiGateway) -> RResult<(), RString> {
    let gateway = Gateway::new(gw);
    guarded("on_close", |p| p.close(&gateway)).into()
}

extern "C" fn stop() {
    let _ = guarded("on_stop", |p| p.stop());
}

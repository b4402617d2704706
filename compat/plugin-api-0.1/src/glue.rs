//! The `extern "C"` functions behind [`crate::export_plugin!`]: they own the plugin instance,
//! convert between FFI and plain types, and stop panics at the boundary (abi_stable aborts the
//! whole process if a panic unwinds through an `extern "C"` function).

use std::{
    any::Any,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::OnceLock,
};

use abi_stable::{
    prefix_type::PrefixTypeTrait,
    std_types::{RErr, ROk, RResult, RStr, RString},
};

use crate::{
    ffi::{FfiContext, FfiRequest, FfiResponse, PluginMod, PluginModRef},
    Context, Plugin, Request, Response,
};

/// The object-safe part of [`Plugin`], so that one static can hold any plugin type.
trait Instance: Send + Sync {
    fn handle(&self, req: &Request) -> Response;
    fn on_stop(&self);
}

impl<P: Plugin> Instance for P {
    fn handle(&self, req: &Request) -> Response {
        Plugin::handle(self, req)
    }
    fn on_stop(&self) {
        Plugin::on_stop(self)
    }
}

// One per library: each plugin links its own copy of plugin-api, and a worker loads one plugin.
static INSTANCE: OnceLock<Box<dyn Instance>> = OnceLock::new();

/// Builds the root module for plugin type `P`; `name` and `version` are the plugin crate's.
pub fn root_module<P: Plugin>(name: &'static str, version: &'static str) -> PluginModRef {
    PluginMod {
        name: RStr::from_str(name),
        version: RStr::from_str(version),
        start: start::<P>,
        handle,
        stop,
        blocking: P::BLOCKING,
    }
    .leak_into_prefix()
}

extern "C" fn start<P: Plugin>(ctx: &FfiContext) -> RResult<(), RString> {
    crate::log::install(ctx.log);
    let ctx = Context::from_ffi(ctx);
    match catch_unwind(AssertUnwindSafe(|| P::on_start(ctx))) {
        Ok(Ok(plugin)) => match INSTANCE.set(Box::new(plugin)) {
            Ok(()) => ROk(()),
            Err(_) => RErr("on_start was called twice in one process".into()),
        },
        Ok(Err(e)) => RErr(e.to_string().into()),
        Err(panic) => RErr(format!("on_start panicked: {}", panic_message(&*panic)).into()),
    }
}

extern "C" fn handle(req: &FfiRequest) -> RResult<FfiResponse, RString> {
    let Some(plugin) = INSTANCE.get() else {
        return RErr("the plugin was not started".into());
    };
    match catch_unwind(AssertUnwindSafe(|| plugin.handle(Request::from_ffi(req)))) {
        Ok(response) => ROk(response.into_ffi()),
        Err(panic) => RErr(format!("handler panicked: {}", panic_message(&*panic)).into()),
    }
}

extern "C" fn stop() {
    if let Some(plugin) = INSTANCE.get() {
        // A panic in on_stop has nowhere useful to go: the hook has logged it, the worker exits.
        let _ = catch_unwind(AssertUnwindSafe(|| plugin.on_stop()));
    }
}

/// The text of a panic payload (`panic!` gives a `&str` or a `String`).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic payload that is not a string)".to_string()
    }
}

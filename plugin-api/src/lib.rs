//! The contract between the `host` and its handler plugins.
//!
//! A plugin is a `cdylib` crate that depends on this crate, implements [`Plugin`] (a sync
//! handler) or [`AsyncPlugin`] (an async one), and exports itself with [`export_plugin!`] or
//! [`export_async_plugin!`]. Each worker process of the host loads the plugin once, in its
//! on-start hook, calls `on_start`, then `handle` for every request (concurrently), and
//! `on_stop` when it drains.
//!
//! Plugin authors only see plain Rust types ([`Request`], [`Response`], [`Context`],
//! [`Router`]); the FFI-safe types that cross the library boundary live in [`ffi`] and are
//! converted by the glue the export macros generate. That glue also catches panics: a panic in
//! `handle` becomes a 500 for that request, a panic in `on_start` fails the worker's start
//! with the panic message.
//!
//! A sync plugin:
//!
//! ```no_run
//! use plugin_api::{Context, Plugin, Request, Response};
//!
//! struct Hello;
//!
//! impl Plugin for Hello {
//!     fn on_start(ctx: &Context) -> Result<Self, plugin_api::Error> {
//!         plugin_api::info!("starting in service {}", ctx.service());
//!         Ok(Hello)
//!     }
//!     fn handle(&self, _req: &Request) -> Response {
//!         Response::text(200, "hello\n")
//!     }
//! }
//!
//! plugin_api::export_plugin!(Hello);
//! ```
//!
//! An async plugin with routes; its handlers run on the plugin's own tokio runtime, so they
//! may await timers, databases and other services:
//!
//! ```no_run
//! use std::time::Duration;
//! use plugin_api::{AsyncPlugin, Context, Request, Response, Router};
//!
//! struct Api {
//!     router: Router<()>,
//! }
//!
//! async fn wait(_: (), req: Request) -> Response {
//!     let ms: u64 = req.param("ms").and_then(|ms| ms.parse().ok()).unwrap_or(0);
//!     tokio::time::sleep(Duration::from_millis(ms)).await;
//!     Response::text(200, format!("waited {ms} ms\n"))
//! }
//!
//! impl AsyncPlugin for Api {
//!     async fn on_start(_ctx: &Context) -> Result<Self, plugin_api::Error> {
//!         Ok(Api { router: Router::new(()).get("/wait/{ms}", wait) })
//!     }
//!     async fn handle(&self, req: Request) -> Response {
//!         self.router.handle(req).await
//!     }
//! }
//!
//! plugin_api::export_async_plugin!(Api);
//! ```
//!
//! Compatibility: the root module and the context are abi_stable prefix types (fields are
//! appended, never changed), requests and responses are versioned; the host checks the layout
//! of every shared type and this crate's version when it loads a plugin, and loads plugins
//! built against plugin-api 0.1 as well.
//!
//! Features: `json` (default) adds [`Request::json`] and [`Response::json_value`] (serde).
#![deny(missing_docs)]

mod body;
mod context;
pub mod ffi;
mod glue;
pub mod kv;
mod log;
mod request;
mod response;
mod router;
mod runtime;
pub mod ws;

use std::future::Future;

pub use body::{BodyError, BodySender, Closed, SseSender};
pub use context::Context;
pub use cookie::Cookie;
pub use log::Level;
pub use request::Request;
pub use response::Response;
pub use router::Router;
pub use runtime::{draining, shutdown, spawn};
/// The tokio this crate runs plugins on: use it (or the same major version) for timers and I/O
/// in handlers.
pub use tokio;

/// The version of this crate; a plugin loads only into a host built against a compatible one
/// (same minor version while the major is 0; the host also loads 0.1 plugins).
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The error a plugin's `on_start` returns; anything that implements `std::error::Error`
/// converts into it with `?`, and so do `String` and `&str`.
pub type Error = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A plugin with a synchronous handler, loaded by each worker in its on-start hook.
///
/// One value is created per worker process by [`Plugin::on_start`] and shared by all the
/// worker's request threads, hence `Send + Sync`: keep per-request state on the stack and shared
/// state behind atomics or locks. Worker state is lost when a reload replaces the worker, so
/// anything that must outlive a reload belongs in an external store.
pub trait Plugin: Send + Sync + Sized + 'static {
    /// Called once when a worker starts, before it accepts connections. An error (or a panic)
    /// here fails the worker's start: during a reload, that aborts the reload and the old workers
    /// keep serving.
    fn on_start(ctx: &Context) -> Result<Self, Error>;

    /// Whether `handle` may block: wait on I/O, sleep, take a contended lock, or compute for
    /// long. `true` (the default): the host calls it on a blocking thread pool, so a blocked
    /// call holds one pool thread and the worker's other requests go on. `false`: the host
    /// calls it directly on its async threads, which saves a thread handoff per request (on the
    /// benchmark machine, two thirds of the host's CPU time per request; see docs/benchmarks.md),
    /// but a call that does block stalls other requests of the worker while it lasts. Declare
    /// `false` only for handlers that compute a response from the request and memory alone.
    /// A handler that waits on I/O is better written as an [`AsyncPlugin`].
    const BLOCKING: bool = true;

    /// Handles one request, from several threads at once; see [`Plugin::BLOCKING`] for which.
    /// The body is read whole before the call (up to `max_body_bytes`).
    fn handle(&self, req: &Request) -> Response;

    /// Called once when the worker stops, after the last in-flight request finished; then
    /// the worker waits for the tasks it [`spawn`]ed.
    fn on_stop(&self) {}
}

/// A plugin with an async handler, polled on the host's threads inside the plugin's own runtime's
/// context (its timers and sockets belong to that runtime; see [`spawn`]).
///
/// Write the methods as `async fn`. The handler's future must be `Send`: it moves between
/// threads. Never block in it: a poll holds one of the host's threads. `handle` takes the request by value, so it can read a streamed body
/// ([`Request::chunk`]) and keep the request across `.await`s.
pub trait AsyncPlugin: Send + Sync + Sized + 'static {
    /// Called once when a worker starts, on the plugin's runtime: connect to databases, warm
    /// caches, [`spawn`] background tasks. An error (or a panic) fails the worker's start.
    fn on_start(ctx: &Context) -> impl Future<Output = Result<Self, Error>>;

    /// Handles one request. The host waits for it up to the service's `handler_timeout`
    /// (then the client gets a 503 and the task is cancelled).
    fn handle(&self, req: Request) -> impl Future<Output = Response> + Send;

    /// Called once when the worker stops, after the last in-flight request finished; then
    /// the worker waits for the tasks it [`spawn`]ed.
    fn on_stop(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Exports a [`Plugin`] implementation as this library's root module.
///
/// Use it once per plugin crate, at the top level: `plugin_api::export_plugin!(MyPlugin);`.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        $crate::__export_root_module!($crate::__private::root_module::<$plugin>);
    };
}

/// Exports an [`AsyncPlugin`] implementation as this library's root module.
///
/// Use it once per plugin crate, at the top level: `plugin_api::export_async_plugin!(MyApi);`.
#[macro_export]
macro_rules! export_async_plugin {
    ($plugin:ty) => {
        $crate::__export_root_module!($crate::__private::async_root_module::<$plugin>);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __export_root_module {
    ($builder:expr) => {
        // The symbol name is the one abi_stable's `#[export_root_module]` would generate; the
        // attribute itself cannot be used here because its expansion names `::abi_stable`, which
        // plugin crates do not depend on. A unit test in plugin-api checks the name.
        #[doc(hidden)]
        #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
        pub static __PLUGIN_API_ROOT_MODULE: $crate::__private::LibHeader = {
            fn module() -> $crate::ffi::PluginModRef {
                $builder(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
            }
            extern "C" fn constructor() -> $crate::__private::RootModuleResult {
                $crate::__private::call_root_module_loader(module)
            }
            // SAFETY: `call_root_module_loader` turns the `PluginModRef` that `module`
            // returns into the erased prefix reference, which is what `from_constructor` needs
            // for the module type `PluginModRef`.
            unsafe {
                $crate::__private::LibHeader::from_constructor::<$crate::ffi::PluginModRef>(
                    constructor,
                    $crate::__private::CheckTypeLayout::Yes,
                )
            }
        };
    };
}

/// Logs a message through the host at error level (see [`Level`]).
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::__private::log($crate::Level::Error, format_args!($($arg)+)) };
}

/// Logs a message through the host at warn level (see [`Level`]).
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::__private::log($crate::Level::Warn, format_args!($($arg)+)) };
}

/// Logs a message through the host at info level (see [`Level`]).
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::__private::log($crate::Level::Info, format_args!($($arg)+)) };
}

/// Logs a message through the host at debug level (see [`Level`]).
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::__private::log($crate::Level::Debug, format_args!($($arg)+)) };
}

/// What the macros of this crate expand to; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::glue::{async_root_module, root_module};
    pub use crate::log::log;
    pub use abi_stable::library::{
        __call_root_module_loader as call_root_module_loader, CheckTypeLayout, LibHeader,
        RootModuleResult,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Inline;
    impl Plugin for Inline {
        const BLOCKING: bool = false;
        fn on_start(_: &Context) -> Result<Self, Error> {
            Ok(Inline)
        }
        fn handle(&self, _: &Request) -> Response {
            Response::new(204)
        }
    }

    struct MayBlock;
    impl Plugin for MayBlock {
        fn on_start(_: &Context) -> Result<Self, Error> {
            Ok(MayBlock)
        }
        fn handle(&self, _: &Request) -> Response {
            Response::new(204)
        }
    }

    #[test]
    fn root_module_carries_the_blocking_declaration() {
        let inline = glue::root_module::<Inline>("inline", "0.0.0");
        assert_eq!(inline.calls(), ffi::calls::INLINE);
        let may_block = glue::root_module::<MayBlock>("may-block", "0.0.0");
        assert_eq!(
            may_block.calls(),
            ffi::calls::BLOCKING,
            "handlers may block unless they say so"
        );
    }

    #[test]
    fn export_name_matches_abi_stable() {
        assert_eq!(
            abi_stable::library::ROOT_MODULE_LOADER_NAME,
            "_1as_0lib_1header_0root_bmodule_bloader"
        );
    }
}

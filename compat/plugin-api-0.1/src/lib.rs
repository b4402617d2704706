//! The contract between the `host` and its handler plugins.
//!
//! A plugin is a `cdylib` crate that depends on this crate, implements [`Plugin`] and exports
//! itself with [`export_plugin!`]. Each worker process of the host loads the plugin once, in its
//! on-start hook, calls [`Plugin::on_start`], then calls [`Plugin::handle`] for every request
//! (concurrently, from several threads), and [`Plugin::on_stop`] when it drains.
//!
//! Plugin authors only see plain Rust types ([`Request`], [`Response`], [`Context`]); the FFI-safe
//! types that cross the library boundary live in [`ffi`] and are converted by the glue that
//! [`export_plugin!`] generates. That glue also catches panics: a panic in `handle` becomes a 500
//! for that request, a panic in `on_start` fails the worker's start with the panic message.
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
//! Compatibility: this crate is append-only. The root module is an abi_stable prefix type, so
//! fields added after [`ffi::PluginMod::stop`] do not break plugins built earlier; the host checks
//! the layout of every shared type and this crate's version when it loads a plugin.
#![deny(missing_docs)]

pub mod ffi;
mod glue;
mod log;
mod types;

pub use log::Level;
pub use types::{Context, Request, Response};

/// The version of this crate; a plugin loads only into a host built against a compatible one
/// (same minor version while the major is 0).
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The error a plugin's [`Plugin::on_start`] returns; anything that implements `std::error::Error`
/// converts into it with `?`, and so do `String` and `&str`.
pub type Error = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A request handler, loaded by each worker in its on-start hook.
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
    const BLOCKING: bool = true;

    /// Handles one request, from several threads at once; see [`Plugin::BLOCKING`] for which.
    fn handle(&self, req: &Request) -> Response;

    /// Called once when the worker stops, after the last in-flight request finished.
    fn on_stop(&self) {}
}

/// Exports a [`Plugin`] implementation as this library's root module.
///
/// Use it once per plugin crate, at the top level: `plugin_api::export_plugin!(MyPlugin);`.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        // The symbol name is the one abi_stable's `#[export_root_module]` would generate; the
        // attribute itself cannot be used here because its expansion names `::abi_stable`, which
        // plugin crates do not depend on. A unit test in plugin-api checks the name.
        #[doc(hidden)]
        #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
        pub static __PLUGIN_API_ROOT_MODULE: $crate::__private::LibHeader = {
            fn module() -> $crate::ffi::PluginModRef {
                $crate::__private::root_module::<$plugin>(
                    env!("CARGO_PKG_NAME"),
                    env!("CARGO_PKG_VERSION"),
                )
            }
            extern "C" fn constructor() -> $crate::__private::RootModuleResult {
                $crate::__private::call_root_module_loader(module)
            }
            // SAFETY: `call_root_module_loader` turns the `PluginModRef` that `root_module`
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
    pub use crate::glue::root_module;
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
        assert_eq!(inline.blocking(), Some(false));
        let may_block = glue::root_module::<MayBlock>("may-block", "0.0.0");
        assert_eq!(
            may_block.blocking(),
            Some(true),
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

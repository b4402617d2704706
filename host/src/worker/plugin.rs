//! Loading a plugin library inside a worker, calling it, and turning abi_stable's load errors
//! into advice. Public for `bench/`, which measures the boundary with it.
//!
//! Loading goes through `lib_header_from_path(..).init_root_module()`, not
//! `RootModule::load_from_file`, because the latter caches one module per type per process.
//! A library is never unloaded (unloading Rust dylibs is unsound); the worker process is the unit
//! that is thrown away.
//!
//! Three ABIs: the version a library declares picks the root-module type it is checked against:
//! this host's plugin-api (0.2.1), 0.2.0's (frozen in compat/plugin-api-0.2.0; see [`load`]) or
//! the frozen 0.1 (`super::plugin_v01`), so plugins built against earlier versions keep
//! loading and serving unchanged.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    path::Path,
    time::Duration,
};

use abi_stable::{
    abi_stability::abi_checking::check_layout_compatibility,
    library::{lib_header_from_path, LibHeader, LibraryError},
    prefix_type::PrefixTypeTrait,
    std_types::{RBoxError, RResult, RSlice, RStr, RString, Tuple2},
    StableAbi,
};
use plugin_api::{
    ffi::{
        calls, FfiBody, FfiContext, FfiFuture, FfiRequest, FfiRequestRef, FfiResponse, HostApi,
        PluginModRef,
    },
    Level,
};

use super::plugin_v01::V01;

/// An async handler's call as the plugin hands it over: its answer, or why it failed.
pub type AsyncCallFuture = FfiFuture<RResult<FfiResponse, RString>>;
use crate::protocol::WorkerSpec;

/// How the host calls a plugin's handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Calls {
    /// Sync, may block: on the blocking pool.
    Blocking,
    /// Sync, never blocks: inline on the async thread.
    Inline,
    /// Async: the host polls an FFI-safe future, which polls the handler in the plugin
    /// runtime's context.
    Async,
}

/// A loaded and started plugin. `Copy`: it is a `'static` reference to the root module.
#[derive(Clone, Copy)]
pub enum Plugin {
    /// Built against plugin-api 0.2 (0.2.0's have no `handle_ref` entries: their accessors
    /// answer `None`).
    Current(PluginModRef),
    /// Built against plugin-api 0.1.
    V01(V01),
}

impl Plugin {
    /// Loads the library at `path` (the verified copy of `spec`'s plugin) and calls the
    /// plugin's `on_start`; `loaded` runs between the two (for the start-up timings).
    pub fn load_and_start(
        spec: &WorkerSpec,
        path: &Path,
        loaded: impl FnOnce(),
    ) -> Result<Plugin, String> {
        let header = lib_header_from_path(path).map_err(|e| explain(e, spec, None))?;
        // What the library says it was built against, for errors about it.
        let declared = header.version_strings().to_string();
        let plugin = load(header, &declared).map_err(|e| explain(e, spec, Some(&declared)))?;
        loaded();
        let started = match plugin {
            Plugin::Current(module) => (module.start())(context(spec)),
            Plugin::V01(v01) => v01.start(spec, plugin_log),
        };
        match started {
            RResult::ROk(()) => Ok(plugin),
            RResult::RErr(reason) => Err(format!(
                "plugin {} ({}) failed to start: {reason}. Fix the cause in the plugin's on_start \
                 (or in the service's [service.config] section it reads) and reload.",
                plugin.name(),
                spec.plugin_source.display()
            )),
        }
    }

    /// The plugin crate's name.
    pub fn name(&self) -> &'static str {
        match self {
            Plugin::Current(m) => m.name().as_str(),
            Plugin::V01(v) => v.name(),
        }
    }

    /// The plugin crate's version (from its Cargo.toml).
    pub fn crate_version(&self) -> &'static str {
        match self {
            Plugin::Current(m) => m.version().as_str(),
            Plugin::V01(v) => v.crate_version(),
        }
    }

    /// The plugin-api line the plugin was built against: `0.2` or `0.1`.
    pub fn api(&self) -> &'static str {
        match self {
            Plugin::Current(_) => "0.2",
            Plugin::V01(_) => "0.1",
        }
    }

    /// How the handler is called; 0.1 plugins without the declaration may block.
    pub fn calls(&self) -> Calls {
        match self {
            Plugin::Current(m) => match m.calls() {
                calls::INLINE => Calls::Inline,
                calls::ASYNC => Calls::Async,
                _ => Calls::Blocking,
            },
            Plugin::V01(v) if v.blocking() => Calls::Blocking,
            Plugin::V01(_) => Calls::Inline,
        }
    }

    /// Calls a sync handler; `Err` carries a panic message. A plugin built against plugin-api
    /// 0.2.0 gets the head copied into the owned request its entry takes.
    pub fn handle(&self, req: &FfiRequestRef<'_>, body: FfiBody) -> Result<FfiResponse, String> {
        let result = match self {
            Plugin::Current(m) => match m.handle_ref() {
                Some(handle) => handle(req, body),
                None => (m.handle())(&req.to_owned_request(), body),
            },
            Plugin::V01(v) => return v.handle(req, body),
        };
        result.into_result().map_err(String::from)
    }

    /// `handle` for a head already copied (the blocking pool's): a plugin built against 0.2.0
    /// takes it as it is, without a second copy.
    pub fn handle_owned(&self, req: &FfiRequest, body: FfiBody) -> Result<FfiResponse, String> {
        match self {
            Plugin::Current(m) if m.handle_ref().is_none() => {
                (m.handle())(req, body).into_result().map_err(String::from)
            }
            _ => req.with_ref(|req| self.handle(req, body)),
        }
    }

    /// Starts an async handler call (a 0.1 plugin has none: this calls it in place).
    pub fn handle_async(&self, req: &FfiRequestRef<'_>, body: FfiBody) -> AsyncCallFuture {
        match self {
            Plugin::Current(m) => match m.handle_async_ref() {
                Some(handle) => handle(req, body),
                None => (m.handle_async())(&req.to_owned_request(), body),
            },
            Plugin::V01(_) => {
                let result = self.handle(req, body).map_err(RString::from).into();
                async_ffi::FutureExt::into_ffi(std::future::ready(result))
            }
        }
    }

    /// A future that resolves once the plugin's runtime has run a task (`None`: no runtime).
    pub fn ping(&self) -> Option<FfiFuture<()>> {
        match self {
            Plugin::Current(m) => Some((m.ping())()),
            Plugin::V01(_) => None,
        }
    }

    /// Tells the plugin the worker drains (`plugin_api::shutdown` resolves).
    pub fn drain(&self) {
        if let Plugin::Current(m) = self {
            (m.drain())()
        }
    }

    /// Tells the plugin the worker stops, and waits up to `deadline` for its background
    /// tasks; `Err` says what did not finish.
    pub fn stop(&self, deadline: Duration) -> Result<(), String> {
        match self {
            Plugin::Current(m) => (m.stop())(deadline.as_millis() as u64)
                .into_result()
                .map_err(String::from),
            Plugin::V01(v) => {
                v.stop();
                Ok(())
            }
        }
    }
}

/// Checks the library against the root-module type of the API version it declares.
///
/// abi_stable refuses a library whose root module has fewer fields than the loader's type
/// (a newer library, with more, is fine). 0.2.1 appended the `handle_ref` entries, so a
/// plugin built against 0.2.0 is checked against 0.2.0's root module (frozen in
/// compat/plugin-api-0.2.0), which is field for field the prefix of this one, and then used
/// through this one: its accessors for the appended entries answer `None` for it (a prefix
/// type's accessors read the library's own field list), and the host calls 0.2.0's entries.
fn load(header: &'static LibHeader, declared: &str) -> Result<Plugin, LibraryError> {
    if declared.starts_with("0.1.") {
        return V01::load(header).map(Plugin::V01);
    }
    if declared == "0.2.0" {
        let module = header.init_root_module::<plugin_api_020::ffi::PluginModRef>()?;
        // What the cast below relies on, checked rather than assumed: 0.2.0's root module is
        // a prefix of this one (an edit to a type both reach would break it).
        check_layout_compatibility(
            <plugin_api_020::ffi::PluginModRef as StableAbi>::LAYOUT,
            <PluginModRef as StableAbi>::LAYOUT,
        )
        .map_err(|e| LibraryError::AbiInstability(RBoxError::new(e)))?;
        // SAFETY: abi_stable checked the library's root module against 0.2.0's layout, and
        // that layout against this one's (above): it is this `PluginMod`'s prefix, the fields
        // up to `stop`, of the same types in the same order. So the prefix reads the same
        // memory either way, and the fields past it are read only through accessors that test
        // the library's own field accessibility (its `WithMetadata`), which marks them absent.
        return Ok(Plugin::Current(PluginModRef(unsafe { module.0.cast() })));
    }
    header
        .init_root_module::<PluginModRef>()
        .map(Plugin::Current)
}

/// The context the plugin keeps for the life of the worker: made once, and leaked on purpose
/// (the 'static strings are what lets the plugin keep it).
pub(crate) fn context(spec: &WorkerSpec) -> plugin_api::ffi::FfiContextRef {
    fn leak(s: &str) -> RStr<'static> {
        RStr::from_str(Box::leak(s.to_string().into_boxed_str()))
    }
    let config: Vec<_> = spec
        .config
        .iter()
        .map(|(k, v)| Tuple2(leak(k), leak(v)))
        .collect();
    let host = HostApi {
        log: plugin_log,
        log_for_request: plugin_log_for_request,
        kv: super::kv::call,
    }
    .leak_into_prefix();
    FfiContext {
        service: leak(&spec.service),
        worker_id: spec.slot as u32,
        plugin_version: leak(&spec.plugin_version),
        config: RSlice::from_slice(Box::leak(config.into_boxed_slice())),
        config_toml: leak(&spec.config_toml),
        max_body_bytes: spec.max_body_bytes as u64,
        max_stream_bytes: spec.max_stream_bytes,
        host,
    }
    .leak_into_prefix()
}

/// Where the plugin's `plugin_api::info!` and friends end up: the worker's tracing output,
/// inside the worker's span, so each line carries service, pid and plugin version. The
/// plugin's panic hook logs through here too ("panicked at ..."): that line also goes to the
/// master at once, so that if an abort follows, the master can say why the worker died.
pub(super) extern "C" fn plugin_log(level: u8, message: RStr<'_>) {
    log_line(level, None, message.as_str())
}

/// The same, for a line a handler logged: it carries the request's id.
extern "C" fn plugin_log_for_request(level: u8, request_id: RStr<'_>, message: RStr<'_>) {
    log_line(level, Some(request_id.as_str()), message.as_str())
}

fn log_line(level: u8, request_id: Option<&str>, message: &str) {
    // A panic must not unwind into the plugin's frames (that aborts); logging should not panic,
    // but this is a boundary.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if level == Level::Error as u8 && message.starts_with("panicked") {
            if let Some(link) = super::link::Link::global() {
                link.send(&crate::protocol::FromWorker::Panicked {
                    message: message.to_string(),
                });
            }
        }
        super::in_worker_span(|| match (Level::from_u8(level), request_id) {
            (Level::Error, None) => tracing::error!(target: "plugin", "{message}"),
            (Level::Warn, None) => tracing::warn!(target: "plugin", "{message}"),
            (Level::Info, None) => tracing::info!(target: "plugin", "{message}"),
            (Level::Debug, None) => tracing::debug!(target: "plugin", "{message}"),
            (Level::Error, Some(id)) => {
                tracing::error!(target: "plugin", request_id = id, "{message}")
            }
            (Level::Warn, Some(id)) => {
                tracing::warn!(target: "plugin", request_id = id, "{message}")
            }
            (Level::Info, Some(id)) => {
                tracing::info!(target: "plugin", request_id = id, "{message}")
            }
            (Level::Debug, Some(id)) => {
                tracing::debug!(target: "plugin", request_id = id, "{message}")
            }
        })
    }));
}

/// One paragraph: what was expected, what was found, how to fix it. The raw abi_stable message
/// (for layout mismatches, a dump of every type) goes to the debug log.
pub(crate) fn explain(err: LibraryError, spec: &WorkerSpec, declared: Option<&str>) -> String {
    tracing::debug!(
        "abi_stable load error for {}: {err}",
        spec.plugin_path.display()
    );
    let source = spec.plugin_source.display();
    let api = plugin_api::API_VERSION;
    match err {
        LibraryError::OpenError { err, .. } => format!(
            "could not load plugin {source}: {err}. A plugin must be a shared library built by \
             cargo from a crate with `crate-type = [\"cdylib\"]` for this platform; if it was \
             being written, wait for the build to finish and reload."
        ),
        LibraryError::GetSymbolError { .. } => format!(
            "{source} is a shared library but not a plugin: it exports no plugin root module. \
             Add `plugin_api::export_plugin!(YourPlugin);` to the crate's lib.rs, build it with \
             `crate-type = [\"cdylib\"]`, and reload."
        ),
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => format!(
            "plugin {source} was built against plugin-api {actual_version}, but this host uses \
             plugin-api {expected_version}, which is not compatible with it. Rebuild the plugin \
             against plugin-api {api} (set `plugin-api = \"{api}\"` in its Cargo.toml, then \
             cargo build) and reload. (This host also loads plugins built against plugin-api \
             0.2.0 and 0.1.)"
        ),
        LibraryError::ParseVersionError(e) => format!(
            "plugin {source} declares a plugin-api version that cannot be read ({e}). Rebuild it \
             against plugin-api {api} and reload."
        ),
        LibraryError::AbiInstability(_) => format!(
            "plugin {source} was built against plugin-api {}, which this host (plugin-api {api}) \
             accepts by its version number, but the types it shares with the host have a \
             different layout (a different plugin-api source with a compatible version number). \
             Rebuild it against the plugin-api this host was built with and reload; run with \
             HOST_LOG=debug to see every mismatch.",
            declared.unwrap_or("(unknown)")
        ),
        LibraryError::InvalidAbiHeader(header) => format!(
            "plugin {source} was built with abi_stable's ABI header {header:?}, which this host's \
             abi_stable cannot read (a plugin-api from a different abi_stable major version). \
             Rebuild it against plugin-api {api} and reload."
        ),
        LibraryError::InvalidCAbi { .. } => format!(
            "plugin {source} was built with a compiler ABI this host cannot load (another \
             compiler or target?). Rebuild it with the host's toolchain against plugin-api {api} \
             and reload."
        ),
        LibraryError::RootModule { err, .. } => format!(
            "plugin {source} failed while its library was being initialized ({err}). This runs \
             before on_start: look at static initializers in the plugin."
        ),
        other => format!("could not load plugin {source}: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use abi_stable::{abi_stability::abi_checking::check_layout_compatibility, StableAbi};

    /// `load` casts a 0.2.0 plugin's root module to this one's type; it checks this at every
    /// such load too, but an edit that breaks it should fail here first.
    #[test]
    fn the_frozen_0_2_0_root_module_is_a_prefix_of_this_one() {
        check_layout_compatibility(
            <plugin_api_020::ffi::PluginModRef as StableAbi>::LAYOUT,
            <plugin_api::ffi::PluginModRef as StableAbi>::LAYOUT,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

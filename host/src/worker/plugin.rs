//! Loading a plugin library inside a worker, and turning abi_stable's load errors into advice.
//! Public for `bench/`, which measures the boundary with it.
//!
//! Loading goes through `lib_header_from_path(..).init_root_module()`, not
//! `RootModule::load_from_file`, because the latter caches one module per type per process.
//! A library is never unloaded (unloading Rust dylibs is unsound); the worker process is the unit
//! that is thrown away.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    path::Path,
};

use abi_stable::{
    library::{lib_header_from_path, LibraryError},
    std_types::{RResult, RStr, RString, RVec, Tuple2},
};
use plugin_api::{
    ffi::{FfiContext, FfiRequest, FfiResponse, PluginModRef},
    Level,
};

use crate::protocol::WorkerSpec;

/// A loaded and started plugin. `Copy`: it is a `'static` reference to the root module.
#[derive(Clone, Copy)]
pub struct Plugin {
    module: PluginModRef,
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
        let module = header
            .init_root_module::<PluginModRef>()
            .map_err(|e| explain(e, spec, Some(&declared)))?;
        let plugin = Plugin { module };
        loaded();
        match (module.start())(&context(spec)) {
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
        self.module.name().as_str()
    }

    /// The plugin crate's version (from its Cargo.toml).
    pub fn crate_version(&self) -> &'static str {
        self.module.version().as_str()
    }

    /// Whether the handler may block ([`plugin_api::Plugin::BLOCKING`]); plugins built before
    /// the field existed may block.
    pub fn blocking(&self) -> bool {
        self.module.blocking().unwrap_or(true)
    }

    /// Calls the plugin's handler; `Err` carries a panic message.
    pub fn handle(&self, req: &FfiRequest) -> Result<FfiResponse, String> {
        (self.module.handle())(req)
            .into_result()
            .map_err(String::from)
    }

    /// Tells the plugin the worker stops.
    pub fn stop(&self) {
        (self.module.stop())()
    }
}

/// What the host tells a plugin at its start.
pub(crate) fn context(spec: &WorkerSpec) -> FfiContext {
    FfiContext {
        service: spec.service.as_str().into(),
        worker_id: spec.slot as u32,
        plugin_version: spec.plugin_version.as_str().into(),
        config: spec
            .config
            .iter()
            .map(|(k, v)| Tuple2(RString::from(k.as_str()), RString::from(v.as_str())))
            .collect::<RVec<_>>(),
        config_toml: spec.config_toml.as_str().into(),
        log: plugin_log,
    }
}

/// Where the plugin's `plugin_api::info!` and friends end up: the worker's tracing output,
/// inside the worker's span, so each line carries service, pid and plugin version. The
/// plugin's panic hook logs through here too ("panicked at ..."): that line also goes to the
/// master at once, so that if an abort follows, the master can say why the worker died.
extern "C" fn plugin_log(level: u8, message: RStr<'_>) {
    // A panic must not unwind into the plugin's frames (that aborts); logging should not panic,
    // but this is a boundary.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if level == Level::Error as u8 && message.as_str().starts_with("panicked") {
            if let Some(link) = super::link::Link::global() {
                link.send(&crate::protocol::FromWorker::Panicked {
                    message: message.as_str().to_string(),
                });
            }
        }
        super::in_worker_span(|| match Level::from_u8(level) {
            Level::Error => tracing::error!(target: "plugin", "{message}"),
            Level::Warn => tracing::warn!(target: "plugin", "{message}"),
            Level::Info => tracing::info!(target: "plugin", "{message}"),
            Level::Debug => tracing::debug!(target: "plugin", "{message}"),
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
             cargo build) and reload."
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

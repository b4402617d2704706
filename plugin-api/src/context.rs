//! [`Context`]: what a plugin learns about where it runs. The host keeps the context alive for
//! the life of the worker, so a `Context` is `Copy` and may be kept in the plugin's state.

use abi_stable::{
    prefix_type::PrefixTypeTrait,
    std_types::{RResult, RSlice, RStr, RString, Tuple2},
};

use crate::ffi::{FfiContext, FfiContextRef, FfiFuture, FfiKvOp, FfiKvReply, HostApi};

/// Where the plugin runs: service, worker slot, version, and the `[service.config]` table.
#[derive(Clone, Copy)]
pub struct Context(FfiContextRef);

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("service", &self.service())
            .field("worker_id", &self.worker_id())
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context for unit tests of a plugin, with no configuration; log lines go to stderr.
    pub fn for_tests(service: &str) -> Context {
        Context::test_context(service, Vec::new())
    }

    /// A context for unit tests with this configuration, `[(key, value)]`.
    pub fn for_tests_with_config(service: &str, config: &[(&str, &str)]) -> Context {
        let config = config.iter().map(|(k, v)| (*k, *v)).collect();
        Context::test_context(service, config)
    }

    /// Adds a configuration value (for unit tests); returns a new context.
    pub fn with_config(self, key: &str, value: &str) -> Context {
        let mut config: Vec<(String, String)> = self
            .0
            .config()
            .iter()
            .map(|Tuple2(k, v)| (k.as_str().to_string(), v.as_str().to_string()))
            .collect();
        config.push((key.to_string(), value.to_string()));
        let pairs = config
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Context::test_context(self.service(), pairs)
    }

    fn test_context(service: &str, config: Vec<(&str, &str)>) -> Context {
        extern "C" fn to_stderr(level: u8, message: RStr<'_>) {
            eprintln!("{:?}: {message}", crate::Level::from_u8(level));
        }
        // Leaked: a test context lives for the test, as the host's lives for the worker.
        extern "C" fn to_stderr_for(level: u8, id: RStr<'_>, message: RStr<'_>) {
            eprintln!("{:?}: [{id}] {message}", crate::Level::from_u8(level));
        }
        extern "C" fn no_kv(_: FfiKvOp) -> FfiFuture<RResult<FfiKvReply, RString>> {
            let e = "the host's key/value store is there only when a worker runs the plugin";
            async_ffi::FutureExt::into_ffi(std::future::ready(RResult::RErr(e.into())))
        }
        let host = HostApi {
            log: to_stderr,
            log_for_request: to_stderr_for,
            kv: no_kv,
        }
        .leak_into_prefix();
        let leak = |s: &str| RStr::from_str(Box::leak(s.to_string().into_boxed_str()));
        let config: Vec<_> = config
            .into_iter()
            .map(|(k, v)| Tuple2(leak(k), leak(v)))
            .collect();
        Context(
            FfiContext {
                service: leak(service),
                worker_id: 0,
                plugin_version: RStr::from_str("test"),
                config: RSlice::from_slice(Box::leak(config.into_boxed_slice())),
                config_toml: RStr::from_str(""),
                max_body_bytes: 4 << 20,
                max_stream_bytes: u64::MAX,
                host,
            }
            .leak_into_prefix(),
        )
    }

    pub(crate) fn from_ffi(ctx: FfiContextRef) -> Context {
        Context(ctx)
    }

    /// The name of the service this worker serves.
    pub fn service(&self) -> &'static str {
        self.0.service().as_str()
    }

    /// The worker's slot within its service (0-based); a reload keeps slot numbers.
    pub fn worker_id(&self) -> u32 {
        self.0.worker_id()
    }

    /// The short content hash of the loaded plugin library, as `host status` shows it.
    pub fn plugin_version(&self) -> &'static str {
        self.0.plugin_version().as_str()
    }

    /// A top-level value of the service's `[service.config]` table; strings as they are,
    /// numbers and booleans as written in TOML, nested tables and arrays in TOML syntax.
    pub fn config(&self, key: &str) -> Option<&'static str> {
        self.0
            .config()
            .iter()
            .find(|Tuple2(k, _)| k.as_str() == key)
            .map(|Tuple2(_, v)| v.as_str())
    }

    /// The whole `[service.config]` table as TOML text, for plugins that parse it themselves.
    pub fn config_toml(&self) -> &'static str {
        self.0.config_toml().as_str()
    }

    /// The service's `max_body_bytes` and `max_stream_bytes`.
    pub(crate) fn limits(&self) -> (u64, u64) {
        (self.0.max_body_bytes(), self.0.max_stream_bytes())
    }
}

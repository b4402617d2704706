//! Plugins built against plugin-api 0.1: their root module, checked against the frozen 0.1
//! types (`compat/plugin-api-0.1`), and the conversions between this host's requests and
//! responses and theirs. A 0.1 plugin has a sync handler only, gets the whole body, and has no
//! runtime, drain notice or background tasks.

use abi_stable::{
    library::{LibHeader, LibraryError},
    std_types::{RResult, RStr, RString, RVec, Tuple2},
};
use plugin_api::ffi::{FfiBody, FfiHeader, FfiRequestRef, FfiResponse};
use plugin_api_01::ffi as v01;

use crate::protocol::WorkerSpec;

/// A started 0.1 plugin: its root module.
#[derive(Clone, Copy)]
pub struct V01(v01::PluginModRef);

impl V01 {
    pub fn load(header: &'static LibHeader) -> Result<V01, LibraryError> {
        header.init_root_module::<v01::PluginModRef>().map(V01)
    }

    /// Calls the plugin's on_start with a 0.1 context, which lives for the worker's life.
    pub fn start(
        &self,
        spec: &WorkerSpec,
        log: extern "C" fn(u8, RStr<'_>),
    ) -> RResult<(), RString> {
        let ctx: &'static v01::FfiContext = Box::leak(Box::new(v01::FfiContext {
            service: spec.service.as_str().into(),
            worker_id: spec.slot as u32,
            plugin_version: spec.plugin_version.as_str().into(),
            config: spec
                .config
                .iter()
                .map(|(k, v)| Tuple2(RString::from(k.as_str()), RString::from(v.as_str())))
                .collect::<RVec<_>>(),
            config_toml: spec.config_toml.as_str().into(),
            log,
        }));
        (self.0.start())(ctx)
    }

    pub fn name(&self) -> &'static str {
        self.0.name().as_str()
    }

    pub fn crate_version(&self) -> &'static str {
        self.0.version().as_str()
    }

    /// `BLOCKING`, appended in 0.1 after its prefix: older 0.1 plugins may block.
    pub fn blocking(&self) -> bool {
        self.0.blocking().unwrap_or(true)
    }

    /// Calls the handler with the request in 0.1's shape (the host read the whole body).
    pub fn handle(&self, req: &FfiRequestRef<'_>, body: FfiBody) -> Result<FfiResponse, String> {
        let request = v01::FfiRequest {
            method: req.method.into(),
            path: req.path.into(),
            query: req.query.into(),
            headers: req
                .headers
                .iter()
                .map(|h| v01::FfiHeader {
                    name: h.name.into(),
                    value: h.value.to_vec().into(),
                })
                .collect(),
            body: body.bytes,
        };
        let response = (self.0.handle())(&request)
            .into_result()
            .map_err(String::from)?;
        Ok(FfiResponse {
            status: response.status,
            headers: response
                .headers
                .into_iter()
                .map(|h| FfiHeader {
                    name: h.name,
                    value: h.value,
                })
                .collect(),
            body: FfiBody::full(response.body),
        })
    }

    pub fn stop(&self) {
        (self.0.stop())()
    }
}

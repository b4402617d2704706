//! The config file (and the flags) as written: what serde reads, before any checking. Unknown
//! keys are errors, so a typo never silently falls back to a default.

use std::{path::PathBuf, time::Duration};

use bytesize::ByteSize;
use serde::Deserialize;

/// The config file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Every service's workers run as this user (a root master only), unless the service says
    /// otherwise.
    pub user: Option<String>,
    pub group: Option<String>,
    /// Load plugins from paths other users could write (a warning at every load).
    pub allow_insecure_plugin_path: Option<bool>,
    /// How long a new master has, in `host upgrade`, to report every service ready.
    #[serde(default, with = "humantime_serde")]
    pub upgrade_timeout: Option<Duration>,
    /// `[admin]`: the admin listener (page, API, health, metrics).
    pub admin: Option<RawAdmin>,
    #[serde(default, rename = "service")]
    pub services: Vec<RawService>,
}

/// The `[admin]` table as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: String,
    pub token_file: PathBuf,
    pub tls: Option<RawTls>,
    /// `POST /api/upgrade?exe=PATH` runs a program: off unless said so.
    pub allow_upgrade_exe: Option<bool>,
}

/// `access_log = { path = "PATH", format = "combined" | "json" }` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccessLog {
    pub path: PathBuf,
    pub format: Option<String>,
}

/// One `[[service]]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub name: String,
    pub listen: Vec<String>,
    pub plugin: PathBuf,
    pub workers: Option<usize>,
    pub reloadable: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub ready_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub idle_grace: Option<Duration>,
    pub max_body_bytes: Option<ByteSize>,
    pub max_stream_bytes: Option<ByteSize>,
    pub keep_versions: Option<usize>,
    pub watch: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub watch_debounce: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub canary_probation: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub probation: Option<Duration>,
    pub crash_loop_crashes: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub crash_loop_window: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub liveness_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub handler_timeout: Option<Duration>,
    pub max_requests: Option<u64>,
    pub max_requests_jitter: Option<u64>,
    pub max_rss: Option<ByteSize>,
    #[serde(default, with = "humantime_serde")]
    pub header_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub body_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub keepalive_timeout: Option<Duration>,
    pub max_connections: Option<usize>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub allow_insecure_plugin_path: Option<bool>,
    /// `tls = { cert = "PATH", key = "PATH" }`: HTTPS (and HTTP/2 by ALPN) on every listener.
    pub tls: Option<RawTls>,
    /// Answer `/__host/...` on the service's listeners (default: only without `[admin]`).
    pub host_routes: Option<bool>,
    /// Share new connections evenly among the workers (default: true).
    pub balance_accepts: Option<bool>,
    pub access_log: Option<RawAccessLog>,
    /// `"http"` (the default) or `"websocket"`.
    pub kind: Option<String>,
    /// A websocket service's connection-holding processes.
    pub gateways: Option<usize>,
    /// A websocket service's largest message.
    pub max_message_bytes: Option<ByteSize>,
    pub config: Option<toml::Table>,
}

/// A `tls = { cert, key }` table as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

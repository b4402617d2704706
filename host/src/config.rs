//! Configuration: the raw TOML file or flags, checked into [`Config`].
//!
//! Two stages, as ripgrep does with its flags: [`RawConfig`] is what serde reads, [`Config`] is
//! what the master uses, and [`Config::check`] turns one into the other with errors that name the
//! bad field. Relative plugin paths in a file are relative to the file, not to the cwd, so a
//! config works wherever `host start` runs.

use std::{
    collections::HashSet,
    fmt,
    net::{SocketAddr, ToSocketAddrs},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// Defaults, also quoted in the README.
pub const DEFAULT_WORKERS: usize = 2;
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_GRACE: Duration = Duration::from_secs(5);
pub const DEFAULT_MAX_BODY: usize = 4 * 1024 * 1024;
pub const DEFAULT_KEEP_VERSIONS: usize = 5;
pub const DEFAULT_WATCH_DEBOUNCE: Duration = Duration::from_millis(100);
pub const DEFAULT_CANARY_PROBATION: Duration = Duration::from_secs(1);
pub const DEFAULT_PROBATION: Duration = Duration::from_secs(30);
pub const DEFAULT_CRASH_LOOP_CRASHES: u32 = 3;
pub const DEFAULT_CRASH_LOOP_WINDOW: Duration = Duration::from_secs(60);
pub const DEFAULT_LIVENESS_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(60);

/// The config file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default, rename = "service")]
    pub services: Vec<RawService>,
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
    pub max_body_bytes: Option<usize>,
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
    pub max_rss: Option<bytesize::ByteSize>,
    pub config: Option<toml::Table>,
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub services: Vec<ServiceConfig>,
}

/// One checked service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub name: String,
    pub listen: Vec<SocketAddr>,
    /// Absolute path of the library cargo builds (never loaded directly, see [`crate::shadow`]).
    pub plugin: PathBuf,
    pub workers: usize,
    /// `false`: reload leaves this service's workers alone (Workerman's `reloadable = false`).
    pub reloadable: bool,
    /// How long a draining worker may take to finish its requests before it is killed.
    pub drain_timeout: Duration,
    /// How long a new worker may take to load its plugin and report READY.
    pub ready_timeout: Duration,
    /// How long a draining worker keeps an idle keep-alive connection open (see `worker::http`).
    pub idle_grace: Duration,
    pub max_body_bytes: usize,
    /// How many versions the shadow store keeps for rollback, the live one included.
    pub keep_versions: usize,
    /// Reload by itself when the plugin file is rebuilt (`master::watcher`).
    pub watch: bool,
    /// How long the plugin file must stay quiet before the watcher looks at it.
    pub watch_debounce: Duration,
    /// How long the first new worker of a reload serves alone before the others are replaced.
    pub canary_probation: Duration,
    /// How long a new version stays on trial after its last worker was replaced: a crash or a
    /// liveness failure in this window rolls the service back (`master::rollout`).
    pub probation: Duration,
    /// `crash_loop_crashes` crashes within `crash_loop_window` are a crash loop.
    pub crash_loop_crashes: u32,
    pub crash_loop_window: Duration,
    /// A worker whose heartbeat is older than this is killed and replaced.
    pub liveness_timeout: Duration,
    /// A handler call longer than this gets its client a 503, and its worker is replaced.
    pub handler_timeout: Duration,
    /// A worker that served this many requests (plus up to `max_requests_jitter`) is replaced;
    /// 0 is off.
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    /// A worker whose resident memory exceeds this many bytes is replaced; 0 is off.
    pub max_rss: u64,
    /// The `[service.config]` table handed to the plugin.
    pub plugin_config: toml::Table,
}

/// What is wrong with a configuration, in words that point at the field.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and checks a config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!(
                "could not read config file {}: {e}",
                path.display()
            ))
        })?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| {
            ConfigError(format!("config file {} is not valid: {e}", path.display()))
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::check(raw, base).map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
    }

    /// The one-service configuration that `--plugin --listen --workers` describe.
    pub fn from_flags(
        name: String,
        plugin: PathBuf,
        listen: Vec<String>,
        workers: usize,
    ) -> Result<Config, ConfigError> {
        let raw = RawService {
            name,
            listen,
            plugin,
            workers: Some(workers),
            ..RawService::default()
        };
        Config::check(
            RawConfig {
                services: vec![raw],
            },
            Path::new("."),
        )
    }

    /// Checks a raw config; `base` is the directory relative plugin paths start from.
    pub fn check(raw: RawConfig, base: &Path) -> Result<Config, ConfigError> {
        if raw.services.is_empty() {
            return Err(ConfigError(
                "no service is configured: add a [[service]] table with name, listen and plugin"
                    .into(),
            ));
        }
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        let mut services = Vec::new();
        for s in raw.services {
            let at = format!("service {:?}", s.name);
            if s.name.is_empty()
                || !s
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ConfigError(format!(
                    "{at}: name must be non-empty and use only letters, digits, '-' and '_'"
                )));
            }
            if !names.insert(s.name.clone()) {
                return Err(ConfigError(format!("{at}: two services have this name")));
            }
            if s.listen.is_empty() {
                return Err(ConfigError(format!(
                    "{at}: listen is empty; give at least one address such as \"127.0.0.1:8080\""
                )));
            }
            let mut listen = Vec::new();
            for a in &s.listen {
                let addr =
                    resolve(a).map_err(|e| ConfigError(format!("{at}: listen {a:?}: {e}")))?;
                if addr.port() != 0 && !addrs.insert(addr) {
                    return Err(ConfigError(format!(
                        "{at}: listen {a:?} is used twice; every address may be listed once"
                    )));
                }
                listen.push(addr);
            }
            let workers = s.workers.unwrap_or(DEFAULT_WORKERS);
            if !(1..=256).contains(&workers) {
                return Err(ConfigError(format!(
                    "{at}: workers must be from 1 to 256, not {workers}"
                )));
            }
            let plugin = if s.plugin.is_absolute() {
                s.plugin
            } else {
                base.join(s.plugin)
            };
            let plugin = std::path::absolute(&plugin).unwrap_or(plugin);
            let max_body_bytes = s.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY);
            if max_body_bytes == 0 {
                return Err(ConfigError(format!(
                    "{at}: max_body_bytes must be more than 0"
                )));
            }
            let positive = |d: Option<Duration>, default: Duration, field: &str| match d {
                Some(d) if d.is_zero() => {
                    Err(ConfigError(format!("{at}: {field} must be longer than 0")))
                }
                Some(d) => Ok(d),
                None => Ok(default),
            };
            let crash_loop_crashes = s.crash_loop_crashes.unwrap_or(DEFAULT_CRASH_LOOP_CRASHES);
            if crash_loop_crashes == 0 {
                return Err(ConfigError(format!(
                    "{at}: crash_loop_crashes must be at least 1"
                )));
            }
            let max_requests = s.max_requests.unwrap_or(0);
            let keep_versions = s.keep_versions.unwrap_or(DEFAULT_KEEP_VERSIONS);
            if !(1..=100).contains(&keep_versions) {
                return Err(ConfigError(format!(
                    "{at}: keep_versions must be from 1 to 100, not {keep_versions}"
                )));
            }
            services.push(ServiceConfig {
                drain_timeout: positive(s.drain_timeout, DEFAULT_DRAIN_TIMEOUT, "drain_timeout")?,
                ready_timeout: positive(s.ready_timeout, DEFAULT_READY_TIMEOUT, "ready_timeout")?,
                idle_grace: s.idle_grace.unwrap_or(DEFAULT_IDLE_GRACE),
                name: s.name,
                listen,
                plugin,
                workers,
                reloadable: s.reloadable.unwrap_or(true),
                max_body_bytes,
                keep_versions,
                watch: s.watch.unwrap_or(false),
                watch_debounce: s.watch_debounce.unwrap_or(DEFAULT_WATCH_DEBOUNCE),
                canary_probation: s.canary_probation.unwrap_or(DEFAULT_CANARY_PROBATION),
                probation: s.probation.unwrap_or(DEFAULT_PROBATION),
                crash_loop_crashes,
                crash_loop_window: positive(
                    s.crash_loop_window,
                    DEFAULT_CRASH_LOOP_WINDOW,
                    "crash_loop_window",
                )?,
                liveness_timeout: positive(
                    s.liveness_timeout,
                    DEFAULT_LIVENESS_TIMEOUT,
                    "liveness_timeout",
                )?,
                handler_timeout: positive(
                    s.handler_timeout,
                    DEFAULT_HANDLER_TIMEOUT,
                    "handler_timeout",
                )?,
                max_requests,
                // As gunicorn's max_requests_jitter, so that workers started together are not
                // all recycled together; a tenth of the limit unless set.
                max_requests_jitter: s.max_requests_jitter.unwrap_or(max_requests / 10),
                max_rss: s.max_rss.map_or(0, |b| b.as_u64()),
                plugin_config: s.config.unwrap_or_default(),
            });
        }
        Ok(Config { services })
    }
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    let mut found = addr.to_socket_addrs().map_err(|e| {
        format!(
            "not an address with a port ({e}); write it as \"127.0.0.1:8080\" or \"[::1]:8080\""
        )
    })?;
    found
        .next()
        .ok_or_else(|| "the name resolves to no address".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::check(
            toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?,
            Path::new("/etc"),
        )
    }

    #[test]
    fn full_service() {
        let c = parse(
            r#"
            [[service]]
            name = "api"
            listen = ["127.0.0.1:8080", "[::1]:8080"]
            plugin = "plugins/libapi.so"
            workers = 4
            reloadable = false
            drain_timeout = "5s"
            ready_timeout = "2s"
            [service.config]
            greeting = "hi"
            "#,
        )
        .unwrap();
        let s = &c.services[0];
        assert_eq!(s.listen.len(), 2);
        assert_eq!(s.plugin, Path::new("/etc/plugins/libapi.so"));
        assert_eq!(s.workers, 4);
        assert!(!s.reloadable);
        assert_eq!(s.drain_timeout, Duration::from_secs(5));
        assert_eq!(s.plugin_config["greeting"].as_str(), Some("hi"));
    }

    #[test]
    fn errors_name_the_field() {
        let no_port = parse("[[service]]\nname='a'\nlisten=['127.0.0.1']\nplugin='x.so'");
        assert!(no_port.unwrap_err().0.contains("listen \"127.0.0.1\""));
        let zero = parse("[[service]]\nname='a'\nlisten=['127.0.0.1:1']\nplugin='x.so'\nworkers=0");
        assert!(zero.unwrap_err().0.contains("workers must be"));
        let dup = parse(
            "[[service]]\nname='a'\nlisten=['127.0.0.1:1']\nplugin='x'\n\
             [[service]]\nname='a'\nlisten=['127.0.0.1:2']\nplugin='x'",
        );
        assert!(dup.unwrap_err().0.contains("two services"));
        assert!(parse("").unwrap_err().0.contains("no service"));
    }

    #[test]
    fn unknown_field_is_refused() {
        let e: Result<RawConfig, _> =
            toml::from_str("[[service]]\nname='a'\nlisten=[]\nplugin='x'\nworker=2");
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("unknown field `worker`"));
    }
}

//! Configuration: the raw TOML file or flags, checked into [`Config`].
//!
//! Two stages, as ripgrep does with its flags: [`RawConfig`] (`raw.rs`) is what serde reads,
//! [`Config`] is what the master uses, and [`Config::check`] (`check.rs`) turns one into the
//! other with errors that name the bad field. Relative plugin paths in a file are relative to the
//! file, not to the cwd, so a config works wherever `host start` runs.

mod check;
mod raw;

pub use raw::{RawAccessLog, RawAdmin, RawConfig, RawService, RawTls};

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

/// Defaults, also quoted in the README.
pub const DEFAULT_WORKERS: usize = 2;
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_GRACE: Duration = Duration::from_secs(5);
pub const DEFAULT_MAX_BODY: usize = 4 * 1024 * 1024;
/// A websocket service's largest message by default, and the largest it may be set to.
pub const DEFAULT_MAX_MESSAGE: usize = 1024 * 1024;
pub const MAX_MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// The default cap on a request body read as a stream by an async plugin: 10 GiB.
pub const DEFAULT_MAX_STREAM: u64 = 10 * 1024 * 1024 * 1024;
pub const DEFAULT_KEEP_VERSIONS: usize = 5;
pub const DEFAULT_WATCH_DEBOUNCE: Duration = Duration::from_millis(100);
pub const DEFAULT_CANARY_PROBATION: Duration = Duration::from_secs(1);
pub const DEFAULT_PROBATION: Duration = Duration::from_secs(30);
pub const DEFAULT_CRASH_LOOP_CRASHES: u32 = 3;
pub const DEFAULT_CRASH_LOOP_WINDOW: Duration = Duration::from_secs(60);
pub const DEFAULT_LIVENESS_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(75);
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

/// The checked configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub services: Vec<ServiceConfig>,
    /// How long a new master has, in `host upgrade`, to report every service ready.
    pub upgrade_timeout: Duration,
    /// The admin listener, if configured.
    pub admin: Option<AdminConfig>,
}

/// The checked `[admin]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token_file: PathBuf,
    pub tls: Option<Tls>,
    pub allow_upgrade_exe: bool,
}

/// Where and how a service's workers log each request.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLog {
    pub path: PathBuf,
    pub format: AccessLogFormat,
}

impl AccessLog {
    /// Opens the file for a worker (the master does: the worker may run as a user who cannot).
    /// `/dev/stdout` and `/dev/stderr` are the master's own (a container's log); any other path
    /// is opened for appending, never through a symlink.
    pub fn open(&self) -> Result<std::fs::File, String> {
        use std::os::fd::AsFd;
        let own = |fd: std::os::fd::BorrowedFd<'_>| {
            fd.try_clone_to_owned()
                .map(std::fs::File::from)
                .map_err(|e| format!("could not pass {} to a worker: {e}", self.path.display()))
        };
        match self.path.to_str() {
            Some("/dev/stdout") => own(std::io::stdout().as_fd()),
            Some("/dev/stderr") => own(std::io::stderr().as_fd()),
            _ => crate::daemon::open_log(&self.path),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AccessLogFormat {
    /// Apache's combined format, then duration, worker pid and plugin version.
    Combined,
    /// One JSON object a line.
    Json,
}

/// What a service serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    /// HTTP: workers accept on the listeners and call the plugin per request.
    Http,
    /// WebSocket: gateway processes (host code only) hold the connections; business workers
    /// run the plugin on their events (`crate::gateway`).
    WebSocket {
        /// Gateway processes.
        gateways: usize,
        /// The largest message a client may send, or be sent.
        max_message_bytes: usize,
    },
}

/// One checked service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub kind: Kind,
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
    /// A request body that an async plugin reads as a stream is cut past this (413).
    pub max_stream_bytes: u64,
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
    /// How long a client may take to send a request's headers.
    pub header_timeout: Duration,
    /// How long a client may pause between two parts of a request body (408 after).
    pub body_timeout: Duration,
    /// How long an idle keep-alive connection stays open.
    pub keepalive_timeout: Duration,
    /// Connections one worker holds at most; beyond, it stops accepting until one closes.
    pub max_connections: usize,
    /// Whom the workers run as (a root master drops to this user before loading the plugin).
    pub run_as: Option<RunAs>,
    /// Load the plugin even from a path other users could write (warned at every load).
    pub allow_insecure_plugin_path: bool,
    /// HTTPS on every listener of the service, with this certificate and key.
    pub tls: Option<Tls>,
    /// Answer `/__host/...` (info, worker, readyz) on the service's listeners.
    pub host_routes: bool,
    /// A worker holding more than its share of the service's connections lets the others
    /// accept first (`balance`).
    pub balance_accepts: bool,
    pub access_log: Option<AccessLog>,
    /// The `[service.config]` table handed to the plugin.
    pub plugin_config: toml::Table,
}

/// Where the master's configuration comes from, so that a reload can read it again.
#[derive(Debug, Clone, Default)]
pub struct Source {
    /// The config file; `None` for the flags form (a reload then re-reads only the plugins).
    pub file: Option<PathBuf>,
    /// Flags applied over the file: `--user` (and `--group`), `--allow-insecure-plugin-path`,
    /// `--watch`.
    pub user: Option<(String, Option<String>)>,
    pub allow_insecure_plugin_path: bool,
    pub watch: bool,
    /// `--admin ADDR --admin-token-file PATH`: the admin listener, over the file's `[admin]`
    /// (its other keys kept). In Kubernetes the address comes from the pod (`$(POD_IP):9000`).
    pub admin: Option<(String, PathBuf)>,
}

impl Source {
    /// Reads and checks the config file, with the flags applied over it.
    pub fn load(&self) -> Result<Config, String> {
        let Some(path) = &self.file else {
            return Err("the master was started from flags, with no config file to read".into());
        };
        let mut config = Config::from_file(path).map_err(|e| e.to_string())?;
        if let Some((user, group)) = &self.user {
            let one =
                Config::run_as(Some(user), group.as_deref()).map_err(|e| format!("--user: {e}"))?;
            for svc in &mut config.services {
                svc.run_as = one.clone();
            }
        }
        for svc in &mut config.services {
            svc.allow_insecure_plugin_path |= self.allow_insecure_plugin_path;
            svc.watch |= self.watch;
        }
        if let Some((listen, token_file)) = &self.admin {
            let listen = check::resolve(listen).map_err(|e| format!("--admin {listen:?}: {e}"))?;
            let admin = config.admin.get_or_insert_with(|| AdminConfig {
                listen,
                token_file: token_file.clone(),
                tls: None,
                allow_upgrade_exe: false,
            });
            admin.listen = listen;
            admin.token_file = token_file.clone();
        }
        Ok(config)
    }
}

/// A user (and group) that workers run as, looked up when the config is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
}

/// A service's certificate and key: the paths, and what the files held when the master last
/// read them (at start and on every reload, so a renewed certificate rolls out like a new
/// build). The workers get the contents: they may run as a user who cannot read the key file.
#[derive(Clone, PartialEq)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_pem: Arc<String>,
    pub key_pem: Arc<String>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key itself, not even in a debug line.
        f.debug_struct("Tls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the certificate and key files.
    pub fn read(cert: PathBuf, key: PathBuf) -> Result<Tls, String> {
        let read = |path: &Path, what: &str| {
            std::fs::read_to_string(path)
                .map_err(|e| format!("could not read the TLS {what} file {}: {e}", path.display()))
        };
        Ok(Tls {
            cert_pem: Arc::new(read(&cert, "certificate")?),
            key_pem: Arc::new(read(&key, "key")?),
            cert,
            key,
        })
    }
}

impl ServiceConfig {
    /// Reads the certificate and key files again (a flags-started master's reload, where the
    /// config is not read again but a renewed certificate must still roll out).
    pub fn reread_tls(&mut self) -> Result<(), String> {
        if let Some(tls) = &self.tls {
            self.tls = Some(Tls::read(tls.cert.clone(), tls.key.clone())?);
        }
        Ok(())
    }
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

    /// The one-service configuration that `--plugin --listen --workers` describe (in
    /// `service`), with the file-wide settings the flags give (`globals`; its services ignored).
    pub fn from_flags(service: RawService, globals: RawConfig) -> Result<Config, ConfigError> {
        Config::check(
            RawConfig {
                services: vec![service],
                ..globals
            },
            Path::new("."),
        )
    }
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
    fn the_example_configs_use_known_keys() {
        for text in [
            include_str!("../../../examples/host.toml"),
            include_str!("../../../examples/systemd/host.toml"),
        ] {
            let raw: Result<RawConfig, _> = toml::from_str(text);
            assert!(raw.is_ok(), "{:?}", raw.err());
        }
    }

    #[test]
    fn balance_accepts_is_on_by_default_and_for_http_services_only() {
        let base = "[[service]]\nname='a'\nlisten=['127.0.0.1:1']\nplugin='x'\n";
        assert!(parse(base).unwrap().services[0].balance_accepts);
        let off = parse(&format!("{base}balance_accepts=false")).unwrap();
        assert!(!off.services[0].balance_accepts);
        let ws = parse(&format!("{base}kind='websocket'\nbalance_accepts=true"))
            .unwrap_err()
            .0;
        assert!(ws.contains("balance_accepts is for HTTP services"), "{ws}");
    }

    #[test]
    fn limits_timed_on_the_coarse_clock_are_at_least_100ms() {
        let base = "[[service]]\nname='a'\nlisten=['127.0.0.1:1']\nplugin='x'\n";
        for key in [
            "handler_timeout",
            "header_timeout",
            "keepalive_timeout",
            "idle_grace",
        ] {
            let short = parse(&format!("{base}{key}='50ms'")).unwrap_err().0;
            assert!(
                short.contains(key) && short.contains("100ms or more"),
                "{short}"
            );
            assert!(parse(&format!("{base}{key}='100ms'")).is_ok(), "{key}");
        }
    }

    #[test]
    fn sizes_read_with_units() {
        let c = parse(
            "[[service]]\nname='a'\nlisten=['127.0.0.1:1']\nplugin='x'\nmax_body_bytes='4MiB'\n\
             max_rss='512MiB'",
        )
        .unwrap();
        assert_eq!(c.services[0].max_body_bytes, 4 << 20);
        assert_eq!(c.services[0].max_rss, 512 << 20);
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

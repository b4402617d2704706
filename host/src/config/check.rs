//! [`Config::check`]: a raw config (file or flags) into the checked [`Config`], with errors that
//! name the service and the field.

use std::{
    collections::HashSet,
    net::{SocketAddr, ToSocketAddrs},
    path::Path,
    time::Duration,
};

use nix::unistd::{Group, User};

use super::*;

/// The shortest limit that is timed on the coarse clock (see `coarse` in `Config::check`).
const MIN_COARSE_TIMEOUT: Duration = Duration::from_millis(100);

impl Config {
    /// Checks a raw config; `base` is the directory relative plugin paths start from.
    pub fn check(raw: RawConfig, base: &Path) -> Result<Config, ConfigError> {
        if raw.services.is_empty() {
            return Err(ConfigError(
                "no service is configured: add a [[service]] table with name, listen and plugin"
                    .into(),
            ));
        }
        let global_run_as = run_as(raw.user.as_deref(), raw.group.as_deref())
            .map_err(|e| ConfigError(format!("user: {e}")))?;
        let relative = |p: &Path| {
            let p = if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            };
            std::path::absolute(&p).unwrap_or(p)
        };
        let admin = match &raw.admin {
            None => None,
            Some(a) => Some(AdminConfig {
                listen: resolve(&a.listen)
                    .map_err(|e| ConfigError(format!("[admin]: listen {:?}: {e}", a.listen)))?,
                token_file: relative(&a.token_file),
                tls: match &a.tls {
                    None => None,
                    Some(t) => Some(
                        Tls::read(relative(&t.cert), relative(&t.key))
                            .map_err(|e| ConfigError(format!("[admin]: tls: {e}")))?,
                    ),
                },
                allow_upgrade_exe: a.allow_upgrade_exe.unwrap_or(false),
            }),
        };
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
            let plugin = relative(&s.plugin);
            let max_body_bytes = s
                .max_body_bytes
                .map_or(DEFAULT_MAX_BODY, |b| b.as_u64() as usize);
            if max_body_bytes == 0 {
                return Err(ConfigError(format!(
                    "{at}: max_body_bytes must be more than 0"
                )));
            }
            let max_stream_bytes = s
                .max_stream_bytes
                .map_or(DEFAULT_MAX_STREAM, |b| b.as_u64());
            if max_stream_bytes == 0 {
                return Err(ConfigError(format!(
                    "{at}: max_stream_bytes must be more than 0"
                )));
            }
            let positive = |d: Option<Duration>, default: Duration, field: &str| match d {
                Some(d) if d.is_zero() => {
                    Err(ConfigError(format!("{at}: {field} must be longer than 0")))
                }
                Some(d) => Ok(d),
                None => Ok(default),
            };
            // Timed per request on the coarse clock (`protocol::coarse_ns`, one kernel tick,
            // up to 10 ms, behind): a shorter limit would cut requests by the clock's error.
            let coarse = |d: Option<Duration>, default: Duration, field: &str| {
                let d = positive(d, default, field)?;
                if d < MIN_COARSE_TIMEOUT {
                    return Err(ConfigError(format!(
                        "{at}: {field} is {}, shorter than the {} the host can time it by \
                         (per request it reads a clock that is up to 10 ms behind). Set it to \
                         {} or more.",
                        humantime::format_duration(d),
                        humantime::format_duration(MIN_COARSE_TIMEOUT),
                        humantime::format_duration(MIN_COARSE_TIMEOUT)
                    )));
                }
                Ok(d)
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
            let max_connections = s.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
            if max_connections == 0 {
                return Err(ConfigError(format!(
                    "{at}: max_connections must be at least 1"
                )));
            }
            let run_as = match (&s.user, &s.group) {
                (None, None) => global_run_as.clone(),
                (user, group) => run_as(
                    user.as_deref().or(raw.user.as_deref()),
                    group.as_deref().or(raw.group.as_deref()),
                )
                .map_err(|e| ConfigError(format!("{at}: user: {e}")))?,
            };
            let access_log = match &s.access_log {
                None => None,
                Some(raw) => Some(AccessLog {
                    path: relative(&raw.path),
                    format: match raw.format.as_deref() {
                        None | Some("combined") => AccessLogFormat::Combined,
                        Some("json") => AccessLogFormat::Json,
                        Some(other) => {
                            return Err(ConfigError(format!(
                                "{at}: access_log: format {other:?} is not one of \"combined\" \
                                 or \"json\""
                            )))
                        }
                    },
                }),
            };
            let tls = match &s.tls {
                None => None,
                Some(raw) => Some(
                    Tls::read(relative(&raw.cert), relative(&raw.key))
                        .map_err(|e| ConfigError(format!("{at}: tls: {e}")))?,
                ),
            };
            let kind = match s.kind.as_deref() {
                None | Some("http") => {
                    if s.gateways.is_some() || s.max_message_bytes.is_some() {
                        return Err(ConfigError(format!(
                            "{at}: gateways and max_message_bytes are for kind = \"websocket\""
                        )));
                    }
                    Kind::Http
                }
                Some("websocket") => {
                    let gateways = s.gateways.unwrap_or(1);
                    if !(1..=64).contains(&gateways) {
                        return Err(ConfigError(format!(
                            "{at}: gateways must be from 1 to 64, not {gateways}"
                        )));
                    }
                    let max_message_bytes = s
                        .max_message_bytes
                        .map_or(DEFAULT_MAX_MESSAGE, |b| b.as_u64() as usize);
                    if !(1..=MAX_MAX_MESSAGE).contains(&max_message_bytes) {
                        return Err(ConfigError(format!(
                            "{at}: max_message_bytes must be from 1 byte to 64MiB"
                        )));
                    }
                    if s.access_log.is_some() {
                        return Err(ConfigError(format!(
                            "{at}: access_log is for HTTP services (a websocket service has no \
                             requests to log)"
                        )));
                    }
                    if s.balance_accepts.is_some() {
                        return Err(ConfigError(format!(
                            "{at}: balance_accepts is for HTTP services (a websocket service's \
                             connections are held by its gateways, which take them as they come)"
                        )));
                    }
                    Kind::WebSocket {
                        gateways,
                        max_message_bytes,
                    }
                }
                Some(other) => {
                    return Err(ConfigError(format!(
                        "{at}: kind {other:?} is not one of \"http\" or \"websocket\""
                    )))
                }
            };
            services.push(ServiceConfig {
                kind,
                drain_timeout: positive(s.drain_timeout, DEFAULT_DRAIN_TIMEOUT, "drain_timeout")?,
                ready_timeout: positive(s.ready_timeout, DEFAULT_READY_TIMEOUT, "ready_timeout")?,
                idle_grace: coarse(s.idle_grace, DEFAULT_IDLE_GRACE, "idle_grace")?,
                name: s.name,
                listen,
                plugin,
                workers,
                reloadable: s.reloadable.unwrap_or(true),
                max_body_bytes,
                max_stream_bytes,
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
                handler_timeout: coarse(
                    s.handler_timeout,
                    DEFAULT_HANDLER_TIMEOUT,
                    "handler_timeout",
                )?,
                max_requests,
                // As gunicorn's max_requests_jitter, so that workers started together are not
                // all recycled together; a tenth of the limit unless set.
                max_requests_jitter: s.max_requests_jitter.unwrap_or(max_requests / 10),
                max_rss: s.max_rss.map_or(0, |b| b.as_u64()),
                header_timeout: coarse(s.header_timeout, DEFAULT_HEADER_TIMEOUT, "header_timeout")?,
                body_timeout: positive(s.body_timeout, DEFAULT_BODY_TIMEOUT, "body_timeout")?,
                keepalive_timeout: coarse(
                    s.keepalive_timeout,
                    DEFAULT_KEEPALIVE_TIMEOUT,
                    "keepalive_timeout",
                )?,
                max_connections,
                run_as,
                allow_insecure_plugin_path: s
                    .allow_insecure_plugin_path
                    .or(raw.allow_insecure_plugin_path)
                    .unwrap_or(false),
                tls,
                // These routes tell anyone pids and versions: off by default once the admin
                // listener serves that to operators.
                host_routes: s.host_routes.unwrap_or(raw.admin.is_none()),
                balance_accepts: s.balance_accepts.unwrap_or(true),
                access_log,
                plugin_config: s.config.unwrap_or_default(),
            });
        }
        let upgrade_timeout = match raw.upgrade_timeout {
            Some(d) if d.is_zero() => {
                return Err(ConfigError("upgrade_timeout must be longer than 0".into()))
            }
            d => d.unwrap_or(DEFAULT_UPGRADE_TIMEOUT),
        };
        Ok(Config {
            services,
            upgrade_timeout,
            admin,
        })
    }
}

impl Config {
    /// Looks up the user (and group) workers run as; `group` defaults to the user's own.
    pub fn run_as(user: Option<&str>, group: Option<&str>) -> Result<Option<RunAs>, String> {
        run_as(user, group)
    }
}

fn run_as(user: Option<&str>, group: Option<&str>) -> Result<Option<RunAs>, String> {
    let Some(name) = user else {
        return match group {
            Some(_) => Err("group is set but user is not; set user too".into()),
            None => Ok(None),
        };
    };
    let found = User::from_name(name)
        .map_err(|e| format!("could not look up user {name:?}: {e}"))?
        .ok_or_else(|| {
            format!(
                "there is no user {name:?} on this machine; create it (useradd --system \
                 {name}) or name an existing one, such as \"nobody\""
            )
        })?;
    let gid = match group {
        None => found.gid.as_raw(),
        Some(g) => Group::from_name(g)
            .map_err(|e| format!("could not look up group {g:?}: {e}"))?
            .ok_or_else(|| format!("there is no group {g:?} on this machine"))?
            .gid
            .as_raw(),
    };
    if found.uid.is_root() {
        return Err(format!(
            "user {name:?} is root; workers run as a user so that plugin code does not run as \
             root. Name an unprivileged user, or leave user out."
        ));
    }
    Ok(Some(RunAs {
        user: name.to_string(),
        uid: found.uid.as_raw(),
        gid,
    }))
}

pub(super) fn resolve(addr: &str) -> Result<SocketAddr, String> {
    let mut found = addr.to_socket_addrs().map_err(|e| {
        format!(
            "not an address with a port ({e}); write it as \"127.0.0.1:8080\" or \"[::1]:8080\""
        )
    })?;
    found
        .next()
        .ok_or_else(|| "the name resolves to no address".to_string())
}

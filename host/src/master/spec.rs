//! What a worker is started with: the start message ([`WorkerSpec`]) built from its service's
//! configuration, the plugin version and the slot, and the timings derived from them (the
//! heartbeat interval, the request limit with its jitter). The master's pool, the gateways and
//! `host check` all build it here.

use std::time::Duration;

use crate::{
    config::{Kind, ServiceConfig},
    protocol::{monotonic_ns, Role, TlsPem, WorkerSpec},
    shadow::PluginVersion,
};

/// The request count after which a worker is recycled: `max_requests` plus a jitter that
/// differs between workers (from the clock and the slot, as good as random here and with no
/// generator to seed), so that workers started together are not recycled together.
fn request_limit(config: &ServiceConfig, slot: usize) -> u64 {
    if config.max_requests == 0 {
        return 0;
    }
    let jitter = match config.max_requests_jitter {
        0 => 0,
        j => (monotonic_ns() ^ slot as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) % (j + 1),
    };
    config.max_requests + jitter
}

/// What a worker of `config` in `slot` needs to start on `version`, listening on `listen`.
pub fn worker_spec(
    config: &ServiceConfig,
    slot: usize,
    version: &PluginVersion,
    listen: Vec<String>,
) -> WorkerSpec {
    WorkerSpec {
        role: match config.kind {
            Kind::Http => Role::Http,
            // The gateways are added by `start_worker`, which knows them.
            Kind::WebSocket {
                max_message_bytes, ..
            } => Role::Business {
                gateways: Vec::new(),
                max_message_bytes,
            },
        },
        service: config.name.clone(),
        slot,
        plugin_path: version.path.clone(),
        plugin_source: version.source.clone(),
        plugin_version: version.short().to_string(),
        listen,
        config_toml: toml::to_string(&config.plugin_config).unwrap_or_default(),
        config: flatten(&config.plugin_config),
        max_body_bytes: config.max_body_bytes,
        max_stream_bytes: config.max_stream_bytes,
        idle_grace_ms: config.idle_grace.as_millis() as u64,
        drain_timeout_ms: config.drain_timeout.as_millis() as u64,
        heartbeat_ms: heartbeat_interval(config.liveness_timeout).as_millis() as u64,
        handler_timeout_ms: config.handler_timeout.as_millis() as u64,
        max_requests: request_limit(config, slot),
        header_timeout_ms: config.header_timeout.as_millis() as u64,
        body_timeout_ms: config.body_timeout.as_millis() as u64,
        keepalive_timeout_ms: config.keepalive_timeout.as_millis() as u64,
        max_connections: config.max_connections,
        run_as: config.run_as.as_ref().map(|r| (r.uid, r.gid)),
        tls: config.tls.as_ref().map(TlsPem::from),
        host_routes: config.host_routes,
        access_log: config.access_log.as_ref().map(|a| a.format),
        // Set by `start_worker`, which passes the table.
        balance_fd: None,
        master_pid: std::process::id(),
        check_only: false,
    }
}

/// How often a worker sends its heartbeat: several per liveness timeout, so that one late
/// heartbeat on a busy machine is not a missed deadline, but not more than every 10 ms nor
/// less than every second.
pub fn heartbeat_interval(liveness_timeout: Duration) -> Duration {
    (liveness_timeout / 5).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// The `[service.config]` table as key/value strings for `Context::config`.
fn flatten(table: &toml::Table) -> Vec<(String, String)> {
    table
        .iter()
        .map(|(k, v)| {
            let value = match v {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_values_are_flattened() {
        let t: toml::Table = toml::from_str("a = 'x'\nb = 3\nc = [1, 2]").unwrap();
        let mut flat = flatten(&t);
        flat.sort();
        assert_eq!(
            flat,
            vec![
                ("a".into(), "x".into()),
                ("b".into(), "3".into()),
                ("c".into(), "[1, 2]".into())
            ]
        );
    }

    #[test]
    fn heartbeats_come_several_times_per_timeout() {
        assert_eq!(
            heartbeat_interval(Duration::from_secs(10)),
            Duration::from_secs(1)
        );
        assert_eq!(
            heartbeat_interval(Duration::from_millis(500)),
            Duration::from_millis(100)
        );
        assert_eq!(
            heartbeat_interval(Duration::from_millis(1)),
            Duration::from_millis(10)
        );
    }
}

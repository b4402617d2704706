//! `host status`: asks the master for its report and prints it, as text for a terminal or
//! (`--json`) as JSON.

use std::time::Duration;

use super::{client::converse, EXIT_FAILED};
use crate::{
    protocol::{ControlReply, ControlRequest, StatusReport},
    state_dir::StateDir,
};

pub fn status(state: &StateDir, json: bool) -> Result<(), (u8, String)> {
    let mut report = None;
    converse(state, &ControlRequest::Status, |reply| {
        if let ControlReply::Status(r) = reply {
            report = Some(r);
        }
    })?;
    let report = report.ok_or((EXIT_FAILED, "the master sent no status".to_string()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap());
    } else {
        print!("{}", render_status(&report));
    }
    Ok(())
}

fn ago(ms: u64) -> String {
    humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
}

fn render_status(r: &StatusReport) -> String {
    let mut out = format!(
        "master pid {}, up {}, host {} (build {}, {})\n",
        r.master_pid,
        ago(r.uptime_ms),
        r.host_version,
        r.build_id,
        r.executable.display()
    );
    if let Some(admin) = &r.admin {
        out += &format!("admin on {admin}\n");
    }
    let now = crate::protocol::epoch_secs(std::time::SystemTime::now());
    for s in &r.services {
        let health = match (&s.probation_left_ms, &s.probation_fallback) {
            (Some(left), Some(back)) => format!(
                "on probation for {} more (a crash rolls back to {back})",
                ago(*left)
            ),
            // An operator's rollback: the version it left is no fallback.
            (Some(left), None) => format!(
                "on probation for {} more (no fallback: rolled back to by an operator)",
                ago(*left)
            ),
            _ if s.version_healthy => "healthy".to_string(),
            _ => "not yet proven healthy".to_string(),
        };
        out += &format!(
            "\nservice {} on {}: plugin {} ({}){}, {health}\n",
            s.name,
            s.listen.join(", "),
            s.version,
            s.plugin.display(),
            if s.reloadable {
                ""
            } else {
                ", reloadable = false"
            }
        );
        if s.crashes_last_minute > 0 {
            out += &format!("  crashes in the last minute: {}\n", s.crashes_last_minute);
        }
        if let Some(held_back) = &s.held_back {
            out += &format!("  held back: {held_back}\n");
        }
        if !s.previous.is_empty() {
            let previous: Vec<_> = s
                .previous
                .iter()
                .map(|v| {
                    let mut text = format!(
                        "{} (first loaded {} ago",
                        v.version,
                        ago(now.saturating_sub(v.first_loaded) * 1000)
                    );
                    if v.failed.is_some() {
                        text += ", failed";
                    } else if v.set_aside.is_some() {
                        text += ", rolled back by an operator";
                    } else if v.healthy {
                        text += ", healthy";
                    }
                    text + ")"
                })
                .collect();
            out += &format!("  previous versions: {}\n", previous.join(", "));
        }
        out += &format!(
            "  {:<5} {:<8} {:<9} {:<8} {:<10} {:<9} {:<6} {}\n",
            "SLOT", "PID", "STATE", "VERSION", "UPTIME", "RSS", "CONNS", "REQUESTS"
        );
        for w in &s.workers {
            let requests = w.requests.map_or("?".to_string(), |n| n.to_string());
            // A websocket service's gateways are listed with its business workers: `gw N`.
            let slot = match w.role.as_str() {
                "gateway" => format!("gw {}", w.slot),
                _ => w.slot.to_string(),
            };
            out += &format!(
                "  {:<5} {:<8} {:<9} {:<8} {:<10} {:<9} {:<6} {}\n",
                slot,
                w.pid,
                w.state,
                w.version,
                ago(w.uptime_ms),
                format!("{:.1}M", w.rss_bytes as f64 / (1024.0 * 1024.0)),
                w.connections,
                requests
            );
        }
        for slot in &s.slots {
            let Some(exit) = &slot.last_exit else {
                continue;
            };
            out += &format!(
                "  slot {}: last exit {} ago: {exit}",
                slot.slot,
                ago(slot.last_exit_ago_ms.unwrap_or(0))
            );
            if let Some(next) = slot.next_retry_in_ms {
                out += &format!(
                    "; {} short-lived workers in a row, next start in {next} ms",
                    slot.crashes_in_a_row
                );
            }
            out += "\n";
        }
        for e in &s.recent {
            out += &format!(
                "  {} ago: {} {} -> {}: {} in {} ms{}\n",
                ago(now.saturating_sub(e.at) * 1000),
                e.kind,
                e.from,
                e.to,
                e.outcome,
                e.duration_ms,
                e.detail
                    .as_deref()
                    .map(|d| format!(" ({})", d.lines().next().unwrap_or("")))
                    .unwrap_or_default()
            );
        }
    }
    out
}

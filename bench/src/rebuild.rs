//! Rebuild latency: from the moment a rebuilt plugin file appears (the end of `cargo build`:
//! cargo's last step puts the new file in place) to the first response from the new code, on a
//! 4-worker service with the watcher on and its default debounce.
//!
//! Baseline, interleaved round by round: the same file swap followed at once by an explicit
//! `host reload` on a second master (no watcher, no debounce). The ratio shows what watching
//! costs over reloading by hand. Also reported: the time until every worker runs the new
//! version.

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use crate::{
    replace,
    report::{ratios, Goal, RoundTable},
    Build, Master, Probation, Service,
};

const WORKERS: usize = 4;
/// The goal for `--watch`: the first new response within 500 ms of the rebuild.
const GOAL_MS: f64 = 500.0;
/// A round that takes longer than this is a failure of the host, not a slow figure.
const GIVE_UP: Duration = Duration::from_secs(30);

/// Runs `rounds` rounds and returns the figure's Markdown table.
pub fn run(b: &Build, rounds: usize) -> RoundTable {
    // Probation as in `host dev`, the loop this figure is about.
    let service = |watch| Service {
        watch,
        probation: Probation::dev(),
        ..Service::new(&b.hello_v1, WORKERS)
    };
    let watched = Master::serving(&b.host, &service(true), "info");
    let manual = Master::serving(&b.host, &service(false), "info");
    let agent = ureq::AgentBuilder::new()
        .max_idle_connections(0)
        .timeout(Duration::from_secs(5))
        .build();

    let (mut watch_first, mut watch_all, mut manual_first, mut manual_all) =
        (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let (plugin, expect) = if round % 2 == 0 {
            (&b.hello_v2, "hello v2")
        } else {
            (&b.hello_v1, "hello v1")
        };
        let mut sides = [
            (&watched, &mut watch_first, &mut watch_all, false),
            (&manual, &mut manual_first, &mut manual_all, true),
        ];
        // Alternate which master goes first, so that a drift within a round does not always
        // favour the same one.
        if round % 2 == 1 {
            sides.reverse();
        }
        for (master, first, all, by_hand) in sides {
            let addr = master.addr();
            let start = Instant::now();
            replace(plugin, &master.plugin_path());
            let reload = by_hand.then(|| {
                let host = master.host.clone();
                let state = master.dir.path().join(".host");
                thread::spawn(move || {
                    Command::new(host)
                        .arg("reload")
                        .arg("--state-dir")
                        .arg(state)
                        .output()
                })
            });
            loop {
                let body = crate::body_of(&agent, &addr);
                if body.is_some_and(|b| b.contains(expect)) {
                    break;
                }
                assert!(start.elapsed() < GIVE_UP, "the new version never answered");
            }
            first.push(start.elapsed().as_secs_f64() * 1000.0);
            loop {
                let status = master.status();
                let workers = status["services"][0]["workers"].as_array().unwrap().clone();
                let version = status["services"][0]["version"].clone();
                let ready_new = workers
                    .iter()
                    .filter(|w| w["state"] == "ready" && w["version"] == version)
                    .count();
                if ready_new == WORKERS && workers.len() == WORKERS {
                    break;
                }
                assert!(
                    start.elapsed() < GIVE_UP,
                    "the workers never all ran the new version"
                );
            }
            all.push(start.elapsed().as_secs_f64() * 1000.0);
            if let Some(r) = reload {
                let out = r.join().unwrap().unwrap();
                assert!(
                    out.status.success(),
                    "host reload failed: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
        }
    }
    let mut t = RoundTable::new(rounds);
    t.values_with_goal(
        "first new response (ms): --watch",
        &watch_first,
        Goal::AtMost(GOAL_MS),
    );
    t.values("first new response (ms): swap + host reload", &manual_first);
    t.ratios(
        "**first new response: --watch / swap + host reload**",
        &ratios(&watch_first, &manual_first),
        None,
    );
    t.compare(
        "all 4 workers on the new version (ms)",
        ("--watch", &watch_all),
        ("swap + host reload", &manual_all),
        None,
    );
    t
}

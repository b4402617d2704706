//! Rebuild latency: from the moment a rebuilt plugin file appears (the end of `cargo build`:
//! cargo's last step puts the new file in place) to the first response from the new code, on a
//! 4-worker service with the watcher on and its default debounce.
//!
//! Baseline, in the same run and interleaved: the same file swap followed at once by an explicit
//! `host reload` (no watcher, no debounce). The ratio shows what watching costs over reloading
//! by hand. Also reported: the time until every worker runs the new version.
//!
//! Run: `cargo run --release -p bench --bin rebuild_latency [ROUNDS]`

use std::time::{Duration, Instant};

use bench::{build, replace, summary, Master};

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("ROUNDS must be a number"))
        .unwrap_or(20);
    let b = build();
    let watched = Master::serving(&b.host, &b.hello_v1, 4, &["--watch"], "info");
    let manual = Master::serving(&b.host, &b.hello_v1, 4, &[], "info");
    let agent = ureq::AgentBuilder::new().max_idle_connections(0).build();

    let (mut watch_first, mut watch_all, mut manual_first, mut manual_all) =
        (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let (plugin, expect) = if round % 2 == 0 {
            (&b.hello_v2, "hello v2")
        } else {
            (&b.hello_v1, "hello v1")
        };
        for (master, first, all, by_hand) in [
            (&watched, &mut watch_first, &mut watch_all, false),
            (&manual, &mut manual_first, &mut manual_all, true),
        ] {
            let addr = master.addr();
            let start = Instant::now();
            replace(plugin, &master.plugin_path());
            let reload = by_hand.then(|| {
                let host = master.host.clone();
                let state = master.dir.path().join(".host");
                std::thread::spawn(move || {
                    std::process::Command::new(host)
                        .arg("reload")
                        .arg("--state-dir")
                        .arg(state)
                        .output()
                })
            });
            loop {
                let body = agent
                    .get(&format!("http://{addr}/"))
                    .call()
                    .ok()
                    .and_then(|r| r.into_string().ok());
                if body.is_some_and(|b| b.contains(expect)) {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "the new version never answered"
                );
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
                if ready_new == 4 && workers.len() == 4 {
                    break;
                }
            }
            all.push(start.elapsed().as_secs_f64() * 1000.0);
            if let Some(r) = reload {
                assert!(r.join().unwrap().unwrap().status.success());
            }
        }
    }
    let (wf, mf) = (summary(&mut watch_first), summary(&mut manual_first));
    let (wa, ma) = (summary(&mut watch_all), summary(&mut manual_all));
    println!("rebuild -> first new response, 4 workers, {rounds} rounds (ms)");
    println!("| | p50 | p90 | max |");
    println!("|---|---|---|---|");
    println!(
        "| --watch (default debounce) | {:.0} | {:.0} | {:.0} |",
        wf.0, wf.1, wf.2
    );
    println!(
        "| swap + `host reload` (baseline) | {:.0} | {:.0} | {:.0} |",
        mf.0, mf.1, mf.2
    );
    println!("| ratio watch / baseline (p50) | {:.2} | | |", wf.0 / mf.0);
    println!();
    println!("rebuild -> all 4 workers on the new version (ms)");
    println!("| | p50 | p90 | max |");
    println!("|---|---|---|---|");
    println!("| --watch | {:.0} | {:.0} | {:.0} |", wa.0, wa.1, wa.2);
    println!(
        "| swap + `host reload` | {:.0} | {:.0} | {:.0} |",
        ma.0, ma.1, ma.2
    );
}

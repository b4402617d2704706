//! The host's key/value store: shared by every worker of a service, atomic, and kept across
//! reloads (the `counter` example's shared count).

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use crate::{
    harness::{dir_with_config, wait_until, Host},
    http::{get, Conn},
};

const CLIENTS: usize = 8;
const INCREMENTS: usize = 10_000;
const RELOADS: usize = 10;

#[test]
fn ten_thousand_increments_from_8_clients_across_10_reloads_of_4_workers_count_exactly() {
    let config = r#"
        [[service]]
        name = "counter"
        listen = ["127.0.0.1:0"]
        plugin = "plugin.so"
        workers = 4
        canary_probation = "0s"
    "#;
    let host = Host::start(
        dir_with_config(config, &[("plugin.so", "counter")]),
        &["--config", "host.toml"],
    );
    let addr = host.addr("counter");
    let served = Arc::new(AtomicUsize::new(0));
    let reloads = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (addr, served, reloads) = (addr.clone(), served.clone(), reloads.clone());
            thread::spawn(move || {
                let mut conn = Conn::new(&addr);
                for _ in 0..INCREMENTS / CLIENTS {
                    // At most a tenth of the increments between two reloads, so every reload
                    // happens while increments are being made.
                    while served.load(Ordering::SeqCst)
                        >= (reloads.load(Ordering::SeqCst) + 1) * (INCREMENTS / RELOADS)
                        && reloads.load(Ordering::SeqCst) < RELOADS
                    {
                        thread::sleep(Duration::from_millis(1));
                    }
                    let resp = conn.send("POST", "/shared", Vec::new())?;
                    if resp.status != 200 {
                        return Err(format!("{}: {}", resp.status, resp.body));
                    }
                    served.fetch_add(1, Ordering::SeqCst);
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    for i in 1..=RELOADS {
        // Halfway through this tenth of the increments.
        wait_until("the clients are halfway through a tenth", || {
            served.load(Ordering::SeqCst)
                >= (i - 1) * (INCREMENTS / RELOADS) + INCREMENTS / RELOADS / 2
        });
        let old = host.ready_pids("counter");
        host.reload_ok();
        assert!(host.ready_pids("counter").iter().all(|p| !old.contains(p)));
        reloads.store(i, Ordering::SeqCst);
    }
    for client in clients {
        client.join().unwrap().expect("no increment failed");
    }
    assert_eq!(
        get(&addr, "/shared").body,
        format!("shared count {INCREMENTS}\n")
    );
}

#[test]
fn the_store_is_per_service_and_the_in_memory_count_is_per_worker() {
    let config = r#"
        [[service]]
        name = "a"
        listen = ["127.0.0.1:0"]
        plugin = "counter.so"
        workers = 2

        [[service]]
        name = "b"
        listen = ["127.0.0.1:0"]
        plugin = "counter.so"
        workers = 1
    "#;
    let host = Host::start(
        dir_with_config(config, &[("counter.so", "counter")]),
        &["--config", "host.toml"],
    );
    let (a, b) = (host.addr("a"), host.addr("b"));
    for _ in 0..3 {
        get(&a, "/shared/incr");
    }
    assert_eq!(get(&a, "/shared").body, "shared count 3\n");
    assert_eq!(
        get(&b, "/shared").body,
        "shared count 0\n",
        "b has its own keys"
    );
    assert!(get(&b, "/").body.starts_with("request 1 "));
}

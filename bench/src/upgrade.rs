//! The upgrade figure: `host upgrade` (a new master from the same executable takes over the
//! listening sockets, the old one drains its workers and exits) timed with no load, and under
//! keep-alive load against the same load without upgrades.
//!
//! Every master an upgrade starts stays in the first master's process group, and each of its
//! workers leads a group of its own: [`Masters`] remembers every master pid it saw and kills
//! each with its workers' groups at the end (`procs::kill_master_and_workers`), beside
//! `Master`'s own drop, which kills the one the pid file names.

use std::{
    thread,
    time::{Duration, Instant},
};

use crate::{procs, Master};

/// Longest the old master may take to drain its workers and exit after handing over.
pub const OLD_MASTER_EXIT: Duration = Duration::from_secs(15);

/// One master (and every master it became through upgrades).
pub struct Masters {
    pub master: Master,
    /// Every master pid seen, the first included, oldest first.
    pub seen: Vec<u32>,
}

/// What one `host upgrade` did.
pub struct Upgraded {
    /// Wall time of `host upgrade`.
    pub ms: f64,
    pub old_pid: u32,
    pub new_pid: u32,
}

impl Masters {
    pub fn new(master: Master) -> Masters {
        let first = master.pid;
        Masters {
            master,
            seen: vec![first],
        }
    }

    /// The master `host status` names now.
    pub fn current(&self) -> u32 {
        self.master.status()["master_pid"]
            .as_u64()
            .expect("host status names its master_pid") as u32
    }

    /// `host upgrade` (to the executable the master was started from), asserting that it
    /// succeeded and that another master answers afterwards.
    pub fn upgrade(&mut self) -> Upgraded {
        let old_pid = self.current();
        let start = Instant::now();
        let out = self.master.cli(&["upgrade"]);
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("upgraded in"),
            "host upgrade failed: {text}\n--- log ---\n{}",
            self.master.log()
        );
        let new_pid = self.current();
        assert_ne!(new_pid, old_pid, "the same master answers after an upgrade");
        self.seen.push(new_pid);
        Upgraded {
            ms,
            old_pid,
            new_pid,
        }
    }

    /// Waits until `pid` (an old master) has exited; returns whether it did in time.
    pub fn wait_gone(&self, pid: u32) -> bool {
        let start = Instant::now();
        while procs::alive(pid) {
            if start.elapsed() > OLD_MASTER_EXIT {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

impl Drop for Masters {
    fn drop(&mut self) {
        // Newest first: the serving master and its workers, then any old one still draining
        // (each with its workers' groups); `Master`'s drop then kills the first master's group
        // and reaps it.
        for pid in self.seen.iter().rev() {
            procs::kill_master_and_workers(*pid);
        }
    }
}

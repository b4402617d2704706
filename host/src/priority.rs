//! Start priority: a worker starts at a lower CPU priority (a higher nice value) and takes its
//! normal one back just before it accepts its first connection.
//!
//! Starting a worker (exec, dynamic linking, loading and verifying the plugin, `on_start`) is
//! CPU work that competes with the workers serving meanwhile; on a machine with few cores that
//! shows as a rise of the serving workers' latency during a reload. At a nice value 10 above
//! the master's, a start yields the CPU to the serving workers whenever they want it, and
//! takes it whenever they do not.
//!
//! Only under a root master: lowering a nice value again needs privilege (CAP_SYS_NICE, or an
//! RLIMIT_NICE that allows it), and a worker left at the lower priority would stay behind every
//! other process of the machine. The worker takes its priority back itself just before it
//! accepts, so that no request is served at the start priority: as root it may; run as its
//! service's user, it may if it could raise its RLIMIT_NICE while still root (that needs
//! CAP_SYS_RESOURCE, which some containers withhold from root), up to the master's nice value
//! and no further. Where it cannot, the master (which can) does it when the worker reports
//! ready, a moment after its first accept. Linux keeps a nice value per thread, so it is set on
//! every thread of the process (`/proc/PID/task`).
//!
//! `HOST_START_NICE=N` in the master's environment sets the step (0 to 19; 0 turns it off):
//! the benchmark compares the two (docs/benchmarks.md, figure 15).

use std::{io, sync::OnceLock};

/// How much lower (in nice steps) a starting worker runs than the master, by default.
pub const START_NICE_STEP: i32 = 10;

/// The step from `HOST_START_NICE`, or the default; an error names the bad value.
pub fn step() -> Result<i32, String> {
    static STEP: OnceLock<Result<i32, String>> = OnceLock::new();
    STEP.get_or_init(|| match std::env::var("HOST_START_NICE") {
        Err(_) => Ok(START_NICE_STEP),
        Ok(v) => v
            .trim()
            .parse::<i32>()
            .ok()
            .filter(|n| (0..=19).contains(n))
            .ok_or_else(|| {
                format!(
                "HOST_START_NICE is {v:?}: it must be a whole number from 0 to 19 (how many nice \
                 steps below the master a worker starts at; 0 turns the start priority off). \
                 Fix or unset it."
            )
            }),
    })
    .clone()
}

/// The nice values a new worker should start and serve at, when it will be able to come back
/// (this master runs as root): the master's own plus the step (at most 19), and the master's.
pub fn for_worker() -> Option<StartNice> {
    let step = step().ok().filter(|s| *s > 0)?;
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let serve = own_nice()?;
    Some(StartNice {
        start: (serve + step).min(19),
        serve,
    })
}

/// In the worker, first thing (still root): lower every thread's priority for the start, and
/// allow coming back to `serve` later, whatever user it runs as by then (where root may raise
/// the limit: if not, [`restore`] is the master's to do).
pub fn lower_for_start(nice: StartNice) -> io::Result<()> {
    // RLIMIT_NICE n lets a process lower its nice value down to 20 - n.
    let limit = (20 - nice.serve).clamp(0, 40) as u64;
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NICE, limit, limit);
    set_all_threads("self", nice.start)
}

/// Every thread of process `pid` ("self": this one) back to the serving priority: in the
/// worker just before it accepts, and in the master when the worker reports ready (which
/// changes nothing if the worker could do it). Returns whether it could.
pub fn restore(pid: &str, nice: Option<StartNice>) -> bool {
    nice.is_none_or(|nice| set_all_threads(pid, nice.serve).is_ok())
}

/// A worker's nice values: while it starts, and once it serves.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct StartNice {
    pub start: i32,
    pub serve: i32,
}

/// This process's nice value.
fn own_nice() -> Option<i32> {
    nix::errno::Errno::clear();
    // SAFETY: getpriority takes plain integers and returns one; it cannot touch memory.
    let nice = unsafe { nix::libc::getpriority(nix::libc::PRIO_PROCESS, 0) };
    // -1 is also a valid nice value: errno tells an error apart.
    if nice == -1 && nix::errno::Errno::last_raw() != 0 {
        return None;
    }
    Some(nice)
}

/// Sets the nice value of every thread of process `pid` ("self", or a number). Twice over, so
/// that a thread started while the first pass ran (by a thread it had not reached yet) is set
/// too.
fn set_all_threads(pid: &str, nice: i32) -> io::Result<()> {
    for _ in 0..2 {
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let Some(tid) = task?
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<u32>().ok())
            else {
                continue;
            };
            // SAFETY: setpriority takes plain integers; it cannot touch memory. With
            // PRIO_PROCESS and a thread id, Linux sets that thread's nice value alone.
            let done = unsafe {
                nix::libc::setpriority(nix::libc::PRIO_PROCESS, tid as nix::libc::id_t, nice)
            };
            // A thread that exited meanwhile (ESRCH) is no failure.
            if done != 0 && nix::errno::Errno::last() != nix::errno::Errno::ESRCH {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

//! Start priority: a worker starts at a lower CPU priority (a higher nice value) and gets its
//! normal one back once it is ready.
//!
//! Starting a worker (exec, dynamic linking, loading and verifying the plugin, `on_start`) is
//! CPU work that competes with the workers serving meanwhile; on a machine with few cores that
//! shows as a rise of the serving workers' latency during a reload. At a nice value 10 above
//! the master's, a start yields the CPU to the serving workers whenever they want it, and
//! takes it whenever they do not.
//!
//! Only a root master does it: giving a process back its priority (lowering its nice value)
//! needs privilege (CAP_SYS_NICE), and a worker left at the lower priority after its start
//! would stay behind every other process of the machine. Linux keeps a nice value per thread,
//! so both sides set it on every thread of the process (`/proc/PID/task`).

use std::io;

/// How much lower (in nice steps) a starting worker runs than the master.
pub const START_NICE_STEP: i32 = 10;

/// The nice value a new worker should start at, when this master can give it its normal
/// priority back (it runs as root): its own plus [`START_NICE_STEP`], at most 19.
pub fn start_nice() -> Option<i32> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    Some((own_nice()? + START_NICE_STEP).min(19))
}

/// The master's nice value: what a worker gets back once ready.
pub fn own_nice() -> Option<i32> {
    nix::errno::Errno::clear();
    // SAFETY: getpriority takes plain integers and returns one; it cannot touch memory.
    let nice = unsafe { nix::libc::getpriority(nix::libc::PRIO_PROCESS, 0) };
    // -1 is also a valid nice value: errno tells an error apart.
    if nice == -1 && nix::errno::Errno::last_raw() != 0 {
        return None;
    }
    Some(nice)
}

/// Sets the nice value of every thread of process `pid` (0: this process). Twice over, so that
/// a thread started while the first pass ran (by a thread it had not reached yet) is set too.
pub fn set_all_threads(pid: u32, nice: i32) -> io::Result<()> {
    let dir = if pid == 0 {
        "/proc/self/task".to_string()
    } else {
        format!("/proc/{pid}/task")
    };
    for _ in 0..2 {
        for task in std::fs::read_dir(&dir)? {
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

//! What /proc says about the servers under test: their process trees, CPU time, memory.

use std::fs;

/// `(ppid, utime + stime in clock ticks)` of a process, from /proc/PID/stat.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: the fields we want come after the last ')'.
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// `pid` and all its descendants.
pub fn tree(pid: u32) -> Vec<u32> {
    let all: Vec<(u32, u32)> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| stat(p).map(|(ppid, _)| (p, ppid)))
        .collect();
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(
            all.iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    out
}

/// CPU seconds (user + system) used so far by these processes.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks: u64 = pids.iter().filter_map(|p| stat(*p)).map(|(_, t)| t).sum();
    ticks as f64
        / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64
}

/// Resident memory of a process in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(str::to_string)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Proportional set size of a process in MiB (its private pages, and each shared page divided
/// by the processes that map it), from /proc/PID/smaps_rollup: summed over a server's
/// processes, shared code (the host binary in the master and its workers) counts once.
pub fn pss_mib(pid: u32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The pids whose parent is `pid`, from /proc/PID/task/*/children.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Kills a master and every worker it started, as tests/integration/harness.rs does: the
/// master is stopped first, so that it starts no worker between the look at its children and
/// the kill; each worker's process group (a worker leads its own) is killed, then the master's.
pub fn kill_master_and_workers(master: u32) {
    use nix::{
        sys::signal::{kill, killpg, Signal},
        unistd::Pid,
    };
    let master_pid = Pid::from_raw(master as i32);
    if !alive(master) {
        return;
    }
    let _ = kill(master_pid, Signal::SIGSTOP);
    for worker in children(master) {
        let _ = killpg(Pid::from_raw(worker as i32), Signal::SIGKILL);
    }
    let _ = killpg(master_pid, Signal::SIGKILL);
    let _ = kill(master_pid, Signal::SIGKILL);
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Open file descriptors of a process (entries of /proc/PID/fd).
pub fn fd_count(pid: u32) -> Option<usize> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Every process whose executable is `exe`, wherever it sits in the process tree: a worker
/// that outlived its master, reparented to init, is found as well. Zombies are not (their
/// `/proc/PID/exe` no longer resolves); count those among a parent's children.
pub fn running(exe: &std::path::Path) -> Vec<u32> {
    let exe = fs::canonicalize(exe).unwrap_or_else(|_| exe.to_path_buf());
    let mut found: Vec<u32> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|l| {
                l == exe
                    || l.to_string_lossy().trim_end_matches(" (deleted)") == exe.to_string_lossy()
            })
        })
        .collect();
    found.sort();
    found
}

/// The state letter of a process (R, S, T, Z, ...), from /proc/PID/stat.
pub fn state(pid: u32) -> Option<char> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    text.rsplit_once(')')?.1.trim_start().chars().next()
}

/// How many of a process's open fds are sockets (listening, connected or a socketpair's end):
/// the difference between two reads of a server's process is the connections it took between
/// them.
pub fn sockets(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

/// What a process's open fds are, one word or path each, with the inode numbers of sockets and
/// pipes left out (so that two snapshots compare by kind): "socket", "pipe",
/// "anon_inode:[eventfd]", "/path/of/a/file".
pub fn fd_kinds(pid: u32) -> Vec<String> {
    let mut kinds: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .map(|target| {
            let t = target.to_string_lossy().into_owned();
            match t.split_once(":[") {
                Some((kind, _)) if kind == "socket" || kind == "pipe" => kind.to_string(),
                _ => t,
            }
        })
        .collect();
    kinds.sort();
    kinds
}

/// A process's memory in MiB, from one read of /proc/PID/smaps_rollup: resident (RSS), each
/// shared page divided by the processes that map it (PSS), and the pages no other process maps
/// (USS: Private_Clean + Private_Dirty), which is what its exit would give back.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Memory {
    pub rss: f64,
    pub pss: f64,
    pub uss: f64,
}

pub fn memory(pid: u32) -> Memory {
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
        return Memory::default();
    };
    let kib = |key: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Memory {
        rss: kib("Rss:") / 1024.0,
        pss: kib("Pss:") / 1024.0,
        uss: (kib("Private_Clean:") + kib("Private_Dirty:")) / 1024.0,
    }
}

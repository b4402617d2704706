//! Accept balancing: how a service's workers share out new connections.
//!
//! Every worker of a service accepts on the same inherited listening socket (see
//! docs/architecture.md for why not SO_REUSEPORT), and the kernel wakes all of them for each new
//! connection: whichever calls accept(2) first takes it. On a busy machine that is often the
//! worker that is already running, so one worker can end up holding most of a service's
//! keep-alive connections while another idles, and every reload (whose clients reconnect at
//! once) draws a new split. Workers that hold different shares serve at different latencies,
//! which is what made the p99 under reload spread from one run to the next.
//!
//! So the workers of a service keep a small table in shared memory: one seat per worker, with
//! its pid, whether it is accepting, and how many connections it holds. A worker woken for a
//! connection while it holds more than one above the mean of the accepting workers waits
//! [`yield_time`] before it accepts, so that another worker (woken by the same connection)
//! takes it; if it is still queued then, it takes it. After a few waits in a row in which no
//! other worker accepted anything (they are busy, or wedged), it stops waiting until one does
//! (`worker::http::accept`). So the table only ever delays an accept and never refuses one: a
//! wrong or stale count (a wedged worker still counted as accepting, a misbehaving plugin
//! writing to the page) makes the split less even and a few new connections up to 2 ms
//! slower, not the service less available.
//!
//! The master creates the table (a sealed memfd of 64 KiB per HTTP service, of which only the
//! pages of seats in use are ever touched), passes it to each HTTP worker it starts, marks a
//! worker not accepting when it tells it to drain (a wedged worker could not), and frees the
//! seat of a worker that has exited. A table that cannot be made or mapped is logged, and the
//! service runs without balancing.

use std::{
    num::NonZeroUsize,
    os::fd::{AsFd, OwnedFd},
    sync::{
        atomic::{
            AtomicU32,
            Ordering::{Acquire, Relaxed, Release},
        },
        OnceLock,
    },
    time::Duration,
};

use nix::{
    fcntl::{fcntl, FcntlArg, SealFlag},
    sys::{
        memfd::{memfd_create, MFdFlags},
        mman::{mmap, MapFlags, ProtFlags},
        stat::fstat,
    },
    unistd::ftruncate,
};

/// How long a worker over its share leaves a connection to the others before it takes it:
/// 1 ms (tokio's timer makes it 1-2), or `HOST_ACCEPT_YIELD_MS` (read once per worker), which
/// the tests raise so that a busy machine's scheduling delays cannot decide their outcome.
pub fn yield_time() -> Duration {
    static YIELD: OnceLock<Duration> = OnceLock::new();
    *YIELD.get_or_init(|| {
        let ms = std::env::var("HOST_ACCEPT_YIELD_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1u64);
        Duration::from_millis(ms.clamp(1, 1000))
    })
}

/// Seats per service: up to 256 workers, the ones replacing them in a reload and those still
/// draining (a slot keeps two draining generations), with room to spare. A worker that finds
/// no free seat accepts unbalanced.
const SEATS: usize = 1024;

/// One worker's seat; a cache line of its own, so that a worker counting its connections does
/// not slow the others' reads of theirs.
#[repr(C, align(64))]
struct Seat {
    /// The worker's pid; 0: free.
    pid: AtomicU32,
    /// 1 while the worker accepts; 0 once it drains.
    accepting: AtomicU32,
    connections: AtomicU32,
    /// Connections accepted so far (wrapping): whether a worker is taking any, whatever
    /// closes meanwhile.
    accepted: AtomicU32,
}

/// The table's first cache line: how many seats from the start have ever been taken, so that
/// a worker's count of the others reads those only (seats are taken lowest first).
#[repr(C, align(64))]
struct Header {
    used: AtomicU32,
}

const SIZE: usize = std::mem::size_of::<Header>() + SEATS * std::mem::size_of::<Seat>();

/// A service's table, mapped for the life of the process and never unmapped (a seat may be
/// read until the process exits): a master whose config adds and removes services keeps the
/// mapping of each it had, 64 KiB of address space and the touched pages.
#[derive(Clone, Copy)]
pub struct Table {
    header: &'static Header,
    seats: &'static [Seat],
}

impl Table {
    /// The master's side: a new, zeroed table, sealed at its size so that no worker can shrink
    /// it under another's mapping (which would kill that worker with SIGBUS on its next read).
    pub fn create() -> Result<(Table, OwnedFd), String> {
        let fd = memfd_create(
            c"host-accept-balance",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(|e| format!("memfd_create: {e}"))?;
        ftruncate(&fd, SIZE as i64).map_err(|e| format!("ftruncate: {e}"))?;
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).map_err(|e| format!("sealing it: {e}"))?;
        Ok((map(&fd)?, fd))
    }

    /// The worker's side: the table the master passed, once it is checked to be one (sealed
    /// against shrinking, at least the table's size).
    pub fn adopt(fd: &OwnedFd) -> Result<Table, String> {
        let seals = fcntl(fd, FcntlArg::F_GET_SEALS).map_err(|e| format!("F_GET_SEALS: {e}"))?;
        if SealFlag::from_bits_truncate(seals) & SealFlag::F_SEAL_SHRINK != SealFlag::F_SEAL_SHRINK
        {
            return Err("the file is not sealed against shrinking".into());
        }
        let size = fstat(fd).map_err(|e| format!("fstat: {e}"))?.st_size;
        if size < SIZE as i64 {
            return Err(format!("it is {size} bytes, not {SIZE}"));
        }
        map(fd)
    }

    /// Takes a free seat for `pid`, accepting with no connections; None if all are taken.
    pub fn sit(self, pid: u32) -> Option<Place> {
        // Acquire: the master's zeroing of a freed seat (released with its pid) happens before
        // this worker's own stores below.
        let index = self
            .seats
            .iter()
            .position(|seat| seat.pid.compare_exchange(0, pid, Acquire, Relaxed).is_ok())?;
        self.header.used.fetch_max(index as u32 + 1, Relaxed);
        let seat = &self.seats[index];
        seat.connections.store(0, Relaxed);
        seat.accepting.store(1, Relaxed);
        Some(Place { table: self, index })
    }

    /// The seats ever taken: the only ones that can hold a worker.
    fn used(self) -> &'static [Seat] {
        let used = (self.header.used.load(Relaxed) as usize).min(SEATS);
        &self.seats[..used]
    }

    /// The seat `pid` holds, if any (pid 0, a free seat's, holds none).
    fn seats_of(self, pid: u32) -> impl Iterator<Item = &'static Seat> {
        self.used()
            .iter()
            .filter(move |s| pid != 0 && s.pid.load(Relaxed) == pid)
    }

    /// The master's side, when it tells `pid` to drain: its connections stop counting towards
    /// the mean at once (the worker says so itself too, unless it is wedged).
    pub fn stop_accepting(self, pid: u32) {
        for seat in self.seats_of(pid) {
            seat.accepting.store(0, Relaxed);
        }
    }

    /// The master's side, when `pid` has exited: frees its seat, if it had one.
    pub fn clear(self, pid: u32) {
        for seat in self.seats_of(pid) {
            seat.accepting.store(0, Relaxed);
            seat.connections.store(0, Relaxed);
            // Release: a worker that takes the seat next sees it zeroed.
            let _ = seat.pid.compare_exchange(pid, 0, Release, Relaxed);
        }
    }
}

fn map(fd: &OwnedFd) -> Result<Table, String> {
    let len = NonZeroUsize::new(SIZE).expect("a table has seats");
    // SAFETY: a shared read-write mapping of `SIZE` bytes of a memfd that is at least that
    // large and sealed against shrinking (checked by the caller), so every byte stays backed
    // and no access faults. It is never unmapped, hence the 'static references. Every byte
    // pattern is a valid `Header` and `Seat` (`AtomicU32`s and padding); the mapping is
    // page-aligned and `Header` is 64 bytes, so both keep their 64-byte alignment; other
    // processes change it only through atomic operations on the same words.
    let (header, seats) = unsafe {
        let ptr = mmap(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            fd.as_fd(),
            0,
        )
        .map_err(|e| format!("mmap: {e}"))?;
        let header = ptr.as_ptr() as *const Header;
        let first = header.add(1) as *const Seat;
        (&*header, std::slice::from_raw_parts(first, SEATS))
    };
    Ok(Table { header, seats })
}

/// A worker's seat in its service's table.
pub struct Place {
    table: Table,
    index: usize,
}

impl Place {
    fn seat(&self) -> &Seat {
        &self.table.seats[self.index]
    }

    pub fn opened(&self) {
        self.seat().connections.fetch_add(1, Relaxed);
        self.seat().accepted.fetch_add(1, Relaxed);
    }

    pub fn closed(&self) {
        // Never below 0, should the count have been cleared under the worker (a plugin writing
        // to the page): a wrapped count would make this worker look over any share for good.
        let _ = self
            .seat()
            .connections
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
    }

    /// The worker drains: its connections no longer count towards the others' mean.
    pub fn stop_accepting(&self) {
        self.seat().accepting.store(0, Relaxed);
    }

    /// Whether this worker holds more than one connection above the mean of the service's
    /// accepting workers (itself included).
    pub fn over_share(&self) -> bool {
        let mine = u64::from(self.seat().connections.load(Relaxed));
        let (mut total, mut accepting) = (0u64, 0u64);
        for seat in self.table.used() {
            if seat.accepting.load(Relaxed) == 1 && seat.pid.load(Relaxed) != 0 {
                total += u64::from(seat.connections.load(Relaxed));
                accepting += 1;
            }
        }
        accepting > 1 && mine * accepting > total + accepting
    }

    /// A number that changes whenever another worker of the service accepts a connection.
    pub fn others_accepted(&self) -> u32 {
        self.table
            .used()
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != self.index)
            .fold(0u32, |sum, (_, seat)| {
                sum.wrapping_add(seat.accepted.load(Relaxed))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_over_the_mean_yields_and_a_cleared_seat_stops_counting() {
        let (table, fd) = Table::create().expect("a table");
        // A second mapping of the same memfd, as a worker has.
        let other = Table::adopt(&fd).expect("adopted");
        let a = table.sit(100).expect("a seat");
        let b = other.sit(200).expect("another seat");
        assert_ne!(a.index, b.index);
        for _ in 0..3 {
            a.opened();
        }
        // 3 against 0: the mean is 1.5; 3 is more than one above it.
        assert!(a.over_share());
        assert!(!b.over_share());
        b.opened();
        // 3 against 1: the mean is 2; 3 is not more than one above it.
        assert!(!a.over_share());
        // Accepting shows in the others' number, and closing does not undo it.
        let seen = a.others_accepted();
        b.closed();
        assert_eq!(a.others_accepted(), seen);
        b.opened();
        assert_ne!(a.others_accepted(), seen);
        b.closed();
        b.closed();
        assert!(a.over_share());
        // A draining worker's connections do not count, and it is not over any share.
        b.stop_accepting();
        assert!(!a.over_share(), "alone: nobody to leave connections to");
        // The master clears an exited worker's seat; a new worker may take it.
        table.clear(100);
        let c = other.sit(300).expect("the freed seat");
        assert_eq!(c.index, a.index);
        assert_eq!(c.seat().connections.load(Relaxed), 0);
    }

    #[test]
    fn garbage_in_the_table_skews_the_split_but_cannot_overflow_or_wrap() {
        let (table, _fd) = Table::create().expect("a table");
        let me = table.sit(100).expect("a seat");
        for pid in 1..SEATS as u32 {
            let other = table.sit(1000 + pid).expect("a seat");
            other.seat().connections.store(u32::MAX, Relaxed);
        }
        assert!(table.sit(5000).is_none(), "every seat is taken");
        me.seat().connections.store(u32::MAX, Relaxed);
        assert!(!me.over_share(), "all equal: nobody is over the mean");
        // A count cleared under a live worker stays at 0 when its connection closes.
        me.seat().connections.store(0, Relaxed);
        me.closed();
        assert_eq!(me.seat().connections.load(Relaxed), 0);
        // The master marks a draining worker not accepting; pid 0 touches nothing.
        table.stop_accepting(100);
        assert_eq!(me.seat().accepting.load(Relaxed), 0);
        table.clear(0);
        assert_eq!(table.seats[1].pid.load(Relaxed), 1001);
    }

    #[test]
    fn an_unsealed_or_small_file_is_refused() {
        let fd = memfd_create(c"not-a-table", MFdFlags::MFD_CLOEXEC).expect("memfd");
        ftruncate(&fd, SIZE as i64).expect("size");
        let err = Table::adopt(&fd).err().expect("refused");
        assert!(err.contains("not sealed"), "{err}");
        let fd = memfd_create(
            c"small",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .expect("memfd");
        ftruncate(&fd, 64).expect("size");
        fcntl(&fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK)).expect("seal");
        let err = Table::adopt(&fd).err().expect("refused");
        assert!(err.contains("64 bytes"), "{err}");
        assert_eq!(SIZE, 64 + 1024 * 64, "a header line and 1024 seats");
    }
}

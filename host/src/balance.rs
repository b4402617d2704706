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
//! [`YIELD`] before it accepts, so that another worker (woken by the same connection) takes it;
//! if none does, it accepts it after all. The table only ever delays an accept, by at most
//! [`YIELD`] per connection, and never refuses one: a wrong or stale count (a worker that
//! crashed before the master cleared its seat, a misbehaving plugin writing to the page) makes
//! the split less even, not the service less available.
//!
//! The master creates the table (a sealed memfd of 8 KiB per service), passes it to each HTTP
//! worker it starts, and clears the seat of a worker that has exited. A table that cannot be
//! made or mapped is logged, and the service runs without balancing.

use std::{
    num::NonZeroUsize,
    os::fd::{AsFd, OwnedFd},
    sync::atomic::{AtomicU32, Ordering::Relaxed},
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

/// How long a worker over its share leaves a connection to the others before it takes it.
pub const YIELD: Duration = Duration::from_millis(1);

/// Seats per service: a service's workers, the ones replacing them in a reload, and the ones
/// draining, with room to spare. A worker that finds no free seat accepts unbalanced.
const SEATS: usize = 128;

/// One worker's seat; a cache line of its own, so that a worker counting its connections does
/// not slow the others' reads of theirs.
#[repr(C, align(64))]
struct Seat {
    /// The worker's pid; 0: free.
    pid: AtomicU32,
    /// 1 while the worker accepts; 0 once it drains.
    accepting: AtomicU32,
    connections: AtomicU32,
}

const SIZE: usize = SEATS * std::mem::size_of::<Seat>();

/// A service's table, mapped for the life of the process (8 KiB per service, never unmapped:
/// a seat may be read until the process exits).
#[derive(Clone, Copy)]
pub struct Table {
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
        let index = self
            .seats
            .iter()
            .position(|seat| seat.pid.compare_exchange(0, pid, Relaxed, Relaxed).is_ok())?;
        let seat = &self.seats[index];
        seat.connections.store(0, Relaxed);
        seat.accepting.store(1, Relaxed);
        Some(Place { table: self, index })
    }

    /// The master's side, when `pid` has exited: frees its seat, if it had one.
    pub fn clear(self, pid: u32) {
        for seat in self.seats.iter().filter(|s| s.pid.load(Relaxed) == pid) {
            seat.accepting.store(0, Relaxed);
            seat.connections.store(0, Relaxed);
            let _ = seat.pid.compare_exchange(pid, 0, Relaxed, Relaxed);
        }
    }
}

fn map(fd: &OwnedFd) -> Result<Table, String> {
    let len = NonZeroUsize::new(SIZE).expect("a table has seats");
    // SAFETY: a shared read-write mapping of `SIZE` bytes of a memfd that is at least that
    // large and sealed against shrinking (checked by the caller), so every byte stays backed
    // and no access faults. It is never unmapped, hence the 'static slice. Every byte pattern
    // is a valid `Seat` (three `AtomicU32`s and padding), the mapping is page-aligned (so
    // `Seat`'s 64-byte alignment holds), and other processes change it only through atomic
    // operations on the same words.
    let seats = unsafe {
        let ptr = mmap(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            fd.as_fd(),
            0,
        )
        .map_err(|e| format!("mmap: {e}"))?;
        std::slice::from_raw_parts(ptr.as_ptr() as *const Seat, SEATS)
    };
    Ok(Table { seats })
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
    }

    pub fn closed(&self) {
        self.seat().connections.fetch_sub(1, Relaxed);
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
        for seat in self.table.seats {
            if seat.accepting.load(Relaxed) == 1 && seat.pid.load(Relaxed) != 0 {
                total += u64::from(seat.connections.load(Relaxed));
                accepting += 1;
            }
        }
        accepting > 1 && mine * accepting > total + accepting
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
    }
}

//! Latches, sleeping and the clock: waiting on this process's latch and
//! maybe a socket (`WaitLatch`, `WaitLatchOrSocket`, `ResetLatch`),
//! waking another process through the latch it published in shared
//! memory (`SetLatch`), plain sleeps
//! (`pg_usleep`), servicing interrupts, and reading the time
//! (`GetCurrentTimestamp`).

use pgrx::pg_sys;
use std::sync::atomic::{AtomicUsize, Ordering::*};

/// Waits on this process's latch (set by another process, by shm_mq, or
/// by a signal) and, if given, for `socket` to become readable, for at
/// most `ms`; resets the latch if it was set, then services interrupts.
/// The postmaster's death ends the process.
pub fn wait(socket: Option<pg_sys::pgsocket>, ms: i64) {
    let events = pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH;
    // SAFETY: MyLatch is this process's own latch, set up by PostgreSQL
    // before any extension code runs and never freed while it lives;
    // WL_EXIT_ON_PM_DEATH needs no postmaster-death handling from us. Both
    // waits are guarded bindings (PGINVALID_SOCKET as the socket is an
    // ERROR, raised through the guard).
    unsafe {
        let rc = match socket {
            // WaitLatch reuses one wait set per process; a socket needs a
            // set of its own.
            None => pg_sys::WaitLatch(pg_sys::MyLatch, events as i32, ms as _, pg_sys::PG_WAIT_EXTENSION),
            Some(fd) => pg_sys::WaitLatchOrSocket(pg_sys::MyLatch, (events | pg_sys::WL_SOCKET_READABLE) as i32, fd, ms as _, pg_sys::PG_WAIT_EXTENSION),
        };
        if rc & pg_sys::WL_LATCH_SET as i32 != 0 {
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
    }
    check_for_interrupts();
}

/// Sleeps `microseconds` without watching the latch.
pub fn sleep(microseconds: i64) {
    // SAFETY: pg_usleep only sleeps; it touches no shared state.
    unsafe { pg_sys::pg_usleep(microseconds as _) };
}

/// Services a pending cancel or termination request (may raise ERROR or
/// exit), as PostgreSQL's CHECK_FOR_INTERRUPTS.
pub fn check_for_interrupts() {
    pg_sys::check_for_interrupts!();
}

/// The current time (`GetCurrentTimestamp`), not the transaction's.
pub fn now() -> pg_sys::TimestampTz {
    // SAFETY: reads the system clock; no preconditions.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// A latch a process publishes in shared memory so others can wake it.
/// Only this process's own latch (inside its PGPROC, which lives in shared
/// memory at the same address in every backend for the server's life) or
/// nothing can be stored, which is what makes [`LatchSlot::set`] sound.
#[repr(transparent)]
pub struct LatchSlot(AtomicUsize);

impl LatchSlot {
    /// No latch published.
    pub const fn new() -> Self {
        LatchSlot(AtomicUsize::new(0))
    }

    /// Publishes this process's latch.
    pub fn publish_mine(&self) {
        // SAFETY: MyProc is this backend's PGPROC (set before extension code
        // runs, in shared memory); only the field's address is taken.
        let latch = unsafe { &raw mut (*pg_sys::MyProc).procLatch };
        self.0.store(latch as usize, Release);
    }

    /// Withdraws whatever latch was published.
    pub fn clear(&self) {
        self.0.store(0, Release);
    }

    /// Sets the published latch, if any.
    pub fn set(&self) {
        let latch = self.0.load(Acquire);
        if latch != 0 {
            // SAFETY: only `publish_mine` stores a non-zero value: the
            // procLatch of some PGPROC, valid for the server's life in every
            // backend; setting the latch of a process that has gone (or of
            // its PGPROC's next owner) is a spurious wakeup, which every
            // latch waiter tolerates.
            unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
        }
    }
}

impl Default for LatchSlot {
    fn default() -> Self {
        LatchSlot::new()
    }
}

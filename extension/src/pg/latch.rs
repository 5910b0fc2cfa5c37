//! Latches, sleeping and the clock: waiting on this process's latch and
//! maybe a socket (`WaitLatch`, a wait event set kept for the socket's
//! life, `ResetLatch`),
//! waking another process through the latch it published in shared
//! memory (`SetLatch`), plain sleeps
//! (`pg_usleep`), servicing interrupts, and reading the time
//! (`GetCurrentTimestamp`).

use pgrx::pg_sys;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering::*};

/// Waits on this process's latch (set by another process, by shm_mq, or
/// by a signal) for at most `ms`; resets the latch if it was set, then
/// services interrupts. The postmaster's death ends the process.
pub fn wait(ms: i64) {
    let events = pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH;
    // SAFETY: MyLatch is this process's own latch, set up by PostgreSQL
    // before any extension code runs and never freed while it lives;
    // WL_EXIT_ON_PM_DEATH needs no postmaster-death handling from us.
    // Guarded bindings.
    unsafe {
        let rc = pg_sys::WaitLatch(pg_sys::MyLatch, events as i32, ms as _, pg_sys::PG_WAIT_EXTENSION);
        if rc & pg_sys::WL_LATCH_SET as i32 != 0 {
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
    }
    check_for_interrupts();
}

/// A wait on this process's latch and one socket, set up once for as
/// long as the socket lives. (`WaitLatchOrSocket` builds and frees an
/// epoll set on every call: five more system calls per wait, and a
/// receiver waits about once per message it is sent.)
pub struct SocketWait {
    set: NonNull<pg_sys::WaitEventSet>,
    socket: pg_sys::pgsocket,
}

impl SocketWait {
    /// Watches `socket` (readable), this process's latch and the
    /// postmaster.
    pub fn new(socket: pg_sys::pgsocket) -> SocketWait {
        // SAFETY: guarded bindings. The set is allocated in
        // TopMemoryContext, which outlives it, and freed only by Drop;
        // MyLatch is this process's own latch (see `wait`); the socket is
        // the caller's open connection, which must outlive the set (the
        // receiver drops it with its stream).
        unsafe {
            let set = pg_sys::CreateWaitEventSet(pg_sys::TopMemoryContext, 3);
            let none = pg_sys::PGINVALID_SOCKET;
            let null = std::ptr::null_mut();
            pg_sys::AddWaitEventToSet(set, pg_sys::WL_LATCH_SET, none, pg_sys::MyLatch, null);
            pg_sys::AddWaitEventToSet(set, pg_sys::WL_EXIT_ON_PM_DEATH, none, std::ptr::null_mut(), null);
            pg_sys::AddWaitEventToSet(set, pg_sys::WL_SOCKET_READABLE, socket, std::ptr::null_mut(), null);
            SocketWait { set: NonNull::new(set).expect("CreateWaitEventSet returns memory or raises ERROR"), socket }
        }
    }

    /// The socket watched.
    pub fn socket(&self) -> pg_sys::pgsocket {
        self.socket
    }

    /// Waits until the socket is readable or the latch is set, for at most
    /// `ms`; resets the latch if it was set, then services interrupts.
    pub fn wait(&mut self, ms: i64) {
        // SAFETY: the set is live (freed only by Drop); a zeroed WaitEvent
        // (integers and a null pointer) is a valid out-parameter for one
        // event. Guarded bindings.
        unsafe {
            let mut event: pg_sys::WaitEvent = std::mem::zeroed();
            let n = pg_sys::WaitEventSetWait(self.set.as_ptr(), ms as _, &mut event, 1, pg_sys::PG_WAIT_EXTENSION);
            if n > 0 && event.events & pg_sys::WL_LATCH_SET != 0 {
                pg_sys::ResetLatch(pg_sys::MyLatch);
            }
        }
        check_for_interrupts();
    }
}

impl Drop for SocketWait {
    fn drop(&mut self) {
        // SAFETY: created by CreateWaitEventSet and freed only here;
        // FreeWaitEventSet closes its epoll descriptor, not the socket.
        unsafe { pg_sys::FreeWaitEventSet(self.set.as_ptr()) };
    }
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

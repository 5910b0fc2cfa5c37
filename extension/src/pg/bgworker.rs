//! Background workers: the entry points PostgreSQL calls by name for the
//! launcher and the apply workers (trampolines into [`crate::launcher`]
//! and [`crate::worker`]), and what a pool member reads or publishes about
//! its own process: its pid, its PGPROC number (and, from another
//! process, what that PGPROC waits for), and the replication-origin
//! session an apply worker holds while it commits. (Registration and
//! signals go through pgrx's safe `pgrx::bgworkers` API.)
//!
//! The process-state wrappers overlap `pg/proc.rs` and `pg/origin.rs`,
//! which other parts of the refactor fill in; they are here so the pool
//! needs nothing outside its own layer files.

use pgrx::pg_sys;
use pgrx::prelude::*;
use std::sync::atomic::{AtomicI32, Ordering::*};

/// The launcher's entry point (`bgw_function_name` in launcher::register).
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn mtm_launcher_main(_arg: pg_sys::Datum) {
    crate::launcher::main();
}

/// An apply worker's entry point (`bgw_function_name` in
/// pool::Queues::start); its argument is the handle of the pool's segment.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn mtm_apply_worker_main(arg: pg_sys::Datum) {
    crate::worker::main(arg.value() as pg_sys::dsm_handle);
}

/// This process's pid (`MyProcPid`).
pub fn my_pid() -> i32 {
    // SAFETY: set once when the process starts, before extension code
    // runs; a plain read of an int.
    unsafe { pg_sys::MyProcPid }
}

/// A PGPROC number a process publishes in shared memory (-1: none). Only
/// this process's own can be stored, so one read back always indexes
/// `ProcGlobal->allProcs` within bounds.
#[repr(transparent)]
pub struct ProcSlot(AtomicI32);

impl ProcSlot {
    /// No process published.
    pub const fn new() -> Self {
        ProcSlot(AtomicI32::new(-1))
    }

    /// Publishes this process's PGPROC number.
    pub fn publish_mine(&self) {
        // SAFETY: MyProc is this backend's PGPROC, set before extension
        // code runs.
        let procno = unsafe { (*pg_sys::MyProc).pgprocno };
        self.0.store(procno, Release);
    }

    /// Withdraws whatever was published.
    pub fn clear(&self) {
        self.0.store(-1, Release);
    }

    /// The published PGPROC, if any.
    pub fn get(&self) -> Option<ProcNo> {
        let procno = self.0.load(Acquire);
        (procno >= 0).then_some(ProcNo(procno))
    }
}

impl Default for ProcSlot {
    fn default() -> Self {
        ProcSlot::new()
    }
}

/// A PGPROC number read from a [`ProcSlot`].
#[derive(Debug, Clone, Copy)]
pub struct ProcNo(i32);

/// The heavyweight lock a process waits for.
#[derive(Debug, Clone, Copy)]
pub struct WaitedLock {
    /// The LOCK's address in shared memory: a new wait has a new one.
    pub lock: usize,
    /// The transaction id waited for (a transaction lock), else None.
    pub xid: Option<u32>,
}

impl ProcNo {
    /// What this process waits for now, if it waits for a heavyweight lock.
    /// Read without a lock, so the answer may already be stale.
    pub fn lock_wait(self) -> Option<WaitedLock> {
        // SAFETY: the number came from ProcSlot::publish_mine, so it is a
        // real PGPROC's; PGPROCs and the lock table live in shared memory
        // for the server's life, so the reads cannot fault (volatile: the
        // owner changes them concurrently, and a LOCK freed meanwhile reads
        // as some other lock, which callers tolerate).
        unsafe {
            let proc = (*pg_sys::ProcGlobal).allProcs.add(self.0 as usize);
            let event = std::ptr::read_volatile(&(*proc).wait_event_info);
            let lock = std::ptr::read_volatile(&(*proc).waitLock);
            if event & 0xFF00_0000 != pg_sys::PG_WAIT_LOCK || lock.is_null() {
                return None;
            }
            let tag = std::ptr::read_volatile(&(*lock).tag);
            let xid = (tag.locktag_type as u32 == pg_sys::LockTagType::LOCKTAG_TRANSACTION).then_some(tag.locktag_field1);
            Some(WaitedLock { lock: lock as usize, xid })
        }
    }
}

/// The replication origin called `name` (ERROR if there is none), looked
/// up in a transaction of its own.
pub fn origin_by_name(name: &std::ffi::CStr) -> pg_sys::RepOriginId {
    // SAFETY: starting and committing our own transaction is sound only
    // outside one (committing a caller's would free memory it may still
    // use), which is checked first; replorigin_by_name reads the catalog
    // inside it and raises ERROR for a missing origin.
    unsafe {
        if pg_sys::IsTransactionOrTransactionBlock() {
            error!("multimaster: a replication origin looked up inside a transaction");
        }
        pg_sys::StartTransactionCommand();
        let origin = pg_sys::replorigin_by_name(name.as_ptr(), false);
        pg_sys::CommitTransactionCommand();
        origin
    }
}

/// Makes `origin` this session's replication origin, so commits record
/// the peer's LSN in it (ERROR if another process holds it).
pub fn take_origin(origin: pg_sys::RepOriginId) {
    // SAFETY: replorigin_session_setup checks its own preconditions and
    // raises ERROR; replorigin_session_origin is a plain backend-local
    // global nothing else borrows.
    unsafe {
        pg_sys::replorigin_session_setup(origin);
        pg_sys::replorigin_session_origin = origin;
    }
    ORIGIN_TAKEN.set(true);
}

thread_local! {
    /// Whether this process holds a session origin ([`take_origin`] to
    /// [`release_origin`]): PostgreSQL only Asserts it where it
    /// dereferences the session's origin state.
    static ORIGIN_TAKEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this process holds a session origin taken by [`take_origin`].
pub(super) fn origin_taken() -> bool {
    ORIGIN_TAKEN.get()
}

/// Gives up the session's replication origin taken by [`take_origin`]
/// (ERROR if none is set up).
pub fn release_origin() {
    // SAFETY: as take_origin; replorigin_session_reset raises ERROR when
    // no origin is set up.
    unsafe {
        pg_sys::replorigin_session_origin = pg_sys::InvalidRepOriginId as pg_sys::RepOriginId;
        pg_sys::replorigin_session_reset();
    }
    ORIGIN_TAKEN.set(false);
}

/// The current WAL insert position.
pub fn wal_insert_position() -> pg_sys::XLogRecPtr {
    // SAFETY: reads the WAL insert position under its spinlock; raises
    // ERROR during recovery, where no apply worker runs.
    unsafe { pg_sys::GetXLogInsertRecPtr() }
}

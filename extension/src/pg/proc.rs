//! Processes: this process's PGPROC (`MyProc`) and backend type, the
//! other processes' PGPROCs in `ProcGlobal->allProcs` (what transaction
//! each runs, what it waits for), waking one through its latch and
//! cancelling what one runs (SIGINT, as `pg_cancel_backend`).

use pgrx::pg_sys;
use std::sync::atomic::{AtomicI32, Ordering::*};

/// Whether the library is being loaded from `shared_preload_libraries`
/// (in the postmaster, at server start).
pub fn preloading() -> bool {
    // SAFETY: a plain read of a postmaster-global flag, set and cleared by
    // the postmaster around loading the libraries; no other thread.
    unsafe { pg_sys::process_shared_preload_libraries_in_progress }
}

unsafe extern "C-unwind" {
    /// From utils/timeout.h, which pgrx does not bind.
    fn disable_timeout(id: u32, keep_indicator: bool);
    fn enable_timeout_after(id: u32, delay_ms: i32);
}

/// `STATEMENT_TIMEOUT` in PostgreSQL 15's `TimeoutId` (utils/timeout.h).
const STATEMENT_TIMEOUT: u32 = 3;

/// Disarms the running statement's `statement_timeout`: a wait with a
/// timeout of its own (the cluster's votes) must not be cut short by the
/// client's, any more than PostgreSQL's wait for synchronous standbys
/// is. The next statement arms it again.
pub fn disarm_statement_timeout() {
    // SAFETY: disable_timeout only touches this process's timeout table
    // and its alarm; disabling a timeout that is not active is a no-op.
    // Called through pgrx's guard, so its elog (if the alarm cannot be
    // reset) does not unwind over Rust frames.
    unsafe { pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| disable_timeout(STATEMENT_TIMEOUT, false)) }
}

/// Runs `f` with query cancels held off (PostgreSQL's
/// HOLD_CANCEL_INTERRUPTS): for a wait after the statement's work is done
/// and durable, which a cancel must not turn into an error that reads as
/// "not done". A cancel that arrives meanwhile is acted on at the next
/// interrupt check after it.
pub fn holding_cancels<T>(f: impl FnOnce() -> T) -> T {
    /// Releases the hold however `f` ends (an ERROR's recovery also
    /// resets the counter to 0).
    struct Held;
    impl Drop for Held {
        fn drop(&mut self) {
            // SAFETY: a counter of this backend's own, read only by its
            // interrupt checks; `holding_cancels` raised it by one.
            unsafe { pg_sys::QueryCancelHoldoffCount = pg_sys::QueryCancelHoldoffCount.saturating_sub(1) }
        }
    }
    // SAFETY: as above; this process's main thread.
    unsafe { pg_sys::QueryCancelHoldoffCount += 1 }
    let _held = Held;
    f()
}

/// Runs `f` under a deadline of `ms` milliseconds: past it, the next
/// interrupt check inside `f` raises an ERROR ("canceling statement due
/// to statement timeout"), as `statement_timeout` does. For waits with no
/// timeout of their own, such as libpqwalreceiver's connect and query on
/// a frozen peer. From a backend or a background worker connected to a
/// database (which handles SIGINT as a cancel), on its main thread.
pub fn with_deadline<T>(ms: i32, f: impl FnOnce() -> T) -> T {
    /// Disarms the deadline however `f` ends, and drops a cancel it may
    /// have raised after `f` stopped checking (it would otherwise end the
    /// caller's next statement).
    struct Disarm;
    impl Drop for Disarm {
        fn drop(&mut self) {
            disarm_statement_timeout();
            // SAFETY: a flag of this process that its own SIGINT handler
            // sets; clearing it only forgets a cancel this deadline caused
            // (nothing else cancels a resolver's launcher).
            unsafe { pg_sys::QueryCancelPending = 0 };
        }
    }
    // SAFETY: enable_timeout_after only touches this process's timeout
    // table and alarm; STATEMENT_TIMEOUT is registered by InitPostgres in
    // every process connected to a database. Through pgrx's guard, so its
    // elog (if the alarm cannot be set) does not unwind over Rust frames.
    unsafe { pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| enable_timeout_after(STATEMENT_TIMEOUT, ms.max(1))) };
    let _disarm = Disarm;
    f()
}

/// Whether this process is the checkpointer.
pub fn am_checkpointer() -> bool {
    // SAFETY: a plain read of this process's type, set when it starts.
    unsafe { pg_sys::MyBackendType == pg_sys::BackendType::B_CHECKPOINTER }
}

/// This process's PGPROC number, or None before it has a PGPROC (early
/// in its start, or the postmaster).
pub fn my_procno() -> Option<i32> {
    // SAFETY: MyProc is null or this backend's own PGPROC, which lives in
    // shared memory for the server's life; pgprocno is fixed at its
    // creation, so the read races with nothing.
    unsafe {
        let me = pg_sys::MyProc;
        (!me.is_null()).then(|| (*me).pgprocno)
    }
}

/// `max_prepared_transactions` (fixed while the server runs): the number
/// of PGPROCs the prepared transactions have after the others.
fn max_prepared_transactions() -> usize {
    static VALUE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *VALUE.get_or_init(|| crate::pg::guc::setting(c"max_prepared_transactions").and_then(|t| t.parse().ok()).unwrap_or(0))
}

/// How many PGPROCs `ProcGlobal->allProcs` holds: `allProcCount` leaves
/// out the prepared transactions' PGPROCs, which follow the others.
fn proc_count() -> usize {
    // SAFETY: ProcGlobal is set up in shared memory before any backend or
    // worker runs, and allProcCount never changes afterwards.
    unsafe { (*pg_sys::ProcGlobal).allProcCount as usize + max_prepared_transactions() }
}

/// Sets the latch of the process with PGPROC number `procno` (one a live
/// backend published to be woken); a number that is no process's (not
/// below `allProcCount`) is ignored.
pub fn set_latch_of(procno: i32) {
    // SAFETY: ProcGlobal is set up in shared memory before any backend or
    // worker runs, and allProcCount never changes afterwards.
    let processes = unsafe { (*pg_sys::ProcGlobal).allProcCount };
    if procno < 0 || procno as u32 >= processes {
        return;
    }
    // SAFETY: procno is within allProcs (checked above); PGPROC entries
    // are in shared memory for the server's life, so the latch address is
    // valid even if its owner has gone (then the wakeup is spurious, which
    // every latch waiter tolerates).
    unsafe { pg_sys::SetLatch(&raw mut (*(*pg_sys::ProcGlobal).allProcs.add(procno as usize)).procLatch) };
}

thread_local! {
    /// The functions [`at_exit`] registered in this process.
    static AT_EXIT: std::cell::RefCell<Vec<fn()>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` as this process exits normally or after an ERROR or FATAL
/// (PostgreSQL's `before_shmem_exit`, shared memory still attached). A
/// crash resets shared memory, so what `f` cleans up there is gone anyway.
/// Registers `f` once per process however often it is called, so callers
/// may ask on every use of what `f` cleans up.
pub fn at_exit(f: fn()) {
    let new = AT_EXIT.with_borrow_mut(|registered| {
        let new = !registered.iter().any(|&g| std::ptr::fn_addr_eq(g, f));
        if new {
            registered.push(f);
        }
        new
    });
    if !new {
        return;
    }
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn call(_code: std::ffi::c_int, arg: pg_sys::Datum) {
        // SAFETY: `arg` is the `fn()` that at_exit registered, as a
        // pointer-sized integer; fn pointers and usize have the same size.
        let f = unsafe { std::mem::transmute::<usize, fn()>(arg.value()) };
        f();
    }
    // SAFETY: registers a callback that lives for the program's life (a
    // plain function) with a pointer-sized argument; pgrx's binding is
    // guarded, so the ERROR raised when the list is full does not unwind
    // over Rust frames.
    unsafe { pg_sys::before_shmem_exit(Some(call), pg_sys::Datum::from(f as usize)) }
}

/// Whether a backend of this server (a client's, a background worker, a
/// walsender) has process id `pid`: what `pg_cancel_backend` looks for.
pub fn is_backend(pid: i32) -> bool {
    // SAFETY: a guarded binding that reads the proc array under its own
    // lock; the PGPROC it returns is only compared with null.
    !unsafe { pg_sys::BackendPidGetProc(pid) }.is_null()
}

/// Calls the built-in function `oid` with `args` (none of them NULL) and
/// reads its result as a boolean; its ERROR is raised as from any call.
pub fn call_builtin(oid: pg_sys::Oid, args: &[pg_sys::Datum]) -> bool {
    // SAFETY: guarded fmgr calls of a built-in function by oid, with the
    // number of arguments it takes (the callers name functions of one and
    // two arguments); a boolean result is read as one.
    let result = unsafe {
        match args {
            [a] => pg_sys::OidFunctionCall1Coll(oid, pg_sys::InvalidOid, *a),
            [a, b] => pg_sys::OidFunctionCall2Coll(oid, pg_sys::InvalidOid, *a, *b),
            _ => unreachable!("call_builtin takes one or two arguments"),
        }
    };
    result.value() != 0
}

/// Sends SIGINT to process `pid` of this server: what pg_cancel_backend
/// sends, ending the statement it runs with 57014.
pub fn cancel(pid: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; callers pass the
    // pid of a PGPROC of this server.
    unsafe { libc::kill(pid, libc::SIGINT) };
}

/// One PGPROC of `ProcGlobal->allProcs`, read without its lock: each
/// field read is a snapshot its owner may change at once. Only
/// [`all_procs`] and [`Proc::by_procno`] make one, so it always points
/// inside the array.
#[derive(Clone, Copy)]
pub struct Proc(*mut pg_sys::PGPROC);

/// Every PGPROC, those of the prepared transactions included.
pub fn all_procs() -> impl Iterator<Item = Proc> {
    // SAFETY (of each `add`): i < proc_count(), the length of allProcs,
    // which lives in shared memory for the server's life.
    (0..proc_count()).map(|i| Proc(unsafe { (*pg_sys::ProcGlobal).allProcs.add(i) }))
}

impl Proc {
    /// The PGPROC numbered `procno`, if there is one.
    pub fn by_procno(procno: i32) -> Option<Proc> {
        let i = usize::try_from(procno).ok().filter(|&i| i < proc_count())?;
        // SAFETY: i < proc_count(), the length of allProcs (checked).
        Some(Proc(unsafe { (*pg_sys::ProcGlobal).allProcs.add(i) }))
    }

    // The reads below all rest on the type's invariant: the pointer is
    // inside allProcs, mapped for the server's life; the fields are read
    // by copy, words written whole by their owner, so a stale value is the
    // worst outcome, which the callers tolerate.

    /// The pid (0: a prepared transaction's PGPROC, or a free one).
    pub fn pid(self) -> i32 {
        // SAFETY: a PGPROC inside allProcs (the type's invariant), read by copy.
        unsafe { std::ptr::read_volatile(&raw const (*self.0).pid) }
    }

    /// The PGPROC number.
    pub fn procno(self) -> i32 {
        // SAFETY: a PGPROC inside allProcs (the type's invariant), read by copy.
        unsafe { (*self.0).pgprocno }
    }

    /// The top transaction id (0: none).
    pub fn xid(self) -> u32 {
        // SAFETY: a PGPROC inside allProcs (the type's invariant), read by copy.
        unsafe { std::ptr::read_volatile(&raw const (*self.0).xid).into_inner() }
    }

    /// Whether `xid` is among its cached subtransaction ids (at most
    /// PGPROC_MAX_CACHED_SUBXIDS).
    pub fn has_subxid(self, xid: u32) -> bool {
        // SAFETY: a PGPROC inside allProcs (the type's invariant), read by copy.
        unsafe {
            let n = (*self.0).subxidStatus.count as usize;
            if n == 0 {
                return false;
            }
            let subxids = std::ptr::read_volatile(&raw const (*self.0).subxids);
            subxids.xids[..n.min(subxids.xids.len())].iter().any(|x| x.into_inner() == xid)
        }
    }

    /// Whether it is a background worker.
    pub fn is_background_worker(self) -> bool {
        // SAFETY: a PGPROC inside allProcs (the type's invariant), read by copy.
        unsafe { (*self.0).isBackgroundWorker }
    }

    /// Whether it is an autovacuum worker.
    pub fn is_autovacuum(self) -> bool {
        // SAFETY: a PGPROC inside allProcs (the type's invariant), read by copy.
        unsafe { (*self.0).statusFlags as u32 & pg_sys::PROC_IS_AUTOVACUUM != 0 }
    }

    /// The class of what it waits for (`PG_WAIT_LOCK`, `PG_WAIT_CLIENT`...;
    /// 0: it does not wait).
    pub fn wait_class(self) -> u32 {
        // SAFETY: a PGPROC inside allProcs (the type's invariant), read by copy.
        unsafe { std::ptr::read_volatile(&raw const (*self.0).wait_event_info) & 0xFF00_0000 }
    }

    /// Sets its latch (a spurious wakeup if its owner changed meanwhile).
    pub fn set_latch(self) {
        // SAFETY: the latch of a PGPROC in shared memory (see the type).
        unsafe { pg_sys::SetLatch(&raw mut (*self.0).procLatch) };
    }
}

impl Proc {
    /// What it waits for now, if it waits for a heavyweight lock. Read
    /// without a lock, so the answer may already be stale.
    pub fn lock_wait(self) -> Option<WaitedLock> {
        if self.wait_class() != pg_sys::PG_WAIT_LOCK {
            return None;
        }
        // SAFETY: a PGPROC inside allProcs (the type's invariant), read by
        // copy; the lock table lives in shared memory for the server's
        // life, so reading a LOCK cannot fault (volatile: the owner changes
        // it concurrently, and a LOCK freed meanwhile reads as some other
        // lock, which callers tolerate).
        unsafe {
            let lock = std::ptr::read_volatile(&raw const (*self.0).waitLock);
            if lock.is_null() {
                return None;
            }
            let tag = std::ptr::read_volatile(&(*lock).tag);
            let xid = (tag.locktag_type as u32 == pg_sys::LockTagType::LOCKTAG_TRANSACTION).then_some(tag.locktag_field1);
            Some(WaitedLock { lock: lock as usize, xid })
        }
    }
}

/// The heavyweight lock a process waits for.
#[derive(Debug, Clone, Copy)]
pub struct WaitedLock {
    /// The LOCK's address in shared memory: a new wait has a new one.
    pub lock: usize,
    /// The transaction id waited for (a transaction lock), else None.
    pub xid: Option<u32>,
}

/// A PGPROC number a process publishes in shared memory (-1: none), so
/// others can look at what it waits for.
#[repr(transparent)]
pub struct ProcSlot(AtomicI32);

impl ProcSlot {
    /// No process published.
    pub const fn new() -> Self {
        ProcSlot(AtomicI32::new(-1))
    }

    /// Publishes this process's PGPROC number.
    pub fn publish_mine(&self) {
        self.0.store(my_procno().expect("a process with a PGPROC"), Release);
    }

    /// Withdraws whatever was published.
    pub fn clear(&self) {
        self.0.store(-1, Release);
    }

    /// The published PGPROC, if any.
    pub fn get(&self) -> Option<Proc> {
        Proc::by_procno(self.0.load(Acquire))
    }

    /// Sets the latch of the published PGPROC, if any. (Bounded by
    /// `allProcCount`, not [`Self::get`]'s bound, which reads a setting:
    /// this runs in on_dsm_detach callbacks too.)
    pub fn set_latch(&self) {
        set_latch_of(self.0.load(Acquire));
    }
}

impl Default for ProcSlot {
    fn default() -> Self {
        ProcSlot::new()
    }
}

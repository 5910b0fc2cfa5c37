//! Replication origins: the durable record, per peer, of how far its
//! stream has been applied here (`mtm_node_<peer>`), from which a new
//! receiver resumes.

use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use pgrx::prelude::*;

/// How far `origin` has durably got (`InvalidXLogRecPtr` if it never
/// advanced), without flushing WAL first.
pub fn progress(origin: pg_sys::RepOriginId) -> pg_sys::XLogRecPtr {
    // SAFETY: a guarded binding that takes ReplicationOriginLock itself and
    // only reads the shared replication states every backend attaches at
    // start; an unknown id finds nothing and reads as invalid.
    unsafe { pg_sys::replorigin_get_progress(origin, false) }
}

/// The name of replication origin `origin`, None if there is no such
/// origin (a catalog lookup).
pub fn name_of(origin: pg_sys::RepOriginId) -> Option<String> {
    let mut name: *mut std::ffi::c_char = std::ptr::null_mut();
    // SAFETY: a guarded syscache lookup with missing_ok, writing through a
    // valid out-pointer; on success `name` is a NUL-terminated string
    // palloc'd in the current memory context, copied at once.
    unsafe {
        if pg_sys::replorigin_by_oid(origin, true, &mut name) {
            Some(std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned())
        } else {
            None
        }
    }
}

// Session origin of the apply path (added with apply.rs's refactor).

/// Tags the WAL records this session writes from now on with `origin`
/// (`replorigin_session_origin`), so walsenders can tell applied changes
/// from local ones.
pub fn set_session_origin(origin: pg_sys::RepOriginId) {
    // SAFETY: a plain backend-local global that PostgreSQL reads when it
    // writes a record; this process is single-threaded and nothing borrows
    // it.
    unsafe { pg_sys::replorigin_session_origin = origin };
}

/// The peer's position (`lsn`, commit `time`) the next commit or prepare
/// of this session records in its origin.
pub fn set_session_progress(lsn: pg_sys::XLogRecPtr, time: pg_sys::TimestampTz) {
    // SAFETY: plain backend-local globals read by the commit record code;
    // single-threaded, nothing borrows them.
    unsafe {
        pg_sys::replorigin_session_origin_lsn = lsn;
        pg_sys::replorigin_session_origin_timestamp = time;
    }
}

/// `replorigin_session_advance`: the session's origin (taken with
/// [`take_origin`]) has got to `remote` (here `local`),
/// in memory until the next checkpoint.
pub fn advance_session(remote: pg_sys::XLogRecPtr, local: pg_sys::XLogRecPtr) {
    assert!(origin_taken(), "multimaster: advancing a session origin this process does not hold");
    // SAFETY: replorigin_session_advance dereferences the session's origin
    // state, checked by PostgreSQL only with an Assert; it exists between
    // take_origin and release_origin, which the flag checked above
    // follows. A guarded binding taking the state's own lock.
    unsafe { pg_sys::replorigin_session_advance(remote, local) }
}

/// The replication origin this session's changes are recorded as coming
/// from (`InvalidRepOriginId`: none, a client's own changes).
pub fn session_origin() -> pg_sys::RepOriginId {
    // SAFETY: a plain read of a backend-local variable.
    unsafe { pg_sys::replorigin_session_origin }
}

/// Runs `f` with no session replication origin, so what it logs is this
/// node's own, and puts the origin back after it (not if `f` raises an
/// ERROR: the transaction's abort or the process's exit follows).
pub fn without_session_origin<T>(f: impl FnOnce() -> T) -> T {
    let saved = session_origin();
    // SAFETY: plain writes of a backend-local variable, which PostgreSQL
    // only reads when it logs a record; no reference to it is held.
    unsafe { pg_sys::replorigin_session_origin = pg_sys::InvalidRepOriginId as pg_sys::RepOriginId };
    let out = f();
    // SAFETY: as above.
    unsafe { pg_sys::replorigin_session_origin = saved };
    out
}

// The session origin an apply worker holds while it commits.

/// The replication origin called `name` (ERROR if there is none), looked
/// up in a transaction of its own: from a background worker connected to
/// the database, outside a transaction.
pub fn origin_by_name(name: &std::ffi::CStr) -> pg_sys::RepOriginId {
    // Committing a caller's transaction would free memory it may still
    // use, and BackgroundWorker::transaction does not check for one.
    // SAFETY: reads this backend's own transaction state; no ERROR.
    if unsafe { pg_sys::IsTransactionOrTransactionBlock() } {
        error!("multimaster: a replication origin looked up inside a transaction");
    }
    BackgroundWorker::transaction(|| {
        // SAFETY: a guarded binding, inside the transaction just started,
        // where it reads the catalog; a missing origin is an ERROR.
        unsafe { pg_sys::replorigin_by_name(name.as_ptr(), false) }
    })
}

/// Makes `origin` this session's replication origin, so commits record
/// the peer's LSN in it (ERROR if another process holds it).
pub fn take_origin(origin: pg_sys::RepOriginId) {
    // SAFETY: replorigin_session_setup checks its own preconditions and
    // raises ERROR.
    unsafe { pg_sys::replorigin_session_setup(origin) };
    set_session_origin(origin);
    ORIGIN_TAKEN.set(true);
}

thread_local! {
    /// Whether this process holds a session origin ([`take_origin`] to
    /// [`release_origin`]): PostgreSQL only Asserts it where it
    /// dereferences the session's origin state.
    static ORIGIN_TAKEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this process holds a session origin taken by [`take_origin`].
pub fn origin_taken() -> bool {
    ORIGIN_TAKEN.get()
}

/// Gives up the session's replication origin taken by [`take_origin`]
/// (ERROR if none is set up).
pub fn release_origin() {
    set_session_origin(pg_sys::InvalidRepOriginId as pg_sys::RepOriginId);
    // SAFETY: a guarded binding that raises ERROR when no origin is set up.
    unsafe { pg_sys::replorigin_session_reset() };
    ORIGIN_TAKEN.set(false);
}

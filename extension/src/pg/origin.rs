//! Replication origins: the durable record, per peer, of how far its
//! stream has been applied here (`mtm_node_<peer>`), from which a new
//! receiver resumes.

use pgrx::pg_sys;

/// How far `origin` has durably got (`InvalidXLogRecPtr` if it never
/// advanced), without flushing WAL first.
pub fn progress(origin: pg_sys::RepOriginId) -> pg_sys::XLogRecPtr {
    // SAFETY: a guarded binding that takes ReplicationOriginLock itself and
    // only reads the shared replication states every backend attaches at
    // start; an unknown id finds nothing and reads as invalid.
    unsafe { pg_sys::replorigin_get_progress(origin, false) }
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

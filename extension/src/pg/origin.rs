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

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

//! Two-phase commit: finishing a prepared transaction by its gid
//! (`FinishPreparedTransaction`, the body of COMMIT/ROLLBACK PREPARED,
//! which pgrx does not export), the transaction state a PREPARE records,
//! and the cleanup after a failed finish.

use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::{c_char, CStr};

unsafe extern "C-unwind" {
    // twophase.h; not in pg_sys, so not guarded by pgrx: called only
    // through pg_guard_ffi_boundary below.
    fn FinishPreparedTransaction(gid: *const c_char, is_commit: bool);
}

/// COMMIT PREPARED (`commit`) or ROLLBACK PREPARED of `gid`, in the
/// current transaction; an ERROR (not prepared, finished meanwhile...)
/// unwinds as a Rust panic through the caller's frames.
pub fn finish_prepared(gid: &CStr, commit: bool) {
    // FinishPreparedTransaction is written for COMMIT PREPARED, which runs
    // in a transaction: refuse to run it outside one.
    // SAFETY: reads this backend's own transaction state; no ERROR.
    if !unsafe { pg_sys::IsTransactionState() } {
        error!("multimaster: finishing prepared transaction {} outside a transaction", gid.to_string_lossy());
    }
    // SAFETY: inside a transaction (checked above), on the main thread (the
    // boundary panics otherwise); `gid` is NUL-terminated and outlives the
    // call; an ERROR is caught by the boundary instead of longjmp-ing over
    // Rust frames.
    unsafe { pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| FinishPreparedTransaction(gid.as_ptr(), commit)) }
}

/// Whether this session is inside a transaction block (BEGIN … or a
/// multi-statement Query), where PostgreSQL refuses COMMIT PREPARED.
pub fn in_transaction_block() -> bool {
    // SAFETY: reads this backend's own transaction state; no ERROR.
    unsafe { pg_sys::IsTransactionBlock() }
}

/// This backend's top transaction id, or invalid (0) while it has none:
/// the xid a PREPARE TRANSACTION run now prepares.
pub fn top_xid_if_any() -> pg_sys::TransactionId {
    // SAFETY: reads this backend's own transaction state, valid in any
    // state (no transaction reads as invalid); no ERROR.
    unsafe { pg_sys::GetTopTransactionIdIfAny() }
}

/// Aborts whatever is left of the current transaction after a caught
/// ERROR, as a worker that survives an ERROR must before its next one.
pub fn abort_current_transaction() {
    // SAFETY: a guarded binding that handles every transaction-block state
    // (a no-op with no transaction), called at a worker's top level, where
    // PostgreSQL's own error recovery calls it.
    unsafe { pg_sys::AbortCurrentTransaction() }
}

//! The DDL capture's side of the utility and executor hooks: the entry
//! points the ProcessUtility and ExecutorStart hooks call with their raw
//! arguments (turned here into the views of [`crate::pg::nodes`] for the
//! safe logic of [`crate::ddl`]), the object access hook (installed and
//! chained to the previous one here), and the transaction-state calls the
//! DDL paths make (nest level, command counter, the snapshot a replayed
//! statement runs with).
//!
//! The hooks themselves belong to [`crate::xact`], which calls these entry
//! points under the names `crate::ddl::begin` and so on (re-exported
//! there), so its calls are unchanged.

use crate::pg::nodes::{ParamList, PlannedStmt, QueryDesc};
use pgrx::pg_guard;
use pgrx::pg_sys;
use std::ffi::{c_char, CStr};

/// Starts capturing the statement a ProcessUtility call runs
/// ([`crate::ddl::capture`]), with the hook's own arguments.
///
/// # Safety
/// From the ProcessUtility hook, with the `pstmt`, `query_string` and
/// `params` it was called with (valid for the call: PostgreSQL keeps them
/// until the hook returns).
pub unsafe fn begin(pstmt: *mut pg_sys::PlannedStmt, query_string: *const c_char, params: pg_sys::ParamListInfo) -> Option<crate::ddl::Capture> {
    // SAFETY: the caller's contract; ProcessUtility always has a query
    // string, and the views live only for this call.
    let (stmt, query, params) = unsafe { (PlannedStmt::from_raw(pstmt), CStr::from_ptr(query_string), ParamList::from_raw(params)) };
    crate::ddl::capture(stmt, query, params)
}

/// Keeps the replica identity of the table the statement just created or
/// altered ([`crate::ddl::keep_replica_identity_of`]).
///
/// # Safety
/// From the ProcessUtility hook, after the statement ran, with its
/// `pstmt` (valid until the hook returns).
pub unsafe fn keep_replica_identity(pstmt: *mut pg_sys::PlannedStmt) {
    // SAFETY: the caller's contract; the view lives only for this call.
    crate::ddl::keep_replica_identity_of(unsafe { PlannedStmt::from_raw(pstmt) })
}

/// Refuses a schema change that filled rows with values computed per
/// node ([`crate::ddl::refuse_values_per_node_of`]).
///
/// # Safety
/// From the ProcessUtility hook, after the statement ran, with its
/// `pstmt` (valid until the hook returns).
pub unsafe fn refuse_values_per_node(pstmt: *mut pg_sys::PlannedStmt) {
    // SAFETY: the caller's contract; the view lives only for this call.
    crate::ddl::refuse_values_per_node_of(unsafe { PlannedStmt::from_raw(pstmt) })
}

/// Starts capturing a statement that calls a remote function
/// ([`crate::ddl::capture_query`]), from ExecutorStart.
///
/// # Safety
/// From the ExecutorStart hook with its QueryDesc (valid for the call).
pub unsafe fn begin_statement(query: *mut pg_sys::QueryDesc) {
    // SAFETY: the caller's contract; the view lives only for this call
    // (the capture keeps the QueryDesc's address only, as its identity).
    crate::ddl::capture_query(unsafe { QueryDesc::from_raw(query) })
}

static mut PREV_OBJECT_ACCESS: pg_sys::object_access_hook_type = None;

/// Installs the object access hook ([`crate::ddl::object_accessed`]),
/// keeping the previous one, which it calls first.
pub fn install_object_access_hook() {
    // SAFETY: called once from _PG_init while the library is preloaded,
    // before any backend runs a statement, so nothing reads the hook
    // variables concurrently; the previous hook is kept and called.
    unsafe {
        PREV_OBJECT_ACCESS = pg_sys::object_access_hook;
        pg_sys::object_access_hook = Some(object_access);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn object_access(
    access: pg_sys::ObjectAccessType::Type,
    class_id: pg_sys::Oid,
    object_id: pg_sys::Oid,
    sub_id: std::ffi::c_int,
    arg: *mut std::ffi::c_void,
) {
    // SAFETY: PREV_OBJECT_ACCESS is written only by
    // install_object_access_hook, before any call of this hook; the
    // previous hook gets exactly our arguments, behind the boundary
    // because a raw function pointer is not guarded by pgrx.
    unsafe {
        if let Some(prev) = PREV_OBJECT_ACCESS {
            pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| prev(access, class_id, object_id, sub_id, arg));
        }
    }
    crate::ddl::object_accessed(access, class_id, object_id);
}

/// The current transaction nesting level (1: the top transaction, 0:
/// none).
pub fn transaction_nest_level() -> i32 {
    // SAFETY: reads this backend's own transaction state; no ERROR.
    unsafe { pg_sys::GetCurrentTransactionNestLevel() }
}

/// Makes this command's changes visible to the next ones
/// (`CommandCounterIncrement`).
pub fn command_counter_increment() {
    // SAFETY: a guarded binding, inside the caller's transaction (an ERROR
    // outside one, or after too many commands).
    unsafe { pg_sys::CommandCounterIncrement() }
}

/// Runs `f` with the transaction snapshot pushed as the active one, and
/// pops it after (if `f` raises an ERROR the transaction's abort pops it).
pub fn with_transaction_snapshot<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: guarded bindings inside the caller's transaction;
    // PushActiveSnapshot copies the snapshot it is given if it must.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    let out = f();
    // SAFETY: pops the snapshot pushed above: `f` leaves the active
    // snapshot stack balanced (SPI does).
    unsafe { pg_sys::PopActiveSnapshot() };
    out
}

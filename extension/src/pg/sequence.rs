//! CREATE SEQUENCE and ALTER SEQUENCE as the ProcessUtility hook sees
//! them: the entry point that gives [`crate::sequences`] a view of the
//! statement and, when it asks for this node's INCREMENT and START (or
//! RESTART value), rewrites the statement's option list (on a copy of the
//! tree when PostgreSQL marked it read-only: `UtilityCall::writable_plan`)
//! before PostgreSQL runs it.

use crate::pg::nodes::Node;
use pgrx::pg_sys;
use std::ffi::{CStr, CString};

/// What this node changes in a sequence statement.
pub enum Change {
    /// CREATE SEQUENCE: INCREMENT and START.
    Create { increment: i64, start: i64 },
    /// ALTER SEQUENCE ... RESTART WITH: the value.
    Restart(i64),
}

/// For a CREATE SEQUENCE on a cluster node, this node's INCREMENT and
/// START ([`crate::sequences::node_step`] decides them); for an ALTER
/// SEQUENCE ... RESTART WITH, this node's value
/// ([`crate::sequences::node_restart`]). None for any other statement.
///
/// # Safety
/// `pstmt` is the ProcessUtility hook's statement, valid for the call.
pub unsafe fn change_for(pstmt: *mut pg_sys::PlannedStmt) -> Option<Change> {
    // SAFETY: the caller's contract: `pstmt` is a valid PlannedStmt whose
    // utilityStmt is NULL or a node of it; the views end with this block.
    unsafe {
        let node = Node::from_raw((*pstmt).utilityStmt);
        if let Some(seq) = node.and_then(|n| n.as_create_sequence()) {
            crate::sequences::node_step(seq).map(|(increment, start)| Change::Create { increment, start })
        } else if let Some(alter) = node.and_then(|n| n.as_alter_sequence()) {
            crate::sequences::node_restart(alter).map(Change::Restart)
        } else {
            None
        }
    }
}

/// Rewrites the statement's option list with `change`.
///
/// # Safety
/// `pstmt` is a statement the caller may change (not read-only), whose
/// [`change_for`] was `change`, valid for the call.
pub unsafe fn apply(pstmt: *mut pg_sys::PlannedStmt, change: Change) {
    // SAFETY: the caller's contract; its utilityStmt is the CreateSeqStmt
    // or AlterSeqStmt `change` was made for (a copy keeps the type); the
    // new Lists and DefElems are palloc'd in the current memory context,
    // which lives as long as the statement, by guarded bindings.
    unsafe {
        match change {
            Change::Create { increment, start } => {
                let stmt = (*pstmt).utilityStmt as *mut pg_sys::CreateSeqStmt;
                let mut options = (*stmt).options;
                // A START or INCREMENT given twice is an error: replace the
                // user's (an INCREMENT here is pg_dump's BY 1).
                options = remove_option(options, c"start");
                options = remove_option(options, c"increment");
                options = pg_sys::lappend(options, int_option(c"increment", increment) as *mut std::ffi::c_void);
                options = pg_sys::lappend(options, int_option(c"start", start) as *mut std::ffi::c_void);
                (*stmt).options = options;
            }
            Change::Restart(value) => {
                let stmt = (*pstmt).utilityStmt as *mut pg_sys::AlterSeqStmt;
                let options = remove_option((*stmt).options, c"restart");
                (*stmt).options = pg_sys::lappend(options, int_option(c"restart", value) as *mut std::ffi::c_void);
            }
        }
    }
}

/// A DefElem `name = value`.
///
/// # Safety
/// Inside a memory context that outlives the statement it goes into.
unsafe fn int_option(name: &CStr, value: i64) -> *mut pg_sys::DefElem {
    // SAFETY: guarded node constructors, palloc'd in the caller's context;
    // the strings are copied with pstrdup.
    unsafe {
        let arg = match i32::try_from(value) {
            Ok(v) => pg_sys::makeInteger(v) as *mut pg_sys::Node,
            // Larger values are written as PostgreSQL's parser writes them.
            Err(_) => {
                let text = CString::new(value.to_string()).expect("digits");
                pg_sys::makeFloat(pg_sys::pstrdup(text.as_ptr())) as *mut pg_sys::Node
            }
        };
        pg_sys::makeDefElem(pg_sys::pstrdup(name.as_ptr()), arg, -1)
    }
}

/// `options` without the DefElem called `name`.
///
/// # Safety
/// `options` is NIL or a List of DefElem.
unsafe fn remove_option(options: *mut pg_sys::List, name: &CStr) -> *mut pg_sys::List {
    let mut out: *mut pg_sys::List = std::ptr::null_mut();
    // SAFETY: the caller's contract; every DefElem has a defname; lappend
    // is a guarded binding building a new list in the current context.
    unsafe {
        for elem in pgrx::PgList::<pg_sys::DefElem>::from_pg(options).iter_ptr() {
            if CStr::from_ptr((*elem).defname) != name {
                out = pg_sys::lappend(out, elem as *mut std::ffi::c_void);
            }
        }
    }
    out
}

/// PostgreSQL's own `setval(seq, value, is_called)` (not through SQL: in
/// a session of the proxy parse analysis points SQL calls of it at
/// `mtm.setval`). Checks the session's privileges on the sequence.
pub fn setval(seq: pg_sys::Oid, value: i64, is_called: bool) {
    use pgrx::IntoDatum;
    // SAFETY: setval3_oid is a SQL-callable function of (regclass, int8,
    // bool), called with three non-null datums of those types inside a
    // transaction; its ERRORs (no such sequence, no privilege, value out
    // of range) unwind through pgrx's guarded call.
    unsafe {
        pgrx::direct_function_call::<i64>(pg_sys::setval3_oid, &[seq.into_datum(), value.into_datum(), is_called.into_datum()]);
    }
}

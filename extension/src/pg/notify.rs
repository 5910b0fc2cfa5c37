//! NOTIFY: PostgreSQL's own queueing of a notification (`Async_Notify`,
//! not exported by pgrx) and the parse-analysis hook (installed and
//! chained here) that points a query's calls of `pg_notify()`,
//! `setval()`, `pg_cancel_backend()` and `pg_terminate_backend()` at the
//! extension's functions when [`crate::notify`], [`crate::sequences`] and
//! [`crate::signal`] say so.

use pgrx::pg_guard;
use pgrx::pg_sys;
use std::ffi::{c_char, CStr};

unsafe extern "C-unwind" {
    // Not exported through pg_sys (commands/async.h); called only through
    // pg_guard_ffi_boundary.
    fn Async_Notify(channel: *const c_char, payload: *const c_char);
}

/// PostgreSQL's own NOTIFY of `channel` with `payload` in the current
/// transaction (`Async_Notify`: heard on this node when it commits).
pub fn async_notify(channel: &CStr, payload: &CStr) {
    // SAFETY: in a transaction (the callers run inside a statement or a
    // COMMIT PREPARED); both strings are NUL-terminated, outlive the call
    // and are copied by PostgreSQL into its transaction memory; an ERROR
    // (bad channel, queue full) unwinds through the guarded boundary,
    // which also requires the main thread.
    unsafe { pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| Async_Notify(channel.as_ptr(), payload.as_ptr())) };
}

static mut PREV_POST_PARSE_ANALYZE: pg_sys::post_parse_analyze_hook_type = None;

/// Installs the parse-analysis hook that redirects `pg_notify()` calls,
/// keeping the previous one, which it calls first.
pub fn install_parse_hook() {
    // SAFETY: called once from _PG_init while preloading, before any
    // query, so nothing reads the hook variables concurrently; the
    // previous hook is kept and called first.
    unsafe {
        PREV_POST_PARSE_ANALYZE = pg_sys::post_parse_analyze_hook;
        pg_sys::post_parse_analyze_hook = Some(post_parse_analyze);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn post_parse_analyze(pstate: *mut pg_sys::ParseState, query: *mut pg_sys::Query, jstate: *mut pg_sys::JumbleState) {
    // SAFETY: PREV_POST_PARSE_ANALYZE is written only by
    // install_parse_hook, before any call of this hook; the previous hook
    // gets exactly our arguments, behind the boundary because a raw
    // function pointer is not guarded by pgrx.
    unsafe {
        if let Some(prev) = PREV_POST_PARSE_ANALYZE {
            pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| prev(pstate, query, jstate));
        }
    }
    // SAFETY: PostgreSQL hands the hook a ParseState (or NULL) whose
    // source text, if any, is a string alive for the analysis.
    let source = unsafe {
        if pstate.is_null() || (*pstate).p_sourcetext.is_null() {
            return;
        }
        CStr::from_ptr((*pstate).p_sourcetext).to_bytes()
    };
    let mut calls: Vec<(pg_sys::Oid, pg_sys::Oid)> = Vec::new();
    if let Some(ours) = crate::notify::pg_notify_replacement(source) {
        calls.push((pg_sys::F_PG_NOTIFY.into(), ours));
    }
    if let Some(ours) = crate::sequences::setval_replacements(source) {
        calls.extend(ours);
    }
    calls.extend(crate::signal::replacements(source));
    if !calls.is_empty() {
        // SAFETY: `query` is the analysed tree this hook may change in
        // place; the callback is ours below, whose context is `calls`,
        // alive for the walk. A utility statement's own analysed query
        // (CREATE TABLE AS, EXPLAIN, DECLARE CURSOR), which the walker
        // does not enter, is a node of the same tree.
        unsafe {
            pg_sys::query_tree_walker(query, Some(redirect_calls), (&raw mut calls).cast(), 0);
            if let Some(inner) = utility_query(query) {
                redirect_calls(inner, (&raw mut calls).cast());
            }
        }
    }
}

/// The analysed query inside a utility statement that holds one (CREATE
/// TABLE AS, EXPLAIN, DECLARE CURSOR), if `query` is such a statement.
///
/// # Safety
/// `query` is a valid analysed Query.
unsafe fn utility_query(query: *mut pg_sys::Query) -> Option<*mut pg_sys::Node> {
    // SAFETY: the caller's contract; `utilityStmt` is NULL or a node of
    // the same tree, read as the struct its tag names.
    unsafe {
        let stmt = (*query).utilityStmt;
        if (*query).commandType != pg_sys::CmdType::CMD_UTILITY || stmt.is_null() {
            return None;
        }
        let inner = match (*stmt).type_ {
            pg_sys::NodeTag::T_CreateTableAsStmt => (*stmt.cast::<pg_sys::CreateTableAsStmt>()).query,
            pg_sys::NodeTag::T_ExplainStmt => (*stmt.cast::<pg_sys::ExplainStmt>()).query,
            pg_sys::NodeTag::T_DeclareCursorStmt => (*stmt.cast::<pg_sys::DeclareCursorStmt>()).query,
            _ => return None,
        };
        (!inner.is_null() && (*inner).type_ == pg_sys::NodeTag::T_Query).then_some(inner)
    }
}

/// Points every call of a function of PostgreSQL's in the tree at ours
/// (`context`: the (theirs, ours) oid pairs); same arguments, same result
/// type.
#[pg_guard]
unsafe extern "C-unwind" fn redirect_calls(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: the walkers hand us nodes of the tree being walked, which
    // the post-parse-analysis hook may change, and the context
    // post_parse_analyze passed, a live Vec of oid pairs.
    unsafe {
        if (*node).type_ == pg_sys::NodeTag::T_FuncExpr {
            let f = node.cast::<pg_sys::FuncExpr>();
            let calls = &*context.cast::<Vec<(pg_sys::Oid, pg_sys::Oid)>>();
            if let Some((_, ours)) = calls.iter().find(|(theirs, _)| *theirs == (*f).funcid) {
                (*f).funcid = *ours;
            }
        }
        if (*node).type_ == pg_sys::NodeTag::T_Query {
            return pg_sys::query_tree_walker(node.cast(), Some(redirect_calls), context, 0);
        }
        pg_sys::expression_tree_walker(node, Some(redirect_calls), context)
    }
}

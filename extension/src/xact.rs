//! What a client transaction wrote, told to the proxy that coordinates its
//! commit, and the guard that keeps such a transaction from committing
//! on this node alone.
//!
//! The proxy needs to know, at COMMIT, whether the transaction wrote to a
//! replicated table (then it runs the cluster's two-phase commit) or not
//! (then a plain local COMMIT is right, with no extra round trip). The
//! node knows, so it says so: `multimaster.xact_writes` is a reported
//! setting (GUC_REPORT), switched on by the first write of a transaction
//! and off when the transaction ends; PostgreSQL sends the change as a
//! ParameterStatus message before the next ReadyForQuery, which the proxy
//! reads and swallows. It is set at session level rather than LOCAL so
//! a function's own SET clauses cannot revert it at function exit; a
//! ROLLBACK TO SAVEPOINT does revert it when the writes went with it.
//!
//! Writes counted: INSERT/UPDATE/DELETE/MERGE (also in CTEs and inside
//! functions) on a permanent table, COPY FROM into one, TRUNCATE of one.
//! Temporary and unlogged tables are not replicated and do not count.
//! Changes applied for a peer (replication role `replica`) never count.
//!
//! Sessions the proxy opens set `multimaster.coordinated_commit`: in them,
//! a plain COMMIT of a transaction that wrote is refused (it would commit
//! here only), so a write the proxy did not expect — e.g. a function
//! called from a SELECT it let run without its own transaction — fails
//! cleanly instead of letting the nodes diverge.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::prelude::*;
use pgrx::pg_sys;

/// `multimaster.xact_writes` (reported, read-only for users).
pub static XACT_WRITES: GucSetting<bool> = GucSetting::<bool>::new(false);

/// `multimaster.coordinated_commit`: set by the proxy on its sessions.
pub static COORDINATED_COMMIT: GucSetting<bool> = GucSetting::<bool>::new(false);

/// `multimaster.direct_writes`: a session connected to a node directly
/// may write to replicated tables (superuser; repairs and tests).
pub static DIRECT_WRITES: GucSetting<bool> = GucSetting::<bool>::new(false);

static mut PREV_EXECUTOR_START: pg_sys::ExecutorStart_hook_type = None;
static mut PREV_EXECUTOR_END: pg_sys::ExecutorEnd_hook_type = None;
static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

/// Defines the settings and installs the hooks (from `_PG_init`).
pub fn init() {
    GucRegistry::define_bool_guc(
        c"multimaster.xact_writes",
        c"Whether the current transaction wrote to a replicated table.",
        c"Reported to the client (the proxy), which commits such transactions with the cluster's two-phase commit.",
        &XACT_WRITES,
        GucContext::Internal,
        GucFlags::REPORT | GucFlags::NO_RESET_ALL | GucFlags::NO_SHOW_ALL,
    );
    GucRegistry::define_bool_guc(
        c"multimaster.coordinated_commit",
        c"Refuse a plain COMMIT of a transaction that wrote to a replicated table.",
        c"Set by mtm-proxy on its sessions: their writing transactions commit through the cluster's two-phase commit.",
        &COORDINATED_COMMIT,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"multimaster.direct_writes",
        c"Allow writes to replicated tables in a session connected to this node directly.",
        c"Off: such writes (rows and schema changes) are refused; they go through mtm-proxy, which commits them on every node at once. On: they commit here and reach the other nodes afterwards, with no conflict check across nodes.",
        &DIRECT_WRITES,
        GucContext::Suset,
        GucFlags::default(),
    );
    // SAFETY: while the library is preloaded, before any query runs; the
    // previous hooks are kept and called.
    unsafe {
        PREV_EXECUTOR_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start);
        PREV_EXECUTOR_END = pg_sys::ExecutorEnd_hook;
        pg_sys::ExecutorEnd_hook = Some(executor_end);
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
        pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(subxact_callback), std::ptr::null_mut());
    }
}

/// Whether changes made now are a client's (not applied for a peer).
pub(crate) fn client_change() -> bool {
    // SAFETY: plain reads of backend-global settings.
    unsafe {
        pg_sys::SessionReplicationRole != pg_sys::SESSION_REPLICATION_ROLE_REPLICA as i32
            && pg_sys::replorigin_session_origin == pg_sys::InvalidRepOriginId as pg_sys::RepOriginId
    }
}

pub(crate) fn set_writes(on: bool) {
    // Other databases are local to each node: their writes commit here.
    if XACT_WRITES.get() == on || (on && !crate::ddl::replicated_database()) {
        return;
    }
    let value = if on { c"on" } else { c"off" };
    // SAFETY: a defined setting, set as the server itself sets internal
    // ones; errors are raised as ERROR through the guarded binding.
    unsafe {
        pg_sys::set_config_option(
            c"multimaster.xact_writes".as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_INTERNAL,
            // SESSION, not OVERRIDE: an override also becomes the reset
            // value and survives an abort; this must not.
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SET,
            true,
            0,
            false,
        );
    }
}

/// Refuses a client's write to replicated tables (`relids`; empty: a
/// schema change or a statement whose tables are not known) in a session
/// that did not come through the proxy: it would commit on this node
/// alone first, with no conflict check against the others. The
/// extension's own tables (schema `mtm`, written by `mtm.init_cluster`
/// and friends on each node) and extension scripts are exempt.
pub(crate) fn refuse_direct_write(relids: &[pg_sys::Oid], what: &str) {
    // SAFETY: a plain read of a backend-global flag.
    let in_extension_script = unsafe { pg_sys::creating_extension };
    if COORDINATED_COMMIT.get() || DIRECT_WRITES.get() || in_extension_script || !client_change() || !crate::ddl::replicated_database() {
        return;
    }
    // SAFETY: syscache lookups of relations the statement has locked.
    let mtm = unsafe { pg_sys::get_namespace_oid(c"mtm".as_ptr(), true) };
    if !relids.is_empty() && relids.iter().all(|&r| unsafe { pg_sys::get_rel_namespace(r) } == mtm) {
        return;
    }
    crate::raise(
        PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
        format!("multimaster: {what} on a node directly is refused: writes go through mtm-proxy, which commits them on every node at once"),
        "Connect through mtm-proxy (reads are allowed here). For repairs on this node, a superuser can SET multimaster.direct_writes = on: such writes reach the other nodes afterwards, with no conflict check.",
        "refuse_direct_write",
    );
}

/// Whether relation `relid` is replicated (a permanent table).
fn replicated(relid: pg_sys::Oid) -> bool {
    // SAFETY: a syscache lookup of a relation the caller has locked.
    unsafe { pg_sys::get_rel_persistence(relid) as u8 == pg_sys::RELPERSISTENCE_PERMANENT }
}

/// The OIDs of the relations a plan writes to.
///
/// # Safety
/// `stmt` is a valid PlannedStmt.
unsafe fn result_relids(stmt: *mut pg_sys::PlannedStmt) -> Vec<pg_sys::Oid> {
    let results = (*stmt).resultRelations;
    let rtable = (*stmt).rtable;
    if results.is_null() || rtable.is_null() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for i in 0..(*results).length as usize {
        let rti = (*(*results).elements.add(i)).int_value as usize;
        if rti == 0 || rti > (*rtable).length as usize {
            continue;
        }
        let rte = (*(*rtable).elements.add(rti - 1)).ptr_value as *mut pg_sys::RangeTblEntry;
        if !rte.is_null() {
            out.push((*rte).relid);
        }
    }
    out
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_start(query: *mut pg_sys::QueryDesc, eflags: std::ffi::c_int) {
    let op = (*query).operation;
    let stmt = (*query).plannedstmt;
    let modifies = op != pg_sys::CmdType::CMD_SELECT || (!stmt.is_null() && (*stmt).hasModifyingCTE);
    let explain_only = eflags & pg_sys::EXEC_FLAG_EXPLAIN_ONLY as i32 != 0;
    // A proxy session that already wrote has nothing more to learn here;
    // elsewhere each write may have to be refused.
    let known = XACT_WRITES.get() && COORDINATED_COMMIT.get();
    let client = client_change();
    if client {
        crate::conflicts::check_current();
    }
    if modifies && !explain_only && !known && client && !crate::notify::own_work() {
        let written: Vec<pg_sys::Oid> = result_relids(stmt).into_iter().filter(|&r| replicated(r)).collect();
        if !written.is_empty() {
            refuse_direct_write(&written, "writing to a replicated table");
            if !XACT_WRITES.get() {
                set_writes(true);
            }
        }
    }
    if !explain_only {
        crate::ddl::begin_statement(query);
    }
    match PREV_EXECUTOR_START {
        Some(prev) => prev(query, eflags),
        None => pg_sys::standard_ExecutorStart(query, eflags),
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_end(query: *mut pg_sys::QueryDesc) {
    match PREV_EXECUTOR_END {
        Some(prev) => prev(query),
        None => pg_sys::standard_ExecutorEnd(query),
    }
    crate::ddl::end_statement(query);
}

#[pg_guard]
unsafe extern "C-unwind" fn subxact_callback(
    event: pg_sys::SubXactEvent::Type,
    _my: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    let level = pg_sys::GetCurrentTransactionNestLevel();
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        crate::ddl::aborted(level);
        crate::notify::subtransaction_ended(level, true);
    } else if event == pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB {
        crate::notify::subtransaction_ended(level, false);
    }
}

/// The relation a RangeVar names, if it exists.
pub(crate) unsafe fn range_var_relid(rv: *mut pg_sys::RangeVar) -> Option<pg_sys::Oid> {
    if rv.is_null() {
        return None;
    }
    let oid = pg_sys::RangeVarGetRelidExtended(rv, pg_sys::NoLock as i32, pg_sys::RVROption::RVR_MISSING_OK, None, std::ptr::null_mut());
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// Whether a utility statement writes rows of a replicated table that the
/// executor hook does not see (COPY FROM, TRUNCATE).
unsafe fn utility_writes(node: *mut pg_sys::Node) -> bool {
    if node.is_null() {
        return false;
    }
    match (*node).type_ {
        pg_sys::NodeTag::T_CopyStmt => {
            let copy = node as *mut pg_sys::CopyStmt;
            (*copy).is_from && range_var_relid((*copy).relation).is_some_and(replicated)
        }
        pg_sys::NodeTag::T_TruncateStmt => {
            let rels = (*(node as *mut pg_sys::TruncateStmt)).relations;
            !rels.is_null()
                && (0..(*rels).length as usize).any(|i| {
                    range_var_relid((*(*rels).elements.add(i)).ptr_value as *mut pg_sys::RangeVar).is_some_and(replicated)
                })
        }
        _ => false,
    }
}

/// A COMMIT PREPARED (`commit`) or ROLLBACK PREPARED of `gid`.
struct Finishing {
    gid: String,
    commit: bool,
}

/// Tells the resolver which backend coordinates an `mtm-` gid, and says
/// whether the statement finishes a prepared transaction.
unsafe fn note_two_phase(node: *mut pg_sys::Node) -> Option<Finishing> {
    if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_TransactionStmt {
        return None;
    }
    let stmt = node as *mut pg_sys::TransactionStmt;
    if (*stmt).gid.is_null() {
        return None;
    }
    let gid = std::ffi::CStr::from_ptr((*stmt).gid).to_string_lossy().into_owned();
    match (*stmt).kind {
        pg_sys::TransactionStmtKind::TRANS_STMT_PREPARE => {
            crate::resolver::note_prepare(&gid);
            crate::notify::prepare(&gid);
            None
        }
        pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED | pg_sys::TransactionStmtKind::TRANS_STMT_ROLLBACK_PREPARED => {
            crate::resolver::note_finished(&gid);
            let commit = (*stmt).kind == pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED;
            Some(Finishing { gid, commit })
        }
        _ => None,
    }
}

/// Logs the outcome of an `mtm-` gid about to be finished here, if it is
/// prepared here (a COMMIT PREPARED of an unknown gid is an error, not a
/// decision).
fn log_finishing(f: &Finishing) {
    if !mtm_state::decisions::loggable(&f.gid) {
        return;
    }
    if crate::prepared_here(&f.gid) {
        use mtm_state::decisions::State;
        crate::decisions::log(&f.gid, if f.commit { State::Committed } else { State::Aborted });
    }
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    let node = (*pstmt).utilityStmt;
    if !node.is_null() && (*node).type_ == pg_sys::NodeTag::T_NotifyStmt && crate::notify::take_over(node as *mut pg_sys::NotifyStmt) {
        return;
    }
    if client_change() && utility_writes(node) {
        refuse_direct_write(&[], "COPY FROM or TRUNCATE of a replicated table");
        set_writes(true);
    }
    let finishing = note_two_phase(node);
    if let Some(f) = &finishing {
        log_finishing(f);
    }
    let (pstmt, read_only_tree) = crate::sequences::adjust(pstmt, read_only_tree);
    let run = || match PREV_PROCESS_UTILITY {
        Some(prev) => prev(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
        None => pg_sys::standard_ProcessUtility(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
    };
    match crate::ddl::begin(pstmt, query_string, params) {
        None => run(),
        Some(capture) => {
            crate::ddl::while_capturing(run);
            crate::ddl::keep_replica_identity(pstmt);
            crate::ddl::refuse_values_per_node(pstmt);
            // A schema change goes through the cluster's commit like a write.
            if crate::ddl::finish(capture) {
                // After it ran: only now is it known not to be temp-only.
                refuse_direct_write(&[], "a schema change");
                set_writes(true);
            }
            return;
        }
    }
    // A peer's replayed DDL, or a statement inside a captured one.
    crate::ddl::keep_replica_identity(pstmt);
    if let Some(f) = finishing.as_ref().filter(|f| f.commit) {
        crate::notify::deliver(&f.gid);
    }
    if finishing.is_some() {
        // The peers apply it as soon as the walsenders see it.
        pg_sys::WalSndWakeup();
    }
}


#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT if XACT_WRITES.get() && COORDINATED_COMMIT.get() => {
            crate::raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "multimaster: this transaction wrote to a replicated table but was not committed through the cluster's two-phase commit, so it is rolled back",
                "Run the writes inside BEGIN ... COMMIT and send COMMIT (or COMMIT AND CHAIN) as a statement of its own or at the end of a multi-statement query.",
                "xact_callback",
            );
        }
        // PostgreSQL does not decode a prepared transaction that changed
        // nothing (a DELETE that matched no row), so the peers would never
        // see it nor vote: give every prepare one change, a transactional
        // message naming this node as the one that prepared it.
        pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT if client_change() => crate::conflicts::check_current(),
        pg_sys::XactEvent::XACT_EVENT_PRE_PREPARE if client_change() => {
            crate::conflicts::check_current();
            let me = crate::votes::MY_NODE.get().load(std::sync::atomic::Ordering::Relaxed);
            crate::votes::log_message(c"mtm_prepare", &me.to_be_bytes(), true);
        }
        // The transaction is over (an abort restores the value itself).
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            crate::notify::transaction_ended();
            if event == pg_sys::XactEvent::XACT_EVENT_PREPARE {
                crate::votes::note_prepared_at(pg_sys::GetXLogInsertRecPtr());
            }
            if XACT_WRITES.get() {
                // The peers vote on (or apply) this transaction as soon as
                // the walsenders see it: do not leave that to their timers.
                pg_sys::WalSndWakeup();
            }
            set_writes(false);
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT => {
            crate::ddl::aborted(0);
            crate::notify::transaction_ended();
        }
        _ => {}
    }
}

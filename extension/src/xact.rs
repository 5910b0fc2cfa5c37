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

#![deny(unsafe_code)]

use crate::pg::xact::{ExecutorEnd, ExecutorRun, ExecutorStart, UtilityCall, UtilityStmt};
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
    crate::pg::xact::install_hooks();
}

/// Whether changes made now are a client's (not applied for a peer).
pub(crate) fn client_change() -> bool {
    !crate::pg::xact::replication_role_is_replica() && crate::pg::origin::session_origin() == pg_sys::InvalidRepOriginId as pg_sys::RepOriginId
}

pub(crate) fn set_writes(on: bool) {
    ONLY_NOTIFIES.set(false);
    // Other databases are local to each node: their writes commit here.
    if XACT_WRITES.get() == on || (on && !crate::ddl::replicated_database()) {
        return;
    }
    let value = if on { c"on" } else { c"off" };
    // SESSION, not OVERRIDE: an override also becomes the reset value and
    // survives an abort; this must not.
    crate::pg::guc::set_internal_for_session(c"multimaster.xact_writes", value);
}

thread_local! {
    /// What made the open transaction a write is NOTIFY alone.
    static ONLY_NOTIFIES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A NOTIFY taken over: the transaction goes through the cluster's
/// commit, like a write.
pub(crate) fn set_writes_for_notify() {
    let only_notifies_so_far = !XACT_WRITES.get() || ONLY_NOTIFIES.get();
    set_writes(true);
    ONLY_NOTIFIES.set(only_notifies_so_far && XACT_WRITES.get());
}

/// Whether the open transaction counts as a write only for its NOTIFYs.
pub(crate) fn writes_only_notifies() -> bool {
    ONLY_NOTIFIES.get() && XACT_WRITES.get()
}

/// Refuses a client's write to replicated tables (`relids`; empty: a
/// schema change or a statement whose tables are not known) in a session
/// that did not come through the proxy: it would commit on this node
/// alone first, with no conflict check against the others. The
/// extension's own tables (schema `mtm`, written by `mtm.init_cluster`
/// and friends on each node) and extension scripts are exempt.
pub(crate) fn refuse_direct_write(relids: &[pg_sys::Oid], what: &str) {
    let in_extension_script = crate::pg::xact::creating_extension();
    if COORDINATED_COMMIT.get() || DIRECT_WRITES.get() || in_extension_script || !client_change() || !crate::ddl::replicated_database() {
        return;
    }
    // Syscache lookups of relations the statement has locked.
    let mtm = crate::pg::catalog::namespace_oid(c"mtm");
    if !relids.is_empty() && relids.iter().all(|&r| crate::pg::catalog::relation_namespace(r) == mtm) {
        return;
    }
    crate::raise(
        PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
        format!("multimaster: {what} on a node directly is refused: writes go through mtm-proxy, which commits them on every node at once"),
        "Connect through mtm-proxy (reads are allowed here). For repairs on this node, a superuser can SET multimaster.direct_writes = on: such writes reach the other nodes afterwards, with no conflict check.",
        "refuse_direct_write",
    );
}

/// Whether relation `relid` is replicated (a permanent table; the caller
/// has locked it).
fn replicated(relid: pg_sys::Oid) -> bool {
    crate::pg::catalog::relation_persistence(relid) == pg_sys::RELPERSISTENCE_PERMANENT
}

/// The executor hook: the write guard and `xact_writes` for a statement
/// about to run, then the statement's start.
pub(crate) fn executor_start(query: ExecutorStart<'_>) {
    let modifies = query.operation() != pg_sys::CmdType::CMD_SELECT || query.has_modifying_cte();
    let explain_only = query.eflags() & pg_sys::EXEC_FLAG_EXPLAIN_ONLY as i32 != 0;
    // A proxy session that already wrote has nothing more to learn here
    // (unless all it did was NOTIFY: a LISTEN may still make that a local
    // commit, which a row written now must forbid); elsewhere each write
    // may have to be refused.
    let known = XACT_WRITES.get() && COORDINATED_COMMIT.get() && !ONLY_NOTIFIES.get();
    let client = client_change();
    if client {
        crate::conflicts::check_current();
    }
    if modifies && !explain_only && !known && client && !crate::notify::own_work() {
        let written: Vec<pg_sys::Oid> = query.result_relids().into_iter().filter(|&r| replicated(r)).collect();
        if !written.is_empty() {
            refuse_direct_write(&written, "writing to a replicated table");
            set_writes(true);
        }
    }
    if !explain_only {
        crate::ddl::capture_query(query.query_desc());
    }
    query.run();
}

/// The executor's run hook: DDL capture follows a CREATE TABLE AS's query.
pub(crate) fn executor_run(run: ExecutorRun<'_>) {
    crate::ddl::executor_run(run);
}

/// The executor's end hook: the statement ends, then DDL capture hears it.
pub(crate) fn executor_end(query: ExecutorEnd<'_>) {
    let address = query.address();
    query.run();
    crate::ddl::end_statement(address);
}

/// The subtransaction callback: DDL capture and NOTIFY follow savepoints.
pub(crate) fn subxact_callback(event: pg_sys::SubXactEvent::Type) {
    let level = crate::pg::xact::nest_level();
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        crate::ddl::aborted(level);
        crate::notify::subtransaction_ended(level, true);
    } else if event == pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB {
        crate::notify::subtransaction_ended(level, false);
    }
}


/// Whether a utility statement writes rows of a replicated table that the
/// executor hook does not see (COPY FROM, TRUNCATE).
fn utility_writes(stmt: &UtilityStmt<'_>) -> bool {
    match stmt {
        UtilityStmt::Copy { is_from, relation } => *is_from && relation.and_then(crate::pg::catalog::range_var_relid).is_some_and(replicated),
        UtilityStmt::Truncate(rels) => rels.iter().any(|rv| rv.and_then(crate::pg::catalog::range_var_relid).is_some_and(replicated)),
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
fn note_two_phase(stmt: &UtilityStmt<'_>) -> Option<Finishing> {
    let UtilityStmt::Transaction { kind, gid: Some(gid) } = stmt else {
        return None;
    };
    let gid = gid.to_string_lossy().into_owned();
    match *kind {
        pg_sys::TransactionStmtKind::TRANS_STMT_PREPARE => {
            crate::resolver::note_prepare(&gid);
            crate::notify::prepare(&gid);
            None
        }
        // PostgreSQL refuses it there, after this hook: nothing to note.
        pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED | pg_sys::TransactionStmtKind::TRANS_STMT_ROLLBACK_PREPARED
            if crate::pg::twophase::in_transaction_block() =>
        {
            None
        }
        pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED | pg_sys::TransactionStmtKind::TRANS_STMT_ROLLBACK_PREPARED => {
            if mtm_state::decisions::loggable(&gid) {
                // The cluster decided; the client's statement_timeout must
                // not leave the decision half carried out.
                crate::pg::proc::disarm_statement_timeout();
            }
            crate::resolver::note_finished(&gid);
            let commit = *kind == pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED;
            Some(Finishing { gid, commit })
        }
        _ => None,
    }
}

/// Logs the outcome of an `mtm-` gid about to be finished here, if it is
/// prepared here (a COMMIT PREPARED of an unknown gid is an error, not a
/// decision). A statement against what this node promised is refused:
/// ROLLBACK PREPARED of a gid it promised to commit (a majority may have
/// promised too, and a resolver will commit it) — e.g. the proxy's
/// rollback after its wait for the promises was cancelled — and COMMIT
/// PREPARED of one it promised a resolver to roll back. The resolvers
/// finish such a gid: nobody here coordinates it any more.
fn log_finishing(f: &Finishing) {
    use mtm_state::decisions::State;
    if !mtm_state::decisions::loggable(&f.gid) || !crate::prepared_here(&f.gid) {
        return;
    }
    match (crate::decisions::state(&f.gid), f.commit) {
        (Some(State::Precommitted | State::Committed), false) => crate::raise(
            PgSqlErrorCode::ERRCODE_T_R_STATEMENT_COMPLETION_UNKNOWN,
            format!("transaction {} cannot be rolled back here: this node promised to commit it", f.gid),
            "A majority of the nodes may have promised too; the cluster's resolvers finish it within seconds.",
            "ROLLBACK PREPARED",
        ),
        (Some(State::Preaborted | State::Aborted), true) => crate::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("transaction {} cannot be committed here: this node promised to roll it back", f.gid),
            "The cluster's resolvers finish it within seconds.",
            "COMMIT PREPARED",
        ),
        (_, commit) => {
            crate::decisions::log(&f.gid, if commit { State::Committed } else { State::Aborted });
        }
    }
}

/// The utility hook: NOTIFY taken over, the write guard for COPY FROM and
/// TRUNCATE, 2PC bookkeeping, per-node sequence options, DDL capture.
pub(crate) fn process_utility(mut call: UtilityCall<'_>) {
    let stmt = call.statement();
    if let UtilityStmt::Notify { channel, payload } = &stmt {
        if crate::notify::take_over(channel, payload) {
            return;
        }
    }
    if matches!(stmt, UtilityStmt::Listen) {
        crate::notify::listen_seen();
    }
    if client_change() && utility_writes(&stmt) {
        refuse_direct_write(&[], "COPY FROM or TRUNCATE of a replicated table");
        set_writes(true);
    }
    // In another database prepared transactions are the node's own.
    let finishing = if crate::ddl::replicated_database() { note_two_phase(&stmt) } else { None };
    if let Some(f) = &finishing {
        log_finishing(f);
    }
    // A client's own gid finished from a session of the proxy: the
    // statement returns once every node has finished it.
    let client_gid = finishing.as_ref().filter(|f| COORDINATED_COMMIT.get() && client_change() && !crate::votes::acked(&f.gid)).map(|f| f.gid.clone());
    if let Some(gid) = &client_gid {
        crate::votes::forget_finished(gid);
    }
    call.adjust_sequences();
    let (pstmt, query_string, params) = (call.plan(), call.query_string(), call.params());
    let run = move || call.run();
    match crate::ddl::capture(pstmt, query_string, params) {
        None => crate::ddl::run_uncaptured(pstmt, run),
        Some(mut capture) => {
            crate::ddl::run_captured(&mut capture, run);
            crate::ddl::keep_replica_identity(pstmt);
            crate::ddl::refuse_values_per_node(pstmt, &capture);
            // A schema change goes through the cluster's commit like a write.
            let schema_change = crate::ddl::finish(capture);
            if schema_change {
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
        crate::pg::rmgr::wake_walsenders();
    }
    if let Some(gid) = client_gid {
        crate::votes::await_finished(&gid);
    }
}

/// Prefix of the transactional message every prepare of a client's
/// transaction carries: this node's id (4 bytes) and the name of the
/// role that prepares it, which owns the peers' copies too (a client's
/// own gid is finished by that role from a session on any node).
pub const PREPARE_MESSAGE: &std::ffi::CStr = c"mtm_prepare";

/// The transaction callback: the plain-COMMIT guard, conflict checks, the
/// prepare's marker message, and the end of the transaction's bookkeeping.
pub(crate) fn xact_callback(event: pg_sys::XactEvent::Type) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT if XACT_WRITES.get() && COORDINATED_COMMIT.get() => {
            crate::raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "multimaster: this transaction wrote to a replicated table but was not committed through the cluster's two-phase commit, so it is rolled back",
                "Run the writes inside BEGIN ... COMMIT through mtm-proxy, with the COMMIT sent by the client (not by a procedure or DO block).",
                "xact_callback",
            );
        }
        // PostgreSQL does not decode a prepared transaction that changed
        // nothing (a DELETE that matched no row), so the peers would never
        // see it nor vote: give every prepare one change, a transactional
        // message naming this node as the one that prepared it.
        pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT if client_change() => {
            crate::conflicts::check_current();
            // Committed here without PREPARE (it ran LISTEN): its NOTIFYs
            // are PostgreSQL's own on this node.
            crate::notify::before_local_commit();
        }
        pg_sys::XactEvent::XACT_EVENT_PRE_PREPARE if client_change() => {
            if COORDINATED_COMMIT.get() && XACT_WRITES.get() {
                crate::votes::refuse_if_a_peer_is_unreachable();
            }
            crate::conflicts::check_current();
            let me = crate::votes::MY_NODE.get().load(std::sync::atomic::Ordering::Relaxed);
            let mut content = me.to_be_bytes().to_vec();
            content.extend_from_slice(crate::pg::catalog::current_user_name().as_bytes());
            crate::pg::rmgr::log_logical_message(PREPARE_MESSAGE, &content, true);
        }
        // The transaction is over (an abort restores the value itself).
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            crate::resolver::transaction_ended(event == pg_sys::XactEvent::XACT_EVENT_PREPARE);
            crate::notify::transaction_ended();
            if event == pg_sys::XactEvent::XACT_EVENT_PREPARE {
                crate::votes::note_prepared_at(crate::pg::rmgr::wal_insert_position());
            }
            if XACT_WRITES.get() || event == pg_sys::XactEvent::XACT_EVENT_PREPARE {
                // The peers vote on (or apply) this transaction as soon as
                // the walsenders see it — a prepared one that only read
                // too: do not leave that to their timers.
                crate::pg::rmgr::wake_walsenders();
            }
            set_writes(false);
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT => {
            crate::ddl::aborted(0);
            crate::resolver::transaction_ended(false);
            crate::notify::transaction_ended();
        }
        _ => {}
    }
}

//! Transactions and the statements in them, as [`crate::xact`] sees them:
//! the executor (`ExecutorStart`/`ExecutorRun`/`ExecutorEnd`) and utility
//! (`ProcessUtility`) hooks and the transaction and subtransaction
//! callbacks, as trampolines with views of their arguments that chain to
//! the previous hooks; snapshots ([`with_snapshot`]); the transaction and
//! session state the write guard reads (nesting level, replication role,
//! extension scripts), setting `multimaster.xact_writes` the way the
//! server sets its own, and the catalog lookups the guard makes.

use crate::pg::nodes::RangeVar;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::{c_char, c_int, CStr};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// Runs `f` with an active snapshot: SPI needs one, and a utility
/// statement (or a hook around it) may run without. Inside a transaction.
pub fn with_snapshot<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: reads whether this backend's snapshot stack has an entry.
    if unsafe { pg_sys::ActiveSnapshotSet() } {
        return f();
    }
    with_transaction_snapshot(f)
}

/// Transaction and subtransaction events of this process (the callbacks
/// below count every one): while it stays the same, no (sub)transaction
/// has started or ended. (A PostgreSQL process has one thread.)
static BOUNDARIES: AtomicU64 = AtomicU64::new(0);
/// The callbacks counting BOUNDARIES are registered.
static COUNTING: AtomicBool = AtomicBool::new(false);

/// This backend's current (local transaction id, subtransaction id).
fn current_transaction() -> (pg_sys::LocalTransactionId, pg_sys::SubTransactionId) {
    // SAFETY: MyProc is this backend's own PGPROC, set up before extension
    // code runs; only this backend writes its lxid. The subtransaction id
    // is backend-local state, readable in any transaction state.
    unsafe { ((*pg_sys::MyProc).lxid, pg_sys::GetCurrentSubTransactionId()) }
}

/// The (sub)transaction current when it was made, which
/// [`TransactionMark::is_current`] compares with the current one: a
/// counter read while no (sub)transaction started or ended since, the
/// (lxid, subtransaction id) pair (a call into PostgreSQL) otherwise.
#[derive(Clone, Copy)]
pub(super) struct TransactionMark {
    /// BOUNDARIES when made; u64::MAX, which it never reaches, when made
    /// outside a (sub)transaction in progress (from there it can change
    /// without a callback: StartTransaction, CleanupSubTransaction of an
    /// aborted one) or uncounted.
    boundaries: u64,
    transaction: (pg_sys::LocalTransactionId, pg_sys::SubTransactionId),
}

impl TransactionMark {
    /// The current (sub)transaction.
    pub(super) fn now() -> Self {
        // SAFETY: reads this backend's own transaction state; no ERROR.
        let in_progress = unsafe { pg_sys::IsTransactionState() };
        let boundaries = if in_progress && COUNTING.load(Relaxed) { BOUNDARIES.load(Relaxed) } else { u64::MAX };
        TransactionMark { boundaries, transaction: current_transaction() }
    }

    /// Whether the (sub)transaction it was made in is the current one.
    /// From one in progress, the current (sub)transaction ends only
    /// through a callback (COMMIT_SUB, ABORT_SUB; COMMIT, PREPARE, ABORT or
    /// their parallel forms) and a subtransaction starts with START_SUB,
    /// so an unmoved counter means yes; the exception, a savepoint pushed
    /// by SAVEPOINT and started only when that statement ends, leaves the
    /// marked one in progress beneath it, nothing of it ended or released,
    /// which is what callers rely on. A moved counter may still come back
    /// to it (a subtransaction begun and ended since): the pair tells.
    pub(super) fn is_current(&self) -> bool {
        BOUNDARIES.load(Relaxed) == self.boundaries || current_transaction() == self.transaction
    }
}

static mut PREV_EXECUTOR_START: pg_sys::ExecutorStart_hook_type = None;
static mut PREV_EXECUTOR_RUN: pg_sys::ExecutorRun_hook_type = None;
static mut PREV_EXECUTOR_END: pg_sys::ExecutorEnd_hook_type = None;
static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

/// Installs the executor and utility hooks (keeping the previous ones,
/// which [`ExecutorStart::run`] and friends call) and registers the
/// transaction callbacks (from `_PG_init`, while preloading).
pub fn install_hooks() {
    // SAFETY: called once from _PG_init while the library is preloaded,
    // before any query runs and with no other thread, so nothing reads the
    // hook variables meanwhile; the callbacks live as long as the library.
    unsafe {
        PREV_EXECUTOR_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start);
        PREV_EXECUTOR_RUN = pg_sys::ExecutorRun_hook;
        pg_sys::ExecutorRun_hook = Some(executor_run);
        PREV_EXECUTOR_END = pg_sys::ExecutorEnd_hook;
        pg_sys::ExecutorEnd_hook = Some(executor_end);
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
        pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(subxact_callback), std::ptr::null_mut());
    }
    COUNTING.store(true, Relaxed);
}

/// An `ExecutorStart` call, for the hook's duration. Only the trampoline
/// makes one, from the arguments PostgreSQL passed.
pub struct ExecutorStart<'a> {
    query: *mut pg_sys::QueryDesc,
    eflags: c_int,
    _call: PhantomData<&'a ()>,
}

impl<'a> ExecutorStart<'a> {
    /// The statement's command (SELECT, INSERT...).
    pub fn operation(&self) -> pg_sys::CmdType::Type {
        // SAFETY: the QueryDesc PostgreSQL passed, valid for the call.
        unsafe { (*self.query).operation }
    }

    /// Whether its plan has a data-modifying CTE.
    pub fn has_modifying_cte(&self) -> bool {
        // SAFETY: as in operation; plannedstmt is null or a valid plan.
        unsafe {
            let stmt = (*self.query).plannedstmt;
            !stmt.is_null() && (*stmt).hasModifyingCTE
        }
    }

    /// The executor flags (`EXEC_FLAG_*`).
    pub fn eflags(&self) -> c_int {
        self.eflags
    }

    /// The OIDs of the relations its plan writes to.
    pub fn result_relids(&self) -> Vec<pg_sys::Oid> {
        // SAFETY: as in operation: the plan and its lists are valid for the
        // call; resultRelations holds 1-based range-table indexes, checked
        // against the range table's length before use.
        unsafe {
            let stmt = (*self.query).plannedstmt;
            if stmt.is_null() {
                return Vec::new();
            }
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
    }

    /// The QueryDesc, viewed for the call.
    pub fn query_desc(&self) -> crate::pg::nodes::QueryDesc<'a> {
        // SAFETY: the non-NULL QueryDesc PostgreSQL passed, alive for the
        // hook's duration, which 'a stands for.
        unsafe { crate::pg::nodes::QueryDesc::from_raw(self.query) }
    }

    /// Runs the previous hook, or the standard ExecutorStart.
    pub fn run(self) {
        // SAFETY: PostgreSQL's own arguments, passed on unchanged, once,
        // under keep::call (inside the trampoline's keep::hook); the
        // closure holds nothing to drop.
        unsafe {
            crate::pg::keep::call(|| match PREV_EXECUTOR_START {
                Some(prev) => prev(self.query, self.eflags),
                None => raw::standard_ExecutorStart(self.query, self.eflags),
            })
        }
    }
}

/// An `ExecutorRun` call, for the hook's duration. Only the trampoline
/// makes one, from the arguments PostgreSQL passed.
pub struct ExecutorRun<'a> {
    query: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
    execute_once: bool,
    _call: PhantomData<&'a ()>,
}

impl ExecutorRun<'_> {
    /// Whether its rows go into the table a CREATE TABLE AS (SELECT INTO,
    /// `… AS EXECUTE`) makes as the run starts.
    pub fn fills_new_table(&self) -> bool {
        // SAFETY: the QueryDesc PostgreSQL passed, valid for the call; its
        // `dest` is set before the run (NULL checked).
        unsafe {
            let dest = (*self.query).dest;
            !dest.is_null() && (*dest).mydest == pg_sys::CommandDest::DestIntoRel
        }
    }

    /// The columns of its result, in order: those the new table gets
    /// (`intorel_startup` reads the same descriptor).
    pub fn result_columns(&self) -> Vec<crate::pg::nodes::ResultColumn> {
        // SAFETY: as above; `tupDesc` is NULL or the plan's result
        // descriptor, set by ExecutorStart and alive for the run.
        unsafe { crate::pg::nodes::ResultColumn::of((*self.query).tupDesc) }.unwrap_or_default()
    }

    /// Runs the previous hook, or the standard ExecutorRun.
    pub fn run(self) {
        // SAFETY: PostgreSQL's own arguments, passed on unchanged, once,
        // under keep::call as in ExecutorStart::run.
        unsafe {
            crate::pg::keep::call(|| match PREV_EXECUTOR_RUN {
                Some(prev) => prev(self.query, self.direction, self.count, self.execute_once),
                None => raw::standard_ExecutorRun(self.query, self.direction, self.count, self.execute_once),
            })
        }
    }
}

/// An `ExecutorEnd` call, for the hook's duration. Only the trampoline
/// makes one.
pub struct ExecutorEnd<'a> {
    query: *mut pg_sys::QueryDesc,
    _call: PhantomData<&'a ()>,
}

impl ExecutorEnd<'_> {
    /// The QueryDesc's address: the identity of its run from
    /// ExecutorStart on (see [`crate::pg::nodes::QueryDesc::address`]).
    pub fn address(&self) -> usize {
        self.query as usize
    }

    /// Runs the previous hook, or the standard ExecutorEnd.
    pub fn run(self) {
        // SAFETY: PostgreSQL's own argument, passed on unchanged, once,
        // under keep::call as in ExecutorStart::run.
        unsafe {
            crate::pg::keep::call(|| match PREV_EXECUTOR_END {
                Some(prev) => prev(self.query),
                None => raw::standard_ExecutorEnd(self.query),
            })
        }
    }
}

/// A `ProcessUtility` call, for the hook's duration. Only the trampoline
/// makes one, from the arguments PostgreSQL passed.
pub struct UtilityCall<'a> {
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
    _call: PhantomData<&'a ()>,
}

/// The utility statement of a [`UtilityCall`], as far as the write guard
/// and the 2PC bookkeeping look into it.
pub enum UtilityStmt<'a> {
    /// NOTIFY: its channel and payload (empty when it has none).
    Notify { channel: String, payload: String },
    /// COPY: whether FROM, and its table (None for COPY (query)).
    Copy { is_from: bool, relation: Option<RangeVar<'a>> },
    /// TRUNCATE of these tables.
    Truncate(Vec<Option<RangeVar<'a>>>),
    /// A transaction statement: its kind and gid, if it has one.
    Transaction { kind: pg_sys::TransactionStmtKind::Type, gid: Option<&'a CStr> },
    /// LISTEN or UNLISTEN.
    Listen,
    /// Anything else (or no statement).
    Other,
}

impl<'a> UtilityCall<'a> {
    /// The statement it runs.
    pub fn statement(&self) -> UtilityStmt<'_> {
        let Some(node) = self.plan().utility() else {
            return UtilityStmt::Other;
        };
        let text = |s: Option<&CStr>| s.map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        if let Some(notify) = node.as_notify() {
            UtilityStmt::Notify { channel: text(notify.channel()), payload: text(notify.payload()) }
        } else if let Some(copy) = node.as_copy() {
            UtilityStmt::Copy { is_from: copy.is_from(), relation: copy.relation() }
        } else if let Some(truncate) = node.as_truncate() {
            UtilityStmt::Truncate(truncate.relations().collect())
        } else if let Some(stmt) = node.as_transaction() {
            UtilityStmt::Transaction { kind: stmt.kind(), gid: stmt.gid() }
        } else if matches!(node.tag(), pg_sys::NodeTag::T_ListenStmt | pg_sys::NodeTag::T_UnlistenStmt) {
            UtilityStmt::Listen
        } else {
            UtilityStmt::Other
        }
    }

    /// The PlannedStmt (the one adjust_sequences put in place, if it did),
    /// viewed for the call.
    pub fn plan(&self) -> crate::pg::nodes::PlannedStmt<'a> {
        // SAFETY: PostgreSQL's non-NULL plan, or adjust_sequences' copy in
        // the statement's memory context; either lives for the call ('a)
        // and is not changed while viewed (adjust_sequences runs before).
        unsafe { crate::pg::nodes::PlannedStmt::from_raw(self.pstmt) }
    }

    /// The query string (ProcessUtility always has one).
    pub fn query_string(&self) -> &'a CStr {
        // SAFETY: a NUL-terminated string PostgreSQL keeps for the call.
        unsafe { CStr::from_ptr(self.query_string) }
    }

    /// The statement's parameters (None: it has none).
    pub fn params(&self) -> Option<crate::pg::nodes::ParamList<'a>> {
        // SAFETY: NULL or the statement's parameter list, alive for the call.
        unsafe { crate::pg::nodes::ParamList::from_raw(self.params) }
    }

    /// The statement, to change before it runs: PostgreSQL's own, or, when
    /// it marked the tree read-only, a copy that replaces it for the rest
    /// of the call.
    fn writable_plan(&mut self) -> *mut pg_sys::PlannedStmt {
        if self.read_only_tree {
            // SAFETY: PostgreSQL's valid plan, copied whole (copyObjectImpl)
            // in the current memory context, which lives as long as the
            // statement.
            self.pstmt = unsafe { pg_sys::copyObjectImpl(self.pstmt as *const std::ffi::c_void) } as *mut pg_sys::PlannedStmt;
            self.read_only_tree = false;
        }
        self.pstmt
    }

    /// Gives a CREATE SEQUENCE this node's INCREMENT and START, an ALTER
    /// SEQUENCE ... RESTART WITH this node's value
    /// ([`crate::pg::sequence`]), before it runs.
    pub fn adjust_sequences(&mut self) {
        // SAFETY: the plan PostgreSQL passed, valid for the call.
        let Some(change) = (unsafe { crate::pg::sequence::change_for(self.pstmt) }) else { return };
        let pstmt = self.writable_plan();
        // SAFETY: a plan this call may change, the one `change` was made
        // for (or its copy).
        unsafe { crate::pg::sequence::apply(pstmt, change) }
    }

    /// Runs the previous hook, or the standard ProcessUtility.
    pub fn run(self) {
        // SAFETY: PostgreSQL's own arguments (the plan possibly replaced by
        // adjust_sequences, a valid one), passed on once, under keep::call
        // as in ExecutorStart::run.
        unsafe {
            crate::pg::keep::call(|| match PREV_PROCESS_UTILITY {
                Some(prev) => prev(self.pstmt, self.query_string, self.read_only_tree, self.context, self.params, self.query_env, self.dest, self.qc),
                None => raw::standard_ProcessUtility(self.pstmt, self.query_string, self.read_only_tree, self.context, self.params, self.query_env, self.dest, self.qc),
            })
        }
    }
}

/// PostgreSQL's standard executor and utility functions, unguarded: the
/// hooks call them under [`crate::pg::keep::call`], which keeps their
/// errors whole (pgrx's guarded bindings would catch them first).
mod raw {
    use pgrx::pg_sys;
    use std::ffi::{c_char, c_int};

    unsafe extern "C-unwind" {
        pub fn standard_ExecutorStart(query: *mut pg_sys::QueryDesc, eflags: c_int);
        pub fn standard_ExecutorRun(query: *mut pg_sys::QueryDesc, direction: pg_sys::ScanDirection::Type, count: u64, execute_once: bool);
        pub fn standard_ExecutorEnd(query: *mut pg_sys::QueryDesc);
        #[allow(clippy::too_many_arguments)]
        pub fn standard_ProcessUtility(
            pstmt: *mut pg_sys::PlannedStmt,
            query_string: *const c_char,
            read_only_tree: bool,
            context: pg_sys::ProcessUtilityContext::Type,
            params: pg_sys::ParamListInfo,
            query_env: *mut pg_sys::QueryEnvironment,
            dest: *mut pg_sys::DestReceiver,
            qc: *mut pg_sys::QueryCompletion,
        );
    }
}

// The four hook trampolines are guarded by keep::hook: #[pg_guard]'s
// guard plus the re-raise of an error kept whole.

unsafe extern "C-unwind" fn executor_start(query: *mut pg_sys::QueryDesc, eflags: c_int) {
    // SAFETY: the whole body of the trampoline, nothing else in its frame.
    unsafe {
        crate::pg::keep::hook(|| {
            let call = ();
            crate::xact::executor_start(ExecutorStart { query, eflags, _call: scoped(&call) });
        })
    }
}

unsafe extern "C-unwind" fn executor_run(query: *mut pg_sys::QueryDesc, direction: pg_sys::ScanDirection::Type, count: u64, execute_once: bool) {
    // SAFETY: as in executor_start.
    unsafe {
        crate::pg::keep::hook(|| {
            let call = ();
            crate::xact::executor_run(ExecutorRun { query, direction, count, execute_once, _call: scoped(&call) });
        })
    }
}

unsafe extern "C-unwind" fn executor_end(query: *mut pg_sys::QueryDesc) {
    // SAFETY: as in executor_start.
    unsafe {
        crate::pg::keep::hook(|| {
            let call = ();
            crate::xact::executor_end(ExecutorEnd { query, _call: scoped(&call) });
        })
    }
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: as in executor_start.
    unsafe {
        crate::pg::keep::hook(|| {
            let call = ();
            crate::xact::process_utility(UtilityCall { pstmt, query_string, read_only_tree, context, params, query_env, dest, qc, _call: scoped(&call) });
        })
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    // First: the role's callback may raise an ERROR.
    BOUNDARIES.fetch_add(1, Relaxed);
    crate::xact::xact_callback(event);
}

#[pg_guard]
unsafe extern "C-unwind" fn subxact_callback(
    event: pg_sys::SubXactEvent::Type,
    _my: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    BOUNDARIES.fetch_add(1, Relaxed);
    crate::xact::subxact_callback(event);
}

/// Ties a view's lifetime to a local of the trampoline, so the view
/// cannot be kept past the call.
fn scoped<'a>(_call: &'a ()) -> PhantomData<&'a ()> {
    PhantomData
}

/// The current (sub)transaction nesting level (1: the top transaction).
pub fn nest_level() -> i32 {
    // SAFETY: reads this backend's own transaction state; no ERROR.
    unsafe { pg_sys::GetCurrentTransactionNestLevel() }
}

/// Whether this session applies changes as a replica
/// (`session_replication_role = replica`).
pub fn replication_role_is_replica() -> bool {
    // SAFETY: a plain read of a backend-local setting variable.
    unsafe { pg_sys::SessionReplicationRole == pg_sys::SESSION_REPLICATION_ROLE_REPLICA as i32 }
}

/// Whether an extension script is running (CREATE/ALTER EXTENSION).
pub fn creating_extension() -> bool {
    // SAFETY: a plain read of a backend-local flag.
    unsafe { pg_sys::creating_extension }
}

/// `CommandCounterIncrement`: what this transaction wrote so far becomes
/// visible to its next command.
pub fn command_counter_increment() {
    // SAFETY: a guarded binding; outside a transaction it does nothing.
    unsafe { pg_sys::CommandCounterIncrement() }
}

/// Runs `f` with the transaction snapshot pushed as the active one, and
/// pops it after (if `f` raises an ERROR the transaction's abort pops it).
pub fn with_transaction_snapshot<T>(f: impl FnOnce() -> T) -> T {
    let snapshot = push_transaction_snapshot();
    let out = f();
    snapshot.pop();
    out
}

/// The active snapshot pushed by [`push_transaction_snapshot`]; popped by
/// [`ActiveSnapshot::pop`] (left to the abort on ERROR).
pub struct ActiveSnapshot(());

/// `PushActiveSnapshot(GetTransactionSnapshot())`, inside a transaction.
pub fn push_transaction_snapshot() -> ActiveSnapshot {
    // SAFETY: guarded bindings; GetTransactionSnapshot raises an ERROR
    // outside a transaction, and PushActiveSnapshot copies what it keeps.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    ActiveSnapshot(())
}

impl ActiveSnapshot {
    /// `PopActiveSnapshot`.
    pub fn pop(self) {
        // SAFETY: the snapshot this value stands for was pushed and, the
        // value being consumed, is popped once; what was pushed after it
        // (SPI, the executor) is popped before control returns here.
        unsafe { pg_sys::PopActiveSnapshot() }
    }
}

//! The executor, as the apply path drives it for one replicated change:
//! an executor state (`EState`) with the table as its only range-table
//! entry and result relation, its indexes opened for maintenance, virtual
//! slots filled with column values, the `ExecSimpleRelation*` calls that
//! insert, update and delete (triggers, constraints, indexes), the lookup
//! of the existing row by replica-identity index or sequential scan, and
//! column defaults. Also what a change runs inside: the transaction
//! commands, the active snapshot, the command counter, the per-change
//! memory context, and the statistics report between transactions.
//!
//! None of the executor's pieces clean up on Drop: a change that raises an
//! ERROR leaves them to the transaction's abort, as PostgreSQL's own apply
//! worker does, so the cleanup runs only through the explicit `finish` /
//! `pop` calls and the end of `with_epq`, in the order the caller makes
//! them.

use super::relation::{ColumnValue, Rel, TypeFunction};
use crate::pg::xact::ActiveSnapshot;
use pgrx::pg_sys;
use pgrx::PgBox;
use std::ffi::CStr;
use std::marker::PhantomData;

/// The executor state of one change to an open table: `CreateExecutorState`
/// with the table as range-table entry 1 and as the result relation, its
/// indexes open and an after-trigger query level begun. Ended by
/// [`ChangeExecutor::finish`]; abandoned (left to the abort) on ERROR.
pub struct ChangeExecutor<'r> {
    rel: &'r Rel,
    /// Row checks, triggers and index lookups read the active snapshot.
    _snapshot: &'r ActiveSnapshot,
    estate: *mut pg_sys::EState,
    rri: *mut pg_sys::ResultRelInfo,
}

impl<'r> ChangeExecutor<'r> {
    /// Sets up the executor for a change to `rel` (the calls
    /// `apply_handle_insert` & co. make) under the active `snapshot`,
    /// which stays pushed until the executor is finished; with
    /// `check_foreign_keys`, the change's foreign keys are checked at the
    /// transaction's end ([`check_foreign_keys_at_end`]).
    pub fn begin(rel: &'r Rel, snapshot: &'r ActiveSnapshot, check_foreign_keys: bool) -> Self {
        // SAFETY: `rel` is open (and locked) in the current transaction and
        // the snapshot pushed, both for at least 'r, which this value cannot
        // outlive; every node is allocated with palloc in the
        // current memory context (the range-table entry through PgBox's
        // makeNode, handed over to PostgreSQL's list by into_pg), and the
        // EState and ResultRelInfo are used only through this value, whose
        // finish frees the state at most once; `ri_TrigDesc` is null or the
        // copy of the table's triggers InitResultRelInfo just made for this
        // ResultRelInfo alone. All calls are guarded
        // bindings (an ERROR unwinds as a panic, leaving them to the abort).
        unsafe {
            let estate = pg_sys::CreateExecutorState();
            let mut rte = PgBox::<pg_sys::RangeTblEntry>::alloc_node(pg_sys::NodeTag::T_RangeTblEntry);
            rte.rtekind = pg_sys::RTEKind::RTE_RELATION;
            rte.relid = rel.oid();
            rte.relkind = rel.relkind();
            rte.rellockmode = pg_sys::AccessShareLock as i32;
            pg_sys::ExecInitRangeTable(estate, pg_sys::lappend(std::ptr::null_mut(), rte.into_pg() as *mut std::ffi::c_void));
            let rri = PgBox::<pg_sys::ResultRelInfo>::alloc_node(pg_sys::NodeTag::T_ResultRelInfo).into_pg();
            pg_sys::InitResultRelInfo(rri, rel.as_ptr(), 1, std::ptr::null_mut(), 0);
            if check_foreign_keys {
                check_foreign_keys_at_end((*rri).ri_TrigDesc);
            }
            (*estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
            pg_sys::ExecOpenIndices(rri, false);
            pg_sys::AfterTriggerBeginQuery();
            ChangeExecutor { rel, _snapshot: snapshot, estate, rri }
        }
    }

    /// A new, empty virtual slot of the table, in the executor's tuple
    /// table (`ExecInitExtraTupleSlot`, then `ExecClearTuple`).
    pub fn virtual_slot(&self) -> SlotBuilder<'_> {
        // SAFETY: a live EState and the open table's descriptor; the slot
        // is owned by the EState's tuple table, and the builder borrows
        // this executor, so it cannot outlive the state that frees it.
        let slot = unsafe {
            let slot = pg_sys::ExecInitExtraTupleSlot(self.estate, (*self.rel.as_ptr()).rd_att, &pg_sys::TTSOpsVirtual);
            pg_sys::ExecClearTuple(slot);
            slot
        };
        SlotBuilder { slot, executor: self }
    }

    /// The default of column `i` (0-based), evaluated in the executor's
    /// per-tuple memory; None when the column has none (or it evaluates to
    /// NULL).
    fn column_default(&self, i: usize) -> Option<ColumnValue> {
        let type_oid = self.rel.attributes()[i].atttypid;
        // SAFETY: `rel` is open and `i` is one of its columns (indexed
        // above); the expression state and expression context belong to
        // our live EState. `evalfunc` is a raw function pointer, so it is
        // called inside pg_guard_ffi_boundary: an ERROR in the default's
        // evaluation unwinds as a panic instead of jumping over Rust
        // frames. The memory context is switched back right after the
        // evaluation, as ExecEvalExprSwitchContext does.
        unsafe {
            let expr = pg_sys::build_column_default(self.rel.as_ptr(), i as i32 + 1);
            if expr.is_null() {
                return None;
            }
            let state = pg_sys::ExecPrepareExpr(expr as *mut pg_sys::Expr, self.estate);
            let econtext = pg_sys::MakePerTupleExprContext(self.estate);
            let eval = (*state).evalfunc?;
            let old = pg_sys::MemoryContextSwitchTo((*econtext).ecxt_per_tuple_memory);
            let mut is_null = false;
            let d = pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| eval(state, econtext, &mut is_null));
            pg_sys::MemoryContextSwitchTo(old);
            (!is_null).then_some(ColumnValue { datum: d, type_oid })
        }
    }

    /// `ExecSimpleRelationInsert` of `slot`.
    pub fn insert(&self, slot: &VirtualSlot) {
        self.check(slot.estate);
        // SAFETY: a stored virtual slot of this executor's table (checked),
        // the live ResultRelInfo and EState of this executor.
        unsafe { pg_sys::ExecSimpleRelationInsert(self.rri, self.estate, slot.slot) }
    }

    /// `RelationFindReplTupleByIndex` (index `index` of the table) of the
    /// row equal to `search`, locked exclusively, in a new slot of the
    /// table (`table_slot_create`); None when there is none.
    pub fn find_by_index(&self, index: pg_sys::Oid, search: &VirtualSlot) -> Option<FoundRow<'_>> {
        self.check(search.estate);
        let local = self.table_slot();
        // SAFETY: the open table, a stored slot of it (checked) and a slot
        // of it to fill; an `index` that is not one of the table's indexes
        // raises an ERROR when it is opened.
        let found = unsafe { pg_sys::RelationFindReplTupleByIndex(self.rel.as_ptr(), index, pg_sys::LockTupleMode::LockTupleExclusive, search.slot, local) };
        found.then_some(FoundRow { slot: local, estate: self.estate, _executor: PhantomData })
    }

    /// `RelationFindReplTupleSeq`: as [`Self::find_by_index`], by a
    /// sequential scan comparing every column.
    pub fn find_by_scan(&self, search: &VirtualSlot) -> Option<FoundRow<'_>> {
        self.check(search.estate);
        let local = self.table_slot();
        // SAFETY: the open table, a stored slot of it (checked) and a slot
        // of it to fill.
        let found = unsafe { pg_sys::RelationFindReplTupleSeq(self.rel.as_ptr(), pg_sys::LockTupleMode::LockTupleExclusive, search.slot, local) };
        found.then_some(FoundRow { slot: local, estate: self.estate, _executor: PhantomData })
    }

    /// `table_slot_create` in the executor's tuple table.
    fn table_slot(&self) -> *mut pg_sys::TupleTableSlot {
        // SAFETY: the open table and our live EState, whose tuple table
        // list the new slot is appended to (and freed with).
        unsafe { pg_sys::table_slot_create(self.rel.as_ptr(), &mut (*self.estate).es_tupleTable) }
    }

    /// Runs `f` with an EPQ state for an update or delete through this
    /// executor: `EvalPlanQualInit` (no plan, no row marks) before it,
    /// `EvalPlanQualEnd` after it (not if `f` unwinds: the abort cleans
    /// up, as for the rest of the executor).
    pub fn with_epq<R>(&self, f: impl FnOnce(&mut Epq) -> R) -> R {
        // SAFETY: zeroed is EPQState's state before EvalPlanQualInit (a
        // struct of pointers and integers, for which all zeroes is valid).
        let mut state = unsafe { std::mem::zeroed::<pg_sys::EPQState>() };
        // SAFETY: a local of this frame, as in PostgreSQL's apply worker:
        // it stays at this address from the init to the end, the `Epq`
        // lent to `f` cannot leave `f`, and our EState is live for the
        // borrow. No plan and no row marks, as the ExecSimpleRelation*
        // calls need none.
        unsafe { pg_sys::EvalPlanQualInit(&mut state, self.estate, std::ptr::null_mut(), std::ptr::null_mut(), -1) };
        let mut epq = Epq { state: &mut state, estate: self.estate };
        let r = f(&mut epq);
        // SAFETY: initialized above for our still live EState, ended once.
        unsafe { pg_sys::EvalPlanQualEnd(&mut state) };
        r
    }

    /// `ExecSimpleRelationUpdate` of the found row `old` to `new`.
    pub fn update(&self, epq: &mut Epq, old: &FoundRow, new: &VirtualSlot) {
        self.check(epq.estate);
        self.check(old.estate);
        self.check(new.estate);
        // SAFETY: `old` holds the row found (and locked) through this
        // executor, `new` is a stored slot of the same table (both
        // checked), the EPQState was initialized for this EState.
        unsafe { pg_sys::ExecSimpleRelationUpdate(self.rri, self.estate, &mut *epq.state, old.slot, new.slot) }
    }

    /// `ExecSimpleRelationDelete` of the found row `old`.
    pub fn delete(&self, epq: &mut Epq, old: &FoundRow) {
        self.check(epq.estate);
        self.check(old.estate);
        // SAFETY: as in update.
        unsafe { pg_sys::ExecSimpleRelationDelete(self.rri, self.estate, &mut *epq.state, old.slot) }
    }

    /// Ends the change: `AfterTriggerEndQuery` (the change's triggers
    /// fire), `ExecCloseIndices`, `ExecResetTupleTable`,
    /// `FreeExecutorState`.
    pub fn finish(self) {
        // SAFETY: consumes the executor, so nothing borrowing it (slots,
        // found rows, EPQ states) is left; each call runs once, in the
        // order of PostgreSQL's apply worker.
        unsafe {
            pg_sys::AfterTriggerEndQuery(self.estate);
            pg_sys::ExecCloseIndices(self.rri);
            pg_sys::ExecResetTupleTable((*self.estate).es_tupleTable, false);
            pg_sys::FreeExecutorState(self.estate);
        }
    }

    /// A slot from another executor would be an object of another
    /// table's (or an already freed) state.
    fn check(&self, estate: *mut pg_sys::EState) {
        assert!(std::ptr::eq(estate, self.estate), "multimaster: a slot used with another change's executor");
    }
}

/// Makes the foreign-key checks of a changed row (the internal
/// `RI_FKey_check_ins` / `RI_FKey_check_upd` triggers: look the referenced
/// row up and lock it FOR KEY SHARE, or raise 23503) fire in this executor
/// although the apply session runs as a replica, where PostgreSQL skips
/// them. The node that made the change checked it, but not against a
/// parent row deleted at the same time on another node: checked here too,
/// the applied child waits for that delete's lock (a conflict, settled like
/// any other) or finds the parent gone (a no vote), and the lock it takes
/// makes a later delete of the parent here wait for it. The checks are
/// deferred to the transaction's end (its PREPARE, or an earlier schema
/// change: [`fire_deferred_checks`]), so rows that the home node's
/// statement checked together (a parent and its child inserted by one
/// statement, children first) are checked together here.
///
/// `trigdesc` is the ResultRelInfo's own copy of the table's triggers
/// (`InitResultRelInfo` copies the relation cache's), so nothing outside
/// this executor sees the change; a disabled trigger stays disabled.
///
/// # Safety
/// `trigdesc` is null or the live TriggerDesc of a ResultRelInfo being set
/// up, whose `triggers` has `numtriggers` entries (CopyTriggerDesc returns
/// NULL rather than an empty descriptor).
unsafe fn check_foreign_keys_at_end(trigdesc: *mut pg_sys::TriggerDesc) {
    // SAFETY: the caller's contract; the pointers are checked for null.
    let triggers = unsafe {
        match trigdesc.as_mut() {
            Some(d) if d.numtriggers > 0 && !d.triggers.is_null() => std::slice::from_raw_parts_mut(d.triggers, d.numtriggers as usize),
            _ => return,
        }
    };
    for t in triggers {
        let check = t.tgfoid == pg_sys::Oid::from(pg_sys::F_RI_FKEY_CHECK_INS) || t.tgfoid == pg_sys::Oid::from(pg_sys::F_RI_FKEY_CHECK_UPD);
        if !t.tgisinternal || !check || t.tgenabled == pg_sys::TRIGGER_DISABLED as i8 {
            continue;
        }
        if t.tgenabled == pg_sys::TRIGGER_FIRES_ON_ORIGIN as i8 {
            t.tgenabled = pg_sys::TRIGGER_FIRES_ALWAYS as i8;
        }
        t.tgdeferrable = true;
        t.tginitdeferred = true;
    }
}

/// Runs the checks deferred so far in this transaction (SET CONSTRAINTS
/// ALL IMMEDIATE) and defers the rest again (SET CONSTRAINTS ALL
/// DEFERRED): before a schema change or TRUNCATE, which PostgreSQL refuses
/// on a table with pending checks (55006), as the home node ran them at
/// the end of each statement. A failed check raises its ERROR.
pub fn fire_deferred_checks() {
    for deferred in [false, true] {
        // SAFETY: a ConstraintsSetStmt of all constraints (NIL list),
        // palloc'd as a node in the current memory context, inside the
        // applying transaction; guarded bindings (a failed check unwinds
        // as a panic, to the apply's guard).
        unsafe {
            let mut stmt = PgBox::<pg_sys::ConstraintsSetStmt>::alloc_node(pg_sys::NodeTag::T_ConstraintsSetStmt);
            stmt.constraints = std::ptr::null_mut();
            stmt.deferred = deferred;
            pg_sys::AfterTriggerSetState(stmt.as_ptr())
        }
    }
}

/// An `EPQState` for [`ChangeExecutor::update`] and
/// [`ChangeExecutor::delete`], lent by [`ChangeExecutor::with_epq`].
pub struct Epq<'s> {
    state: &'s mut pg_sys::EPQState,
    estate: *mut pg_sys::EState,
}

/// A virtual slot being filled: every column starts as it was left by
/// `ExecClearTuple` (call [`SlotBuilder::set_all_null`] or
/// [`SlotBuilder::copy_from`] first), then [`SlotBuilder::store`].
pub struct SlotBuilder<'e> {
    slot: *mut pg_sys::TupleTableSlot,
    executor: &'e ChangeExecutor<'e>,
}

/// A stored virtual slot of a change's table.
pub struct VirtualSlot<'e> {
    slot: *mut pg_sys::TupleTableSlot,
    estate: *mut pg_sys::EState,
    _executor: PhantomData<&'e ChangeExecutor<'e>>,
}

/// The existing row a change found (and locked), in a slot of its table.
pub struct FoundRow<'e> {
    slot: *mut pg_sys::TupleTableSlot,
    estate: *mut pg_sys::EState,
    _executor: PhantomData<&'e ChangeExecutor<'e>>,
}

impl<'e> SlotBuilder<'e> {
    /// The slot's value and null arrays, one entry per column of the
    /// table.
    fn arrays(&mut self) -> (&mut [pg_sys::Datum], &mut [bool]) {
        // SAFETY: a slot made for the table's descriptor allocates both
        // arrays with natts entries for its life (the executor's, which
        // the builder borrows); `&mut self` makes these the only
        // references into them.
        unsafe {
            let natts = (*(*self.slot).tts_tupleDescriptor).natts as usize;
            (std::slice::from_raw_parts_mut((*self.slot).tts_values, natts), std::slice::from_raw_parts_mut((*self.slot).tts_isnull, natts))
        }
    }

    /// Every column NULL.
    pub fn set_all_null(&mut self) {
        self.arrays().1.iter_mut().for_each(|n| *n = true);
    }

    /// Every column as in `base` (`slot_getallattrs` first): the row an
    /// update starts from.
    pub fn copy_from(&mut self, base: &FoundRow) {
        self.executor.check(base.estate);
        // SAFETY: `base` is a filled slot of the same table (same executor,
        // checked), so it has the same number of columns; after
        // slot_getallattrs its arrays hold them all, and it is another
        // slot than ours, so the borrows do not overlap.
        let (values, nulls) = unsafe {
            pg_sys::slot_getallattrs(base.slot);
            let natts = (*(*base.slot).tts_tupleDescriptor).natts as usize;
            (std::slice::from_raw_parts((*base.slot).tts_values, natts), std::slice::from_raw_parts((*base.slot).tts_isnull, natts))
        };
        let (datums, isnull) = self.arrays();
        datums.copy_from_slice(values);
        isnull.copy_from_slice(nulls);
    }

    /// Column `i` (0-based) NULL.
    pub fn set_null(&mut self, i: usize) {
        let (datums, nulls) = self.arrays();
        datums[i] = pg_sys::Datum::from(0usize);
        nulls[i] = true;
    }

    /// Column `i` (0-based) NULL, leaving its value slot as it is (the
    /// slot's null flag is all PostgreSQL reads then).
    pub fn mark_null(&mut self, i: usize) {
        self.arrays().1[i] = true;
    }

    /// Column `i` (0-based) set to its default, if it has one (NULL
    /// included); left as it is otherwise.
    pub fn set_default(&mut self, i: usize) {
        if let Some(d) = self.executor.column_default(i) {
            self.set(i, d);
        }
    }

    /// Column `i` (0-based) set to the value receive function `f` makes of
    /// `bytes` for `typmod`.
    pub fn set_received(&mut self, i: usize, f: &TypeFunction, bytes: &[u8], typmod: i32) {
        let value = f.receive(bytes, typmod);
        self.set(i, value);
    }

    /// Column `i` (0-based) set to the value input function `f` makes of
    /// `text` for `typmod`.
    pub fn set_input(&mut self, i: usize, f: &TypeFunction, text: &CStr, typmod: i32) {
        let value = f.input(text, typmod);
        self.set(i, value);
    }

    /// Column `i` (0-based) set to `value`, which must be of the column's
    /// type (a value of another type would be misread by PostgreSQL).
    fn set(&mut self, i: usize, value: ColumnValue) {
        // SAFETY: the descriptor has natts attributes for the slot's life.
        let type_oid = unsafe {
            let desc = (*self.slot).tts_tupleDescriptor;
            (*desc).attrs.as_slice((*desc).natts as usize)[i].atttypid
        };
        assert!(value.type_oid == type_oid, "multimaster: a value of type {} for a column of type {}", value.type_oid.to_u32(), type_oid.to_u32());
        let (datums, nulls) = self.arrays();
        datums[i] = value.datum;
        nulls[i] = false;
    }

    /// `ExecStoreVirtualTuple`: the row is complete.
    pub fn store(self) -> VirtualSlot<'e> {
        // SAFETY: our empty (cleared) virtual slot, whose arrays are filled
        // with values of the columns' types or nulls.
        unsafe { pg_sys::ExecStoreVirtualTuple(self.slot) };
        VirtualSlot { slot: self.slot, estate: self.executor.estate, _executor: PhantomData }
    }
}

/// `StartTransactionCommand`.
pub fn start_transaction_command() {
    // SAFETY: a guarded binding that checks the transaction state itself
    // (and raises ERROR when it is wrong).
    unsafe { pg_sys::StartTransactionCommand() }
}

/// `CommitTransactionCommand`.
pub fn commit_transaction_command() {
    // SAFETY: a guarded binding that checks the transaction state itself.
    // The memory of the committed transaction is gone afterwards; nothing
    // Rust holds points into it (values and executor states live in the
    // apply path's own contexts, reset per change).
    unsafe { pg_sys::CommitTransactionCommand() }
}

/// `BeginTransactionBlock` (as BEGIN does).
pub fn begin_transaction_block() {
    // SAFETY: a guarded binding that checks the block state itself.
    unsafe { pg_sys::BeginTransactionBlock() }
}

/// `PrepareTransactionBlock(gid)` (as PREPARE TRANSACTION does): false
/// when the block was not in a state to prepare.
pub fn prepare_transaction_block(gid: &CStr) -> bool {
    // SAFETY: a guarded binding; `gid` is NUL-terminated, outlives the
    // call and is copied by PostgreSQL.
    unsafe { pg_sys::PrepareTransactionBlock(gid.as_ptr()) }
}

/// `AbortOutOfAnyTransaction`: whatever transaction (block) is open is
/// rolled back.
pub fn abort_out_of_any_transaction() {
    // SAFETY: a guarded binding valid in every transaction state (a no-op
    // outside one).
    unsafe { pg_sys::AbortOutOfAnyTransaction() }
}

/// `pgstat_report_stat(false)`: publishes this process's pending
/// statistics, between transactions.
pub fn report_stats() {
    // SAFETY: a guarded binding; it flushes this backend's own pending
    // counters to shared memory under their locks.
    unsafe { pg_sys::pgstat_report_stat(false) };
}

//! Applying a peer's decoded transactions through the executor helpers
//! the core apply worker uses: rows located by the replica identity index
//! (or a sequential scan for REPLICA IDENTITY FULL), inserted, updated and
//! deleted with ExecSimpleRelation* so indexes and constraints are
//! maintained. Columns are matched by name. Each transaction commits (or
//! prepares) with the source's LSN in the session's replication origin, so
//! a restart resumes exactly after the last applied one.
//!
//! An Applier lives in an apply worker ([`crate::worker`]); its commits,
//! prepares and their ends wait for their turn ([`crate::pool::Turn`]).
//!
//! A transaction that fails to apply (conflict, constraint, lock wait
//! past `lock_timeout`) is rolled back here. If it ends in PREPARE, the
//! failure is this node's "no" vote on its gid ([`crate::votes`]) and the
//! stream moves on (the coordinator will roll it back everywhere); a plain
//! COMMIT cannot be skipped, so the worker stops, and the pool restarts
//! and retries it. Before a no vote, a failure that applying side by side
//! can cause is tried once more, alone, in the transaction's commit turn
//! ([`mtm_schedule::retry`]).

use crate::pool::Turn;
use mtm_protocol::{Column, Message, OldTuple, Value};
use crate::relmap::LocalColumn;
use mtm_state::decisions::State;
use pgrx::prelude::*;
use pgrx::{pg_sys, PgBox};
use std::collections::HashMap;
use std::ffi::{c_char, CString};

unsafe extern "C-unwind" {
    // Not exported through pg_sys (twophase.h); called only through
    // pg_guard_ffi_boundary.
    pub(crate) fn FinishPreparedTransaction(gid: *const c_char, is_commit: bool);
}

struct RemoteRelation {
    namespace: String,
    name: String,
    columns: Vec<Column>,
}

pub struct Applier {
    peer: i32,
    turn: Turn,
    /// The current transaction's number in the peer's commit order.
    seq: u64,
    relations: HashMap<u32, RemoteRelation>,
    /// The local tables of the peer's relations ([`crate::relmap`]).
    cache: std::cell::RefCell<crate::relmap::RelationCache>,
    /// Between Begin and its Commit/Prepare.
    in_transaction: bool,
    /// The current transaction failed (SQLSTATE, message); its remaining
    /// changes are skipped until its Commit or Prepare.
    failed: Option<(String, String)>,
    /// The transaction's NOTIFYs (channel, payload), queued at its commit
    /// ([`crate::notify`]).
    notifications: Vec<(String, String)>,
    /// Reset after every change, so a huge transaction is applied in
    /// constant memory (values, slots, executor state live here).
    change_cx: pg_sys::MemoryContext,
    /// The current transaction's messages, for a serial retry.
    replay: mtm_schedule::retry::Replay,
    /// Replaying them now (a second failure is a no vote).
    retrying: bool,
    /// The failure was giving way to an older transaction of this peer.
    failed_for_own_peer: bool,
}

/// Most a worker keeps of one transaction for its serial retry; a bigger
/// one that fails is a no vote without a second try.
const REPLAY_BUDGET: usize = 16 << 20;

impl Applier {
    pub fn new(peer: i32, turn: Turn) -> Self {
        Applier {
            peer,
            turn,
            seq: 0,
            relations: HashMap::new(),
            cache: std::cell::RefCell::new(crate::relmap::RelationCache::new()),
            notifications: Vec::new(),
            in_transaction: false,
            failed: None,
            replay: mtm_schedule::retry::Replay::new(REPLAY_BUDGET),
            retrying: false,
            failed_for_own_peer: false,
            // SAFETY: a child of TopMemoryContext, kept for the worker's life.
            change_cx: unsafe {
                pg_sys::AllocSetContextCreateInternal(
                    pg_sys::TopMemoryContext,
                    c"multimaster apply change".as_ptr(),
                    0,
                    8 * 1024,
                    8 * 1024 * 1024,
                )
            },
        }
    }

    pub fn peer(&self) -> i32 {
        self.peer
    }

    pub fn turn(&self) -> &Turn {
        &self.turn
    }

    /// Keeps a message of a transaction that may end in PREPARE, before it
    /// is applied, for [`Self::retry_alone`].
    pub fn keep(&mut self, msg: &Message, raw: &[u8]) {
        match msg {
            Message::Begin { .. } => self.replay.begin(raw),
            Message::Commit { .. } | Message::CommitPrepared { .. } | Message::RollbackPrepared { .. } => self.replay.clear(),
            _ => self.replay.keep(raw),
        }
    }

    /// The next messages are transaction number `seq`.
    pub fn start(&mut self, seq: u64) {
        self.seq = seq;
        self.turn.busy(true);
    }

    /// Called while waiting for data: publish the statistics of what was
    /// applied (PostgreSQL batches them; a worker must push them itself).
    pub fn idle(&self) {
        if !self.in_transaction {
            // SAFETY: outside any transaction, as pgstat requires.
            unsafe { pg_sys::pgstat_report_stat(false) };
        }
    }

    /// A transaction (or prepare, or its end) from the peer ending at
    /// `remote_end` is committed here: pass the turn on.
    unsafe fn applied(&mut self, remote_end: u64) {
        self.turn.applying(0);
        self.turn.done(self.seq, remote_end);
        self.in_transaction = false;
        pg_sys::pgstat_report_stat(false);
    }

    pub fn apply(&mut self, msg: Message) {
        // SAFETY: executor and transaction calls from the worker's thread.
        unsafe {
            if let Message::Prepare { gid, .. } = &msg {
                // Kept in the prepared transaction, queued at its commit.
                if !self.notifications.is_empty() {
                    let notifications = std::mem::take(&mut self.notifications);
                    self.guarded(|_| crate::notify::store(gid, &notifications));
                }
            }
            match msg {
                Message::Begin { commit_time, .. } => {
                    self.turn.applying(commit_time);
                    // Tag the rows' WAL records with the peer's origin (only
                    // the commit needs the origin set up, in its turn): the
                    // walsenders then drop them as they decode, instead of
                    // queueing every applied row until its commit says
                    // whose it was.
                    pg_sys::replorigin_session_origin = self.turn.origin();
                    pg_sys::StartTransactionCommand();
                    self.in_transaction = true;
                    self.failed = None;
                    self.notifications.clear();
                }
                Message::Origin { .. } => {}
                Message::Relation { relid, namespace, name, columns, .. } => {
                    self.cache.get_mut().forget(relid);
                    self.relations.insert(relid, RemoteRelation { namespace, name, columns });
                }
                Message::Insert { relid, new } => self.guarded(|a| a.change(relid, None, Some(new))),
                Message::Update { relid, old, new } => self.guarded(|a| a.change(relid, Some(old), Some(new))),
                Message::Delete { relid, old } => self.guarded(|a| a.change(relid, Some(old), None)),
                Message::Truncate { cascade, restart_identity, relids } => {
                    self.guarded(|a| a.truncate(&relids, cascade, restart_identity))
                }
                Message::Commit { .. } if self.failed.is_some() => {
                    let (code, message) = self.failed.take().unwrap_or_default();
                    // With the cause's SQLSTATE, so mtm.nodes() shows it.
                    ereport!(
                        PgLogLevel::ERROR,
                        PgSqlErrorCode::from(crate::votes::sqlstate_code(&code)),
                        format!("multimaster: a transaction from node {} could not be applied and will be retried: {message} ({code})", self.peer)
                    );
                }
                Message::Prepare { end_lsn, gid, .. } if self.failed.is_some() => {
                    let (sqlstate, message) = self.failed.take().unwrap_or_default();
                    let own_peer = std::mem::take(&mut self.failed_for_own_peer);
                    if mtm_schedule::retry::worth_retrying(&sqlstate, own_peer) && self.retry_alone(&gid, &message) {
                        return;
                    }
                    self.turn.wait(self.seq);
                    self.vote_no(&gid, sqlstate, message, end_lsn);
                    self.applied(end_lsn);
                }
                Message::Commit { end_lsn, commit_time, .. } => {
                    self.turn.wait(self.seq);
                    set_origin_progress(end_lsn, commit_time);
                    crate::notify::queue(&std::mem::take(&mut self.notifications));
                    pg_sys::CommitTransactionCommand();
                    self.applied(end_lsn);
                }
                Message::Prepare { end_lsn, gid, .. } if crate::conflicts::doomed_by().is_some() => {
                    self.give_way(&gid, end_lsn, false);
                }
                Message::Prepare { end_lsn, prepare_time, gid, .. } => {
                    let gid = CString::new(gid).expect("gid without NUL");
                    // Balances the EndTransactionBlock inside PrepareTransactionBlock.
                    pg_sys::BeginTransactionBlock();
                    pg_sys::CommitTransactionCommand();
                    // Waiting for its turn, it may be told to give way to an
                    // older conflicting transaction that needs its locks
                    // (`crate::conflicts`); so also once it has the turn.
                    let turn = self.turn.wait_unless(self.seq, || crate::conflicts::doomed_by().is_some());
                    if !turn || crate::conflicts::doomed_by().is_some() {
                        self.give_way(&gid.to_string_lossy(), end_lsn, turn);
                        return;
                    }
                    set_origin_progress(end_lsn, prepare_time);
                    let xid = pg_sys::GetTopTransactionIdIfAny().into_inner();
                    let prepared = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
                        pg_sys::PrepareTransactionBlock(gid.as_ptr());
                        pg_sys::CommitTransactionCommand();
                        Ok(())
                    }))
                    .catch_others(|e| Err(describe(&e)))
                    .execute();
                    let gid = gid.to_string_lossy().into_owned();
                    match prepared {
                        Ok(()) => {
                            crate::votes::record(&gid, &crate::votes::Vote::Yes);
                            crate::votes::note_applied_prepare(&gid, xid, self.peer, prepare_time);
                            crate::votes::send(self.peer, &gid, None);
                        }
                        Err((sqlstate, message)) => {
                            pg_sys::AbortCurrentTransaction();
                            self.vote_no(&gid, sqlstate, message, end_lsn);
                        }
                    }
                    self.applied(end_lsn);
                }
                Message::CommitPrepared { end_lsn, commit_time, gid, .. } => {
                    self.turn.wait(self.seq);
                    self.finish_prepared(&gid, true, end_lsn, commit_time);
                    self.applied(end_lsn);
                }
                Message::RollbackPrepared { rollback_end_lsn, rollback_time, gid, .. } => {
                    self.turn.wait(self.seq);
                    self.finish_prepared(&gid, false, rollback_end_lsn, rollback_time);
                    self.applied(rollback_end_lsn);
                }
                Message::Message { transactional: true, prefix, content, .. } if prefix == mtm_protocol::DDL_PREFIX => {
                    self.guarded(|a| a.ddl(&content))
                }
                Message::Message { transactional: true, prefix, content, .. } if crate::notify::is_notify(&prefix) => {
                    self.notifications.extend(crate::notify::decode(&content));
                }
                Message::Message { .. } => {}
            }
        }
    }

    /// COMMIT PREPARED / ROLLBACK PREPARED of `gid`, if it is prepared
    /// here. It may not be: its PREPARE failed here (this node voted no),
    /// or a session on this node already finished it (a client's
    /// `COMMIT PREPARED` can be run on any node). Either way there is
    /// nothing to do but move past it, which is logged, never an error
    /// that would stall the stream.
    unsafe fn finish_prepared(&self, gid: &str, commit: bool, end_lsn: u64, time: pg_sys::TimestampTz) {
        pg_sys::StartTransactionCommand();
        set_origin_progress(end_lsn, time);
        let here = crate::prepared_here(gid);
        if here {
            crate::decisions::log(gid, if commit { State::Committed } else { State::Aborted });
            let c_gid = CString::new(gid).expect("gid without NUL");
            // SAFETY: inside a transaction, main thread; an ERROR unwinds
            // to the worker's guard through our frames.
            pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| FinishPreparedTransaction(c_gid.as_ptr(), commit));
            if commit {
                crate::notify::deliver(gid);
            }
        } else {
            let what = if commit { "COMMIT PREPARED" } else { "ROLLBACK PREPARED" };
            log!("multimaster: {what} {gid} from node {}: not prepared here (already finished, or its prepare failed here); skipped", self.peer);
        }
        pg_sys::CommitTransactionCommand();
        crate::votes::forget(gid);
        if commit {
            // Now visible here: the coordinator may answer its client.
            crate::votes::send_committed(self.peer, gid);
        }
    }

    /// A prepared transaction that could not be applied: this node votes
    /// no, and the stream moves past it without retrying. (The position is
    /// kept in memory until the next checkpoint or commit; after a crash it
    /// is applied again, and its ROLLBACK PREPARED follows.)
    unsafe fn vote_no(&self, gid: &str, sqlstate: String, message: String, end_lsn: u64) {
        warning!("multimaster: votes no on {gid} from node {}: {message} ({sqlstate})", self.peer);
        crate::votes::record(gid, &crate::votes::Vote::No { sqlstate: sqlstate.clone(), message: message.clone() });
        pg_sys::replorigin_session_advance(end_lsn, pg_sys::GetXLogInsertRecPtr());
        crate::votes::send(self.peer, gid, Some((sqlstate, message)));
    }

    /// This transaction, not prepared yet, gives way to an older one that
    /// needs its locks: roll it back now, then vote no in its turn.
    unsafe fn give_way(&mut self, gid: &str, end_lsn: u64, have_turn: bool) {
        let by = crate::conflicts::doomed_by().unwrap_or(0);
        let message = crate::conflicts::message(by);
        if mtm_schedule::retry::worth_retrying("40001", by == self.peer) && self.retry_alone(gid, &message) {
            return;
        }
        pg_sys::AbortOutOfAnyTransaction();
        if !have_turn {
            self.turn.wait(self.seq);
        }
        self.vote_no(gid, "40001".into(), message, end_lsn);
        self.applied(end_lsn);
    }

    /// The transaction that failed under parallel apply (`cause`) is
    /// applied once more, alone: rolled back, then — once every earlier
    /// transaction of the peer is done here (its commit turn) — replayed
    /// from its kept messages through its PREPARE, which votes as usual
    /// (a second failure is a no). False: it was not kept (too big), or
    /// this already is the retry; the caller votes no.
    unsafe fn retry_alone(&mut self, gid: &str, cause: &str) -> bool {
        if self.retrying {
            return false;
        }
        let Some(kept) = self.replay.take() else { return false };
        pg_sys::AbortOutOfAnyTransaction();
        self.turn.wait(self.seq);
        log!("multimaster: applying {gid} from node {} again, alone, after: {cause}", self.peer);
        self.retrying = true;
        for raw in &kept {
            let msg = Message::decode(raw)
                .unwrap_or_else(|e| error!("multimaster: undecodable kept message from node {}: {e}", self.peer));
            self.apply(msg);
        }
        self.retrying = false;
        true
    }

    /// Runs one change unless the transaction already failed; a failure
    /// rolls the transaction back and is remembered for its end.
    unsafe fn guarded(&mut self, f: impl FnOnce(&Self)) {
        if self.failed.is_some() {
            return;
        }
        let this = &*self;
        let outer = pg_sys::MemoryContextSwitchTo(self.change_cx);
        let result = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
            f(this);
            Ok(())
        }))
        .catch_others(|e| Err(describe(&e)))
        .execute();
        pg_sys::MemoryContextSwitchTo(outer);
        // Cancelled because it gives way to an older transaction.
        let doomed_by = crate::conflicts::doomed_by();
        let result = result.map_err(|(sqlstate, message)| match doomed_by {
            Some(by) if sqlstate == "57014" => ("40001".to_string(), crate::conflicts::message(by)),
            _ => (sqlstate, message),
        });
        self.failed_for_own_peer = result.is_err() && doomed_by == Some(self.peer);
        if let Err((sqlstate, message)) = result {
            pg_sys::AbortCurrentTransaction();
            log!("multimaster: applying a change from node {} failed: {message} ({sqlstate})", self.peer);
            self.failed = Some((sqlstate, message));
        }
        pg_sys::MemoryContextReset(self.change_cx);
    }

    fn remote(&self, relid: u32) -> &RemoteRelation {
        self.relations
            .get(&relid)
            .unwrap_or_else(|| error!("multimaster: change for relation {relid} from node {} without its Relation message", self.peer))
    }

    /// A peer's DDL statement, at its place in the transaction.
    unsafe fn ddl(&self, content: &[u8]) {
        let m = mtm_protocol::DdlMessage::decode(content)
            .unwrap_or_else(|e| error!("multimaster: undecodable DDL message from node {}: {e}", self.peer));
        crate::ddl::replay(&m, self.peer);
    }

    unsafe fn truncate(&self, relids: &[u32], cascade: bool, restart: bool) {
        // One statement for the whole table list, not per row.
        let names: Vec<String> = relids
            .iter()
            .map(|r| {
                let rr = self.remote(*r);
                format!("{}.{}", quote_ident(&rr.namespace), quote_ident(&rr.name))
            })
            .collect();
        let sql = format!(
            "TRUNCATE {}{}{}",
            names.join(", "),
            if restart { " RESTART IDENTITY" } else { "" },
            if cascade { " CASCADE" } else { "" }
        );
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        if let Err(e) = Spi::run(&sql) {
            error!("multimaster: applying {sql} from node {}: {e}", self.peer);
        }
        pg_sys::PopActiveSnapshot();
        pg_sys::CommandCounterIncrement();
    }

    /// INSERT (old None), UPDATE (both), DELETE (new None).
    unsafe fn change(&self, relid: u32, old: Option<Option<OldTuple>>, new: Option<Vec<Value>>) {
        let remote = self.remote(relid);
        let table = format!("{}.{}", remote.namespace, remote.name);
        let mut cache = self.cache.borrow_mut();
        let (rel, map) = cache.open(relid, &remote.namespace, &remote.name, &remote.columns, self.peer);
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());

        let estate = pg_sys::CreateExecutorState();
        let mut rte = PgBox::<pg_sys::RangeTblEntry>::alloc_node(pg_sys::NodeTag::T_RangeTblEntry);
        rte.rtekind = pg_sys::RTEKind::RTE_RELATION;
        rte.relid = rel.oid();
        rte.relkind = rel.relkind();
        rte.rellockmode = pg_sys::AccessShareLock as i32;
        pg_sys::ExecInitRangeTable(estate, pg_sys::lappend(std::ptr::null_mut(), rte.into_pg() as *mut std::ffi::c_void));
        let rri = PgBox::<pg_sys::ResultRelInfo>::alloc_node(pg_sys::NodeTag::T_ResultRelInfo).into_pg();
        pg_sys::InitResultRelInfo(rri, rel.as_ptr(), 1, std::ptr::null_mut(), 0);
        (*estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
        pg_sys::ExecOpenIndices(rri, false);
        pg_sys::AfterTriggerBeginQuery();

        match (old, new) {
            (None, Some(new)) => {
                let slot = self.build_slot(estate, &rel, map, &new, Row::New, &table);
                pg_sys::ExecSimpleRelationInsert(rri, estate, slot);
            }
            (Some(old), new) => {
                let key_values = match (&old, &new) {
                    (Some(OldTuple::Key(t)) | Some(OldTuple::Full(t)), _) => t,
                    (None, Some(n)) => n,
                    (None, None) => error!(
                        "multimaster: DELETE on {table} from node {} carries no old row: the table has no primary key or replica identity",
                        self.peer
                    ),
                };
                let full = matches!(old, Some(OldTuple::Full(_)));
                let mut idx = rel.replica_index();
                if idx == pg_sys::Oid::INVALID {
                    idx = rel.primary_key_index();
                }
                if idx == pg_sys::Oid::INVALID && !full {
                    error!(
                        "multimaster: cannot apply UPDATE/DELETE on {table} from node {}: no primary key or replica identity here",
                        self.peer
                    );
                }
                let search = self.build_slot(estate, &rel, map, key_values, Row::Search, &table);
                let local = pg_sys::table_slot_create(rel.as_ptr(), &mut (*estate).es_tupleTable);
                let found = if idx != pg_sys::Oid::INVALID {
                    pg_sys::RelationFindReplTupleByIndex(rel.as_ptr(), idx, pg_sys::LockTupleMode::LockTupleExclusive, search, local)
                } else {
                    pg_sys::RelationFindReplTupleSeq(rel.as_ptr(), pg_sys::LockTupleMode::LockTupleExclusive, search, local)
                };
                if !found {
                    error!(
                        "multimaster: row to {} not found in {table} (from node {}, key {})",
                        if new.is_some() { "update" } else { "delete" },
                        self.peer,
                        describe_key(&remote.columns, key_values)
                    );
                }
                let mut epq: pg_sys::EPQState = std::mem::zeroed();
                pg_sys::EvalPlanQualInit(&mut epq, estate, std::ptr::null_mut(), std::ptr::null_mut(), -1);
                match new {
                    Some(new) => {
                        let slot = self.build_slot(estate, &rel, map, &new, Row::Update(local), &table);
                        pg_sys::ExecSimpleRelationUpdate(rri, estate, &mut epq, local, slot);
                    }
                    None => pg_sys::ExecSimpleRelationDelete(rri, estate, &mut epq, local),
                }
                pg_sys::EvalPlanQualEnd(&mut epq);
            }
            (None, None) => {}
        }
        pg_sys::AfterTriggerEndQuery(estate);
        pg_sys::ExecCloseIndices(rri);
        pg_sys::ExecResetTupleTable((*estate).es_tupleTable, false);
        pg_sys::FreeExecutorState(estate);
        pg_sys::PopActiveSnapshot();
        rel.table_close(pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::CommandCounterIncrement();
    }

    /// A virtual slot of the local table filled from remote values matched
    /// by column name. Local columns the peer did not send get their
    /// default in a new row and keep their value in an updated one; an
    /// unchanged TOAST value is taken from `base` (the existing row).
    unsafe fn build_slot(
        &self,
        estate: *mut pg_sys::EState,
        rel: &crate::pg::relation::Rel,
        local: &crate::relmap::LocalRelation,
        values: &[Value],
        row: Row,
        table: &str,
    ) -> *mut pg_sys::TupleTableSlot {
        let base = match row {
            Row::Update(local) => Some(local),
            Row::New | Row::Search => None,
        };
        let desc = (*rel.as_ptr()).rd_att;
        let natts = (*desc).natts as usize;
        let slot = pg_sys::ExecInitExtraTupleSlot(estate, desc, &pg_sys::TTSOpsVirtual);
        pg_sys::ExecClearTuple(slot);
        let datums = std::slice::from_raw_parts_mut((*slot).tts_values, natts);
        let nulls = std::slice::from_raw_parts_mut((*slot).tts_isnull, natts);
        if let Some(b) = base {
            pg_sys::slot_getallattrs(b);
            datums.copy_from_slice(std::slice::from_raw_parts((*b).tts_values, natts));
            nulls.copy_from_slice(std::slice::from_raw_parts((*b).tts_isnull, natts));
        } else {
            nulls.iter_mut().for_each(|n| *n = true);
        }
        for (i, column) in local.columns.iter().enumerate() {
            let col = match column {
                LocalColumn::Ignored => continue,
                LocalColumn::NotSent => {
                    // A column the peer does not have (its schema differs
                    // here): a new row gets the column's default, as an
                    // INSERT that leaves it out would.
                    if matches!(row, Row::New) {
                        if let Some(d) = column_default(estate, rel.as_ptr(), i) {
                            datums[i] = d;
                            nulls[i] = false;
                        }
                    }
                    continue;
                }
                LocalColumn::Sent(col) => col,
            };
            match &values[col.remote] {
                Value::Null => {
                    datums[i] = pg_sys::Datum::from(0usize);
                    nulls[i] = true;
                }
                Value::UnchangedToast => {
                    if base.is_none() {
                        nulls[i] = true;
                    }
                }
                Value::Binary(bytes) => {
                    if !col.same_type {
                        let a = &(*desc).attrs.as_slice(natts)[i];
                        error!(
                            "multimaster: column {} of {table} has type {} here but {} on node {}",
                            std::ffi::CStr::from_ptr(a.attname.data.as_ptr()).to_string_lossy(),
                            a.atttypid.to_u32(),
                            col.remote_type,
                            self.peer
                        );
                    }
                    datums[i] = col.recv.receive(bytes, col.recv_ioparam, col.typmod);
                    nulls[i] = false;
                }
                Value::Text(bytes) => {
                    let text = CString::new(bytes.clone()).unwrap_or_else(|_| error!("NUL in a text value"));
                    datums[i] = col.input.input(&text, col.input_ioparam, col.typmod);
                    nulls[i] = false;
                }
            }
        }
        pg_sys::ExecStoreVirtualTuple(slot);
        slot
    }
}

/// What a slot built from a peer's values is for.
#[derive(Clone, Copy)]
enum Row {
    /// An inserted row: columns the peer did not send get their default.
    New,
    /// The values an UPDATE/DELETE looks the row up by.
    Search,
    /// The new version of this existing row: what the peer did not send
    /// (or left as unchanged TOAST) is kept.
    Update(*mut pg_sys::TupleTableSlot),
}

/// The default of column `i` (0-based) of `rel`, evaluated in `estate`;
/// None when it has none (or it evaluates to NULL).
///
/// # Safety
/// `rel` is open, `estate` is the change's executor state.
unsafe fn column_default(estate: *mut pg_sys::EState, rel: pg_sys::Relation, i: usize) -> Option<pg_sys::Datum> {
    let expr = pg_sys::build_column_default(rel, i as i32 + 1);
    if expr.is_null() {
        return None;
    }
    let state = pg_sys::ExecPrepareExpr(expr as *mut pg_sys::Expr, estate);
    let econtext = pg_sys::MakePerTupleExprContext(estate);
    let eval = (*state).evalfunc?;
    // ExecEvalExprSwitchContext: evaluate in the per-tuple memory.
    let old = pg_sys::MemoryContextSwitchTo((*econtext).ecxt_per_tuple_memory);
    let mut is_null = false;
    let d = eval(state, econtext, &mut is_null);
    pg_sys::MemoryContextSwitchTo(old);
    (!is_null).then_some(d)
}

/// The peer's position the next commit or prepare records in our origin.
unsafe fn set_origin_progress(lsn: u64, time: pg_sys::TimestampTz) {
    pg_sys::replorigin_session_origin_lsn = lsn;
    pg_sys::replorigin_session_origin_timestamp = time;
}

/// SQLSTATE and message of a caught error (a Rust panic counts as XX000).
/// PostgreSQL's DETAIL (e.g. which key) follows the message after ": ".
pub fn describe(e: &pg_sys::panic::CaughtError) -> (String, String) {
    match e {
        pg_sys::panic::CaughtError::PostgresError(r) | pg_sys::panic::CaughtError::ErrorReport(r) => {
            let message = match r.detail() {
                Some(d) => format!("{}: {d}", r.message()),
                None => r.message().to_string(),
            };
            (crate::votes::sqlstate_text(r.sql_error_code() as i32), message)
        }
        pg_sys::panic::CaughtError::RustPanic { ereport, .. } => ("XX000".to_string(), ereport.message().to_string()),
    }
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `col=value` of the key columns, for error messages.
fn describe_key(columns: &[Column], values: &[Value]) -> String {
    columns
        .iter()
        .zip(values)
        .filter(|(c, _)| c.key)
        .map(|(c, v)| match v {
            Value::Binary(b) if b.len() == 4 => format!("{}={}", c.name, i32::from_be_bytes([b[0], b[1], b[2], b[3]])),
            Value::Binary(b) if b.len() == 8 => format!("{}={}", c.name, i64::from_be_bytes(b[..8].try_into().unwrap_or([0; 8]))),
            Value::Binary(b) | Value::Text(b) => format!("{}={}", c.name, String::from_utf8_lossy(b)),
            Value::Null => format!("{}=NULL", c.name),
            Value::UnchangedToast => format!("{}=(toast)", c.name),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

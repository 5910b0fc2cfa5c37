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
#![deny(unsafe_code)]

use crate::pg::executor::{self as exec, ChangeExecutor, FoundRow, SlotBuilder, VirtualSlot};
use crate::pg::memcx::MemCx;
use crate::pg::relation::{self, Rel};
use crate::pg::{origin, twophase};
use crate::pool::Turn;
use mtm_protocol::{Column, Message, OldTuple, Value};
use crate::relmap::LocalColumn;
use mtm_state::decisions::State;
use pgrx::prelude::*;
use pgrx::pg_sys;
use std::collections::HashMap;
use std::ffi::CString;

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
    change_cx: MemCx,
    /// The current transaction's messages, for a serial retry.
    replay: mtm_schedule::retry::Replay,
    /// Replaying them now (a second failure is a no vote).
    retrying: bool,
    /// The failure was giving way to an older transaction of this peer.
    failed_for_own_peer: bool,
    /// The role that prepared the transaction at its home node
    /// ([`crate::xact::PREPARE_MESSAGE`]).
    prepared_by: Option<CString>,
    /// The transaction ends in PREPARE: its rows' foreign keys are checked
    /// here too (`pg/executor.rs`). A plain commit — a superuser's repair
    /// on a node directly — is applied as its node made it.
    checks_foreign_keys: bool,
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
            prepared_by: None,
            checks_foreign_keys: false,
            in_transaction: false,
            failed: None,
            replay: mtm_schedule::retry::Replay::new(REPLAY_BUDGET),
            retrying: false,
            failed_for_own_peer: false,
            // A child of TopMemoryContext, kept for the worker's life.
            change_cx: MemCx::for_process(c"multimaster apply change"),
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
        self.turn.started(seq);
        self.turn.busy(true);
    }

    /// Called while waiting for data: publish the statistics of what was
    /// applied (PostgreSQL batches them; a worker must push them itself).
    pub fn idle(&self) {
        if !self.in_transaction {
            // Outside any transaction, as pgstat requires.
            exec::report_stats();
        }
    }

    /// A transaction (or prepare, or its end) from the peer ending at
    /// `remote_end` is committed here: pass the turn on.
    fn applied(&mut self, remote_end: u64) {
        self.turn.applying(0);
        self.turn.done(self.seq, remote_end);
        self.in_transaction = false;
        exec::report_stats();
    }

    pub fn apply(&mut self, msg: Message) {
        // Rolled back at its home while it waited here (the receiver saw its
        // ROLLBACK PREPARED): nothing more of it is applied, and at its
        // PREPARE it is dropped. Under contention on a few rows most
        // transactions are rolled back, and a pool that applied each of
        // them (its rows, a flushed PREPARE, a flushed vote) fell further
        // and further behind.
        if self.turn.pool().is_abandoned(self.seq) {
            match msg {
                Message::Prepare { end_lsn, gid, .. } => return self.drop_abandoned(&gid, end_lsn),
                Message::Insert { .. } | Message::Update { .. } | Message::Delete { .. } | Message::Truncate { .. } => return,
                Message::Message { transactional: true, .. } => return,
                _ => {}
            }
        }
        // A Prepare's NOTIFYs are kept in the prepared transaction, queued
        // at its commit.
        let notifies = match &msg {
            Message::Prepare { gid, .. } if !self.notifications.is_empty() => {
                let notifications = std::mem::take(&mut self.notifications);
                self.guarded(|_| crate::notify::store(gid, &notifications));
                true
            }
            _ => false,
        };
        match msg {
            Message::Begin { commit_time, prepared, .. } => {
                self.turn.applying(commit_time);
                self.checks_foreign_keys = prepared;
                // Tag the rows' WAL records with the peer's origin (only
                // the commit needs the origin set up, in its turn): the
                // walsenders then drop them as they decode, instead of
                // queueing every applied row until its commit says
                // whose it was.
                origin::set_session_origin(self.turn.origin());
                exec::start_transaction_command();
                self.in_transaction = true;
                self.failed = None;
                self.notifications.clear();
                self.prepared_by = None;
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
                origin::set_session_progress(end_lsn, commit_time);
                crate::notify::queue(&std::mem::take(&mut self.notifications));
                exec::commit_transaction_command();
                self.applied(end_lsn);
            }
            Message::Prepare { end_lsn, gid, .. } if crate::conflicts::doomed_by().is_some() => {
                self.give_way(&gid, end_lsn, false);
            }
            Message::Prepare { end_lsn, prepare_time, gid, .. } => {
                let gid = CString::new(gid).expect("gid without NUL");
                // Balances the EndTransactionBlock inside PrepareTransactionBlock.
                exec::begin_transaction_block();
                exec::commit_transaction_command();
                // Waiting for its turn, it may be told to give way to an
                // older conflicting transaction that needs its locks
                // (`crate::conflicts`); so also once it has the turn.
                let pool = self.turn.pool();
                let seq = self.seq;
                let turn = self.turn.wait_unless(seq, || crate::conflicts::doomed_by().is_some() || pool.is_abandoned(seq));
                if pool.is_abandoned(seq) {
                    // (Its wait for the turn returns at once if it has it.)
                    return self.drop_abandoned(&gid.to_string_lossy(), end_lsn);
                }
                if !turn || crate::conflicts::doomed_by().is_some() {
                    self.give_way(&gid.to_string_lossy(), end_lsn, turn);
                    return;
                }
                origin::set_session_progress(end_lsn, prepare_time);
                // Makes the transaction decodable (and gives it its xid, if
                // it changed nothing) for our walsender to the peer, which
                // sends its PREPARE as our yes (`decoder::filter_by_origin`).
                crate::pg::rmgr::log_logical_message(crate::decoder::APPLIED_PREFIX, &[], true);
                let xid = twophase::top_xid_if_any().into_inner();
                // A client's own gid is owned by its role here as at home,
                // so that role may finish it from a session on this node.
                let owner = self.prepared_by.take().filter(|_| !gid.to_bytes().starts_with(b"mtm-"));
                let prepared = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
                    exec::prepare_transaction_block(&gid);
                    match &owner {
                        Some(role) => crate::pg::catalog::as_role(role, exec::commit_transaction_command),
                        None => exec::commit_transaction_command(),
                    }
                    Ok(())
                }))
                .catch_others(|e| Err(describe(&e)))
                .execute();
                let gid = gid.to_string_lossy().into_owned();
                match prepared {
                    Ok(()) => {
                        crate::votes::record(&gid, &crate::votes::Vote::Yes);
                        crate::votes::note_applied_prepare(&gid, xid, self.peer, prepare_time, notifies);
                    }
                    Err((sqlstate, message)) => {
                        twophase::abort_current_transaction();
                        self.vote_no(&gid, sqlstate, message, end_lsn);
                    }
                }
                self.applied(end_lsn);
            }
            Message::CommitPrepared { end_lsn, commit_time, gid, .. } => {
                self.turn.wait(self.seq);
                finish_prepared(self.peer, &gid, true, end_lsn, commit_time);
                self.applied(end_lsn);
            }
            Message::RollbackPrepared { rollback_end_lsn, rollback_time, gid, .. } => {
                self.turn.wait(self.seq);
                finish_prepared(self.peer, &gid, false, rollback_end_lsn, rollback_time);
                self.applied(rollback_end_lsn);
            }
            // A DDL statement; in an opening one, a CREATE TABLE AS's
            // table, whose rows follow.
            Message::Message { transactional: true, prefix, content, .. }
                if prefix == mtm_protocol::DDL_PREFIX || prefix == mtm_protocol::DDL_BEGIN_PREFIX =>
            {
                self.guarded(|a| a.ddl(&content))
            }
            Message::Message { transactional: true, prefix, content, .. } if crate::notify::is_notify(&prefix) => {
                self.notifications.extend(crate::notify::decode(&content));
            }
            Message::Message { transactional: true, prefix, content, .. }
                if prefix.as_bytes() == crate::xact::PREPARE_MESSAGE.to_bytes() && content.len() > 4 =>
            {
                self.prepared_by = CString::new(&content[4..]).ok();
            }
            Message::Message { .. } => {}
        }
    }

    /// A prepared transaction its home node has rolled back already:
    /// rolled back here before it is prepared, and no vote (nobody waits
    /// for one). Its ROLLBACK PREPARED follows and is skipped.
    fn drop_abandoned(&mut self, gid: &str, end_lsn: u64) {
        exec::abort_out_of_any_transaction();
        self.failed = None;
        self.notifications.clear();
        self.turn.wait(self.seq);
        debug1!("multimaster: {gid} from node {}: rolled back at its home before it was prepared here; dropped", self.peer);
        origin::advance_session(end_lsn, crate::pg::rmgr::wal_insert_position());
        self.applied(end_lsn);
        self.turn.pool().dropped_before_prepare.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A prepared transaction that could not be applied: this node votes
    /// no, and the stream moves past it without retrying. (The position is
    /// kept in memory until the next checkpoint or commit; after a crash it
    /// is applied again, and its ROLLBACK PREPARED follows.)
    fn vote_no(&self, gid: &str, sqlstate: String, message: String, end_lsn: u64) {
        warning!("multimaster: votes no on {gid} from node {}: {message} ({sqlstate})", self.peer);
        crate::votes::record(gid, &crate::votes::Vote::No { sqlstate: sqlstate.clone(), message: message.clone() });
        origin::advance_session(end_lsn, crate::pg::rmgr::wal_insert_position());
        crate::votes::send(self.peer, gid, Some((sqlstate, message)));
    }

    /// This transaction, not prepared yet, gives way to an older one that
    /// needs its locks: roll it back now, then vote no in its turn.
    fn give_way(&mut self, gid: &str, end_lsn: u64, have_turn: bool) {
        let by = crate::conflicts::doomed_by().unwrap_or(0);
        let message = crate::conflicts::message(by);
        if mtm_schedule::retry::worth_retrying("40001", by == self.peer) && self.retry_alone(gid, &message) {
            return;
        }
        exec::abort_out_of_any_transaction();
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
    fn retry_alone(&mut self, gid: &str, cause: &str) -> bool {
        if self.retrying {
            return false;
        }
        let Some(kept) = self.replay.take() else { return false };
        exec::abort_out_of_any_transaction();
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
    fn guarded(&mut self, f: impl FnOnce(&Self)) {
        if self.failed.is_some() {
            return;
        }
        let this = &*self;
        let result = self.change_cx.within(|| {
            PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
                f(this);
                Ok(())
            }))
            .catch_others(|e| Err(describe(&e)))
            .execute()
        });
        // Cancelled because it gives way to an older transaction.
        let doomed_by = crate::conflicts::doomed_by();
        let result = result.map_err(|(sqlstate, message)| match doomed_by {
            Some(by) if sqlstate == "57014" => ("40001".to_string(), crate::conflicts::message(by)),
            _ => (sqlstate, message),
        });
        self.failed_for_own_peer = result.is_err() && doomed_by == Some(self.peer);
        if let Err((sqlstate, message)) = result {
            twophase::abort_current_transaction();
            log!("multimaster: applying a change from node {} failed: {message} ({sqlstate})", self.peer);
            self.failed = Some((sqlstate, message));
        }
        self.change_cx.reset();
    }

    fn remote(&self, relid: u32) -> &RemoteRelation {
        self.relations
            .get(&relid)
            .unwrap_or_else(|| error!("multimaster: change for relation {relid} from node {} without its Relation message", self.peer))
    }

    /// A peer's DDL statement, at its place in the transaction.
    fn ddl(&self, content: &[u8]) {
        let m = mtm_protocol::DdlMessage::decode(content)
            .unwrap_or_else(|e| error!("multimaster: undecodable DDL message from node {}: {e}", self.peer));
        if self.checks_foreign_keys {
            crate::pg::xact::with_transaction_snapshot(exec::fire_deferred_checks);
        }
        crate::ddl::replay(&m, self.peer);
    }

    fn truncate(&self, relids: &[u32], cascade: bool, restart: bool) {
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
        crate::pg::xact::with_transaction_snapshot(|| {
            if self.checks_foreign_keys {
                exec::fire_deferred_checks();
            }
            if let Err(e) = Spi::run(&sql) {
                error!("multimaster: applying {sql} from node {}: {e}", self.peer);
            }
        });
        crate::pg::xact::command_counter_increment();
    }

    /// INSERT (old None), UPDATE (both), DELETE (new None).
    fn change(&self, relid: u32, old: Option<Option<OldTuple>>, new: Option<Vec<Value>>) {
        let remote = self.remote(relid);
        let table = format!("{}.{}", remote.namespace, remote.name);
        let mut cache = self.cache.borrow_mut();
        let (rel, map) = cache.open(relid, &remote.namespace, &remote.name, &remote.columns, self.peer);
        let snapshot = crate::pg::xact::push_transaction_snapshot();

        let executor = ChangeExecutor::begin(&rel, &snapshot, self.checks_foreign_keys);

        match (old, new) {
            (None, Some(new)) => {
                let slot = self.build_slot(&executor, &rel, map, &new, Row::New, &table);
                executor.insert(&slot);
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
                let search = self.build_slot(&executor, &rel, map, key_values, Row::Search, &table);
                let found = if idx != pg_sys::Oid::INVALID {
                    executor.find_by_index(idx, &search)
                } else {
                    executor.find_by_scan(&search)
                };
                let Some(local) = found else {
                    error!(
                        "multimaster: row to {} not found in {table} (from node {}, key {})",
                        if new.is_some() { "update" } else { "delete" },
                        self.peer,
                        describe_key(&remote.columns, key_values)
                    );
                };
                executor.with_epq(|epq| match new {
                    Some(new) => {
                        let slot = self.build_slot(&executor, &rel, map, &new, Row::Update(&local), &table);
                        executor.update(epq, &local, &slot);
                    }
                    None => executor.delete(epq, &local),
                });
            }
            (None, None) => {}
        }
        executor.finish();
        snapshot.pop();
        rel.table_close(pg_sys::NoLock as pg_sys::LOCKMODE);
        crate::pg::xact::command_counter_increment();
    }

    /// A virtual slot of the local table filled from remote values matched
    /// by column name. Local columns the peer did not send get their
    /// default in a new row and keep their value in an updated one; an
    /// unchanged TOAST value is taken from `base` (the existing row).
    fn build_slot<'e>(
        &self,
        executor: &'e ChangeExecutor,
        rel: &Rel,
        local: &crate::relmap::LocalRelation,
        values: &[Value],
        row: Row,
        table: &str,
    ) -> VirtualSlot<'e> {
        let base = match row {
            Row::Update(local) => Some(local),
            Row::New | Row::Search => None,
        };
        let mut slot: SlotBuilder = executor.virtual_slot();
        if let Some(b) = base {
            slot.copy_from(b);
        } else {
            slot.set_all_null();
        }
        for (i, column) in local.columns.iter().enumerate() {
            let col = match column {
                LocalColumn::Ignored => continue,
                LocalColumn::NotSent => {
                    // A column the peer does not have (its schema differs
                    // here): a new row gets the column's default, as an
                    // INSERT that leaves it out would.
                    if matches!(row, Row::New) {
                        slot.set_default(i);
                    }
                    continue;
                }
                LocalColumn::Sent(col) => col,
            };
            match &values[col.remote] {
                Value::Null => slot.set_null(i),
                Value::UnchangedToast => {
                    if base.is_none() {
                        slot.mark_null(i);
                    }
                }
                Value::Binary(bytes) => {
                    if !col.same_type {
                        let a = &rel.attributes()[i];
                        error!(
                            "multimaster: column {} of {table} has type {} here but {} on node {}",
                            relation::attribute_name(a),
                            a.atttypid.to_u32(),
                            col.remote_type,
                            self.peer
                        );
                    }
                    slot.set_received(i, &col.recv, bytes, col.typmod);
                }
                Value::Text(bytes) => {
                    let text = CString::new(bytes.clone()).unwrap_or_else(|_| error!("NUL in a text value"));
                    slot.set_input(i, &col.input, &text, col.typmod);
                }
            }
        }
        slot.store()
    }
}

/// What a slot built from a peer's values is for.
#[derive(Clone, Copy)]
enum Row<'a, 'e> {
    /// An inserted row: columns the peer did not send get their default.
    New,
    /// The values an UPDATE/DELETE looks the row up by.
    Search,
    /// The new version of this existing row: what the peer did not send
    /// (or left as unchanged TOAST) is kept.
    Update(&'a FoundRow<'e>),
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

/// COMMIT PREPARED / ROLLBACK PREPARED of `gid`, if it is prepared
/// here. It may not be: its PREPARE failed here (this node voted no),
/// or a session on this node already finished it (a client's
/// `COMMIT PREPARED` can be run on any node). Either way there is
/// nothing to do but move past it, which is logged, never an error
/// that would stall the stream.
///
/// From an apply worker in its commit turn, or from the receiver out
/// of turn ([`mtm_schedule::Finish::Now`]); either way under a session
/// origin, so that this node's walsenders do not send it on, and
/// outside a transaction.
pub fn finish_prepared(peer: i32, gid: &str, commit: bool, end_lsn: u64, time: pg_sys::TimestampTz) {
    exec::start_transaction_command();
    origin::set_session_progress(end_lsn, time);
    let here = crate::prepared_here(gid);
    // How this node finished it, if it did before.
    let mut finished_before = None;
    if here {
        crate::decisions::log(gid, if commit { State::Committed } else { State::Aborted });
        let c_gid = CString::new(gid).expect("gid without NUL");
        // Inside the transaction started above; an ERROR unwinds to the
        // worker's guard through our frames.
        twophase::finish_prepared(&c_gid, commit);
        if commit && crate::votes::may_notify(gid) {
            crate::notify::deliver(gid);
        }
    } else {
        finished_before = crate::decisions::state(gid).filter(|s| s.finished());
        let what = if commit { "COMMIT PREPARED" } else { "ROLLBACK PREPARED" };
        match finished_before {
            Some(state) if (state == State::Committed) != commit => warning!(
                "multimaster: {what} {gid} from node {peer}, but this node {} it: the nodes disagree on it",
                if commit { "rolled back" } else { "committed" }
            ),
            _ => log!("multimaster: {what} {gid} from node {peer}: not prepared here (already finished, or its prepare failed here); skipped"),
        }
    }
    exec::commit_transaction_command();
    crate::votes::forget(gid);
    if !here && !crate::votes::acked(gid) {
        // A client's own gid finished from `peer` (or rolled back there
        // after this node refused or dropped it): no record here for our
        // walsender to ack, and that statement waits for every node
        // (`votes::await_finished`).
        crate::votes::send(peer, &crate::votes::committed_key(gid), None);
    } else if commit && !here && finished_before != Some(State::Aborted) {
        // No COMMIT PREPARED record for our walsender to ack (it acks the
        // ones it decodes, `decoder.rs`): say it ourselves, so the
        // coordinator need not wait for its timeout.
        crate::votes::send_committed(peer, gid);
    }
}

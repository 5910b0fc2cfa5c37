//! The `multimaster` output plugin: turns the reorder buffer's transactions
//! into the binary messages of `extension/PROTOCOL.md` (encoded by the
//! safe `mtm-protocol` crate). The callbacks' logic: PostgreSQL's
//! structures (transactions, relations, heap tuples) are read through the
//! views of [`crate::pg::decoding`], whose trampolines call the functions
//! here, and plain values go to the encoder.
//!
//! Behaviour:
//! - two-phase decoding is always on (except while the slot is created):
//!   peers see a transaction at PREPARE, then COMMIT/ROLLBACK PREPARED;
//! - in normal mode only transactions that originated on this node are
//!   sent (`filter_by_origin_cb`), so nothing loops; option
//!   `mtm_mode 'recovery'` forwards every origin;
//! - tables listed in `mtm.local_tables` are skipped;
//! - built-in types go in their binary send format, other types (and the
//!   object identifier types, whose binary form is a node-local OID) as text;
//!   unchanged TOAST values are marked, never detoasted;
//! - a Relation message precedes the first change of each table in each
//!   transaction (and again after a DDL statement), so a receiver always
//!   has the columns (by name) of the table as the change saw it;
//! - a DDL statement ([`crate::ddl`]) goes out as one message at its place
//!   in the transaction; the rows the statement itself wrote (CREATE TABLE
//!   AS, an extension script) do not, the peers' replay writes them;
//! - to a walsender, a transaction's messages up to its Prepare or Commit
//!   go out as one chunk ([`mtm_protocol::Batch`], at most
//!   [`BATCH_BYTES`] each): one send and one wake-up of the receiver
//!   instead of one per row;
//! - a vote goes only to the node that coordinates its transaction (the
//!   slot `mtm_slot_<n>` streams to node n): the others would drop it;
//! - on the slot of node n, the PREPARE of one of n's transactions applied
//!   here goes out as this node's yes vote, and its COMMIT PREPARED as
//!   the ack ([`filter_by_origin`]).

#![deny(unsafe_code)]

use crate::pg::decoding::{self, FilteredRecord, Output, Relation, RowChange, Startup, Truncate, Tuple, Txn};
use crate::pg::memcx::MemCx;
use mtm_protocol::{Batch, Column, Message, OldTuple, Value, VoteMessage};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::collections::{HashMap, HashSet};
use std::ffi::CStr;

/// Per-slot state behind `ctx->output_plugin_private`.
pub(crate) struct DecoderState {
    recovery: bool,
    /// Reset after every change: send-function results and deformed tuples.
    scratch: MemCx,
    /// Relations whose Relation message went out in this transaction.
    described: HashSet<pg_sys::Oid>,
    /// Whether a relation is local (looked up once per transaction).
    local: HashMap<pg_sys::Oid, bool>,
    /// The rows of `mtm.local_tables` (schema, name) as this transaction
    /// sees them: read at its first relation, once (not once per relation).
    local_tables: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    /// Begin (and Origin) of the current transaction went out. Begin is
    /// sent lazily, so a transaction with nothing to send (only local
    /// tables) sends nothing at all.
    begun: bool,
    /// Between a DDL statement's two messages: its own row changes are not
    /// sent (the peers' replay of the statement makes them).
    in_ddl: bool,
    sink: Sink,
    /// The node this slot streams to, if its name says (`mtm_slot_<n>`).
    subscriber: Option<i32>,
}

/// A gathered chunk goes out once it reaches this size, so a big
/// transaction still streams.
pub(crate) const BATCH_BYTES: usize = 64 * 1024;

/// Where messages go: each straight out as its own chunk, or gathered
/// into a batch that goes out at the end of the transaction's part.
struct Sink {
    batch: Option<Batch>,
}

impl Sink {
    fn send(&mut self, out: &mut Output, msg: &Message) {
        match &mut self.batch {
            None => out.write(&msg.to_bytes(), true),
            Some(batch) => {
                batch.push(msg);
                if batch.len() >= BATCH_BYTES {
                    self.flush(out);
                }
            }
        }
    }

    /// Writes what is gathered, at the end of a transaction's part
    /// (Prepare, Commit, ...) or of a message outside transactions.
    fn flush(&mut self, out: &mut Output) {
        if let Some(chunk) = self.batch.as_mut().and_then(Batch::take) {
            out.write(&chunk, true);
        }
    }

    /// Sends `msg` and everything gathered before it.
    fn send_now(&mut self, out: &mut Output, msg: &Message) {
        self.send(out, msg);
        self.flush(out);
    }
}

/// Normal mode sends only transactions that originated on this node.
fn skipped_origin(st: &DecoderState, txn: &Txn) -> bool {
    !st.recovery && txn.origin_id() != pg_sys::InvalidRepOriginId as pg_sys::RepOriginId
}

/// The startup callback: reads the options, sets the output mode.
pub(crate) fn startup(ctx: &mut Startup, is_init: bool) -> DecoderState {
    ctx.set_binary_output();
    let mut recovery = false;
    // Options we do not know (libpqwalreceiver always sends proto_version
    // and publication_names) are ignored.
    for elem in ctx.options() {
        let name = elem.name().to_string_lossy();
        if name == "mtm_mode" {
            let value = elem.string();
            recovery = match value.as_str() {
                "normal" => false,
                "recovery" => true,
                other => error!("invalid mtm_mode \"{other}\": expected normal or recovery"),
            };
        }
    }
    if is_init {
        // Slot creation: no two-phase or streaming decisions to make yet.
        ctx.set_twophase(false);
        ctx.set_streaming(false);
    } else {
        ctx.set_twophase_opt_given(true);
    }
    let scratch = ctx.create_scratch(c"multimaster decoder");
    let sink = Sink { batch: ctx.to_walsender().then(Batch::default) };
    let subscriber = ctx.slot_name().strip_prefix("mtm_slot_").and_then(|n| n.parse().ok());
    if let Some(peer) = subscriber.filter(|_| !is_init && ctx.to_walsender()) {
        wait_for_origins(peer);
    }
    DecoderState {
        recovery,
        scratch,
        described: HashSet::new(),
        local: HashMap::new(),
        local_tables: None,
        begun: false,
        in_ddl: false,
        sink,
        subscriber,
    }
}

/// Longest a walsender waits at its start for the receiver from its
/// subscriber to publish that node's origins.
const ORIGINS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Right after this node starts, its walsender to `peer` may decode a
/// PREPARE of `peer`'s that was applied here before the receiver from
/// `peer` has said which origins are `peer`'s: the PREPARE would be
/// skipped, and `peer` would get no yes and roll the gid back at its vote
/// timeout. The receiver publishes them before it connects, so the wait
/// is short; bounded, should the receiver not run.
fn wait_for_origins(peer: i32) {
    wait_while(ORIGINS_WAIT, 20_000, || !crate::pool::origins_published(peer));
}

/// Polls `busy` every `every_us` microseconds until it is false or
/// `limit` has passed.
fn wait_while(limit: std::time::Duration, every_us: i64, busy: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while busy() && std::time::Instant::now() < deadline {
        crate::pg::latch::sleep(every_us);
        crate::pg::latch::check_for_interrupts();
    }
}

/// The shutdown callback: the state goes (its scratch context goes with
/// the decoding context).
pub(crate) fn shutdown(st: Box<DecoderState>) {
    drop(st);
}

/// Whether to skip what a record with origin `origin_id` says (true =
/// skip). Normal mode sends only what originated here, with one
/// exception: on the slot of node n, the PREPARE and COMMIT PREPARED of
/// n's transactions applied here go through, to become this node's yes
/// vote and its ack to n ([`prepare`], [`commit_prepared`]), and so does
/// the ROLLBACK PREPARED of a client's own gid that n's client rolled
/// back ([`rollback_prepared`]: the ack its statement waits for). They cost no
/// flush of their own: the records that PostgreSQL flushes anyway say it,
/// and only once they are on disk. PostgreSQL decodes only a transaction
/// it has queued a change of, so the apply worker logs one
/// [`APPLIED_PREFIX`] message before each PREPARE, which goes through here
/// too (and no further, [`message`]); the rows stay filtered.
pub(crate) fn filter_by_origin(st: &DecoderState, origin_id: pg_sys::RepOriginId, record: FilteredRecord) -> bool {
    if st.recovery || origin_id == pg_sys::InvalidRepOriginId as pg_sys::RepOriginId {
        return false;
    }
    match record {
        FilteredRecord::Prepare | FilteredRecord::CommitPrepared | FilteredRecord::AbortPrepared | FilteredRecord::Message => {
            applied_from_subscriber(st, origin_id).is_none()
        }
        // Never filtered (the message callback drops them): a peer's
        // transaction applied here gets its base snapshot in the reorder
        // buffer from its first row change (taken before this filter) or
        // a message that passes it, and one that has none — a read-only
        // one, whose only record is the apply's `APPLIED_PREFIX` message —
        // gets no COMMIT PREPARED callback. A client of the peer may finish
        // its gid from a session here (XA): that COMMIT PREPARED, this
        // node's own, must reach every other node.
        FilteredRecord::TransactionalMessage => false,
        FilteredRecord::Other => true,
    }
}

/// Prefix of the transactional message an apply worker logs before it
/// prepares a peer's transaction (empty content; see [`filter_by_origin`]).
pub(crate) const APPLIED_PREFIX: &CStr = c"mtm_applied";

/// The node this slot streams to, if `origin` is one under which this
/// node applies (or finishes) that node's transactions.
fn applied_from_subscriber(st: &DecoderState, origin: pg_sys::RepOriginId) -> Option<i32> {
    let peer = crate::pool::peer_of_origin(origin)?;
    (st.subscriber == Some(peer)).then_some(peer)
}

/// Sends this node's yes on `gid` to `coordinator`, as the vote message
/// an apply worker would log (`votes::send`), at `lsn`.
fn send_vote(st: &mut DecoderState, out: &mut Output, coordinator: i32, gid: String, lsn: pg_sys::XLogRecPtr) {
    let content = crate::votes::content(coordinator, gid, None);
    let vote = Message::Message { transactional: false, lsn, prefix: mtm_protocol::VOTE_PREFIX.to_string(), content };
    st.sink.send_now(out, &vote);
}

/// begin and begin_prepare.
pub(crate) fn begin(st: &mut DecoderState) {
    forget_relations(st);
    st.begun = false;
    st.in_ddl = false;
}

/// Which relations were described and which are local: looked up again
/// from here on.
fn forget_relations(st: &mut DecoderState) {
    st.described.clear();
    st.local.clear();
    st.local_tables = None;
}

/// Sends Begin (and Origin) before the transaction's first message.
fn ensure_begun(st: &mut DecoderState, out: &mut Output, txn: Option<&Txn>) {
    let Some(txn) = txn.filter(|_| !st.begun) else {
        return;
    };
    st.begun = true;
    let has_origin = txn.origin_id() != pg_sys::InvalidRepOriginId as pg_sys::RepOriginId;
    // The reorder buffer names a transaction's gid before it replays one
    // that ends in PREPARE.
    let prepared = txn.gid().is_some();
    st.sink.send(out, &Message::Begin { xid: txn.xid().into(), final_lsn: txn.final_lsn(), commit_time: txn.commit_time(), prepared });
    if has_origin {
        let name = crate::pg::origin::name_of(txn.origin_id()).unwrap_or_default();
        st.sink.send(out, &Message::Origin { origin_lsn: txn.origin_lsn(), name });
    }
}

pub(crate) fn commit(st: &mut DecoderState, out: &mut Output, txn: Txn, commit_lsn: pg_sys::XLogRecPtr) {
    if !st.begun {
        return;
    }
    st.sink.send_now(out, &Message::Commit { commit_lsn, end_lsn: txn.end_lsn(), commit_time: txn.commit_time() });
}

fn gid_of(txn: &Txn) -> String {
    match txn.gid() {
        None => String::new(),
        Some(gid) => gid.to_string_lossy().into_owned(),
    }
}

pub(crate) fn prepare(st: &mut DecoderState, out: &mut Output, txn: Txn, prepare_lsn: pg_sys::XLogRecPtr) {
    // A prepare goes out even with no changes: its gid is what peers vote on.
    if skipped_origin(st, &txn) {
        // The subscriber's transaction, prepared here and on disk (a
        // walsender reads only flushed WAL): our yes.
        if let Some(coordinator) = applied_from_subscriber(st, txn.origin_id()) {
            let gid = gid_of(&txn);
            // A client's own gid may be committed from a session on this
            // node as soon as its client hears the votes.
            if !crate::votes::acked(&gid) {
                wait_until_prepared(txn.xid());
            }
            send_vote(st, out, coordinator, gid, prepare_lsn);
        }
        return;
    }
    ensure_begun(st, out, Some(&txn));
    let msg = Message::Prepare {
        prepare_lsn,
        end_lsn: txn.end_lsn(),
        prepare_time: txn.prepare_time(),
        xid: txn.xid().into(),
        gid: gid_of(&txn),
    };
    st.sink.send_now(out, &msg);
}

pub(crate) fn commit_prepared(st: &mut DecoderState, out: &mut Output, txn: Txn, commit_lsn: pg_sys::XLogRecPtr) {
    if skipped_origin(st, &txn) {
        // The subscriber's transaction, committed here: the ack its
        // coordinator waits for before it answers COMMIT — or, for a
        // client's own gid, the node its client finished it from
        // (`votes::await_finished`).
        let gid = gid_of(&txn);
        if let Some(coordinator) = applied_from_subscriber(st, txn.origin_id()) {
            wait_until_visible(txn.xid());
            send_vote(st, out, coordinator, crate::votes::committed_key(&gid), commit_lsn);
        }
        return;
    }
    let msg = Message::CommitPrepared {
        commit_lsn,
        end_lsn: txn.end_lsn(),
        commit_time: txn.commit_time(),
        xid: txn.xid().into(),
        gid: gid_of(&txn),
    };
    st.sink.send_now(out, &msg);
}

/// The yes says the transaction is prepared here, so a COMMIT PREPARED
/// from any session finds it. Its PREPARE record is flushed just before
/// the preparing process marks it valid and then lets go of its
/// transaction id (a prepared transaction's own PGPROC has no pid): wait
/// for that (microseconds; bounded, in case).
fn wait_until_prepared(xid: pg_sys::TransactionId) {
    let xid = xid.into_inner();
    wait_while(std::time::Duration::from_secs(5), 20, || crate::pg::proc::all_procs().any(|p| p.pid() != 0 && p.xid() == xid));
}

/// The ack says the transaction is visible here. Its COMMIT PREPARED
/// record is flushed just before the committing process takes it out of
/// the proc array: wait for that (microseconds; bounded, in case).
fn wait_until_visible(xid: pg_sys::TransactionId) {
    wait_while(std::time::Duration::from_secs(5), 20, || decoding::xid_in_progress(xid));
}

pub(crate) fn rollback_prepared(
    st: &mut DecoderState,
    out: &mut Output,
    txn: Txn,
    prepare_end_lsn: pg_sys::XLogRecPtr,
    prepare_time: pg_sys::TimestampTz,
) {
    if skipped_origin(st, &txn) {
        // A client's own gid rolled back here as the subscriber's client
        // asked: the ack `votes::await_finished` waits for there.
        let gid = gid_of(&txn);
        if let Some(coordinator) = applied_from_subscriber(st, txn.origin_id()).filter(|_| !crate::votes::acked(&gid)) {
            wait_until_visible(txn.xid());
            send_vote(st, out, coordinator, crate::votes::committed_key(&gid), txn.end_lsn());
        }
        return;
    }
    let msg = Message::RollbackPrepared {
        prepare_end_lsn,
        rollback_end_lsn: txn.end_lsn(),
        prepare_time,
        rollback_time: txn.commit_time(),
        xid: txn.xid().into(),
        gid: gid_of(&txn),
    };
    st.sink.send_now(out, &msg);
}

/// A logical message (`txn` only if `transactional`).
pub(crate) fn message(
    st: &mut DecoderState,
    out: &mut Output,
    txn: Option<Txn>,
    lsn: pg_sys::XLogRecPtr,
    transactional: bool,
    prefix: &CStr,
    content: &[u8],
) {
    // A message of a peer's transaction applied here (`APPLIED_PREFIX`, or
    // anything else the apply logged): it only made the transaction
    // decodable, for the vote at its PREPARE.
    if txn.as_ref().is_some_and(|t| skipped_origin(st, t)) {
        return;
    }
    let prefix = prefix.to_string_lossy().into_owned();
    let content = content.to_vec();
    if transactional && prefix == mtm_protocol::DDL_BEGIN_PREFIX {
        if content.is_empty() {
            st.in_ddl = true;
            return;
        }
        // A CREATE TABLE AS whose rows follow: sent now, rows and all.
    }
    if transactional && prefix == mtm_protocol::DDL_PREFIX {
        st.in_ddl = false;
        // The statement may have changed the columns of tables already
        // described in this transaction (or which are local): look again.
        forget_relations(st);
        if content.is_empty() {
            return; // temporary objects only: stays on this node
        }
    }
    if !transactional && prefix == mtm_protocol::VOTE_PREFIX {
        let to = VoteMessage::coordinator_of(&content);
        if st.subscriber.is_some() && to != st.subscriber {
            return;
        }
    }
    let msg = Message::Message { transactional, lsn, prefix, content };
    if transactional {
        ensure_begun(st, out, txn.as_ref());
        st.sink.send(out, &msg);
    } else {
        st.sink.send_now(out, &msg);
    }
}

pub(crate) fn truncate(st: &mut DecoderState, out: &mut Output, txn: Txn, relations: Vec<Relation>, change: Truncate) {
    if st.in_ddl {
        return;
    }
    let rels: Vec<Relation> = relations.into_iter().filter(|rel| !is_local(st, rel)).collect();
    if rels.is_empty() {
        return;
    }
    ensure_begun(st, out, Some(&txn));
    let mut relids = Vec::with_capacity(rels.len());
    for rel in rels {
        describe(&mut st.described, &mut st.sink, out, &rel);
        relids.push(rel.id().to_u32());
    }
    st.sink.send(out, &Message::Truncate { cascade: change.cascade(), restart_identity: change.restart_seqs(), relids });
}

pub(crate) fn change(st: &mut DecoderState, out: &mut Output, txn: Txn, change: RowChange) {
    let rel = change.relation();
    if st.in_ddl || is_local(st, &rel) {
        return;
    }
    ensure_begun(st, out, Some(&txn));
    let DecoderState { scratch, described, sink, .. } = st;
    scratch.within_then_reset(|| {
        describe(described, sink, out, &rel);
        let relid = rel.id().to_u32();
        let full = rel.replica_identity() == pg_sys::REPLICA_IDENTITY_FULL;
        let old = change.old_tuple().map(|old| {
            let t = tuple_values(&old);
            if full { OldTuple::Full(t) } else { OldTuple::Key(t) }
        });
        let msg = match (change.action(), change.new_tuple()) {
            (pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_INSERT, Some(new)) => {
                Some(Message::Insert { relid, new: tuple_values(&new) })
            }
            (pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_UPDATE, Some(new)) => {
                Some(Message::Update { relid, old, new: tuple_values(&new) })
            }
            // A DELETE without an old tuple is a table without replica
            // identity: sent with none, so the receiver reports it clearly.
            (pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_DELETE, _) => Some(Message::Delete { relid, old }),
            _ => None,
        };
        if let Some(msg) = msg {
            sink.send(out, &msg);
        }
    });
}

/// The columns a change carries: not dropped, not generated.
fn live_attributes<'a>(rel: &Relation<'a>) -> Vec<&'a pg_sys::FormData_pg_attribute> {
    rel.attributes().iter().filter(|a| !a.attisdropped && a.attgenerated == 0).collect()
}

/// Sends the Relation message once per relation per transaction.
fn describe(described: &mut HashSet<pg_sys::Oid>, sink: &mut Sink, out: &mut Output, rel: &Relation) {
    let relid = rel.id();
    if !described.insert(relid) {
        return;
    }
    let replident = rel.replica_identity();
    // Not RelationGetIndexAttrBitmap: that locks the indexes, and a PREPAREd
    // transaction that created the table holds them: decoding would wait
    // for its own transaction to end (as pgoutput avoids, too).
    let columns = rel.with_identity_key(|key_attrs| {
        live_attributes(rel)
            .into_iter()
            .map(|a| Column {
                key: replident == pg_sys::REPLICA_IDENTITY_FULL
                    || key_attrs.contains(a.attnum as i32 - pg_sys::FirstLowInvalidHeapAttributeNumber),
                name: crate::pg::relation::attribute_name(a).into_owned(),
                type_oid: a.atttypid.to_u32(),
                typmod: a.atttypmod,
            })
            .collect()
    });
    let namespace = match rel.namespace_name() {
        None => String::new(),
        Some(nsp) => nsp.to_string_lossy().into_owned(),
    };
    let name = rel.name().to_string_lossy().into_owned();
    sink.send(out, &Message::Relation { relid: relid.to_u32(), namespace, name, replica_identity: replident, columns });
}

/// A heap tuple's live columns as protocol values.
fn tuple_values(tuple: &Tuple) -> Vec<Value> {
    let fields = tuple.deform();
    let mut out = Vec::with_capacity(fields.len());
    for (a, field) in fields {
        if a.attisdropped || a.attgenerated != 0 {
            continue;
        }
        match field {
            None => out.push(Value::Null),
            // Unchanged TOAST values are marked, never detoasted.
            Some(f) if f.is_unchanged_toast() => out.push(Value::UnchangedToast),
            Some(f) if names_objects(a.atttypid) => out.push(Value::Text(qualified_text(|| f.text()))),
            Some(f) if a.atttypid.to_u32() < pg_sys::FirstNormalObjectId => out.push(Value::Binary(f.binary())),
            Some(f) => out.push(Value::Text(f.text())),
        }
    }
    out
}

/// The object identifier types (`regclass`, `regtype`... and their
/// arrays): built in, but their binary form is an OID, which names another
/// object (or none) on another node. They go as text, their objects'
/// names, which each node resolves to its own.
fn names_objects(typid: pg_sys::Oid) -> bool {
    // A match, not a list to scan: this runs for every column of every
    // row decoded.
    matches!(
        typid,
        pg_sys::REGPROCOID
            | pg_sys::REGPROCEDUREOID
            | pg_sys::REGOPEROID
            | pg_sys::REGOPERATOROID
            | pg_sys::REGCLASSOID
            | pg_sys::REGCOLLATIONOID
            | pg_sys::REGTYPEOID
            | pg_sys::REGROLEOID
            | pg_sys::REGNAMESPACEOID
            | pg_sys::REGCONFIGOID
            | pg_sys::REGDICTIONARYOID
            | pg_sys::REGPROCARRAYOID
            | pg_sys::REGPROCEDUREARRAYOID
            | pg_sys::REGOPERARRAYOID
            | pg_sys::REGOPERATORARRAYOID
            | pg_sys::REGCLASSARRAYOID
            | pg_sys::REGCOLLATIONARRAYOID
            | pg_sys::REGTYPEARRAYOID
            | pg_sys::REGROLEARRAYOID
            | pg_sys::REGNAMESPACEARRAYOID
            | pg_sys::REGCONFIGARRAYOID
            | pg_sys::REGDICTIONARYARRAYOID
    )
}

/// `output` with only pg_catalog on the search_path, so that every name
/// it prints is schema-qualified (pg_catalog's are found anywhere) and
/// resolves the same whatever the applying session's search_path.
fn qualified_text(output: impl FnOnce() -> Vec<u8>) -> Vec<u8> {
    let nest = crate::pg::guc::new_nest_level();
    crate::pg::guc::set_for_nest_level(c"search_path", c"pg_catalog");
    let text = output();
    crate::pg::guc::end_nest_level(nest);
    text
}

/// Whether `rel` is listed in `mtm.local_tables`. Read with the decoding
/// snapshot (the table is a user_catalog_table for this reason), once per
/// relation per transaction.
fn is_local(st: &mut DecoderState, rel: &Relation) -> bool {
    let relid = rel.id();
    if let Some(&v) = st.local.get(&relid) {
        return v;
    }
    let tables = st.local_tables.get_or_insert_with(|| {
        let mut rows = Vec::new();
        decoding::any_local_table(|s, n| {
            rows.push((s.to_bytes().to_vec(), n.to_bytes().to_vec()));
            false
        });
        rows
    });
    let v = match rel.namespace_name() {
        None => false,
        Some(nsp) => tables.iter().any(|(s, n)| s == nsp.to_bytes() && n == rel.name().to_bytes()),
    };
    st.local.insert(relid, v);
    v
}

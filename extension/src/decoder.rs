//! The `multimaster` output plugin: turns the reorder buffer's transactions
//! into the binary messages of `extension/PROTOCOL.md` (encoded by the
//! safe `mtm-protocol` crate). This file is the thin unsafe layer: it reads
//! PostgreSQL's structures (transactions, relations, heap tuples) and hands
//! plain values to the encoder.
//!
//! Behaviour:
//! - two-phase decoding is always on (except while the slot is created):
//!   peers see a transaction at PREPARE, then COMMIT/ROLLBACK PREPARED;
//! - in normal mode only transactions that originated on this node are
//!   sent (`filter_by_origin_cb`), so nothing loops; option
//!   `mtm_mode 'recovery'` forwards every origin;
//! - tables listed in `mtm.local_tables` are skipped;
//! - built-in types go in their binary send format, other types as text;
//!   unchanged TOAST values are marked, never detoasted;
//! - a Relation message precedes the first change of each table in each
//!   transaction (and again after a DDL statement), so a receiver always
//!   has the columns (by name) of the table as the change saw it;
//! - a DDL statement ([`crate::ddl`]) goes out as one message at its place
//!   in the transaction; the rows the statement itself wrote (CREATE TABLE
//!   AS, an extension script) do not, the peers' replay writes them.

use mtm_protocol::{Column, Message, OldTuple, Value};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::collections::{HashMap, HashSet};
use std::ffi::{c_char, CStr};

/// Per-slot state behind `ctx->output_plugin_private`.
struct DecoderState {
    recovery: bool,
    /// Reset after every change: send-function results and deformed tuples.
    scratch: pg_sys::MemoryContext,
    /// Relations whose Relation message went out in this transaction.
    described: HashSet<pg_sys::Oid>,
    /// Whether a relation is local (looked up once per transaction).
    local: HashMap<pg_sys::Oid, bool>,
    /// Begin (and Origin) of the current transaction went out. Begin is
    /// sent lazily, so a transaction with nothing to send (only local
    /// tables) sends nothing at all.
    begun: bool,
    /// Between a DDL statement's two messages: its own row changes are not
    /// sent (the peers' replay of the statement makes them).
    in_ddl: bool,
}

/// Normal mode sends only transactions that originated on this node.
fn skipped_origin(st: &DecoderState, txn: &pg_sys::ReorderBufferTXN) -> bool {
    !st.recovery && txn.origin_id != pg_sys::InvalidRepOriginId as pg_sys::RepOriginId
}

unsafe fn state<'a>(ctx: *mut pg_sys::LogicalDecodingContext) -> &'a mut DecoderState {
    &mut *((*ctx).output_plugin_private as *mut DecoderState)
}

/// Entry point PostgreSQL looks up in an output plugin library.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn _PG_output_plugin_init(cb: *mut pg_sys::OutputPluginCallbacks) {
    let cb = &mut *cb;
    cb.startup_cb = Some(startup);
    cb.shutdown_cb = Some(shutdown);
    cb.begin_cb = Some(begin);
    cb.change_cb = Some(change);
    cb.truncate_cb = Some(truncate);
    cb.commit_cb = Some(commit);
    cb.message_cb = Some(message);
    cb.filter_by_origin_cb = Some(filter_by_origin);
    cb.begin_prepare_cb = Some(begin);
    cb.prepare_cb = Some(prepare);
    cb.commit_prepared_cb = Some(commit_prepared);
    cb.rollback_prepared_cb = Some(rollback_prepared);
}

#[pg_guard]
unsafe extern "C-unwind" fn startup(
    ctx: *mut pg_sys::LogicalDecodingContext,
    options: *mut pg_sys::OutputPluginOptions,
    is_init: bool,
) {
    (*options).output_type = pg_sys::OutputPluginOutputType::OUTPUT_PLUGIN_BINARY_OUTPUT;
    let mut recovery = false;
    // Options we do not know (libpqwalreceiver always sends proto_version
    // and publication_names) are ignored.
    let list = pgrx::PgList::<pg_sys::DefElem>::from_pg((*ctx).output_plugin_options);
    for elem in list.iter_ptr() {
        let name = CStr::from_ptr((*elem).defname).to_string_lossy();
        if name == "mtm_mode" {
            let value = CStr::from_ptr(pg_sys::defGetString(elem)).to_string_lossy().into_owned();
            recovery = match value.as_str() {
                "normal" => false,
                "recovery" => true,
                other => error!("invalid mtm_mode \"{other}\": expected normal or recovery"),
            };
        }
    }
    if is_init {
        // Slot creation: no two-phase or streaming decisions to make yet.
        (*ctx).twophase = false;
        (*ctx).streaming = false;
    } else {
        (*ctx).twophase_opt_given = true;
    }
    let scratch = pg_sys::AllocSetContextCreateInternal(
        (*ctx).context,
        c"multimaster decoder".as_ptr(),
        0,
        8 * 1024,
        8 * 1024 * 1024,
    );
    let st = Box::new(DecoderState { recovery, scratch, described: HashSet::new(), local: HashMap::new(), begun: false, in_ddl: false });
    (*ctx).output_plugin_private = Box::into_raw(st) as *mut std::ffi::c_void;
}

#[pg_guard]
unsafe extern "C-unwind" fn shutdown(ctx: *mut pg_sys::LogicalDecodingContext) {
    let p = (*ctx).output_plugin_private as *mut DecoderState;
    if !p.is_null() {
        drop(Box::from_raw(p));
        (*ctx).output_plugin_private = std::ptr::null_mut();
    }
}

/// Writes one protocol message as one plugin output chunk.
unsafe fn write(ctx: *mut pg_sys::LogicalDecodingContext, msg: &Message, last: bool) {
    let bytes = msg.to_bytes();
    pg_sys::OutputPluginPrepareWrite(ctx, last);
    pg_sys::appendBinaryStringInfo((*ctx).out, bytes.as_ptr() as *const c_char, bytes.len() as i32);
    pg_sys::OutputPluginWrite(ctx, last);
}

#[pg_guard]
unsafe extern "C-unwind" fn filter_by_origin(ctx: *mut pg_sys::LogicalDecodingContext, origin_id: pg_sys::RepOriginId) -> bool {
    // true = skip. Normal mode sends only what originated here.
    !state(ctx).recovery && origin_id != pg_sys::InvalidRepOriginId as pg_sys::RepOriginId
}

#[pg_guard]
unsafe extern "C-unwind" fn begin(ctx: *mut pg_sys::LogicalDecodingContext, _txn: *mut pg_sys::ReorderBufferTXN) {
    let st = state(ctx);
    st.described.clear();
    st.local.clear();
    st.begun = false;
    st.in_ddl = false;
}

/// Sends Begin (and Origin) before the transaction's first message.
unsafe fn ensure_begun(ctx: *mut pg_sys::LogicalDecodingContext, txn: *mut pg_sys::ReorderBufferTXN) {
    let st = state(ctx);
    if st.begun || txn.is_null() {
        return;
    }
    st.begun = true;
    let txn = &*txn;
    let has_origin = txn.origin_id != pg_sys::InvalidRepOriginId as pg_sys::RepOriginId;
    write(
        ctx,
        &Message::Begin { xid: txn.xid.into(), final_lsn: txn.final_lsn, commit_time: txn.xact_time.commit_time },
        !has_origin,
    );
    if has_origin {
        let mut name: *mut c_char = std::ptr::null_mut();
        let name = if pg_sys::replorigin_by_oid(txn.origin_id, true, &mut name) {
            CStr::from_ptr(name).to_string_lossy().into_owned()
        } else {
            String::new()
        };
        write(ctx, &Message::Origin { origin_lsn: txn.origin_lsn, name }, true);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn commit(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    commit_lsn: pg_sys::XLogRecPtr,
) {
    if !state(ctx).begun {
        return;
    }
    let txn = &*txn;
    write(ctx, &Message::Commit { commit_lsn, end_lsn: txn.end_lsn, commit_time: txn.xact_time.commit_time }, true);
}

fn gid_of(txn: &pg_sys::ReorderBufferTXN) -> String {
    if txn.gid.is_null() {
        String::new()
    } else {
        // SAFETY: gid is a NUL-terminated string owned by the reorder buffer.
        unsafe { CStr::from_ptr(txn.gid) }.to_string_lossy().into_owned()
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn prepare(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    prepare_lsn: pg_sys::XLogRecPtr,
) {
    // A prepare goes out even with no changes: its gid is what peers vote on.
    if skipped_origin(state(ctx), &*txn) {
        return;
    }
    ensure_begun(ctx, txn);
    let txn = &*txn;
    let msg = Message::Prepare {
        prepare_lsn,
        end_lsn: txn.end_lsn,
        prepare_time: txn.xact_time.prepare_time,
        xid: txn.xid.into(),
        gid: gid_of(txn),
    };
    write(ctx, &msg, true);
}

#[pg_guard]
unsafe extern "C-unwind" fn commit_prepared(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    commit_lsn: pg_sys::XLogRecPtr,
) {
    if skipped_origin(state(ctx), &*txn) {
        return;
    }
    let txn = &*txn;
    let msg = Message::CommitPrepared {
        commit_lsn,
        end_lsn: txn.end_lsn,
        commit_time: txn.xact_time.commit_time,
        xid: txn.xid.into(),
        gid: gid_of(txn),
    };
    write(ctx, &msg, true);
}

#[pg_guard]
unsafe extern "C-unwind" fn rollback_prepared(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    prepare_end_lsn: pg_sys::XLogRecPtr,
    prepare_time: pg_sys::TimestampTz,
) {
    if skipped_origin(state(ctx), &*txn) {
        return;
    }
    let txn = &*txn;
    let msg = Message::RollbackPrepared {
        prepare_end_lsn,
        rollback_end_lsn: txn.end_lsn,
        prepare_time,
        rollback_time: txn.xact_time.commit_time,
        xid: txn.xid.into(),
        gid: gid_of(txn),
    };
    write(ctx, &msg, true);
}

#[pg_guard]
unsafe extern "C-unwind" fn message(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    lsn: pg_sys::XLogRecPtr,
    transactional: bool,
    prefix: *const c_char,
    size: pg_sys::Size,
    content: *const c_char,
) {
    let prefix = CStr::from_ptr(prefix).to_string_lossy().into_owned();
    let content = std::slice::from_raw_parts(content as *const u8, size).to_vec();
    if transactional && prefix == mtm_protocol::DDL_BEGIN_PREFIX {
        state(ctx).in_ddl = true;
        return;
    }
    if transactional && prefix == mtm_protocol::DDL_PREFIX {
        let st = state(ctx);
        st.in_ddl = false;
        // The statement may have changed the columns of tables already
        // described in this transaction: describe them again.
        st.described.clear();
        if content.is_empty() {
            return; // temporary objects only: stays on this node
        }
    }
    if transactional {
        ensure_begun(ctx, txn);
    }
    write(ctx, &Message::Message { transactional, lsn, prefix, content }, true);
}

#[pg_guard]
unsafe extern "C-unwind" fn truncate(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    nrelations: std::ffi::c_int,
    relations: *mut pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    if state(ctx).in_ddl {
        return;
    }
    let rels: Vec<pg_sys::Relation> = std::slice::from_raw_parts(relations, nrelations as usize)
        .iter()
        .copied()
        .filter(|&rel| !is_local(ctx, rel))
        .collect();
    if rels.is_empty() {
        return;
    }
    ensure_begun(ctx, txn);
    let mut relids = Vec::with_capacity(rels.len());
    for rel in rels {
        describe(ctx, rel);
        relids.push((*rel).rd_id.to_u32());
    }
    let t = &(*change).data.truncate;
    write(ctx, &Message::Truncate { cascade: t.cascade, restart_identity: t.restart_seqs, relids }, true);
}

#[pg_guard]
unsafe extern "C-unwind" fn change(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    rel: pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    if state(ctx).in_ddl || is_local(ctx, rel) {
        return;
    }
    ensure_begun(ctx, txn);
    let st = state(ctx);
    let old_cx = pg_sys::MemoryContextSwitchTo(st.scratch);
    describe(ctx, rel);
    let relid = (*rel).rd_id.to_u32();
    let tp = &(*change).data.tp;
    let full = (*(*rel).rd_rel).relreplident == pg_sys::REPLICA_IDENTITY_FULL as c_char;
    let old = if tp.oldtuple.is_null() {
        None
    } else {
        let t = tuple_values(rel, &mut (*tp.oldtuple).tuple);
        Some(if full { OldTuple::Full(t) } else { OldTuple::Key(t) })
    };
    let msg = match (*change).action {
        pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_INSERT if !tp.newtuple.is_null() => {
            Some(Message::Insert { relid, new: tuple_values(rel, &mut (*tp.newtuple).tuple) })
        }
        pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_UPDATE if !tp.newtuple.is_null() => {
            Some(Message::Update { relid, old, new: tuple_values(rel, &mut (*tp.newtuple).tuple) })
        }
        // A DELETE without an old tuple is a table without replica
        // identity: sent with none, so the receiver reports it clearly.
        pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_DELETE => Some(Message::Delete { relid, old }),
        _ => None,
    };
    if let Some(msg) = msg {
        write(ctx, &msg, true);
    }
    pg_sys::MemoryContextSwitchTo(old_cx);
    pg_sys::MemoryContextReset(st.scratch);
}

/// The columns a change carries: not dropped, not generated.
unsafe fn live_attributes(rel: pg_sys::Relation) -> Vec<&'static pg_sys::FormData_pg_attribute> {
    let desc = (*rel).rd_att;
    let natts = (*desc).natts as usize;
    (*desc).attrs.as_slice(natts).iter().filter(|a| !a.attisdropped && a.attgenerated == 0).collect()
}

/// Sends the Relation message once per relation per transaction.
unsafe fn describe(ctx: *mut pg_sys::LogicalDecodingContext, rel: pg_sys::Relation) {
    let st = state(ctx);
    let relid = (*rel).rd_id;
    if !st.described.insert(relid) {
        return;
    }
    let form = &*(*rel).rd_rel;
    let replident = form.relreplident as u8;
    // Not RelationGetIndexAttrBitmap: that locks the indexes, and a PREPAREd
    // transaction that created the table holds them: decoding would wait
    // for its own transaction to end (as pgoutput avoids, too).
    let key_attrs = pg_sys::RelationGetIdentityKeyBitmap(rel);
    let columns = live_attributes(rel)
        .into_iter()
        .map(|a| Column {
            key: replident == pg_sys::REPLICA_IDENTITY_FULL
                || pg_sys::bms_is_member(a.attnum as i32 - pg_sys::FirstLowInvalidHeapAttributeNumber, key_attrs),
            name: CStr::from_ptr(a.attname.data.as_ptr()).to_string_lossy().into_owned(),
            type_oid: a.atttypid.to_u32(),
            typmod: a.atttypmod,
        })
        .collect();
    let nsp = pg_sys::get_namespace_name(form.relnamespace);
    let namespace = if nsp.is_null() { String::new() } else { CStr::from_ptr(nsp).to_string_lossy().into_owned() };
    let name = CStr::from_ptr(form.relname.data.as_ptr()).to_string_lossy().into_owned();
    write(ctx, &Message::Relation { relid: relid.to_u32(), namespace, name, replica_identity: replident, columns }, false);
}

/// A heap tuple's live columns as protocol values.
unsafe fn tuple_values(rel: pg_sys::Relation, tuple: *mut pg_sys::HeapTupleData) -> Vec<Value> {
    let desc = (*rel).rd_att;
    let natts = (*desc).natts as usize;
    let mut datums = vec![pg_sys::Datum::from(0usize); natts];
    let mut nulls = vec![false; natts];
    pg_sys::heap_deform_tuple(tuple, desc, datums.as_mut_ptr(), nulls.as_mut_ptr());
    let attrs = (*desc).attrs.as_slice(natts);
    let mut out = Vec::with_capacity(natts);
    for (i, a) in attrs.iter().enumerate() {
        if a.attisdropped || a.attgenerated != 0 {
            continue;
        }
        if nulls[i] {
            out.push(Value::Null);
        } else if a.attlen == -1 && is_unchanged_toast(datums[i]) {
            out.push(Value::UnchangedToast);
        } else if a.atttypid.to_u32() < pg_sys::FirstNormalObjectId {
            let mut send = pg_sys::Oid::INVALID;
            let mut varlena = false;
            pg_sys::getTypeBinaryOutputInfo(a.atttypid, &mut send, &mut varlena);
            let bytea = pg_sys::OidSendFunctionCall(send, datums[i]);
            let len = pgrx::varsize_any_exhdr(bytea);
            let data = pgrx::vardata_any(bytea) as *const u8;
            out.push(Value::Binary(std::slice::from_raw_parts(data, len).to_vec()));
        } else {
            let mut output = pg_sys::Oid::INVALID;
            let mut varlena = false;
            pg_sys::getTypeOutputInfo(a.atttypid, &mut output, &mut varlena);
            let text = pg_sys::OidOutputFunctionCall(output, datums[i]);
            out.push(Value::Text(CStr::from_ptr(text).to_bytes().to_vec()));
        }
    }
    out
}

/// An on-disk TOAST pointer: the reorder buffer left the value out because
/// the change did not touch it (VARATT_IS_EXTERNAL_ONDISK).
unsafe fn is_unchanged_toast(d: pg_sys::Datum) -> bool {
    let p = d.cast_mut_ptr::<u8>();
    // 1-byte header 0x01 = external (on little-endian builds); the tag
    // byte that follows says which kind.
    const VARTAG_ONDISK: u8 = 18;
    *p == 0x01 && *p.add(1) == VARTAG_ONDISK
}

/// Whether `rel` is listed in `mtm.local_tables`. Read with the decoding
/// snapshot (the table is a user_catalog_table for this reason), once per
/// relation per transaction.
unsafe fn is_local(ctx: *mut pg_sys::LogicalDecodingContext, rel: pg_sys::Relation) -> bool {
    let st = state(ctx);
    let relid = (*rel).rd_id;
    if let Some(&v) = st.local.get(&relid) {
        return v;
    }
    let form = &*(*rel).rd_rel;
    let nsp = pg_sys::get_namespace_name(form.relnamespace);
    let v = if nsp.is_null() {
        false
    } else {
        let schema = CStr::from_ptr(nsp).to_bytes().to_vec();
        let name = CStr::from_ptr(form.relname.data.as_ptr()).to_bytes().to_vec();
        local_tables_contains(&schema, &name)
    };
    st.local.insert(relid, v);
    v
}

unsafe fn local_tables_contains(schema: &[u8], name: &[u8]) -> bool {
    let mtm = pg_sys::get_namespace_oid(c"mtm".as_ptr(), true);
    if mtm == pg_sys::Oid::INVALID {
        return false;
    }
    let relid = pg_sys::get_relname_relid(c"local_tables".as_ptr(), mtm);
    if relid == pg_sys::Oid::INVALID {
        return false;
    }
    let lt = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    let scan = pg_sys::systable_beginscan(lt, pg_sys::Oid::INVALID, false, std::ptr::null_mut(), 0, std::ptr::null_mut());
    let desc = (*lt).rd_att;
    let mut found = false;
    loop {
        let tup = pg_sys::systable_getnext(scan);
        if tup.is_null() {
            break;
        }
        let mut datums = [pg_sys::Datum::from(0usize); 2];
        let mut nulls = [false; 2];
        pg_sys::heap_deform_tuple(tup, desc, datums.as_mut_ptr(), nulls.as_mut_ptr());
        if nulls[0] || nulls[1] {
            continue;
        }
        let s = CStr::from_ptr(datums[0].cast_mut_ptr::<c_char>()).to_bytes();
        let n = CStr::from_ptr(datums[1].cast_mut_ptr::<c_char>()).to_bytes();
        if s == schema && n == name {
            found = true;
            break;
        }
    }
    pg_sys::systable_endscan(scan);
    pg_sys::table_close(lt, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    found
}

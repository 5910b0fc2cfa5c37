//! Logical decoding, the output-plugin side: the `_PG_output_plugin_init`
//! entry point and the plugin callbacks as `#[pg_guard]` trampolines into
//! [`crate::decoder`], safe views of what a callback receives (the
//! decoding context for writing output, `ReorderBufferTXN`, the relation,
//! the change and its heap tuples, the plugin options), the per-change
//! scratch memory context, and the catalog lookups the decoder makes
//! (namespace names, `mtm.local_tables`, type output functions).
//!
//! Every view borrows the struct PostgreSQL hands a callback for that
//! callback's duration only (the reorder buffer frees the transaction and
//! its changes, and closes the relation, after the callback returns), and
//! only a trampoline can construct one, so the role module cannot keep one
//! past the call or build one from a pointer of its own.
#![deny(unsafe_op_in_unsafe_fn)]

use crate::decoder::DecoderState;
use crate::pg::memcx::MemCx;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::{c_char, CStr};
use std::marker::PhantomData;
use std::ptr::NonNull;

/// Entry point PostgreSQL looks up (by this name) in an output plugin
/// library.
///
/// # Safety
/// Called by PostgreSQL only, with its callbacks struct to fill in.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn _PG_output_plugin_init(cb: *mut pg_sys::OutputPluginCallbacks) {
    // SAFETY: LoadOutputPlugin passes its zeroed OutputPluginCallbacks,
    // valid and not otherwise accessed during this call.
    let cb = unsafe { &mut *cb };
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

/// The decoder's state and the output view of a callback's context.
///
/// # Safety
/// `ctx` is the live decoding context of a callback other than startup
/// and shutdown: startup stored a boxed `DecoderState` in
/// `output_plugin_private` before any of them runs, and only shutdown
/// frees it. The lifetime must not outlive the callback.
unsafe fn parts<'a>(ctx: *mut pg_sys::LogicalDecodingContext) -> (&'a mut DecoderState, Output<'a>) {
    // SAFETY: `ctx` is live and its private pointer is startup's Box (the
    // contract); that Box is its own allocation, apart from the context
    // the Output writes through, and PostgreSQL runs one callback at a
    // time in this process, so this is the only reference to the state.
    let st = unsafe { &mut *((*ctx).output_plugin_private as *mut DecoderState) };
    (st, Output { ctx: NonNull::new(ctx).expect("decoding context"), _callback: PhantomData })
}

/// # Safety
/// `txn` is the callback's transaction, valid for the callback.
unsafe fn txn_view<'a>(txn: *mut pg_sys::ReorderBufferTXN) -> Txn<'a> {
    // SAFETY: the reorder buffer frees a transaction only after the
    // callbacks that get it return (the contract), and nothing writes it
    // during the callback.
    Txn(unsafe { &*txn })
}

/// # Safety
/// `rel` is a relation the reorder buffer opened for this callback (the
/// view's contract, which its methods rely on).
unsafe fn relation_view<'a>(rel: pg_sys::Relation) -> Relation<'a> {
    Relation(NonNull::new(rel).expect("relation"), PhantomData)
}

#[pg_guard]
unsafe extern "C-unwind" fn startup(
    ctx: *mut pg_sys::LogicalDecodingContext,
    options: *mut pg_sys::OutputPluginOptions,
    is_init: bool,
) {
    // SAFETY: StartupDecodingContext passes its new context and that
    // context's options, both valid and used by nothing else during the
    // call; output_plugin_private is still null here.
    let mut view = Startup { ctx: unsafe { &mut *ctx }, options: unsafe { &mut *options } };
    let st = crate::decoder::startup(&mut view, is_init);
    view.ctx.output_plugin_private = Box::into_raw(Box::new(st)) as *mut std::ffi::c_void;
}

#[pg_guard]
unsafe extern "C-unwind" fn shutdown(ctx: *mut pg_sys::LogicalDecodingContext) {
    // SAFETY: FreeDecodingContext passes its context, valid for the call.
    let ctx = unsafe { &mut *ctx };
    let p = ctx.output_plugin_private as *mut DecoderState;
    if !p.is_null() {
        // SAFETY: a non-null private pointer is the Box startup leaked,
        // freed only here, and nulled right after so never twice.
        crate::decoder::shutdown(unsafe { Box::from_raw(p) });
        ctx.output_plugin_private = std::ptr::null_mut();
    }
}

/// The kind of WAL record the decoder is asked about when it filters by
/// origin: a transaction's PREPARE, COMMIT PREPARED or ROLLBACK PREPARED,
/// a logical message, or anything else (a row change, another end of
/// transaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilteredRecord {
    Prepare,
    CommitPrepared,
    AbortPrepared,
    /// A non-transactional logical message (`pg_logical_emit_message`,
    /// ours: votes).
    Message,
    /// A transactional one.
    TransactionalMessage,
    Other,
}

#[pg_guard]
unsafe extern "C-unwind" fn filter_by_origin(ctx: *mut pg_sys::LogicalDecodingContext, origin_id: pg_sys::RepOriginId) -> bool {
    // SAFETY: a decoding callback after startup (see `parts`).
    let (st, _) = unsafe { parts(ctx) };
    // SAFETY: the filter runs while the reader decodes a record: `reader`
    // and its current `record` are live (checked for null all the same),
    // with `main_data_len` bytes at `main_data` (read only below that).
    let record = unsafe {
        let reader = (*ctx).reader;
        match reader.as_ref().and_then(|r| r.record.as_ref()) {
            Some(rec) if u32::from(rec.header.xl_rmid) == pg_sys::RmgrIds::RM_XACT_ID => {
                match u32::from(rec.header.xl_info) & pg_sys::XLOG_XACT_OPMASK {
                    pg_sys::XLOG_XACT_PREPARE => FilteredRecord::Prepare,
                    pg_sys::XLOG_XACT_COMMIT_PREPARED => FilteredRecord::CommitPrepared,
                    pg_sys::XLOG_XACT_ABORT_PREPARED => FilteredRecord::AbortPrepared,
                    _ => FilteredRecord::Other,
                }
            }
            Some(rec) if u32::from(rec.header.xl_rmid) == pg_sys::RmgrIds::RM_LOGICALMSG_ID => {
                // xl_logical_message (replication/message.h): an Oid, then
                // the bool `transactional`.
                let transactional = !rec.main_data.is_null() && rec.main_data_len > 4 && *rec.main_data.add(4) != 0;
                if transactional {
                    FilteredRecord::TransactionalMessage
                } else {
                    FilteredRecord::Message
                }
            }
            _ => FilteredRecord::Other,
        }
    };
    crate::decoder::filter_by_origin(st, origin_id, record)
}

/// Whether transaction `xid` is still running (or prepared) here.
pub fn xid_in_progress(xid: pg_sys::TransactionId) -> bool {
    // SAFETY: reads the proc array under its own lock; any xid is valid input.
    unsafe { pg_sys::TransactionIdIsInProgress(xid) }
}

#[pg_guard]
unsafe extern "C-unwind" fn begin(ctx: *mut pg_sys::LogicalDecodingContext, _txn: *mut pg_sys::ReorderBufferTXN) {
    // SAFETY: a decoding callback after startup (see `parts`).
    let (st, _) = unsafe { parts(ctx) };
    crate::decoder::begin(st)
}

#[pg_guard]
unsafe extern "C-unwind" fn commit(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    commit_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: a decoding callback after startup, with its transaction.
    let ((st, mut out), txn) = unsafe { (parts(ctx), txn_view(txn)) };
    crate::decoder::commit(st, &mut out, txn, commit_lsn)
}

#[pg_guard]
unsafe extern "C-unwind" fn prepare(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    prepare_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: a decoding callback after startup, with its transaction.
    let ((st, mut out), txn) = unsafe { (parts(ctx), txn_view(txn)) };
    crate::decoder::prepare(st, &mut out, txn, prepare_lsn)
}

#[pg_guard]
unsafe extern "C-unwind" fn commit_prepared(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    commit_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: a decoding callback after startup, with its transaction.
    let ((st, mut out), txn) = unsafe { (parts(ctx), txn_view(txn)) };
    crate::decoder::commit_prepared(st, &mut out, txn, commit_lsn)
}

#[pg_guard]
unsafe extern "C-unwind" fn rollback_prepared(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    prepare_end_lsn: pg_sys::XLogRecPtr,
    prepare_time: pg_sys::TimestampTz,
) {
    // SAFETY: a decoding callback after startup, with its transaction.
    let ((st, mut out), txn) = unsafe { (parts(ctx), txn_view(txn)) };
    crate::decoder::rollback_prepared(st, &mut out, txn, prepare_end_lsn, prepare_time)
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
    // SAFETY: a decoding callback after startup; `txn` is null for a
    // non-transactional message, else its transaction. The prefix is a
    // NUL-terminated string and the content `size` bytes, both in the
    // decoded record, valid for the callback.
    unsafe {
        let (st, mut out) = parts(ctx);
        let txn = if txn.is_null() { None } else { Some(txn_view(txn)) };
        let prefix = CStr::from_ptr(prefix);
        let content = if size == 0 { &[][..] } else { std::slice::from_raw_parts(content as *const u8, size) };
        crate::decoder::message(st, &mut out, txn, lsn, transactional, prefix, content)
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn truncate(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    nrelations: std::ffi::c_int,
    relations: *mut pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: a decoding callback after startup, with its transaction;
    // `relations` holds `nrelations` relations the reorder buffer opened
    // for this call; `change` is the TRUNCATE change, whose active union
    // member is `truncate` (what Truncate reads).
    unsafe {
        let (st, mut out) = parts(ctx);
        let rels = std::slice::from_raw_parts(relations, nrelations as usize).iter().map(|&rel| relation_view(rel)).collect();
        crate::decoder::truncate(st, &mut out, txn_view(txn), rels, Truncate(&*change))
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn change(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    rel: pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: a decoding callback after startup, with its transaction, the
    // relation the reorder buffer opened for the change, and an INSERT,
    // UPDATE or DELETE change (the only ones change_cb gets: a speculative
    // insert arrives as INSERT), whose active union member is `tp`.
    unsafe {
        let (st, mut out) = parts(ctx);
        crate::decoder::change(st, &mut out, txn_view(txn), RowChange { rel: relation_view(rel), change: &*change })
    }
}

/// The decoding context while the startup callback runs.
pub struct Startup<'a> {
    ctx: &'a mut pg_sys::LogicalDecodingContext,
    options: &'a mut pg_sys::OutputPluginOptions,
}

impl Startup<'_> {
    /// The plugin writes binary data (not text).
    pub fn set_binary_output(&mut self) {
        self.options.output_type = pg_sys::OutputPluginOutputType::OUTPUT_PLUGIN_BINARY_OUTPUT;
    }

    /// The options the client gave (`START_REPLICATION ... (name 'value')`).
    pub fn options(&self) -> Vec<crate::pg::nodes::DefElem<'_>> {
        // SAFETY: the context's option list, a List of DefElem (or NIL)
        // built by the walsender from the command, living as long as the
        // context, which outlives this borrow.
        unsafe { crate::pg::nodes::DefElem::list(self.ctx.output_plugin_options) }
    }

    /// The name of the slot being decoded.
    pub fn slot_name(&self) -> String {
        // SAFETY: a decoding context always has its slot acquired while
        // the startup callback runs; its name is a NUL-terminated NameData.
        unsafe { CStr::from_ptr((*self.ctx.slot).data.name.data.as_ptr()).to_string_lossy().into_owned() }
    }

    /// Whether the output goes to a walsender's stream (rather than to
    /// the rows of `pg_logical_slot_*_changes`).
    pub fn to_walsender(&self) -> bool {
        // SAFETY: a plain bool PostgreSQL sets at backend start, read only.
        unsafe { pg_sys::am_walsender }
    }

    /// Whether this session decodes two-phase transactions at PREPARE.
    pub fn set_twophase(&mut self, on: bool) {
        self.ctx.twophase = on;
    }

    /// Whether this session streams in-progress transactions.
    pub fn set_streaming(&mut self, on: bool) {
        self.ctx.streaming = on;
    }

    /// Tells PostgreSQL the client asked for two-phase decoding.
    pub fn set_twophase_opt_given(&mut self, given: bool) {
        self.ctx.twophase_opt_given = given;
    }

    /// A memory context for what one change allocates (send-function
    /// results, deformed tuples), reset after each
    /// ([`MemCx::within_then_reset`]). It is a child of the decoding
    /// context's, freed with it, so it must live no longer than the
    /// plugin's state (which shutdown frees before PostgreSQL frees the
    /// context).
    pub fn create_scratch(&self, name: &'static CStr) -> MemCx {
        // SAFETY: the parent is the live decoding context's memory context,
        // which outlives the plugin's state holding the result (see above).
        unsafe { MemCx::under(self.ctx.context, name) }
    }
}

/// The decoding context of a callback, for writing output.
pub struct Output<'a> {
    ctx: NonNull<pg_sys::LogicalDecodingContext>,
    _callback: PhantomData<&'a mut pg_sys::LogicalDecodingContext>,
}

impl Output<'_> {
    /// Writes `bytes` as one output chunk; `last` if it is the last write
    /// of this callback.
    pub fn write(&mut self, bytes: &[u8], last: bool) {
        let ctx = self.ctx.as_ptr();
        // SAFETY: guarded bindings on the callback's live context, whose
        // `out` buffer OutputPluginPrepareWrite has just set up; the bytes
        // are copied into it.
        unsafe {
            pg_sys::OutputPluginPrepareWrite(ctx, last);
            pg_sys::appendBinaryStringInfo((*ctx).out, bytes.as_ptr() as *const c_char, bytes.len() as i32);
            pg_sys::OutputPluginWrite(ctx, last);
        }
    }
}

/// A transaction from the reorder buffer, for one callback.
#[derive(Clone, Copy)]
pub struct Txn<'a>(&'a pg_sys::ReorderBufferTXN);

impl<'a> Txn<'a> {
    /// Its top-level transaction id.
    pub fn xid(&self) -> pg_sys::TransactionId {
        self.0.xid
    }

    /// The node it originated on (InvalidRepOriginId: this one).
    pub fn origin_id(&self) -> pg_sys::RepOriginId {
        self.0.origin_id
    }

    /// Its commit LSN on the origin node.
    pub fn origin_lsn(&self) -> pg_sys::XLogRecPtr {
        self.0.origin_lsn
    }

    /// The LSN of its commit (or prepare) record.
    pub fn final_lsn(&self) -> pg_sys::XLogRecPtr {
        self.0.final_lsn
    }

    /// The LSN just past its commit (or prepare, or abort) record.
    pub fn end_lsn(&self) -> pg_sys::XLogRecPtr {
        self.0.end_lsn
    }

    /// Its commit (or rollback) time.
    pub fn commit_time(&self) -> pg_sys::TimestampTz {
        // SAFETY: both members of the union are a TimestampTz at the same
        // place, and the reorder buffer zeroes a new transaction, so either
        // reads an initialized value.
        unsafe { self.0.xact_time.commit_time }
    }

    /// Its prepare time.
    pub fn prepare_time(&self) -> pg_sys::TimestampTz {
        // SAFETY: as commit_time.
        unsafe { self.0.xact_time.prepare_time }
    }

    /// The gid of a prepared transaction.
    pub fn gid(&self) -> Option<&'a CStr> {
        if self.0.gid.is_null() {
            None
        } else {
            // SAFETY: a non-null gid is a NUL-terminated string the reorder
            // buffer owns with the transaction.
            Some(unsafe { CStr::from_ptr(self.0.gid) })
        }
    }
}

/// A relation the reorder buffer opened for one callback: it keeps a
/// reference count on the relcache entry, so the entry, its `rd_rel` and
/// its `rd_att` stay in place for the callback (pgoutput relies on the
/// same while it looks up types and writes). Held as a pointer, not a
/// reference, because PostgreSQL updates the entry's caches through it
/// (RelationGetIdentityKeyBitmap fills `rd_idattr`).
#[derive(Clone, Copy)]
pub struct Relation<'a>(NonNull<pg_sys::RelationData>, PhantomData<&'a pg_sys::RelationData>);

impl<'a> Relation<'a> {
    fn data(&self) -> &pg_sys::RelationData {
        // SAFETY: an open relcache entry (see the type), read only for
        // the duration of this short borrow.
        unsafe { self.0.as_ref() }
    }

    /// Its oid.
    pub fn id(&self) -> pg_sys::Oid {
        self.data().rd_id
    }

    fn form(&self) -> &'a pg_sys::FormData_pg_class {
        // SAFETY: an open relation's rd_rel is always set and stays in
        // place while the relation is open (see the type).
        unsafe { &*self.data().rd_rel }
    }

    /// Its `relreplident` (`REPLICA_IDENTITY_*`).
    pub fn replica_identity(&self) -> u8 {
        self.form().relreplident as u8
    }

    /// Its name.
    pub fn name(&self) -> &'a CStr {
        name_str(&self.form().relname)
    }

    /// The name of its schema (a syscache lookup, copied from a palloc'd
    /// string in the current memory context); None if there is none.
    pub fn namespace_name(&self) -> Option<std::ffi::CString> {
        // SAFETY: a guarded binding taking an oid; it returns null or a
        // NUL-terminated palloc'd string, copied at once.
        unsafe {
            let nsp = pg_sys::get_namespace_name(self.form().relnamespace);
            if nsp.is_null() {
                None
            } else {
                Some(CStr::from_ptr(nsp).to_owned())
            }
        }
    }

    fn descriptor(&self) -> pg_sys::TupleDesc {
        self.data().rd_att
    }

    /// All its attributes, dropped and generated ones included.
    pub fn attributes(&self) -> &'a [pg_sys::FormData_pg_attribute] {
        // SAFETY: an open relation's rd_att is set, holds `natts`
        // attributes and stays in place while it is open (see the type).
        unsafe {
            let desc = &*self.descriptor();
            desc.attrs.as_slice(desc.natts as usize)
        }
    }

    /// Runs `f` with the bitmap of its replica identity key's attributes
    /// (`RelationGetIdentityKeyBitmap`, palloc'd in the current memory
    /// context; `f` cannot keep it).
    pub fn with_identity_key<R>(&self, f: impl FnOnce(&IdentityKey<'_>) -> R) -> R {
        // SAFETY: a guarded binding on an open relation (see the type); it
        // takes no index locks, which is why it is used here.
        let bms = unsafe { pg_sys::RelationGetIdentityKeyBitmap(self.0.as_ptr()) };
        f(&IdentityKey(bms, PhantomData))
    }
}

/// The attributes of a relation's replica identity key, as a bitmap
/// offset by `FirstLowInvalidHeapAttributeNumber` (possibly empty).
pub struct IdentityKey<'k>(*mut pg_sys::Bitmapset, PhantomData<&'k pg_sys::Bitmapset>);

impl IdentityKey<'_> {
    /// Whether `member` is in the bitmap (an ERROR if negative).
    pub fn contains(&self, member: i32) -> bool {
        // SAFETY: a guarded binding that reads the bitmap (null is the
        // empty set), alive for this borrow (see with_identity_key).
        unsafe { pg_sys::bms_is_member(member, self.0) }
    }
}

/// A NameData (`relname`, `attname`) as a C string.
pub fn name_str(name: &pg_sys::NameData) -> &CStr {
    // SAFETY: the same NAMEDATALEN bytes, c_char and u8 having the same
    // size and alignment.
    let bytes = unsafe { std::slice::from_raw_parts(name.data.as_ptr() as *const u8, name.data.len()) };
    // PostgreSQL always NUL-terminates a NameData within NAMEDATALEN.
    CStr::from_bytes_until_nul(bytes).unwrap_or(c"")
}

/// An INSERT, UPDATE or DELETE change, with the relation it changes.
pub struct RowChange<'a> {
    rel: Relation<'a>,
    change: &'a pg_sys::ReorderBufferChange,
}

impl<'a> RowChange<'a> {
    /// The relation changed.
    pub fn relation(&self) -> Relation<'a> {
        self.rel
    }

    /// `REORDER_BUFFER_CHANGE_INSERT`, `_UPDATE` or `_DELETE`.
    pub fn action(&self) -> pg_sys::ReorderBufferChangeType::Type {
        self.change.action
    }

    fn tuple(&self, buf: *mut pg_sys::ReorderBufferTupleBuf) -> Option<Tuple<'a>> {
        // SAFETY: a non-null tuple buffer of this change, which the reorder
        // buffer keeps for the callback.
        NonNull::new(buf).map(|buf| Tuple { rel: self.rel, tuple: unsafe { &(*buf.as_ptr()).tuple } })
    }

    /// The old row (its key columns, or all with REPLICA IDENTITY FULL),
    /// if the change logged one.
    pub fn old_tuple(&self) -> Option<Tuple<'a>> {
        // SAFETY: `tp` is the active member for a row change (only a
        // trampoline constructs a RowChange).
        self.tuple(unsafe { self.change.data.tp }.oldtuple)
    }

    /// The new row of an INSERT or UPDATE.
    pub fn new_tuple(&self) -> Option<Tuple<'a>> {
        // SAFETY: as old_tuple.
        self.tuple(unsafe { self.change.data.tp }.newtuple)
    }
}

/// A TRUNCATE change.
pub struct Truncate<'a>(&'a pg_sys::ReorderBufferChange);

impl Truncate<'_> {
    /// TRUNCATE ... CASCADE.
    pub fn cascade(&self) -> bool {
        // SAFETY: `truncate` is the active member of a TRUNCATE change
        // (only the truncate trampoline constructs a Truncate).
        unsafe { self.0.data.truncate }.cascade
    }

    /// TRUNCATE ... RESTART IDENTITY.
    pub fn restart_seqs(&self) -> bool {
        // SAFETY: as cascade.
        unsafe { self.0.data.truncate }.restart_seqs
    }
}

/// A heap tuple of a change, with the relation whose row it is.
pub struct Tuple<'a> {
    rel: Relation<'a>,
    tuple: &'a pg_sys::HeapTupleData,
}

impl<'a> Tuple<'a> {
    /// Every attribute of the relation with its value (None: NULL),
    /// dropped and generated ones included.
    pub fn deform(&self) -> impl ExactSizeIterator<Item = (&'a pg_sys::FormData_pg_attribute, Option<Field<'a>>)> + 'a {
        let attrs = self.rel.attributes();
        let natts = attrs.len();
        let mut datums = vec![pg_sys::Datum::from(0usize); natts];
        let mut nulls = vec![false; natts];
        // SAFETY: a guarded binding that only reads the tuple; the tuple is
        // the relation's row as of the change, formed with this descriptor
        // (fewer attributes read as missing), and the arrays hold the
        // descriptor's natts entries it writes.
        unsafe { pg_sys::heap_deform_tuple(self.tuple as *const _ as *mut _, self.rel.descriptor(), datums.as_mut_ptr(), nulls.as_mut_ptr()) };
        attrs
            .iter()
            .zip(datums.into_iter().zip(nulls))
            .map(|(a, (datum, null))| (a, (!null).then_some(Field { datum, typid: a.atttypid, attlen: a.attlen, _tuple: PhantomData })))
    }
}

/// A non-null value of a tuple's attribute (by-reference values point
/// into the tuple).
pub struct Field<'a> {
    datum: pg_sys::Datum,
    typid: pg_sys::Oid,
    attlen: i16,
    _tuple: PhantomData<&'a pg_sys::HeapTupleData>,
}

impl Field<'_> {
    /// A varlena whose value is an on-disk TOAST pointer: the reorder
    /// buffer left it out because the change did not touch it
    /// (VARATT_IS_EXTERNAL_ONDISK).
    pub fn is_unchanged_toast(&self) -> bool {
        if self.attlen != -1 {
            return false;
        }
        let p = self.datum.cast_mut_ptr::<u8>();
        // 1-byte header 0x01 = external (on little-endian builds); the tag
        // byte that follows says which kind.
        const VARTAG_ONDISK: u8 = 18;
        // SAFETY: a non-null varlena datum points at its header, at least
        // one byte; a header of 0x01 (external) is followed by its tag.
        unsafe { *p == 0x01 && *p.add(1) == VARTAG_ONDISK }
    }

    /// The value in its type's binary send format (palloc'd in the
    /// current memory context, copied).
    pub fn binary(&self) -> Vec<u8> {
        let mut send = pg_sys::Oid::INVALID;
        let mut varlena = false;
        // SAFETY: guarded bindings: the lookup takes an oid and two valid
        // out-pointers; the send function is the one for the value's own
        // type, and returns a bytea we copy at once.
        unsafe {
            pg_sys::getTypeBinaryOutputInfo(self.typid, &mut send, &mut varlena);
            let bytea = pg_sys::OidSendFunctionCall(send, self.datum);
            let len = pgrx::varsize_any_exhdr(bytea);
            let data = pgrx::vardata_any(bytea) as *const u8;
            std::slice::from_raw_parts(data, len).to_vec()
        }
    }

    /// The value in its type's text output format (palloc'd in the current
    /// memory context, copied).
    pub fn text(&self) -> Vec<u8> {
        // SAFETY: as binary: a non-NULL value of its attribute's type.
        unsafe { crate::pg::relation::output_text(self.typid, self.datum) }.into_bytes()
    }
}

/// Scans `mtm.local_tables` (AccessShareLock, the current snapshot: the
/// decoding one, as it is a user_catalog_table) until `f` returns true
/// for a row's (rel_schema, rel_name); rows with a NULL are skipped.
/// False if the table does not exist or no row matched.
pub fn any_local_table(mut f: impl FnMut(&CStr, &CStr) -> bool) -> bool {
    let mtm = crate::pg::catalog::namespace_oid(c"mtm");
    if mtm == pg_sys::Oid::INVALID {
        return false;
    }
    // SAFETY: a guarded catalog lookup by a NUL-terminated literal name, a
    // missing one reading as InvalidOid.
    let relid = unsafe { pg_sys::get_relname_relid(c"local_tables".as_ptr(), mtm) };
    if relid == pg_sys::Oid::INVALID {
        return false;
    }
    // SAFETY: guarded bindings; the table is opened and locked before the
    // scan, which ends before it is closed. The extension script creates
    // it with two `name` columns (NUL-terminated within NAMEDATALEN),
    // which is what the first two datums are read as; the arrays hold
    // every attribute heap_deform_tuple writes.
    unsafe {
        let lt = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let scan = pg_sys::systable_beginscan(lt, pg_sys::Oid::INVALID, false, std::ptr::null_mut(), 0, std::ptr::null_mut());
        let desc = (*lt).rd_att;
        let natts = ((*desc).natts as usize).max(2);
        let mut found = false;
        // Each row overwrites the descriptor's attributes; entries past
        // them (a table with fewer than two) stay NULL.
        let mut datums = vec![pg_sys::Datum::from(0usize); natts];
        let mut nulls = vec![true; natts];
        loop {
            let tup = pg_sys::systable_getnext(scan);
            if tup.is_null() {
                break;
            }
            pg_sys::heap_deform_tuple(tup, desc, datums.as_mut_ptr(), nulls.as_mut_ptr());
            if nulls[0] || nulls[1] {
                continue;
            }
            let s = CStr::from_ptr(datums[0].cast_mut_ptr::<c_char>());
            let n = CStr::from_ptr(datums[1].cast_mut_ptr::<c_char>());
            if f(s, n) {
                found = true;
                break;
            }
        }
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(lt, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        found
    }
}

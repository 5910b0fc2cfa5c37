//! Relations: opening and closing a table, its tuple descriptor's
//! attributes, its types' input and receive functions (looked up once and
//! called per value), and the relcache invalidation callback.
//!
//! A [`Rel`] is a table this backend opened in the current transaction; it
//! is consumed by its close, and PostgreSQL itself releases it if the
//! transaction aborts first (a handle used after that panics instead of
//! reading the released relcache entry). The apply path opens one per change and drops
//! the handle with the change (also when the change fails).

use super::memcx::{Allocated, MemCx};
use super::xact::TransactionMark;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::borrow::Cow;
use std::ffi::{c_char, CStr};
use std::sync::atomic::{AtomicBool, Ordering};

/// A table opened (and locked) by this backend in the current transaction.
pub struct Rel {
    rel: pg_sys::Relation,
    /// The (sub)transaction that opened it, which keeps it open.
    opened_in: TransactionMark,
}

impl Rel {
    /// `try_relation_open`: None when no relation `oid` exists (any more).
    pub fn try_open(oid: pg_sys::Oid, lockmode: pg_sys::LOCKMODE) -> Option<Rel> {
        // SAFETY: needs a transaction for the catalog lookup; without one
        // PostgreSQL raises an ERROR (guarded binding), never reads freed
        // memory. A null result is returned as None.
        let rel = unsafe { pg_sys::try_relation_open(oid, lockmode) };
        (!rel.is_null()).then(|| Rel { rel, opened_in: TransactionMark::now() })
    }

    /// `table_openrv_extended` of `namespace`.`name`; None when missing
    /// (with `missing_ok`).
    pub fn open_by_name(namespace: &CStr, name: &CStr, lockmode: pg_sys::LOCKMODE, missing_ok: bool) -> Option<Rel> {
        // SAFETY: makeRangeVar copies neither name, it keeps the pointers;
        // both CStrs outlive table_openrv_extended, the only reader of the
        // RangeVar (it is dropped with the current memory context). The
        // names are not written through the *mut casts.
        let rel = unsafe {
            let rv = pg_sys::makeRangeVar(namespace.as_ptr() as *mut c_char, name.as_ptr() as *mut c_char, -1);
            pg_sys::table_openrv_extended(rv, lockmode, missing_ok)
        };
        (!rel.is_null()).then(|| Rel { rel, opened_in: TransactionMark::now() })
    }

    /// `relation_close`, releasing `lockmode`.
    pub fn relation_close(self, lockmode: pg_sys::LOCKMODE) {
        // SAFETY: opened by this backend in this (sub)transaction (checked
        // by as_ptr) and, the handle being consumed, closed once.
        unsafe { pg_sys::relation_close(self.as_ptr(), lockmode) }
    }

    /// `table_close`, releasing `lockmode` (NoLock: keep the lock until
    /// the transaction ends).
    pub fn table_close(self, lockmode: pg_sys::LOCKMODE) {
        // SAFETY: opened by this backend in this (sub)transaction (checked
        // by as_ptr) and, the handle being consumed, closed once.
        unsafe { pg_sys::table_close(self.as_ptr(), lockmode) }
    }

    /// The relation's OID.
    pub fn oid(&self) -> pg_sys::Oid {
        // SAFETY: the relcache entry is pinned while the relation is open.
        unsafe { (*self.as_ptr()).rd_id }
    }

    /// `relkind` of its pg_class row.
    pub fn relkind(&self) -> c_char {
        // SAFETY: rd_rel is part of the pinned relcache entry.
        unsafe { (*(*self.as_ptr()).rd_rel).relkind }
    }

    /// Its tuple descriptor's attributes, by attribute number - 1.
    pub fn attributes(&self) -> &[pg_sys::FormData_pg_attribute] {
        // SAFETY: rd_att holds natts attributes; the lock we hold keeps
        // ALTER TABLE from replacing the descriptor while the relation is
        // open, and the slice borrows the open handle.
        unsafe {
            let desc = (*self.as_ptr()).rd_att;
            (*desc).attrs.as_slice((*desc).natts as usize)
        }
    }

    /// `RelationGetReplicaIndex` (InvalidOid: none).
    pub fn replica_index(&self) -> pg_sys::Oid {
        // SAFETY: open relation; catalog lookups inside the transaction.
        unsafe { pg_sys::RelationGetReplicaIndex(self.as_ptr()) }
    }

    /// `RelationGetPrimaryKeyIndex` (InvalidOid: none).
    pub fn primary_key_index(&self) -> pg_sys::Oid {
        // SAFETY: open relation; catalog lookups inside the transaction.
        unsafe { pg_sys::RelationGetPrimaryKeyIndex(self.as_ptr()) }
    }

    /// The raw relation, for the other wrappers of this layer: open until
    /// the (sub)transaction that opened it ends (then PostgreSQL releases
    /// it, and this panics). Checked at every use, as a handle can be kept
    /// past its transaction; the check is a counter compare unless a
    /// (sub)transaction began or ended since the open
    /// ([`TransactionMark`]), so a change's many uses stay cheap.
    pub(super) fn as_ptr(&self) -> pg_sys::Relation {
        assert!(self.opened_in.is_current(), "multimaster: a relation used after the transaction that opened it ended");
        self.rel
    }
}

/// An attribute's name, as text (lossy: names are in the server encoding).
pub fn attribute_name(a: &pg_sys::FormData_pg_attribute) -> Cow<'_, str> {
    crate::pg::decoding::name_str(&a.attname).to_string_lossy()
}

/// A type's input or receive function and its I/O parameter, as the
/// catalog gives them for that type (to look up with
/// [`TypeIo::lookup_in`]).
pub struct TypeIo {
    function: pg_sys::Oid,
    ioparam: pg_sys::Oid,
    for_type: pg_sys::Oid,
}

/// `getTypeBinaryInputInfo`: the receive function of `type_oid` and its
/// I/O parameter. Raises an ERROR when the type has none.
pub fn type_binary_input_info(type_oid: pg_sys::Oid) -> TypeIo {
    let (mut f, mut ioparam) = (pg_sys::Oid::INVALID, pg_sys::Oid::INVALID);
    // SAFETY: both out-pointers are live locals; a syscache lookup that
    // fails raises an ERROR through the guarded binding.
    unsafe { pg_sys::getTypeBinaryInputInfo(type_oid, &mut f, &mut ioparam) };
    TypeIo { function: f, ioparam, for_type: type_oid }
}

/// `getTypeInputInfo`: the input function of `type_oid` and its I/O
/// parameter.
pub fn type_input_info(type_oid: pg_sys::Oid) -> TypeIo {
    let (mut f, mut ioparam) = (pg_sys::Oid::INVALID, pg_sys::Oid::INVALID);
    // SAFETY: both out-pointers are live locals; a syscache lookup that
    // fails raises an ERROR through the guarded binding.
    unsafe { pg_sys::getTypeInputInfo(type_oid, &mut f, &mut ioparam) };
    TypeIo { function: f, ioparam, for_type: type_oid }
}

/// `datum` in the text output format of `type_oid` (`getTypeOutputInfo`
/// and its output function), copied out of the palloc'd result.
///
/// # Safety
/// `datum` is a non-NULL value of type `type_oid`, alive for the call.
pub(super) unsafe fn output_text(type_oid: pg_sys::Oid, datum: pg_sys::Datum) -> std::ffi::CString {
    let (mut output, mut varlena) = (pg_sys::Oid::INVALID, false);
    // SAFETY: guarded bindings; the caller's contract gives the output
    // function a value of its type; it returns a NUL-terminated string,
    // copied at once.
    unsafe {
        pg_sys::getTypeOutputInfo(type_oid, &mut output, &mut varlena);
        CStr::from_ptr(pg_sys::OidOutputFunctionCall(output, datum)).to_owned()
    }
}

/// A type's input or receive function as `fmgr_info_cxt` filled it in, in
/// a [`MemCx`], with the I/O parameter it is called with.
pub struct TypeFunction {
    info: *mut pg_sys::FmgrInfo,
    ioparam: pg_sys::Oid,
    /// The type whose values it makes.
    for_type: pg_sys::Oid,
    /// A reset of the context frees `info`: refuse to be called then.
    allocated: Allocated,
}

/// A value of type `type_oid` as that type's own input or receive
/// function (or a column default of that type) made it, allocated in the
/// memory context current when it was made: what a slot accepts for a
/// column of that type ([`crate::pg::executor`]). Only the layer handles
/// one, so it never outlives the change whose memory holds it.
#[derive(Clone, Copy)]
pub(super) struct ColumnValue {
    pub(super) datum: pg_sys::Datum,
    pub(super) type_oid: pg_sys::Oid,
}

impl TypeIo {
    /// `fmgr_info_cxt` of the function into a zeroed FmgrInfo allocated
    /// in `cx`, callable until `cx` is reset.
    pub fn lookup_in(self, cx: &MemCx) -> TypeFunction {
        let TypeIo { function: f, ioparam, for_type } = self;
        // SAFETY: the FmgrInfo is allocated (zeroed, FmgrInfo-sized) in the
        // live context `cx`, and fmgr_info_cxt keeps its subsidiary data
        // there too; the stamp checked in `info` stops its use after a
        // reset.
        let info = unsafe {
            let info = pg_sys::MemoryContextAllocZero(cx.as_ptr(), std::mem::size_of::<pg_sys::FmgrInfo>()) as *mut pg_sys::FmgrInfo;
            pg_sys::fmgr_info_cxt(f, info, cx.as_ptr());
            info
        };
        TypeFunction { info, ioparam, for_type, allocated: cx.allocated() }
    }
}

impl TypeFunction {
    fn info(&self) -> *mut pg_sys::FmgrInfo {
        if !self.allocated.is_live() {
            panic!("multimaster: a type function used after its relation cache was reset");
        }
        self.info
    }

    /// `ReceiveFunctionCall` on a copy of `bytes` in a StringInfo of the
    /// current memory context; the value is allocated there.
    pub(super) fn receive(&self, bytes: &[u8], typmod: i32) -> ColumnValue {
        let info = self.info();
        // SAFETY: `info` is a live FmgrInfo (stamp checked); the
        // StringInfo is initialized before use and lives across the call,
        // which reads it, never keeps it.
        unsafe {
            let mut buf: pg_sys::StringInfoData = std::mem::zeroed();
            pg_sys::initStringInfo(&mut buf);
            pg_sys::appendBinaryStringInfo(&mut buf, bytes.as_ptr() as *const c_char, bytes.len() as i32);
            let datum = pg_sys::ReceiveFunctionCall(info, &mut buf, self.ioparam, typmod);
            ColumnValue { datum, type_oid: self.for_type }
        }
    }

    /// `InputFunctionCall` on `text`; the value is allocated in the
    /// current memory context.
    pub(super) fn input(&self, text: &CStr, typmod: i32) -> ColumnValue {
        let info = self.info();
        // SAFETY: `info` is a live FmgrInfo (stamp checked); input
        // functions only read their string argument (the *mut is C's).
        let datum = unsafe { pg_sys::InputFunctionCall(info, text.as_ptr() as *mut c_char, self.ioparam, typmod) };
        ColumnValue { datum, type_oid: self.for_type }
    }
}

#[pg_guard]
extern "C-unwind" fn relcache_invalidated(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    crate::relmap::invalidated(relid);
}

/// Has PostgreSQL report every relcache invalidation of this process to
/// [`crate::relmap::invalidated`]. Only the process's first call
/// registers (registrations cannot be undone and their number is
/// limited), so callers need not keep track.
pub fn register_relcache_callback() {
    static REGISTERED: AtomicBool = AtomicBool::new(false);
    if REGISTERED.swap(true, Ordering::Relaxed) {
        return;
    }
    // SAFETY: the callback is a pg_guard'ed function with the signature
    // PostgreSQL calls and lives as long as the library; it ignores the
    // argument.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(relcache_invalidated), pg_sys::Datum::from(0usize)) }
}

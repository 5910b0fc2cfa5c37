//! The WAL: the extension's custom resource manager (`RegisterCustomRmgr`
//! with redo/desc/identify/startup trampolines into [`crate::decisions`]
//! and a view of the record being read), writing its records
//! (`XLogInsert`) and logical messages (`LogLogicalMessage`), flushing and
//! waking the walsenders. (The `emit_log_hook` through which the
//! checkpointer writes the decisions file is in `pg/elog.rs`.)

use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::{c_char, CStr};

/// Registers the decision log's resource manager under `id` and `name`
/// (from `_PG_init`, while preloading; PostgreSQL refuses it otherwise).
pub fn register(id: u8, name: &'static CStr) {
    // Leaked: PostgreSQL keeps the pointer for the server's life.
    let rmgr = Box::leak(Box::new(pg_sys::RmgrData {
        rm_name: name.as_ptr(),
        rm_redo: Some(redo),
        rm_desc: Some(desc),
        rm_identify: Some(identify),
        rm_startup: Some(startup),
        rm_cleanup: None,
        rm_mask: None,
        rm_decode: None,
    }));
    // SAFETY: a guarded binding (it raises ERROR when not preloading or
    // for an id taken); the table and the name are 'static, as PostgreSQL
    // keeps both.
    unsafe { pg_sys::RegisterCustomRmgr(id, rmgr) };
}

/// The record a resource manager callback is given, for the callback's
/// duration.
pub struct Record<'a>(&'a pg_sys::XLogReaderState);

impl Record<'_> {
    /// Its `xl_info` byte.
    pub fn info(&self) -> u8 {
        // SAFETY: PostgreSQL calls rm_redo and rm_desc with a reader
        // positioned on a decoded record (`record` non-null).
        unsafe { (*self.0.record).header.xl_info }
    }

    /// Its main data.
    pub fn data(&self) -> &[u8] {
        // SAFETY: as in info; main_data holds main_data_len bytes in the
        // reader's buffer, which stays put until the reader moves on, after
        // the callback this view lives in.
        unsafe {
            let decoded = self.0.record;
            if (*decoded).main_data_len == 0 {
                return &[];
            }
            std::slice::from_raw_parts((*decoded).main_data as *const u8, (*decoded).main_data_len as usize)
        }
    }

    /// Where it starts.
    pub fn lsn(&self) -> pg_sys::XLogRecPtr {
        self.0.ReadRecPtr
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn redo(record: *mut pg_sys::XLogReaderState) {
    // SAFETY: PostgreSQL passes the reader of the record being redone,
    // valid for the call; the view does not outlive it.
    crate::decisions::redo(&Record(unsafe { &*record }));
}

#[pg_guard]
unsafe extern "C-unwind" fn startup() {
    crate::decisions::startup();
}

#[pg_guard]
unsafe extern "C-unwind" fn desc(buf: pg_sys::StringInfo, record: *mut pg_sys::XLogReaderState) {
    // SAFETY: as in redo, for the record being described.
    let text = crate::decisions::desc(&Record(unsafe { &*record }));
    // SAFETY: `buf` is the StringInfo PostgreSQL passes to fill; the text
    // is copied from a live String of that length.
    unsafe { pg_sys::appendBinaryStringInfo(buf, text.as_ptr() as *const c_char, text.len() as _) };
}

#[pg_guard]
unsafe extern "C-unwind" fn identify(info: u8) -> *const c_char {
    // 'static strings: PostgreSQL keeps the pointer only while it prints.
    crate::decisions::identify(info).map_or(std::ptr::null(), CStr::as_ptr)
}

/// Writes a record of resource manager `rmid` with `info` and `data` as
/// its main data; returns its end.
pub fn insert(rmid: u8, info: u8, data: &[u8]) -> pg_sys::XLogRecPtr {
    // SAFETY: begin, register and insert in one go by this backend, so no
    // other record's construction is interleaved; `data` outlives the
    // insert, which copies it; the bindings raise errors as ERROR.
    unsafe {
        pg_sys::XLogBeginInsert();
        pg_sys::XLogRegisterData(data.as_ptr() as *mut c_char, data.len() as _);
        pg_sys::XLogInsert(rmid, info)
    }
}

/// Flushes the WAL up to `upto`.
pub fn flush(upto: pg_sys::XLogRecPtr) {
    // SAFETY: a guarded binding; any position is accepted (one not yet
    // written is an ERROR raised through the guard).
    unsafe { pg_sys::XLogFlush(upto) }
}

/// Wakes the walsenders, so they send what was just written now rather
/// than at their next timeout.
pub fn wake_walsenders() {
    // SAFETY: sets the latches of the walsenders in shared memory, under
    // their own spinlocks; no ERROR.
    unsafe { pg_sys::WalSndWakeup() }
}

unsafe extern "C-unwind" {
    // replication/message.h; not exported through pg_sys. Called only
    // through pg_guard_ffi_boundary.
    fn LogLogicalMessage(prefix: *const c_char, message: *const c_char, size: usize, transactional: bool) -> pg_sys::XLogRecPtr;
}

/// Writes a logical message (decoded by the peers' walsenders) and returns
/// its end; a transactional one belongs to the current transaction, which
/// must exist (ERROR otherwise).
pub fn log_logical_message(prefix: &CStr, content: &[u8], transactional: bool) -> pg_sys::XLogRecPtr {
    // A transactional message takes the current transaction's id.
    // SAFETY: reads this backend's own transaction state; no ERROR.
    if transactional && !unsafe { pg_sys::IsTransactionState() } {
        error!("multimaster: transactional logical message {} outside a transaction", prefix.to_string_lossy());
    }
    // SAFETY: inside a transaction when transactional (checked above); on
    // the main thread (the boundary panics otherwise); both buffers outlive
    // the call, which copies them; an ERROR becomes a Rust panic that
    // unwinds through our frames to the caller's guard instead of jumping
    // over them.
    unsafe {
        pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| {
            LogLogicalMessage(prefix.as_ptr(), content.as_ptr() as *const c_char, content.len(), transactional)
        })
    }
}

/// The current WAL insert position.
pub fn wal_insert_position() -> pg_sys::XLogRecPtr {
    // SAFETY: reads the WAL insert position under its spinlock; raises
    // ERROR during recovery, where no apply worker runs.
    unsafe { pg_sys::GetXLogInsertRecPtr() }
}

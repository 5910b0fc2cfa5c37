//! Error reporting: the extension's one `emit_log_hook`, through which
//! every message any process logs passes, and the view of the message
//! being reported ([`ReportedError`]). After the previous hook it hands the
//! message to [`crate::conflicts::rewrite_error`] (the error a cancelled
//! lock wait ends with, 57014, becomes a serialization failure before its
//! client sees it) and to [`crate::decisions::log_emitted`] (the
//! checkpointer writes the decisions file as a checkpoint starts).
//!
//! One hook rather than one per user: PostgreSQL calls it for every
//! message of every process, so each installed trampoline is paid for on
//! every log line.

use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CStr;

static mut PREV_EMIT_LOG: pg_sys::emit_log_hook_type = None;

/// Installs the `emit_log_hook`, keeping the previous hook, which runs
/// first (from `_PG_init`, while preloading).
pub fn install_log_hook() {
    // SAFETY: called once from _PG_init while the library is preloaded,
    // before any other process exists and with no other thread: nothing
    // reads the hook variables meanwhile; the previous hook is kept and
    // called.
    unsafe {
        PREV_EMIT_LOG = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(emit_log);
    }
}

/// A message being reported, borrowed from `emit_log_hook` for the hook's
/// duration; changes to it are what the client and the log see.
pub struct ReportedError<'a>(&'a mut pg_sys::ErrorData);

impl ReportedError<'_> {
    /// Its level (`pg_sys::PGERROR`...).
    pub fn elevel(&self) -> i32 {
        self.0.elevel
    }

    /// Its packed SQLSTATE.
    pub fn sqlerrcode(&self) -> i32 {
        self.0.sqlerrcode
    }

    /// Its untranslated message (usually a literal), if it has one.
    pub fn message_id(&self) -> Option<&CStr> {
        // SAFETY: message_id is NULL or a NUL-terminated string of the
        // error, which lives as long as the view.
        (!self.0.message_id.is_null()).then(|| unsafe { CStr::from_ptr(self.0.message_id) })
    }

    /// Replaces its SQLSTATE.
    pub fn set_sqlerrcode(&mut self, code: i32) {
        self.0.sqlerrcode = code;
    }

    /// Replaces its message (copied into the current memory context, the
    /// error's own, which the hook runs in).
    pub fn set_message(&mut self, message: &CStr) {
        // SAFETY: pstrdup copies a NUL-terminated string into the current
        // memory context, ErrorContext while the hook runs, which is the one
        // the error's own strings live in; the old one is left to it.
        self.0.message = unsafe { pg_sys::pstrdup(message.as_ptr()) };
    }

    /// Replaces its hint (copied as [`ReportedError::set_message`]).
    pub fn set_hint(&mut self, hint: &CStr) {
        // SAFETY: as in set_message.
        self.0.hint = unsafe { pg_sys::pstrdup(hint.as_ptr()) };
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn emit_log(edata: *mut pg_sys::ErrorData) {
    // SAFETY: PREV_EMIT_LOG is written only by install_log_hook, before
    // anything is logged; the hook we replaced gets PostgreSQL's own
    // argument, as it would without us.
    unsafe {
        if let Some(prev) = PREV_EMIT_LOG {
            prev(edata);
        }
    }
    // SAFETY: PostgreSQL calls emit_log_hook with the ErrorData being
    // reported, valid and ours alone until the hook returns; the view does
    // not outlive this call.
    let Some(edata) = (unsafe { edata.as_mut() }) else { return };
    let mut error = ReportedError(edata);
    crate::conflicts::rewrite_error(&mut error);
    crate::decisions::log_emitted(&error);
}

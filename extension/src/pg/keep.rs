//! PostgreSQL errors that pass through the extension's hooks whole.
//!
//! The executor and utility hooks run PostgreSQL's own work (the previous
//! hook, or the standard function) inside them: a COPY, a DO block, a
//! function's statements. An ERROR raised there that crossed pgrx's
//! guarded boundary would come out rebuilt from its SQLSTATE, message,
//! detail and hint alone: its CONTEXT lines (the COPY line, the PL/pgSQL
//! call stack), its schema, table, column, datatype and constraint names
//! and its cursor position would be lost, so a client would not get what
//! one PostgreSQL sends. Here the hook's inner call runs under a boundary
//! of our own ([`call`]) that copies the whole error (`CopyErrorData`),
//! lets the Rust frames in between unwind as for any ERROR (pgrx sees an
//! ordinary error report), and hands the copy to the hook's trampoline
//! ([`guard`]), which re-raises it unchanged with `ReThrowError` once
//! nothing is left to drop.

use pgrx::pg_sys;
use pgrx::pg_sys::panic::{CaughtError, ErrorReport};
use std::cell::Cell;
use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::ptr::NonNull;

unsafe extern "C-unwind" {
    /// PostgreSQL's `ReThrowError`, unguarded: it raises on purpose.
    #[link_name = "ReThrowError"]
    fn rethrow_error(edata: *mut pg_sys::ErrorData) -> !;
}

thread_local! {
    /// The last error [`call`] copied whole, until a trampoline takes it.
    static KEPT: Cell<Option<NonNull<pg_sys::ErrorData>>> = const { Cell::new(None) };
}

/// An error copied whole, owned (in the memory context of the hook's
/// caller) until it is raised again or freed.
struct Kept(NonNull<pg_sys::ErrorData>);

impl Kept {
    fn edata(&self) -> &pg_sys::ErrorData {
        // SAFETY: a CopyErrorData result, alive until rethrow or drop.
        unsafe { self.0.as_ref() }
    }

    /// Whether an error pgrx carries (with its SQLSTATE when the payload
    /// has one) is this one: the frames between may have caught it and
    /// raised it again, or raised another.
    fn is(&self, code: Option<pgrx::PgSqlErrorCode>, message: &str) -> bool {
        let e = self.edata();
        // SAFETY: message is NULL or a NUL-terminated string of the copy.
        let own = (!e.message.is_null()).then(|| unsafe { CStr::from_ptr(e.message) }.to_string_lossy());
        // (Compared as pgrx maps codes: one it does not know is XX000.)
        code.is_none_or(|c| c == pgrx::PgSqlErrorCode::from(e.sqlerrcode)) && own.as_deref().unwrap_or("<null error message>") == message
    }

    /// Raises the error again exactly as PostgreSQL first raised it.
    ///
    /// # Safety
    /// At the top of an `extern "C-unwind"` trampoline, after every value
    /// with a destructor in its frames has been dropped: the longjmp
    /// leaves through them.
    unsafe fn rethrow(self) -> ! {
        let edata = self.0.as_ptr();
        std::mem::forget(self);
        // SAFETY: `edata` is a CopyErrorData result at ERROR level (only
        // an ERROR longjmps to the boundary that copied it); the caller's
        // contract makes leaving the frames sound.
        unsafe { rethrow_error(edata) }
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        // SAFETY: a CopyErrorData result not raised again; FreeErrorData
        // frees it and its strings.
        unsafe { pg_sys::FreeErrorData(self.0.as_ptr()) }
    }
}

/// Runs `f`, a call into PostgreSQL (unguarded: a raw function pointer or
/// an unguarded binding) that may raise an ERROR, keeping the error whole
/// for the trampoline's [`guard`] and raising it in Rust as pgrx does.
///
/// # Safety
/// `f` holds nothing with a destructor while it calls PostgreSQL (a
/// longjmp leaves it); only from a hook run under [`guard`], on the
/// backend's main thread.
pub unsafe fn call<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: as pgrx's own pg_guard_ffi_boundary: PostgreSQL's exception
    // and error-context stacks are saved, pointed at our jump buffer for
    // the call and restored after it either way; after a longjmp, the
    // caller's memory context is restored before the error is copied out
    // of ErrorContext, and the error state is flushed.
    unsafe {
        let caller_cx = pg_sys::CurrentMemoryContext;
        let prev_exception_stack = pg_sys::PG_exception_stack;
        let prev_error_context_stack = pg_sys::error_context_stack;
        let mut result = MaybeUninit::<T>::uninit();
        let jumped = cee_scape::call_with_sigsetjmp(false, |jump_buffer| {
            pg_sys::PG_exception_stack = jump_buffer as *const cee_scape::SigJmpBufFields as *mut _;
            result.write(f());
            0
        });
        pg_sys::PG_exception_stack = prev_exception_stack;
        pg_sys::error_context_stack = prev_error_context_stack;
        if jumped == 0 {
            return result.assume_init();
        }
        pg_sys::CurrentMemoryContext = caller_cx;
        let edata = pg_sys::CopyErrorData();
        pg_sys::FlushErrorState();
        let Some(edata) = NonNull::new(edata) else { pgrx::error!("multimaster: an error could not be copied") };
        let report = report_of(edata.as_ref());
        if let Some(stale) = KEPT.replace(Some(edata)) {
            drop(Kept(stale));
        }
        std::panic::panic_any(report)
    }
}

/// The error as pgrx reports it, for the Rust frames it unwinds through.
fn report_of(e: &pg_sys::ErrorData) -> ErrorReport {
    // SAFETY: the strings of a CopyErrorData result are NULL or
    // NUL-terminated.
    let text = |p: *mut std::ffi::c_char| (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned());
    let mut report = ErrorReport::new(e.sqlerrcode.into(), text(e.message).unwrap_or_else(|| "<null error message>".into()), "multimaster hook");
    if let Some(detail) = text(e.detail) {
        report = report.set_detail(detail);
    }
    if let Some(hint) = text(e.hint) {
        report = report.set_hint(hint);
    }
    report
}

/// The body of a hook trampoline: `f` under pgrx's guard (a panic or a
/// PostgreSQL error becomes an ERROR, as `#[pg_guard]` does), except that
/// an error [`call`] kept whole comes back as a value, for the trampoline
/// to raise again with [`Kept::rethrow`].
///
/// # Safety
/// At the top of an `extern "C-unwind"` trampoline, with nothing to drop
/// in its frame.
unsafe fn guard(f: impl FnOnce()) -> Option<Kept> {
    // SAFETY: the caller's contract is pgrx_extern_c_guard's.
    unsafe {
        pg_sys::submodules::panic::pgrx_extern_c_guard(|| {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let kept = KEPT.take().map(Kept);
            match outcome {
                Ok(()) => None,
                Err(payload) => {
                    let same = kept.as_ref().is_some_and(|k| match payload.downcast_ref::<ErrorReport>() {
                        Some(r) => k.is(None, r.message()),
                        None => match payload.downcast_ref::<CaughtError>() {
                            Some(CaughtError::ErrorReport(r) | CaughtError::PostgresError(r)) => k.is(Some(r.sql_error_code()), r.message()),
                            _ => false,
                        },
                    });
                    if same {
                        kept
                    } else {
                        std::panic::resume_unwind(payload)
                    }
                }
            }
        })
    }
}

/// The whole body of a hook trampoline: `f` under [`guard`], then the
/// re-raise of an error kept whole.
///
/// # Safety
/// As [`guard`]: at the top of an `extern "C-unwind"` trampoline, with
/// nothing to drop in its frame (nor in this one when it re-raises).
pub unsafe fn hook(f: impl FnOnce()) {
    // SAFETY: the caller's contract; `f` is consumed by then.
    unsafe {
        if let Some(e) = guard(f) {
            e.rethrow();
        }
    }
}

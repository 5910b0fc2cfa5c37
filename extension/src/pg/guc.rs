//! Settings (GUC): reading a setting's value, setting one the way the
//! server sets its own, and re-reading the configuration file on SIGHUP.

use pgrx::pg_sys;
use std::ffi::CStr;

/// The current value of setting `name` as PostgreSQL shows it (`on`,
/// `200ms`…), or None for a setting that does not exist.
pub fn setting(name: &CStr) -> Option<String> {
    // SAFETY: missing_ok, so no ERROR for an unknown name; the value is a
    // NUL-terminated string owned by the GUC machinery, copied here before
    // anything in this backend can change the setting.
    unsafe {
        let value = pg_sys::GetConfigOption(name.as_ptr(), true, false);
        (!value.is_null()).then(|| CStr::from_ptr(value).to_string_lossy().into_owned())
    }
}

/// Reserves the settings prefix `class` (`MarkGUCPrefixReserved`): the
/// placeholders under it still undefined are dropped, with a WARNING.
pub fn reserve_prefix(class: &CStr) {
    // SAFETY: a guarded binding; `class` is NUL-terminated and copied by
    // the GUC machinery; PostgreSQL expects it once per library, after the
    // library defined its settings, which is where `_PG_init` calls it.
    unsafe { pg_sys::MarkGUCPrefixReserved(class.as_ptr()) }
}

/// Sets `name` to `value` as the server sets its own settings
/// (`SetConfigOption`, source `PGC_S_OVERRIDE`: it also becomes the reset
/// value), checked against `context`; an unknown name or bad value is an
/// ERROR.
pub fn set_override(name: &CStr, value: &CStr, context: pg_sys::GucContext::Type) {
    // SAFETY: a guarded binding; both strings are NUL-terminated and
    // outlive the call, and the GUC machinery copies what it keeps.
    unsafe { pg_sys::SetConfigOption(name.as_ptr(), value.as_ptr(), context, pg_sys::GucSource::PGC_S_OVERRIDE) }
}

/// Re-reads postgresql.conf after a SIGHUP, as a backend does at a safe
/// point of its main loop.
pub fn reload_config_file() {
    // SAFETY: a guarded binding, with the context PostgreSQL's own SIGHUP
    // handling passes; it works in its own memory context and reports bad
    // lines without raising an ERROR in a backend.
    unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) }
}

// A GUC nest level around one statement (ddl's replay of a peer's DDL).

/// Opens a GUC nest level (`NewGUCNestLevel`): settings made with
/// [`set_for_nest_level`] are undone by [`end_nest_level`] with it.
pub fn new_nest_level() -> i32 {
    // SAFETY: only increments this backend's GUC nesting counter.
    unsafe { pg_sys::NewGUCNestLevel() }
}

/// Sets `name` to `value` (as a superuser's session SET) until the
/// innermost nest level ends; an unknown name or bad value is an ERROR.
pub fn set_for_nest_level(name: &CStr, value: &CStr) {
    set(name, value, pg_sys::GucContext::PGC_SUSET, pg_sys::GucAction::GUC_ACTION_SAVE);
}

/// Sets `name` to `value` for the session as the server sets internal
/// settings (`PGC_INTERNAL`, source `PGC_S_SESSION`: unlike an override,
/// not the reset value, and undone by an abort); an ERROR if refused.
pub fn set_internal_for_session(name: &CStr, value: &CStr) {
    set(name, value, pg_sys::GucContext::PGC_INTERNAL, pg_sys::GucAction::GUC_ACTION_SET);
}

/// `set_config_option` with source `PGC_S_SESSION`, changes applied,
/// errors raised as ERROR.
fn set(name: &CStr, value: &CStr, context: pg_sys::GucContext::Type, action: pg_sys::GucAction::Type) {
    // SAFETY: a guarded binding; both strings are NUL-terminated and
    // outlive the call, and the GUC machinery copies what it keeps.
    unsafe {
        pg_sys::set_config_option(name.as_ptr(), value.as_ptr(), context, pg_sys::GucSource::PGC_S_SESSION, action, true, 0, false);
    }
}

/// Ends nest level `nest` (from [`new_nest_level`]), restoring what was
/// set in it (`AtEOXact_GUC(true, nest)`).
pub fn end_nest_level(nest: i32) {
    // SAFETY: a guarded binding that pops this backend's GUC stack down to
    // `nest`, inside the transaction that opened it.
    unsafe { pg_sys::AtEOXact_GUC(true, nest) }
}

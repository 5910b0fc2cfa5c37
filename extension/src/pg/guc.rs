//! Settings (GUC): reading a setting's value, setting one the way the
//! server sets its own, and re-reading the configuration file on SIGHUP.

use pgrx::pg_sys;
use std::ffi::CStr;

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

//! `multimaster` — the per-node PostgreSQL extension.
//!
//! What this version does: it must be preloaded (`shared_preload_libraries`),
//! `CREATE EXTENSION multimaster` creates the `mtm` schema, and
//! `mtm.version()` reports the library version. Replication (decoder,
//! receivers, apply pool), cluster state and the rest of the `mtm` API are
//! not built yet; see the project's open issues.

use pgrx::prelude::*;

pgrx::pg_module_magic!();

/// Library version, as built (matches the extension's `default_version`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Called when the library is loaded. The extension keeps shared-memory
/// state and background workers in later versions, which PostgreSQL only
/// allows from a preloaded library, so refuse any other way of loading it
/// now rather than fail obscurely later.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: a plain read of a postmaster-global flag, during library load.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    if !preloading {
        ereport!(
            PgLogLevel::ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "multimaster must be loaded via shared_preload_libraries",
            "Add multimaster to shared_preload_libraries (and to output_plugin_libraries) in postgresql.conf and restart the server."
        );
    }
}

/// The version of the loaded `multimaster` library.
#[pg_extern(immutable, parallel_safe)]
fn version() -> &'static str {
    VERSION
}

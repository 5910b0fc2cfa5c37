//! `multimaster` — the per-node PostgreSQL extension.
//!
//! Built so far: the `mtm` SQL API surface (`sql/mtm_api.sql`; what is not
//! built yet raises feature_not_supported), the GUCs, the output plugin,
//! the replication mesh (one receiver and one apply pool per peer) and
//! this node's 2PC votes. Cluster state (generations) is not built yet.
//!
//! Module map:
//! - [`decoder`]  — the output plugin (wire format in `PROTOCOL.md`,
//!   encoding in the safe `mtm-protocol` crate);
//! - [`launcher`] — starts and restarts one receiver per peer;
//! - [`receiver`] — streams a peer's slot, plans its transactions
//!   (safe `mtm-schedule` crate) and hands them to the pool;
//! - [`pool`]     — the apply pool's shared state and commit turns;
//! - [`worker`]   — an apply worker's main loop;
//! - [`apply`]    — applies decoded transactions through the executor;
//! - [`relmap`]   — the apply side's relation cache (local table and column
//!   readers of each peer relation);
//! - [`votes`]    — 2PC votes: cast after applying a peer's PREPARE and sent
//!   back over the mesh; counted for this node's own prepares
//!   (`mtm.await_votes`, the proxy's commit path);
//! - [`ddl`]      — schema changes captured where they run and replayed on
//!   every peer inside the same transaction;
//! - [`notify`]   — NOTIFY heard on every node when its transaction
//!   commits there;
//! - [`sequences`] — sequences whose values never collide across nodes
//!   (`mtm.alter_sequences`);
//! - [`signal`]   — `pg_cancel_backend` / `pg_terminate_backend` of a pid
//!   on another node;
//! - [`xact`]     — whether a client transaction wrote (reported to the proxy)
//!   and the guard against committing such a transaction on one node;
//! - [`decisions`] — the durable 2PC decision log: the extension's WAL
//!   resource manager (precommit / preabort / commit / abort of `mtm-`
//!   gids), redone after a crash, `mtm.get_logged_prepared_xact_state`;
//! - [`resolver`] — finishes the prepared `mtm-` gids whose coordinator or
//!   home node is gone, by a majority of promises (run by the launcher);
//! - [`conflicts`] — settles lock waits between transactions of different
//!   nodes (which one gives way) and rewrites their errors to 40001;
//! - [`status`]   — apply errors and pool counters for `mtm.nodes()`,
//!   `mtm.stat_bgwpool`, `mtm.status()`;
//! - [`pg`]       — the thin layer over PostgreSQL's C API: every `unsafe`
//!   block, hook trampoline and view of a PostgreSQL struct, one file per
//!   subsystem (`pg/walrcv.rs`, `pg/executor.rs`, `pg/rmgr.rs`, ...).
//!
//! `unsafe` is denied everywhere but in [`pg`], the thin layer over
//! PostgreSQL's C API (its doc comment gives the rules).

#![deny(unsafe_code)]

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::prelude::*;
use std::ffi::CString;

pub mod apply;
pub mod conflicts;
pub mod ddl;
pub mod decisions;
pub mod decoder;
pub mod launcher;
pub mod notify;
pub mod pg;
pub mod pool;
pub mod receiver;
pub mod relmap;
pub mod resolver;
pub mod sequences;
pub mod signal;
pub mod status;
pub mod votes;
pub mod worker;
pub mod xact;

pgrx::pg_module_magic!();

pgrx::extension_sql_file!("../sql/mtm_api.sql", name = "mtm_api", requires = [status::pool_stats, status::pool_workers, status::apply_errors]);

// Any role may write through mtm-proxy: the proxy's statements in a
// client's session call `mtm.await_votes` / `mtm.await_commits`, and the
// node does its own bookkeeping as the superuser
// (`pg::catalog::as_superuser`). What sets up or changes the cluster
// stays with superusers.
pgrx::extension_sql!(
    r#"
GRANT USAGE ON SCHEMA mtm TO PUBLIC;
REVOKE EXECUTE ON FUNCTION mtm.init_cluster(text, text[]), mtm.alter_sequences(),
    mtm.make_table_local(regclass), mtm.cleanup_old_syncpoints(), mtm.resolve_gid(text, text),
    mtm.signal_local(integer, text, boolean, bigint) FROM PUBLIC;
"#,
    name = "grants",
    finalize
);

/// Library version, as built (matches the extension's `default_version`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `multimaster.remote_functions`: functions whose calls run cluster-wide.
pub static REMOTE_FUNCTIONS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// `multimaster.max_workers`: apply workers per peer (read when a
/// receiver starts).
pub static MAX_WORKERS: GucSetting<i32> = GucSetting::<i32>::new(4);

/// `multimaster.peer_timeout` (ms): a peer silent this long is dropped.
pub static PEER_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(10_000);

pub use pg::xact::with_snapshot;

/// The SPI plan of `sql` (with arguments of types `args`), prepared on
/// first use and kept in `cell` for the backend's life: the look-ups the
/// extension makes at every commit are then planned once per backend,
/// not at every commit (PostgreSQL re-plans it if the catalog changes).
pub fn kept_plan<'a>(
    cell: &'a std::cell::OnceCell<pgrx::spi::OwnedPreparedStatement>,
    client: &pgrx::spi::SpiClient<'_>,
    sql: &str,
    args: &[PgOid],
    mutating: bool,
) -> pgrx::spi::SpiResult<&'a pgrx::spi::OwnedPreparedStatement> {
    if let Some(plan) = cell.get() {
        return Ok(plan);
    }
    let prepared = if mutating { client.prepare_mut(sql, args)? } else { client.prepare(sql, args)? };
    Ok(cell.get_or_init(|| prepared.keep()))
}

/// `pg_prepared_xacts.prepared` as microseconds since 2000 (PostgreSQL's
/// own timestamp unit, as the stream carries a prepare time), in SQL.
pub const PREPARED_MICROS: &str = "((extract(epoch FROM prepared) - 946684800) * 1000000)::int8";

thread_local! {
    static PREPARED_AT: std::cell::OnceCell<pgrx::spi::OwnedPreparedStatement> = const { std::cell::OnceCell::new() };
}

/// When `gid` was prepared on this node ([`PREPARED_MICROS`]), or None if
/// it is not prepared here (inside a transaction).
pub fn prepared_at(gid: &str) -> Option<i64> {
    with_snapshot(|| {
        Spi::connect(|c| {
            PREPARED_AT.with(|cell| {
                let text = [PgOid::BuiltIn(PgBuiltInOids::TEXTOID)];
                let sql = format!("SELECT {PREPARED_MICROS} FROM pg_prepared_xacts WHERE gid = $1");
                let plan = kept_plan(cell, &c, &sql, &text, false).ok()?;
                c.select(plan, None, &[gid.into()]).ok()?.first().get_one::<i64>().ok().flatten()
            })
        })
    })
}

/// `text` as an SQL string literal (standard_conforming_strings on).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Whether `gid` is prepared on this node (inside a transaction).
pub fn prepared_here(gid: &str) -> bool {
    prepared_at(gid).is_some()
}

pub use pg::guc::setting;

/// Raises an ERROR with `code`, `message` and `hint`, reported as coming
/// from `function`.
#[track_caller]
pub fn raise(code: PgSqlErrorCode, message: impl Into<String>, hint: &str, function: &'static str) -> ! {
    pgrx::pg_sys::panic::ErrorReport::new(code, message.into(), function).set_hint(hint).report(PgLogLevel::ERROR);
    unreachable!("an ERROR does not return")
}

/// Whether process `pid` exists (a backend or worker of this server).
pub fn pid_alive(pid: i32) -> bool {
    pid > 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Called when the library is loaded. The extension keeps shared-memory
/// state, background workers and a WAL resource manager, which PostgreSQL
/// only allows from a preloaded library, so refuse any other way of
/// loading it rather than fail obscurely later. (Logical decoding loads
/// the library again in walsenders; that is fine once preloaded.)
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    if !pg::proc::preloading() {
        ereport!(
            PgLogLevel::ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "multimaster must be loaded via shared_preload_libraries",
            "Add multimaster to shared_preload_libraries (and to output_plugin_libraries) in postgresql.conf and restart the server."
        );
    }
    GucRegistry::define_string_guc(
        c"multimaster.remote_functions",
        c"Functions whose calls run on every node of the cluster.",
        c"Comma-separated, optionally schema-qualified function names.",
        &REMOTE_FUNCTIONS,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"multimaster.max_workers",
        c"Apply workers per peer node.",
        c"Transactions from one peer that touch different rows are applied by up to this many workers at once. Takes effect when a receiver (re)starts.",
        &MAX_WORKERS,
        1,
        pool::MAX_WORKERS as i32,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"multimaster.peer_timeout",
        c"How long a receiver waits for any message from its peer before it drops the connection and reconnects.",
        c"Receivers ask their peer's walsender for a reply every second, so a live peer always answers; a frozen or unreachable one is noticed after this long (mtm.nodes() then shows it disconnected).",
        &PEER_TIMEOUT,
        1000,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_string_guc(
        c"multimaster.database",
        c"The replicated database.",
        c"The cluster's workers connect to it; the extension is installed in it. Other databases on the nodes are local to each node.",
        &launcher::DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    xact::init();
    notify::init();
    // Installed here rather than by conflicts or decisions: they share
    // the one emit_log_hook (see pg/elog.rs).
    pg::elog::install_log_hook();
    ddl::init();
    decisions::init();
    // After every module defined its settings: reserving the prefix drops
    // the placeholders still undefined, and with them the values the
    // configuration files gave those settings.
    pg::guc::reserve_prefix(c"multimaster");
    launcher::register();
    pg::shmem::init();
}

/// The version of the loaded `multimaster` library.
#[pg_extern(immutable, parallel_safe)]
fn version() -> &'static str {
    VERSION
}

/// Whether this node answers (used by peers and the proxy).
#[pg_extern]
fn ping() -> bool {
    true
}

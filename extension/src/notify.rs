//! NOTIFY across the cluster: a listener on any node hears a NOTIFY sent
//! from a session on any node, when (and only if) its transaction
//! commits.
//!
//! PostgreSQL cannot PREPARE a transaction that ran NOTIFY, and the
//! cluster commits every writing transaction with PREPARE. So in a
//! session of the proxy (`multimaster.coordinated_commit`) a NOTIFY
//! statement is taken over here instead of queued by PostgreSQL:
//! - it is written as a transactional `mtm_notify` message (channel,
//!   payload), which the peers' apply workers collect, and kept in this
//!   backend's list; the transaction now counts as writing, so the proxy
//!   commits it through the cluster's two-phase commit;
//! - at PREPARE TRANSACTION each node stores the transaction's
//!   notifications in `mtm.notifications` under its gid (a local table,
//!   inside the prepared transaction: gone with a rollback, kept across a
//!   crash);
//! - at COMMIT PREPARED each node takes the gid's rows out and queues
//!   them with PostgreSQL's own `Async_Notify`, in the transaction that
//!   runs the COMMIT PREPARED, so its listeners hear them when that
//!   commits (duplicates folded as PostgreSQL folds them).
//!
//! `pg_notify(channel, payload)` calls are taken over the same way: in a
//! session of the proxy, parse analysis points every call of it (in a
//! query, a trigger's or function's PL/pgSQL, a DO block) at
//! `mtm.pg_notify`, which does what the statement does here.
//!
//! A NOTIFY in a rolled-back subtransaction is dropped, as PostgreSQL
//! drops it. Sessions connected to a node directly keep PostgreSQL's
//! NOTIFY (heard on that node only). LISTEN and UNLISTEN in a transaction
//! that writes are refused by PREPARE (0A000), as PostgreSQL refuses them.

#![deny(unsafe_code)]

use mtm_protocol::{NotifyMessage, NOTIFY_PREFIX};
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};
use std::cell::RefCell;
use std::ffi::CString;

thread_local! {
    /// This transaction's NOTIFYs not yet stored: (subtransaction nest
    /// level, channel, payload), in the order they were sent.
    static PENDING: RefCell<Vec<(i32, String, String)>> = const { RefCell::new(Vec::new()) };
    /// Set while this module writes `mtm.notifications` for a client's
    /// session: not a write of the client's.
    static OWN_WORK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the statement running is this module's own.
pub fn own_work() -> bool {
    OWN_WORK.get()
}

/// Whether notifications of this session are the cluster's (a session of
/// the proxy, running a client's statement, in the replicated database).
pub(crate) fn cluster_wide() -> bool {
    crate::xact::COORDINATED_COMMIT.get() && crate::xact::client_change() && crate::ddl::replicated_database()
}

/// A NOTIFY or `pg_notify()` of `channel` with `payload`: taken over in a
/// session of the proxy ([`cluster_wide`]); false anywhere else.
pub(crate) fn take_over(channel: &str, payload: &str) -> bool {
    if !cluster_wide() {
        return false;
    }
    check(channel, payload);
    let msg = NotifyMessage { channel: channel.to_string(), payload: payload.to_string() };
    crate::pg::rmgr::log_logical_message(c"mtm_notify", &msg.to_bytes(), true);
    let level = crate::pg::xact::nest_level();
    PENDING.with_borrow_mut(|p| p.push((level, msg.channel, msg.payload)));
    // PostgreSQL cannot PREPARE a transaction that ran LISTEN: this one
    // commits here ([`before_local_commit`]), and the peers hear its
    // NOTIFYs when they apply its commit (the message above).
    if !LISTENED.get() {
        crate::xact::set_writes_for_notify();
    }
    true
}

thread_local! {
    /// The open transaction ran LISTEN or UNLISTEN in a session of the
    /// proxy.
    static LISTENED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// LISTEN or UNLISTEN ran. PostgreSQL cannot PREPARE the transaction
/// now, so a transaction whose only cluster-wide work is NOTIFY commits
/// on this node without the cluster's two-phase commit: its NOTIFYs
/// become PostgreSQL's own here as it commits ([`before_local_commit`]),
/// and the peers deliver them when they apply its commit (their
/// `mtm_notify` messages are logged as they are taken over). One that
/// also wrote to replicated tables still needs the two-phase commit,
/// which PostgreSQL refuses (0A000, nothing committed).
pub fn listen_seen() {
    if !cluster_wide() {
        return;
    }
    LISTENED.set(true);
    if crate::xact::writes_only_notifies() {
        crate::xact::set_writes(false);
    }
}

/// The transaction commits on this node without PREPARE: its NOTIFYs
/// still pending (those of savepoints that were not rolled back) are
/// queued the way PostgreSQL's own are, heard here once it commits.
pub fn before_local_commit() {
    let pending: Vec<(String, String)> = PENDING.with_borrow_mut(|p| p.drain(..).map(|(_, c, m)| (c, m)).collect());
    queue(&pending);
}

/// `pg_notify()` as the proxy's sessions run it: parse analysis points
/// their calls of PostgreSQL's `pg_notify` here ([`init`]). Taken over
/// like the NOTIFY statement; elsewhere (should it be called directly)
/// PostgreSQL's own NOTIFY.
#[pg_extern(name = "pg_notify")]
fn notify_function(channel: Option<&str>, payload: Option<&str>) {
    let (channel, payload) = (channel.unwrap_or_default(), payload.unwrap_or_default());
    if !take_over(channel, payload) {
        queue_one(channel, payload);
    }
}

/// Installs the parse-analysis hook that redirects `pg_notify()` calls.
pub fn init() {
    crate::pg::notify::install_parse_hook();
}

thread_local! {
    /// Oid of `mtm.pg_notify(text, text)` in this database, once found.
    static OUR_PG_NOTIFY: std::cell::Cell<Option<pg_sys::Oid>> = const { std::cell::Cell::new(None) };
}

/// The oid of the extension's function `signature`, kept in `cache` once
/// found (not found is not kept: the extension may be created later).
pub(crate) fn function_oid(cache: &'static std::thread::LocalKey<std::cell::Cell<Option<pg_sys::Oid>>>, signature: &str) -> Option<pg_sys::Oid> {
    if let Some(oid) = cache.get() {
        return Some(oid);
    }
    let oid = crate::pg::catalog::to_regprocedure(signature).filter(|o| *o != pg_sys::InvalidOid);
    cache.set(oid);
    oid
}

/// What the parse-analysis hook points a query's calls of PostgreSQL's
/// `pg_notify` at, given the query's source text: ours in a session of
/// the proxy, None (left alone) elsewhere or where the text cannot call it.
pub(crate) fn pg_notify_replacement(source: &[u8]) -> Option<pg_sys::Oid> {
    // Cheap tests first: most queries never name pg_notify.
    if !mentions(source, b"pg_notify") || !cluster_wide() {
        return None;
    }
    function_oid(&OUR_PG_NOTIFY, "mtm.pg_notify(text,text)")
}

/// Whether SQL text may call the function `name` (any case: unquoted
/// names fold).
pub(crate) fn mentions(source: &[u8], name: &[u8]) -> bool {
    source.windows(name.len()).any(|w| w.eq_ignore_ascii_case(name))
}

/// PostgreSQL's own checks of a notification (`Async_Notify`), made when
/// the statement runs rather than where it is delivered.
fn check(channel: &str, payload: &str) {
    let fail = |message: &str| {
        ereport!(PgLogLevel::ERROR, PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message);
    };
    if channel.is_empty() {
        fail("channel name cannot be empty");
    }
    if channel.len() >= pg_sys::NAMEDATALEN as usize {
        fail("channel name too long");
    }
    if payload.len() >= 8000 {
        fail("payload string too long");
    }
}

/// A subtransaction at `level` ended: its NOTIFYs go with it (`aborted`)
/// or now belong to its parent.
pub fn subtransaction_ended(level: i32, aborted: bool) {
    PENDING.with_borrow_mut(|p| {
        if aborted {
            p.retain(|(l, _, _)| *l < level);
        } else {
            p.iter_mut().filter(|(l, _, _)| *l >= level).for_each(|(l, _, _)| *l = level - 1);
        }
    });
}

/// The transaction ended (what was not stored is dropped with it).
pub fn transaction_ended() {
    PENDING.with_borrow_mut(Vec::clear);
    OWN_WORK.set(false);
    LISTENED.set(false);
}

/// Runs `f` as the bootstrap superuser: `mtm.notifications` is the
/// extension's, not the client's. (An error in `f` aborts the
/// transaction, which restores the user.)
fn as_superuser<T>(f: impl FnOnce() -> T) -> T {
    let was = OWN_WORK.replace(true);
    let out = crate::pg::catalog::as_superuser(|| crate::pg::catalog::read_write(f));
    OWN_WORK.set(was);
    out
}

/// Stores `notifications` under `gid`, inside the transaction about to be
/// prepared.
pub fn store(gid: &str, notifications: &[(String, String)]) {
    if notifications.is_empty() {
        return;
    }
    crate::with_snapshot(|| {
        as_superuser(|| {
            for (n, (channel, payload)) in notifications.iter().enumerate() {
                Spi::run_with_args(
                    "INSERT INTO mtm.notifications (gid, n, channel, payload) VALUES ($1, $2, $3, $4)",
                    &[gid.into(), (n as i32).into(), channel.as_str().into(), payload.as_str().into()],
                )
                .unwrap_or_else(|e| error!("multimaster: cannot keep the notifications of {gid}: {e}"));
            }
        })
    });
}

/// This backend's PREPARE TRANSACTION `gid`: stores its NOTIFYs.
pub fn prepare(gid: &str) {
    let pending: Vec<(String, String)> = PENDING.with_borrow_mut(|p| p.drain(..).map(|(_, c, m)| (c, m)).collect());
    store(gid, &pending);
}

thread_local! {
    static DELIVER_PLAN: std::cell::OnceCell<pgrx::spi::OwnedPreparedStatement> = const { std::cell::OnceCell::new() };
}

/// `gid` was just committed here (COMMIT PREPARED, in this transaction):
/// queue its notifications, heard when this transaction commits.
pub fn deliver(gid: &str) {
    let rows: Vec<(String, String)> = crate::with_snapshot(|| {
        as_superuser(|| {
            Spi::connect_mut(|c| {
                let text = [PgOid::BuiltIn(PgBuiltInOids::TEXTOID)];
                let sql = "WITH d AS (DELETE FROM mtm.notifications WHERE gid = $1 RETURNING n, channel, payload)
                           SELECT channel, payload FROM d ORDER BY n";
                DELIVER_PLAN.with(|cell| {
                    let plan = crate::kept_plan(cell, c, sql, &text, true)
                        .unwrap_or_else(|e| error!("multimaster: cannot read the notifications of {gid}: {e}"));
                    c.update(plan, None, &[gid.into()])
                })
                .map(|rows| {
                    rows.filter_map(|r| Some((r.get::<String>(1).ok().flatten()?, r.get::<String>(2).ok().flatten()?))).collect()
                })
                .unwrap_or_else(|e| error!("multimaster: cannot read the notifications of {gid}: {e}"))
            })
        })
    });
    queue(&rows);
}

/// Queues notifications in the current transaction (PostgreSQL's NOTIFY).
pub fn queue(notifications: &[(String, String)]) {
    for (channel, payload) in notifications {
        queue_one(channel, payload);
    }
}

/// PostgreSQL's own NOTIFY of `channel` with `payload`, on this node.
fn queue_one(channel: &str, payload: &str) {
    if let (Ok(c), Ok(p)) = (CString::new(channel), CString::new(payload)) {
        crate::pg::notify::async_notify(&c, &p);
    }
}

/// A peer's `mtm_notify` message, as the apply worker reads it.
pub fn decode(content: &[u8]) -> Option<(String, String)> {
    NotifyMessage::decode(content).ok().map(|m| (m.channel, m.payload))
}

/// Whether a logical message is a notification.
pub fn is_notify(prefix: &str) -> bool {
    prefix == NOTIFY_PREFIX
}

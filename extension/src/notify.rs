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
//! A NOTIFY in a rolled-back subtransaction is dropped, as PostgreSQL
//! drops it. Sessions connected to a node directly keep PostgreSQL's
//! NOTIFY (heard on that node only). `pg_notify()` calls are not taken
//! over (only the statement is): in a transaction that writes, PREPARE
//! refuses them (0A000), as it refuses LISTEN and UNLISTEN there.

use mtm_protocol::{NotifyMessage, NOTIFY_PREFIX};
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};
use std::cell::RefCell;
use std::ffi::CString;

unsafe extern "C-unwind" {
    // Not exported through pg_sys (commands/async.h); called only through
    // pg_guard_ffi_boundary.
    fn Async_Notify(channel: *const std::ffi::c_char, payload: *const std::ffi::c_char);
}

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

/// Takes over a NOTIFY statement in a session of the proxy. Returns false
/// (PostgreSQL runs it) anywhere else.
///
/// # Safety
/// `stmt` is a valid NotifyStmt.
pub unsafe fn take_over(stmt: *mut pg_sys::NotifyStmt) -> bool {
    if !crate::xact::COORDINATED_COMMIT.get() || !crate::xact::client_change() || !crate::ddl::replicated_database() {
        return false;
    }
    let text = |p: *mut std::ffi::c_char| if p.is_null() { String::new() } else { std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned() };
    let (channel, payload) = (text((*stmt).conditionname), text((*stmt).payload));
    check(&channel, &payload);
    let msg = NotifyMessage { channel, payload };
    crate::votes::log_message(c"mtm_notify", &msg.to_bytes(), true);
    let level = pg_sys::GetCurrentTransactionNestLevel();
    PENDING.with_borrow_mut(|p| p.push((level, msg.channel, msg.payload)));
    crate::xact::set_writes(true);
    true
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
}

/// Runs `f` as the bootstrap superuser: `mtm.notifications` is the
/// extension's, not the client's. (An error in `f` aborts the
/// transaction, which restores the user.)
fn as_superuser<T>(f: impl FnOnce() -> T) -> T {
    let (mut user, mut context) = (pg_sys::Oid::INVALID, 0);
    // SAFETY: saved and restored around `f`, as PostgreSQL's own
    // security-restricted operations do.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(pg_sys::BOOTSTRAP_SUPERUSERID.into(), context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    }
    let was = OWN_WORK.replace(true);
    let out = f();
    OWN_WORK.set(was);
    // SAFETY: as above.
    unsafe { pg_sys::SetUserIdAndSecContext(user, context) };
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
        let (c, p) = (CString::new(channel.as_str()), CString::new(payload.as_str()));
        if let (Ok(c), Ok(p)) = (c, p) {
            // SAFETY: in a transaction; both strings are copied by
            // PostgreSQL into its transaction memory; an ERROR unwinds
            // through the guarded boundary.
            unsafe { pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| Async_Notify(c.as_ptr(), p.as_ptr())) };
        }
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

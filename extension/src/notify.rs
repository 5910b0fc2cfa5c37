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
    let text = |p: *mut std::ffi::c_char| if p.is_null() { String::new() } else { std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned() };
    take_over_values(&text((*stmt).conditionname), &text((*stmt).payload))
}

/// Whether notifications of this session are the cluster's (a session of
/// the proxy, running a client's statement, in the replicated database).
fn cluster_wide() -> bool {
    crate::xact::COORDINATED_COMMIT.get() && crate::xact::client_change() && crate::ddl::replicated_database()
}

/// A NOTIFY or `pg_notify()` of `channel` with `payload`: taken over in a
/// session of the proxy ([`cluster_wide`]); false anywhere else.
fn take_over_values(channel: &str, payload: &str) -> bool {
    if !cluster_wide() {
        return false;
    }
    check(channel, payload);
    let msg = NotifyMessage { channel: channel.to_string(), payload: payload.to_string() };
    // SAFETY: in a transaction (a statement is running).
    unsafe { crate::votes::log_message(c"mtm_notify", &msg.to_bytes(), true) };
    // SAFETY: a plain read of the transaction state.
    let level = unsafe { pg_sys::GetCurrentTransactionNestLevel() };
    PENDING.with_borrow_mut(|p| p.push((level, msg.channel, msg.payload)));
    crate::xact::set_writes(true);
    true
}

/// `pg_notify()` as the proxy's sessions run it: parse analysis points
/// their calls of PostgreSQL's `pg_notify` here ([`init`]). Taken over
/// like the NOTIFY statement; elsewhere (should it be called directly)
/// PostgreSQL's own NOTIFY.
#[pg_extern(name = "pg_notify")]
fn notify_function(channel: Option<&str>, payload: Option<&str>) {
    let (channel, payload) = (channel.unwrap_or_default(), payload.unwrap_or_default());
    if !take_over_values(channel, payload) {
        queue_one(channel, payload);
    }
}

static mut PREV_POST_PARSE_ANALYZE: pg_sys::post_parse_analyze_hook_type = None;

/// Installs the parse-analysis hook that redirects `pg_notify()` calls.
pub fn init() {
    // SAFETY: while preloading, before any query; the previous hook is
    // kept and called first.
    unsafe {
        PREV_POST_PARSE_ANALYZE = pg_sys::post_parse_analyze_hook;
        pg_sys::post_parse_analyze_hook = Some(post_parse_analyze);
    }
}

thread_local! {
    /// Oid of `mtm.pg_notify(text, text)` in this database, once found.
    static OUR_PG_NOTIFY: std::cell::Cell<Option<pg_sys::Oid>> = const { std::cell::Cell::new(None) };
}

fn our_pg_notify() -> Option<pg_sys::Oid> {
    if let Some(oid) = OUR_PG_NOTIFY.get() {
        return Some(oid);
    }
    // SAFETY: to_regprocedure is a plain SQL-callable function (NULL when
    // the function does not exist), called inside a transaction.
    let oid = unsafe { pgrx::direct_function_call::<pg_sys::Oid>(pg_sys::to_regprocedure, &["mtm.pg_notify(text,text)".into_datum()]) }
        .filter(|o| *o != pg_sys::InvalidOid);
    // Not found is not kept: the extension may be created later.
    if oid.is_some() {
        OUR_PG_NOTIFY.set(oid);
    }
    oid
}

#[pg_guard]
unsafe extern "C-unwind" fn post_parse_analyze(pstate: *mut pg_sys::ParseState, query: *mut pg_sys::Query, jstate: *mut pg_sys::JumbleState) {
    if let Some(prev) = PREV_POST_PARSE_ANALYZE {
        prev(pstate, query, jstate);
    }
    // Cheap tests first: most queries never name pg_notify.
    let source = if pstate.is_null() || (*pstate).p_sourcetext.is_null() {
        return;
    } else {
        std::ffi::CStr::from_ptr((*pstate).p_sourcetext).to_bytes()
    };
    if !mentions_pg_notify(source) || !cluster_wide() {
        return;
    }
    if let Some(ours) = our_pg_notify() {
        let mut ours = ours;
        pg_sys::query_tree_walker(query, Some(redirect_pg_notify), (&raw mut ours).cast(), 0);
    }
}

/// Whether SQL text may call pg_notify (any case: unquoted names fold).
fn mentions_pg_notify(source: &[u8]) -> bool {
    source.windows(9).any(|w| w.eq_ignore_ascii_case(b"pg_notify"))
}

/// Points every call of PostgreSQL's `pg_notify` in the tree at ours
/// (`context`: its oid); same arguments, same result type.
#[pg_guard]
unsafe extern "C-unwind" fn redirect_pg_notify(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
    if node.is_null() {
        return false;
    }
    if (*node).type_ == pg_sys::NodeTag::T_FuncExpr {
        let f = node.cast::<pg_sys::FuncExpr>();
        if (*f).funcid == pg_sys::Oid::from(pg_sys::F_PG_NOTIFY) {
            (*f).funcid = *context.cast::<pg_sys::Oid>();
        }
    }
    if (*node).type_ == pg_sys::NodeTag::T_Query {
        return pg_sys::query_tree_walker(node.cast(), Some(redirect_pg_notify), context, 0);
    }
    pg_sys::expression_tree_walker(node, Some(redirect_pg_notify), context)
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
        queue_one(channel, payload);
    }
}

/// PostgreSQL's own NOTIFY of `channel` with `payload`, on this node.
fn queue_one(channel: &str, payload: &str) {
    if let (Ok(c), Ok(p)) = (CString::new(channel), CString::new(payload)) {
        // SAFETY: in a transaction; both strings are copied by PostgreSQL
        // into its transaction memory; an ERROR unwinds through the
        // guarded boundary.
        unsafe { pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| Async_Notify(c.as_ptr(), p.as_ptr())) };
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

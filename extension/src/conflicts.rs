//! Where conflicts between transactions of different nodes are settled on
//! this node: the launcher calls [`Settler::settle`] every few
//! milliseconds; when an apply worker has waited for a lock for a few
//! milliseconds, it finds the holder in `pg_locks` and
//! applies the rule of `mtm_schedule::conflict` (the transaction prepared
//! first wins; one not prepared yet gives way).
//!
//! Giving way takes one of four forms:
//! - a transaction prepared here by its own client (under a cluster gid,
//!   or the client's own gid of its two-phase commit): this node refuses
//!   it in the vote table its coordinator waits on (`mtm.await_votes`
//!   then answers no, 40001, and the proxy rolls it back everywhere);
//! - a transaction prepared here for another home node: this node sends
//!   that node a no vote, withdrawing its yes (counted only if the
//!   coordinator has not decided yet);
//! - an apply worker's transaction, not prepared yet: the worker is
//!   marked and, if it waits for a lock, cancelled; it votes no;
//! - a local session's transaction, while it runs a statement or waits
//!   for a lock: marked and cancelled. Its client gets 40001 — the
//!   cancel's error is rewritten in the `emit_log_hook` ([`rewrite_error`]); should the
//!   cancel miss, the mark fails its next statement or its PREPARE (see
//!   [`check_current`]). A session idle in its transaction is left alone
//!   (nothing to cancel): the wait for it ends when it prepares (and gives
//!   way as a prepared transaction) or at the apply's lock timeout.
//!
//! The mark ("doomed") is the transaction id of the holder, kept per
//! PGPROC, so it can never hit the process's next transaction. What is
//! not settled here ends at the apply's `lock_timeout` as before.

#![deny(unsafe_code)]

use crate::pg::elog::ReportedError;
use crate::pg::proc::Proc;
use mtm_schedule::conflict::{table_verdict, verdict, Age, Holder, TableLock, Verdict, WaitWatch};
use pgrx::prelude::*;
use pgrx::pg_sys;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering::*};
use std::time::{Duration, Instant};

/// PGPROC numbers marked; a process with a higher one is never marked
/// (max_connections + workers + prepared transactions stay far below).
const PROCS: usize = 8192;

pub struct Doomed {
    /// The top transaction id that must give way, per PGPROC (0: none).
    xid: [AtomicU32; PROCS],
    /// The node whose transaction it gives way to.
    by: [AtomicI32; PROCS],
}

impl Default for Doomed {
    fn default() -> Self {
        Doomed { xid: std::array::from_fn(|_| AtomicU32::new(0)), by: std::array::from_fn(|_| AtomicI32::new(0)) }
    }
}


pub use crate::pg::shmem::DOOMED;

/// A wait is looked at once it has lasted this long (most end sooner:
/// the holder commits) ...
const LOOK_AFTER: Duration = Duration::from_millis(4);
/// ... and again this often while it lasts.
const LOOK_AGAIN: Duration = Duration::from_millis(50);

/// The launcher's side of the rule: which waits to look at
/// ([`WaitWatch`]), and settling them.
pub struct Settler {
    watch: WaitWatch,
}

impl Default for Settler {
    fn default() -> Self {
        Settler { watch: WaitWatch::new(LOOK_AFTER, LOOK_AGAIN) }
    }
}

impl Settler {
    /// Looks at the apply workers that have waited for a lock for a while
    /// and settles each wait the rule decides. From the launcher, outside
    /// a transaction.
    ///
    /// A row lock (the common case) is settled from shared memory alone:
    /// the holder is the process whose transaction id the worker waits
    /// for. Other locks (DDL) are looked up in `pg_locks`, which takes
    /// every lock-table partition — not something to do every tick.
    pub fn settle(&mut self) {
        let me = crate::votes::MY_NODE.get().load(Relaxed);
        let current = crate::pool::lock_waiters();
        let now = Instant::now();
        let due = self.watch.due(&current.iter().map(|w| (w.pid, w.lock)).collect::<Vec<_>>(), now);
        if me == 0 || due.is_empty() {
            return;
        }
        let mut by_sql = Vec::new();
        for w in current.iter().filter(|w| due.contains(&w.pid)) {
            // Rolled back at its home already: nothing to wait for; its
            // worker drops it at its PREPARE (pool::PeerPool::abandon).
            if w.abandoned {
                cancel_abandoned(w.pid);
                self.watch.looked(w.pid, now);
                continue;
            }
            match w.xid {
                Some(xid) => {
                    if settle_row_wait(me, w.pid, xid) {
                        self.watch.looked(w.pid, now);
                    }
                }
                None => {
                    self.watch.looked(w.pid, now);
                    by_sql.push(w.pid);
                }
            }
        }
        if !by_sql.is_empty() {
            pgrx::bgworkers::BackgroundWorker::transaction(|| settle_by_pg_locks(me, &by_sql));
        }
    }
}

/// Cancels the lock wait of the apply worker `pid`, whose transaction its
/// home node has rolled back.
fn cancel_abandoned(pid: i32) {
    let Some((peer, _)) = crate::pool::applying(pid) else { return };
    // Only while it still waits for a lock, so the cancel ends that wait
    // inside the abandoned transaction: one that got its lock since the
    // look finishes and drops it by itself, and a cancel sent to it now
    // could land in the next transaction it applies (57014), stopping
    // the pool for nothing.
    let waiting = |p: &Proc| p.pid() == pid && p.wait_class() == pg_sys::PG_WAIT_LOCK;
    if let Some(proc) = crate::pg::proc::all_procs().find(waiting) {
        doom(proc, proc.xid(), peer, true);
    }
}

/// The PGPROC whose transaction (or one of its subtransactions) is `xid`
/// (the prepared transactions' PGPROCs included). Read without locks: a
/// stale read finds no holder or a finished one, whose mark can do no
/// harm.
fn proc_of_xid(xid: u32) -> Option<Proc> {
    crate::pg::proc::all_procs().find(|&p| {
        let top = p.xid();
        if top == xid {
            return true;
        }
        if top == 0 {
            return false;
        }
        p.has_subxid(xid)
    })
}

/// Settles an apply worker's wait for the row locks of transaction `xid`.
/// False: not decided yet (look again at the next tick).
fn settle_row_wait(me: i32, waiter_pid: i32, xid: u32) -> bool {
    match proc_of_xid(xid) {
        Some(proc) => settle_wait_for(me, waiter_pid, proc),
        None => true,
    }
}

/// Settles an apply worker's wait for a lock that the process `proc`
/// holds. False: not decided yet (look again at the next tick).
fn settle_wait_for(me: i32, waiter_pid: i32, proc: Proc) -> bool {
    let Some((peer, time)) = crate::pool::applying(waiter_pid) else { return true };
    let waiter = Age { time, home: peer };
    let (pid, top, background, autovacuum, wait_class) = (proc.pid(), proc.xid(), proc.is_background_worker(), proc.is_autovacuum(), proc.wait_class());
    let waits_for_lock = wait_class == pg_sys::PG_WAIT_LOCK;
    let applying = crate::pool::applying(pid);
    // A session idle in its transaction (waiting for its client) is left
    // alone: it cannot be cancelled, and a mark would only hit its next
    // statement after the waiter may have timed out. Most such pauses are
    // between two statements: look again at the next tick (it prepares,
    // or runs).
    if pid != 0 && applying.is_none() && wait_class == pg_sys::PG_WAIT_CLIENT {
        return false;
    }
    // The gid of a prepared holder: ours (a session of this node prepared
    // it, its coordinator can give up) or a peer's (this node voted yes).
    let mut prepared_gid = None;
    let holder = if pid == 0 {
        match crate::resolver::prepared_here_by_xid(top) {
            Some((_, None)) => return false,
            Some((gid, Some(t))) => {
                prepared_gid = Some(gid);
                Holder::Prepared { age: Age { time: t, home: me } }
            }
            None => match crate::votes::applied_prepare_by_xid(top).or_else(|| client_prepare_by_xid(me, top)) {
                Some((gid, home, t)) => {
                    prepared_gid = Some(gid);
                    Holder::Prepared { age: Age { time: t, home } }
                }
                None => Holder::Other,
            },
        }
    } else if let Some((p, t)) = applying {
        Holder::Applying { age: Age { time: t, home: p } }
    } else if !background && !autovacuum {
        Holder::Local
    } else {
        Holder::Other
    };
    match verdict(me, waiter, holder) {
        // Marked in any case; cancelled only while it waits inside a
        // statement — an apply worker for a lock (elsewhere a cancel would
        // stop its pool), a session for a lock, a sleep, I/O… A session
        // running on the CPU is between two protocol messages as often as
        // in a statement, and a cancel landing in, say, the Close its
        // driver sends and never reads the answer of would leave its block
        // aborted with no error seen (then 25P02). Not cancelled, it finds
        // the mark at its next statement or at PREPARE (40001).
        Verdict::CancelHolder => doom(proc, top, peer, waits_for_lock || (applying.is_none() && wait_class != 0)),
        v => {
            if let (Some(gid), Holder::Prepared { age }) = (prepared_gid, holder) {
                settle_prepared(v, me, peer, &gid, age.home);
            }
        }
    }
    true
}

/// Carries out a verdict on a prepared holder, `gid` (home node `home`),
/// that an apply worker of `peer` waits for: refused in the vote table
/// its coordinator here waits on, or this node's yes withdrawn by a no to
/// its home node.
fn settle_prepared(v: Verdict, me: i32, peer: i32, gid: &str, home: i32) {
    match v {
        Verdict::RefuseHolder => crate::votes::refuse_own(gid, me, &refusal(peer, me)),
        Verdict::WithdrawVote => {
            let message = format!("withdraws its vote: an older conflicting transaction from node {peer} waits for its locks on node {me}");
            // The launcher's main thread, outside a transaction.
            crate::votes::send(home, gid, Some(("40001".into(), message)));
        }
        Verdict::Wait | Verdict::CancelHolder => {}
    }
}

/// A transaction a client prepared here under its own gid (its own
/// two-phase commit, through the proxy, which waits for the votes like
/// for its own gids): the gid, this node as its home, its prepare time.
/// Read from `pg_prepared_xacts` (the shared tables hold the cluster's
/// gids and the peers' prepares only); from the launcher, outside a
/// transaction.
fn client_prepare_by_xid(me: i32, xid: u32) -> Option<(String, i32, i64)> {
    pgrx::bgworkers::BackgroundWorker::transaction(|| {
        Spi::connect(|c| {
            let sql = format!("SELECT gid, {} FROM pg_prepared_xacts WHERE transaction = $1::text::xid", crate::PREPARED_MICROS);
            let row = c.select(sql.as_str(), None, &[(xid as i64).to_string().into()]).ok()?.first();
            let gid = row.get::<String>(1).ok()??;
            let time = row.get::<i64>(2).ok()??;
            (!gid.starts_with("mtm-")).then_some((gid, me, time))
        })
    })
}

fn refusal(peer: i32, me: i32) -> String {
    format!("yields to an older conflicting transaction from node {peer} that waits for its locks on node {me}")
}

/// Settles the waits of the apply workers `waiters` for table and object
/// locks (a schema change that conflicts with one from another node) held
/// by a prepared transaction, by the same rule as row waits — a younger one
/// prepared here by its client is refused, a younger one prepared for
/// another home node loses this node's yes — except that a schema change
/// goes before data changes of its table ([`table_verdict`]). A prepared transaction's locks have no pid; they share the
/// virtualtransaction of the lock on its own transaction id. pg_locks is
/// read once. (A wait for a tuple lock — behind a session first in the
/// queue for a row — is left alone: settling those too was measured to
/// abort more transactions than it saved.)
fn settle_by_pg_locks(me: i32, waiters: &[i32]) {
    // (pg_locks has no column `prepared`: PREPARED_MICROS reads p's.)
    let sql = format!(
        "WITH l AS MATERIALIZED (SELECT * FROM pg_locks)
             SELECT w.pid, p.gid, {}, x.transactionid::text::bigint,
                    w.locktype = 'relation' AND w.mode IS NOT NULL, w.mode, string_agg(h.mode, ',')
               FROM l w
               JOIN l h ON h.granted AND h.pid IS NULL AND h.locktype = w.locktype
                       AND h.database IS NOT DISTINCT FROM w.database AND h.relation IS NOT DISTINCT FROM w.relation
                       AND h.classid IS NOT DISTINCT FROM w.classid AND h.objid IS NOT DISTINCT FROM w.objid
                       AND h.objsubid IS NOT DISTINCT FROM w.objsubid
               JOIN l x ON x.pid IS NULL AND x.locktype = 'transactionid' AND x.granted AND x.virtualtransaction = h.virtualtransaction
               JOIN pg_prepared_xacts p ON p.transaction = x.transactionid
              WHERE NOT w.granted AND w.pid = ANY($1) AND w.locktype IN ('relation', 'object')
              GROUP BY w.pid, w.locktype, w.mode, p.gid, p.prepared, x.transactionid",
        crate::PREPARED_MICROS
    );
    type Row = (i32, String, i64, i64, (TableLock, TableLock));
    let rows: Vec<Row> = Spi::connect(|c| {
        c.select(sql.as_str(), None, &[waiters.to_vec().into()])
            .map(|rows| {
                rows.filter_map(|r| {
                    // A table's lock modes say which side changes its
                    // schema; other objects' locks go by age alone.
                    let locks = match r.get::<bool>(5).ok()? {
                        Some(true) => (TableLock::of_mode(&r.get::<String>(6).ok()??), TableLock::of_modes(&r.get::<String>(7).ok()??)),
                        _ => (TableLock::Data, TableLock::Data),
                    };
                    Some((r.get::<i32>(1).ok()??, r.get::<String>(2).ok()??, r.get::<i64>(3).ok()??, r.get::<i64>(4).ok()??, locks))
                })
                .collect()
            })
            .unwrap_or_default()
    });
    for (waiter_pid, gid, prepared_here_at, xid, (waiter_lock, holder_lock)) in rows {
        let Some((peer, time)) = crate::pool::applying(waiter_pid) else { continue };
        let Some(home) = home_of(&gid) else { continue };
        // Its age is its home node's prepare time: this node's own for its
        // sessions' gids; for a peer's, the one its stream carried (the
        // time it was applied here is later, and would make it look
        // younger than it is).
        let prepared_at = if home == me {
            prepared_here_at
        } else {
            match crate::votes::applied_prepare_by_xid(xid as u32) {
                Some((_, _, t)) => t,
                None => continue,
            }
        };
        let holder = Holder::Prepared { age: Age { time: prepared_at, home } };
        settle_prepared(table_verdict(me, Age { time, home: peer }, waiter_lock, holder, holder_lock), me, peer, &gid, home);
    }
}

/// The home node of one of the cluster's gids (`mtm-<node>-…`).
fn home_of(gid: &str) -> Option<i32> {
    gid.strip_prefix("mtm-")?.split('-').next()?.parse().ok()
}

/// Marks transaction `xid` of the process `proc` to give way to node
/// `by`'s, and with `cancel` cancels what it runs (a process not
/// cancelled finds the mark itself: an apply worker before its PREPARE, a
/// session at its next statement).
fn doom(proc: Proc, xid: u32, by: i32, cancel: bool) {
    let (procno, pid) = (proc.procno() as usize, proc.pid());
    if procno >= PROCS || xid == 0 || pid == 0 {
        return;
    }
    let d = DOOMED.get();
    d.by[procno].store(by, Release);
    // Marked already (another waiter, or an earlier look): signalled then.
    // A second cancel could land after the first one's error, in the
    // client's ROLLBACK, and leave its block aborted.
    if d.xid[procno].swap(xid, AcqRel) == xid {
        return;
    }
    if cancel {
        // What pg_cancel_backend sends: the statement ends with 57014,
        // which the marked process reports as 40001.
        crate::pg::proc::cancel(pid);
    } else {
        // An apply worker waiting for its commit turn wakes and finds the
        // mark.
        proc.set_latch();
    }
}

/// The node this process's current transaction must give way to, if it
/// was marked.
pub fn doomed_by() -> Option<i32> {
    let procno = crate::pg::proc::my_procno()? as usize;
    let xid = crate::pg::twophase::top_xid_if_any().into_inner();
    if procno >= PROCS || xid == 0 {
        return None;
    }
    let d = DOOMED.get();
    (d.xid[procno].load(Acquire) == xid).then(|| d.by[procno].load(Acquire))
}

/// The message a transaction that gives way ends with.
pub fn message(by: i32) -> String {
    let me = crate::votes::MY_NODE.get().load(Relaxed);
    format!("could not serialize access: this transaction gives way to a conflicting one from node {by}, prepared first, that waits for its locks on node {me}")
}

/// A local session's transaction that was marked fails here, with 40001,
/// before it does more work (each statement, and PREPARE).
pub fn check_current() {
    if let Some(by) = doomed_by() {
        crate::raise(PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE, message(by), "Retry the transaction.", "check_current");
    }
}

/// The cancel of a marked transaction's lock wait reaches its client as
/// what it is: a serialization failure (from `pg/elog.rs`'s
/// `emit_log_hook`, after the previous hook).
pub(crate) fn rewrite_error(error: &mut ReportedError<'_>) {
    let canceled = crate::votes::sqlstate_code("57014");
    if error.elevel() >= pg_sys::PGERROR as i32 && error.sqlerrcode() == canceled {
        if let Some(by) = doomed_by() {
            error.set_sqlerrcode(crate::votes::sqlstate_code("40001"));
            // In the error's own memory context, which the hook runs in.
            let text = std::ffi::CString::new(message(by)).expect("no NUL");
            error.set_message(&text);
            error.set_hint(c"Retry the transaction.");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_home_node_of_a_gid() {
        assert_eq!(super::home_of("mtm-2-660e9065-1f-3-0"), Some(2));
        assert_eq!(super::home_of("client-gid"), None);
    }
}

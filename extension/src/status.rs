//! What this node reports about replication, for `mtm.stat_bgwpool`,
//! `mtm.nodes()` and `mtm.status()` (`sql/mtm_api.sql` builds those on
//! the functions here): the apply pools' counters ([`crate::pool`]) and
//! the last apply error per peer, kept in shared memory so any backend
//! can read them and a restarting receiver does not lose them.
#![deny(unsafe_code)]

use crate::pool::{self, MAX_NODES, QUEUE_SIZE};
use pgrx::prelude::*;

const MESSAGE_MAX: usize = 1024;

#[derive(Copy, Clone)]
pub struct ErrorSlot {
    count: u64,
    /// TimestampTz of the last error.
    at: i64,
    sqlstate: [u8; 5],
    message: [u8; MESSAGE_MAX],
    message_len: u16,
}

#[derive(Copy, Clone)]
pub struct ApplyErrors {
    /// Indexed by peer node id.
    slots: [ErrorSlot; MAX_NODES + 1],
}

impl Default for ApplyErrors {
    fn default() -> Self {
        let empty = ErrorSlot { count: 0, at: 0, sqlstate: [0; 5], message: [0; MESSAGE_MAX], message_len: 0 };
        ApplyErrors { slots: [empty; MAX_NODES + 1] }
    }
}


pub use crate::pg::shmem::APPLY_ERRORS;

/// A transaction from `peer` failed to apply (it will be retried).
pub fn record_apply_error(peer: i32, sqlstate: &str, message: &str) {
    let Some(i) = usize::try_from(peer).ok().filter(|&i| (1..=MAX_NODES).contains(&i)) else { return };
    let mut cut = message.len().min(MESSAGE_MAX);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut t = APPLY_ERRORS.exclusive();
    let s = &mut t.slots[i];
    s.count += 1;
    s.at = crate::pg::latch::now();
    s.sqlstate = [b'X', b'X', b'0', b'0', b'0'];
    if let Ok(code) = <[u8; 5]>::try_from(sqlstate.as_bytes()) {
        s.sqlstate = code;
    }
    s.message[..cut].copy_from_slice(&message.as_bytes()[..cut]);
    s.message_len = cut as u16;
}

/// Apply errors per peer since the server started: how many, and the
/// last one ("SQLSTATE: message") with its time.
#[pg_extern]
fn apply_errors() -> TableIterator<
    'static,
    (name!(node_id, i32), name!(errors, i64), name!(last_error, Option<String>), name!(last_error_at, Option<pgrx::datum::TimestampWithTimeZone>)),
> {
    let t = APPLY_ERRORS.share();
    let rows: Vec<_> = (1..=MAX_NODES)
        .filter(|&i| t.slots[i].count > 0)
        .map(|i| {
            let s = &t.slots[i];
            let text = format!("{}: {}", String::from_utf8_lossy(&s.sqlstate), String::from_utf8_lossy(&s.message[..s.message_len as usize]));
            let at = pgrx::datum::TimestampWithTimeZone::try_from(s.at).ok();
            (i as i32, s.count as i64, Some(text), at)
        })
        .collect();
    TableIterator::new(rows)
}

/// One row per peer whose receiver runs an apply pool: workers, how many
/// are applying, transactions handed out and not yet committed, queue
/// bytes, the committed (head) and handed-out (tail) transaction numbers.
#[pg_extern]
fn pool_stats() -> TableIterator<
    'static,
    (
        name!(nworkers, i32),
        name!(active, i32),
        name!(pending, i32),
        name!(size, i32),
        name!(head, i32),
        name!(tail, i32),
        name!(receivername, String),
    ),
> {
    let rows: Vec<_> = running_pools()
        .map(|(id, p)| {
            let n = p.workers() as i32;
            // (Counters are u64; the reference columns are int.)
            let head = p.committed.load(std::sync::atomic::Ordering::Acquire) as i32;
            let tail = p.dispatched.load(std::sync::atomic::Ordering::Acquire) as i32;
            (n, p.active() as i32, p.pending().min(i32::MAX as u64) as i32, n * QUEUE_SIZE as i32, head, tail, format!("mtm_receiver_from_{id}"))
        })
        .collect();
    TableIterator::new(rows)
}

/// One row per peer whose receiver runs an apply pool: since the pool
/// started, how many COMMIT/ROLLBACK PREPAREDs the receiver ran at once,
/// out of the pool's commit order (their PREPARE was applied), and how
/// many prepared transactions were dropped unapplied because their home
/// node had rolled them back already. Under contention on a few rows both
/// keep the pool from falling behind (`extension/src/apply.rs`). The
/// third count: of the first, the commits run as soon as this node
/// promised to commit (its promise and the home node's were a majority),
/// before the home node's COMMIT PREPARED arrived.
#[pg_extern]
fn apply_shortcuts() -> TableIterator<
    'static,
    (name!(node_id, i32), name!(finished_out_of_order, i64), name!(dropped_before_prepare, i64), name!(committed_on_promise, i64)),
> {
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed).min(i64::MAX as u64) as i64;
    let rows: Vec<_> = running_pools()
        .map(|(id, p)| (id, load(&p.finished_out_of_order), load(&p.dropped_before_prepare), load(&p.committed_on_promise)))
        .collect();
    TableIterator::new(rows)
}

/// The peers whose receiver runs (and so has a pool), with their pools.
fn running_pools() -> impl Iterator<Item = (i32, &'static pool::PeerPool)> {
    (1..=MAX_NODES as i32).map(|id| (id, pool::peer(id))).filter(|(_, p)| {
        let pid = p.receiver_pid.load(std::sync::atomic::Ordering::Acquire);
        pid > 0 && crate::pid_alive(pid)
    })
}

/// Apply workers running for `peer` (0 when its receiver is not running).
#[pg_extern]
fn pool_workers(node_id: i32) -> i32 {
    if !(1..=MAX_NODES as i32).contains(&node_id) {
        return 0;
    }
    let p = pool::peer(node_id);
    p.worker_pid[..p.workers()].iter().filter(|pid| {
        let pid = pid.load(std::sync::atomic::Ordering::Acquire);
        pid > 0 && crate::pid_alive(pid)
    }).count() as i32
}

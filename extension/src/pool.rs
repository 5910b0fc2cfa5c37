//! The apply pool of one peer: `multimaster.max_workers` dynamic workers
//! ([`crate::worker`]) that apply the peer's transactions side by side
//! and commit them one at a time in the peer's commit order.
//!
//! Why commit in order: each commit records the peer's end LSN in the
//! replication origin `mtm_node_<peer>`, and a restart streams from the
//! origin's position. If a later transaction could commit first, a crash
//! in between would skip the earlier one. So the workers take turns
//! (transaction numbers 1, 2, … handed out by the receiver; the
//! committed watermark and a condition variable live in [`PeerPool`]),
//! and the origin — which PostgreSQL 15 lets only one process hold — is
//! taken by the worker whose turn it is and released right after its
//! commit. A commit wakes only the worker whose turn is next (and the
//! receiver, when it waits for commits): on a small machine a wakeup
//! per waiter per commit costs more than the apply itself. Which
//! transactions may run side by side is decided by the receiver with
//! `mtm-schedule`.
//!
//! Shared state is split in two: [`PeerPool`], in the server's shared
//! memory (one per possible peer, readable by `mtm.stat_bgwpool` from any
//! backend, and surviving a receiver restart), and the message queues,
//! one `shm_mq` per worker in a dynamic shared memory segment the
//! receiver creates ([`Queues`]). A pool is identified by its `epoch`;
//! any member that exits (error, crash, shutdown) marks its epoch
//! aborted, the others stop, and the launcher starts the receiver again,
//! which resumes from the origin.
//!
//! Queue messages: a transaction is `#` + its number (u64, big-endian),
//! then the peer's protocol messages unchanged (`PROTOCOL.md`);
//! Relation messages are sent to every worker as they arrive; an empty
//! message only flushes. Writes are made visible (which sets the worker's
//! latch) only when the worker is hungry — it found its queue empty — or
//! the receiver is about to wait, or a quarter of the queue is pending:
//! a worker that waits for its commit turn is not woken by every
//! transaction queued behind it.
#![deny(unsafe_code)]

use crate::pg::bgworker::my_pid;
use crate::pg::proc::ProcSlot;
use crate::pg::dsm::{MqReceiver, MqSender, Segment};
use crate::pg::latch::LatchSlot;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker};
use pgrx::prelude::*;
use pgrx::pg_sys;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering::*};

/// Node ids are 1..=16 (`mtm.init_cluster`).
pub const MAX_NODES: usize = 16;
/// Upper bound of `multimaster.max_workers`.
pub const MAX_WORKERS: usize = 16;
/// Bytes of each worker's queue.
pub const QUEUE_SIZE: usize = 2 * 1024 * 1024;
/// Tag of the queue message that starts a transaction.
pub const SEQ_TAG: u8 = b'#';

/// One peer's pool, in the server's shared memory.
#[repr(C)]
pub struct PeerPool {
    /// Bumped by each new receiver; members of older pools stop.
    pub epoch: AtomicU64,
    pub aborted: AtomicBool,
    /// Every transaction up to this number is committed here.
    pub committed: AtomicU64,
    /// The last number the receiver handed out.
    pub dispatched: AtomicU64,
    /// The peer's end LSN of the last committed transaction, and our WAL
    /// insert position just after it (what must be flushed before the
    /// peer may be told). Written local first, read remote first.
    pub last_remote: AtomicU64,
    pub last_local: AtomicU64,
    /// The receiver's latch (PGPROC lives in shared memory at the same
    /// address in every backend), 0 when none.
    pub receiver_latch: LatchSlot,
    /// The receiver waits for a commit.
    pub receiver_waiting: AtomicBool,
    pub receiver_pid: AtomicI32,
    pub n_workers: AtomicU32,
    pub worker_pid: [AtomicI32; MAX_WORKERS],
    pub worker_busy: [AtomicBool; MAX_WORKERS],
    /// Each worker's PGPROC number (-1: none), for reading its wait state
    /// and for waking it (its latch is the one in that PGPROC).
    pub worker_procno: [ProcSlot; MAX_WORKERS],
    /// The transaction number whose turn a worker waits for, 0 if none.
    pub worker_waits_for: [AtomicU64; MAX_WORKERS],
    /// The transaction number a worker applies (or last applied).
    pub worker_seq: [AtomicU64; MAX_WORKERS],
    /// A worker found its queue empty and sleeps until data is flushed.
    pub worker_hungry: [AtomicBool; MAX_WORKERS],
    /// The peer's prepare (or commit) time of the transaction a worker is
    /// applying, 0 when none: a conflicting transaction prepared here that
    /// is younger yields to it (`mtm.await_votes`).
    pub worker_txn_time: [AtomicI64; MAX_WORKERS],
    /// After a failure, apply one transaction at a time up to this peer
    /// LSN (what was received when the pool failed), so a failure caused
    /// by running side by side cannot repeat.
    pub serial_until: AtomicU64,
    /// Numbers of prepared transactions whose home node rolled them back
    /// before they were prepared here (slot `seq % ABANDONED`; a number
    /// overwritten before its worker looks is simply applied).
    pub abandoned: [AtomicU64; ABANDONED],
    /// Since the pool started: COMMIT/ROLLBACK PREPAREDs the receiver ran
    /// out of commit order, and abandoned transactions dropped.
    pub finished_out_of_order: AtomicU64,
    pub dropped_before_prepare: AtomicU64,
    /// Of the COMMIT PREPAREDs run out of order, those run as this node
    /// promised to commit (`Receiver::commit_on_promise`), before the
    /// home node's came.
    pub committed_on_promise: AtomicU64,
    /// The ids of the replication origins `mtm_node_<peer>` and
    /// `mtm_finish_<peer>`, 0 until the receiver from the peer starts:
    /// this node's walsenders tell the peer's transactions applied here by
    /// them ([`peer_of_origin`]).
    pub origins: [AtomicU32; 2],
    /// When the receiver from this peer last heard from it, or first
    /// tried to reach it (µs since 2000, 0: no receiver yet), for the
    /// resolver, which asks only peers that answer (a frozen node would
    /// hold its connection attempt forever), and for commits, which stop
    /// waiting for a peer silent too long.
    pub heard_at: AtomicI64,
    /// The receiver is handling what it read, not listening: while it
    /// is, its silence says nothing about the peer.
    pub receiver_busy: AtomicBool,
}

/// How many abandoned transaction numbers a pool remembers.
const ABANDONED: usize = 256;

impl PeerPool {
    /// Transaction `seq`, a prepared one, was rolled back at its home:
    /// its worker need not apply it (from the receiver).
    pub fn abandon(&self, seq: u64) {
        self.abandoned[seq as usize % ABANDONED].store(seq, Release);
    }

    /// Whether transaction `seq` was abandoned.
    pub fn is_abandoned(&self, seq: u64) -> bool {
        seq != 0 && self.abandoned[seq as usize % ABANDONED].load(Acquire) == seq
    }
}

pub struct PoolTable {
    /// Indexed by peer node id (0 unused).
    peers: [PeerPool; MAX_NODES + 1],
}

impl Default for PoolTable {
    fn default() -> Self {
        PoolTable {
            peers: std::array::from_fn(|_| PeerPool {
                epoch: AtomicU64::new(0),
                aborted: AtomicBool::new(true),
                committed: AtomicU64::new(0),
                dispatched: AtomicU64::new(0),
                last_remote: AtomicU64::new(0),
                last_local: AtomicU64::new(0),
                receiver_latch: LatchSlot::new(),
                receiver_waiting: AtomicBool::new(false),
                receiver_pid: AtomicI32::new(0),
                n_workers: AtomicU32::new(0),
                worker_pid: std::array::from_fn(|_| AtomicI32::new(0)),
                worker_busy: std::array::from_fn(|_| AtomicBool::new(false)),
                worker_procno: std::array::from_fn(|_| ProcSlot::new()),
                worker_waits_for: std::array::from_fn(|_| AtomicU64::new(0)),
                worker_seq: std::array::from_fn(|_| AtomicU64::new(0)),
                worker_hungry: std::array::from_fn(|_| AtomicBool::new(false)),
                worker_txn_time: std::array::from_fn(|_| AtomicI64::new(0)),
                serial_until: AtomicU64::new(0),
                abandoned: std::array::from_fn(|_| AtomicU64::new(0)),
                finished_out_of_order: AtomicU64::new(0),
                committed_on_promise: AtomicU64::new(0),
                dropped_before_prepare: AtomicU64::new(0),
                origins: std::array::from_fn(|_| AtomicU32::new(0)),
                heard_at: AtomicI64::new(0),
                receiver_busy: AtomicBool::new(false),
            }),
        }
    }
}


pub use crate::pg::shmem::POOLS;

/// The replication origin `mtm_node_<peer>` (created by mtm.init_cluster).
/// Outside a transaction, in a backend connected to the database.
pub fn origin_of(peer: i32) -> pg_sys::RepOriginId {
    let name = std::ffi::CString::new(format!("mtm_node_{peer}")).expect("no NUL");
    crate::pg::origin::origin_by_name(&name)
}

/// The replication origin `mtm_finish_<peer>`: the receiver from `peer`
/// commits the COMMIT/ROLLBACK PREPARED it runs out of the pool's order
/// under it (see `mtm_schedule::Finish`), so that this node's walsenders
/// do not send them on and the peer's own origin moves only in commit
/// order. `mtm.init_cluster` creates it; created here on a cluster made
/// before it existed. From a background worker, outside a transaction.
pub fn finish_origin_of(peer: i32) -> pg_sys::RepOriginId {
    let name = format!("mtm_finish_{peer}");
    BackgroundWorker::transaction(|| {
        Spi::run_with_args(
            "SELECT pg_replication_origin_create($1) WHERE NOT EXISTS (SELECT FROM pg_replication_origin WHERE roname = $1)",
            &[name.as_str().into()],
        )
    })
    .unwrap_or_else(|e| error!("multimaster: cannot create the replication origin {name}: {e}"));
    crate::pg::origin::origin_by_name(&std::ffi::CString::new(name).expect("no NUL"))
}

/// How long a peer may stay silent and still count as reachable: a live
/// peer answers its receiver's requests for a reply about once a second,
/// so three missed answers mean it is down, frozen or cut off.
pub const REACHABLE_WITHIN_MS: i64 = 3000;

/// Whether the receiver from `peer` heard from it in the last `ms`
/// milliseconds.
pub fn heard_within(peer: i32, ms: i64) -> bool {
    silent_for_ms(peer).is_some_and(|silent| silent < ms)
}

/// For how many milliseconds the receiver from `peer` has heard nothing
/// from it (counted from its first attempt to reach it); None before any
/// receiver from it started.
pub fn silent_for_ms(peer: i32) -> Option<i64> {
    let at = try_peer(peer).map_or(0, |pool| pool.heard_at.load(Relaxed));
    (at != 0).then(|| (crate::pg::latch::now() - at) / 1000)
}

/// The first of `peers` that counts as unreachable
/// ([`unreachable_for_ms`]), and for how long, if any. Reads shared
/// memory only (no catalog), so it can run where SPI cannot.
pub fn first_unreachable(peers: impl IntoIterator<Item = i32>) -> Option<(i32, i64)> {
    peers.into_iter().find_map(|p| unreachable_for_ms(p).map(|ms| (p, ms)))
}

/// Whether `peer` counts as unreachable: its receiver, listening (or
/// not connected), has heard nothing from it for
/// [`REACHABLE_WITHIN_MS`] or more. How long, in milliseconds, if so. A
/// receiver busy with what it read (a big transaction handed to a full
/// pool) does not listen, so its silence proves nothing.
pub fn unreachable_for_ms(peer: i32) -> Option<i64> {
    if try_peer(peer).is_some_and(|pool| pool.receiver_busy.load(Relaxed)) {
        return None;
    }
    silent_for_ms(peer).filter(|&ms| ms >= REACHABLE_WITHIN_MS)
}

/// Whether the receiver from `peer` has published its origins (it does
/// before it applies anything).
pub fn origins_published(peer: i32) -> bool {
    try_peer(peer).is_some_and(|pool| pool.origins.iter().all(|o| o.load(Acquire) != 0))
}

/// The peer whose transactions this node applies (or finishes) under
/// replication origin `origin`, if a receiver from it has published it.
pub fn peer_of_origin(origin: pg_sys::RepOriginId) -> Option<i32> {
    let origin = u32::from(origin);
    if origin == 0 {
        return None;
    }
    let table = POOLS.get();
    (1..=MAX_NODES).find(|&p| table.peers[p].origins.iter().any(|o| o.load(Acquire) == origin)).map(|p| p as i32)
}

/// The peer and the transaction time of the apply worker `pid`, if it is
/// one and is applying a transaction.
pub fn applying(pid: i32) -> Option<(i32, i64)> {
    let table = POOLS.get();
    (1..=MAX_NODES).find_map(|p| {
        let pool = &table.peers[p];
        (0..pool.workers()).find_map(|w| {
            let time = pool.worker_txn_time[w].load(Acquire);
            (pool.worker_pid[w].load(Acquire) == pid && time != 0).then_some((p as i32, time))
        })
    })
}

/// An apply worker that waits for a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockWait {
    pub pid: i32,
    /// The address of the lock in shared memory: a new wait has a new one.
    pub lock: usize,
    /// The transaction id waited for (a row lock), or None (a tuple,
    /// table or object lock).
    pub xid: Option<u32>,
    /// The transaction waiting was rolled back at its home already
    /// ([`PeerPool::abandon`]).
    pub abandoned: bool,
}

/// Apply workers that are applying a transaction and wait for a lock now.
/// Reads each worker's published wait state without a lock: a stale
/// answer only delays, repeats or wastes a look.
pub fn lock_waiters() -> Vec<LockWait> {
    let table = POOLS.get();
    let mut out = Vec::new();
    for pool in &table.peers[1..] {
        if pool.aborted.load(Acquire) {
            continue;
        }
        for w in 0..pool.workers() {
            let Some(proc) = pool.worker_procno[w].get() else { continue };
            if pool.worker_txn_time[w].load(Acquire) == 0 {
                continue;
            }
            let Some(waited) = proc.lock_wait() else { continue };
            let abandoned = pool.is_abandoned(pool.worker_seq[w].load(Acquire));
            out.push(LockWait { pid: pool.worker_pid[w].load(Acquire), lock: waited.lock, xid: waited.xid, abandoned });
        }
    }
    out
}

/// The pool of `peer` (a node id, 1..=16).
pub fn peer(id: i32) -> &'static PeerPool {
    try_peer(id).unwrap_or_else(|| error!("multimaster: node id {id} is outside 1..{MAX_NODES}"))
}

/// The pool of `peer`, None for an id outside 1..=16.
fn try_peer(peer: i32) -> Option<&'static PeerPool> {
    let i = usize::try_from(peer).ok().filter(|&i| (1..=MAX_NODES).contains(&i))?;
    Some(&POOLS.get().peers[i])
}

impl PeerPool {
    /// The receiver from this peer heard from it just now.
    pub fn note_heard(&self) {
        self.heard_at.store(crate::pg::latch::now(), Relaxed);
    }

    /// Whether the pool of `epoch` has stopped (failed, or replaced).
    pub fn stopped(&self, epoch: u64) -> bool {
        self.epoch.load(Acquire) != epoch || self.aborted.load(Acquire)
    }

    /// Workers of the current (or last) pool.
    pub fn workers(&self) -> usize {
        (self.n_workers.load(Acquire) as usize).min(MAX_WORKERS)
    }

    /// Wakes every member: the pool stopped.
    pub fn wake_all(&self) {
        self.worker_procno[..self.workers()].iter().for_each(ProcSlot::set_latch);
        self.receiver_latch.set();
    }

    /// Transaction `seq` committed: wake the worker whose turn is next,
    /// and the receiver if it waits. (Waiters publish what they wait for,
    /// then re-check `committed`; with both sides SeqCst, one of them
    /// sees the other.)
    fn committed_wake(&self, seq: u64) {
        for i in 0..self.workers() {
            if self.worker_waits_for[i].load(SeqCst) == seq + 1 {
                self.worker_procno[i].set_latch();
            }
        }
        if self.receiver_waiting.load(SeqCst) {
            self.receiver_latch.set();
        }
    }

    /// The last committed transaction: (peer end LSN, our WAL position).
    pub fn last_commit(&self) -> (u64, u64) {
        let remote = self.last_remote.load(Acquire);
        (remote, self.last_local.load(Acquire))
    }

    /// Transactions handed out and not yet committed.
    pub fn pending(&self) -> u64 {
        self.dispatched.load(Acquire).saturating_sub(self.committed.load(Acquire))
    }

    pub fn active(&self) -> usize {
        self.worker_busy[..self.workers()].iter().filter(|b| b.load(Relaxed)).count()
    }
}

/// Waits on this process's latch (set by the pool, by shm_mq, or by a
/// signal) for at most `ms`.
pub fn wait_latch(ms: i64) {
    crate::pg::latch::wait(ms);
}

/// Registered with `on_dsm_detach` by every member of a pool
/// ([`Segment::stop_pool_on_detach`]): whoever leaves (error, crash,
/// shutdown) stops the pool of its epoch.
pub fn stop_on_detach(p: i32, epoch: u64) {
    let pool = peer(p);
    if pool.epoch.load(Acquire) == epoch {
        pool.aborted.store(true, Release);
        pool.wake_all();
    }
}

/// The receiver's side: the segment of queues and the workers reading them.
pub struct Queues {
    peer: i32,
    pub epoch: u64,
    handles: Vec<MqSender>,
    workers: Vec<DynamicBackgroundWorker>,
    /// Bytes written but not yet made visible, per worker.
    pending: Vec<bool>,
    /// A flush (empty message) was begun and must be completed before
    /// anything else goes to that worker.
    owed: Vec<bool>,
    /// A message to this worker is half sent (its queue was full).
    mid: Option<usize>,
}

impl Queues {
    /// Starts a new pool of `n` workers for `peer`, after the previous
    /// pool's workers have gone (they may hold the origin).
    pub fn start(p: i32, n: usize) -> Queues {
        let pool = peer(p);
        pool.aborted.store(true, Release);
        pool.wake_all();
        let old: Vec<i32> = pool.worker_pid.iter().map(|a| a.swap(0, AcqRel)).filter(|&pid| pid > 0).collect();
        let since = std::time::Instant::now();
        while old.iter().any(|&pid| crate::pid_alive(pid)) {
            if since.elapsed() > std::time::Duration::from_secs(30) {
                error!("multimaster: apply workers {old:?} of node {p} did not stop within 30 s");
            }
            crate::pg::latch::sleep(20_000);
            crate::pg::latch::check_for_interrupts();
        }
        let n = n.clamp(1, MAX_WORKERS);
        let epoch = pool.epoch.load(Acquire) + 1;
        pool.committed.store(0, Release);
        pool.dispatched.store(0, Release);
        pool.last_remote.store(0, Release);
        pool.last_local.store(0, Release);
        pool.n_workers.store(n as u32, Release);
        pool.worker_busy.iter().for_each(|b| b.store(false, Release));
        pool.worker_waits_for.iter().for_each(|w| w.store(0, Release));
        pool.worker_seq.iter().for_each(|w| w.store(0, Release));
        pool.worker_hungry.iter().for_each(|h| h.store(false, Release));
        pool.worker_procno.iter().for_each(|n| n.clear());
        // Numbers start again at 1 with each receiver.
        pool.abandoned.iter().for_each(|a| a.store(0, Release));
        pool.finished_out_of_order.store(0, Release);
        pool.committed_on_promise.store(0, Release);
        pool.dropped_before_prepare.store(0, Release);
        pool.receiver_busy.store(false, Release);
        // Silence counts from the first attempt to reach the peer: one
        // that never answers since this server started is unreachable too.
        let _ = pool.heard_at.compare_exchange(0, crate::pg::latch::now(), AcqRel, Relaxed);
        pool.receiver_waiting.store(false, Release);
        pool.receiver_latch.publish_mine();
        pool.receiver_pid.store(my_pid(), Release);
        pool.epoch.store(epoch, Release);
        pool.aborted.store(false, Release);

        // The queues are created before any worker can attach.
        let seg = Segment::create(n * QUEUE_SIZE);
        seg.stop_pool_on_detach(p, epoch);
        let handles = seg.create_queues(n, QUEUE_SIZE);
        let handle = seg.handle();
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let w = BackgroundWorkerBuilder::new(&format!("multimaster apply worker {i} for node {p}"))
                .set_type("multimaster apply worker")
                .set_library("multimaster")
                .set_function("mtm_apply_worker_main")
                .set_argument(Some(pg_sys::Datum::from(handle as usize)))
                .set_extra(&format!("{p} {i} {epoch}"))
                .enable_spi_access()
                .set_notify_pid(my_pid())
                .load_dynamic()
                .unwrap_or_else(|_| {
                    error!("multimaster: cannot start apply workers for node {p}: raise max_worker_processes (it needs one per peer for the receiver plus multimaster.max_workers per peer)")
                });
            match w.wait_for_startup() {
                Ok(pid) => pool.worker_pid[i].store(pid, Release),
                Err(e) => error!("multimaster: apply worker {i} for node {p} did not start: {e:?}"),
            }
            workers.push(w);
        }
        Queues { peer: p, epoch, handles, workers, pending: vec![false; n], owed: vec![false; n], mid: None }
    }

    pub fn pool(&self) -> &'static PeerPool {
        peer(self.peer)
    }

    pub fn workers(&self) -> usize {
        self.handles.len()
    }

    fn raw_send(&self, worker: usize, bytes: &[u8], flush: bool) -> pg_sys::shm_mq_result::Type {
        self.handles[worker].send(bytes, flush)
    }

    /// Tries to queue one message for `worker`. `Ok(false)`: the queue is
    /// full (so what it holds is visible), call again later with the same
    /// bytes (shm_mq keeps what it took). `end` (of a transaction) makes
    /// it visible at once if the worker is hungry.
    pub fn try_send(&mut self, worker: usize, bytes: &[u8], end: bool) -> Result<bool, String> {
        use pg_sys::shm_mq_result::*;
        let gone = || format!("apply worker {worker} for node {} has gone", self.peer);
        if self.owed[worker] {
            match self.raw_send(worker, &[], true) {
                SHM_MQ_SUCCESS => self.owed[worker] = false,
                SHM_MQ_WOULD_BLOCK => return Ok(false),
                _ => return Err(gone()),
            }
        }
        let flush = end && self.pool().worker_hungry[worker].load(SeqCst);
        match self.raw_send(worker, bytes, flush) {
            SHM_MQ_SUCCESS => {
                self.pending[worker] = !flush;
                self.mid = None;
                Ok(true)
            }
            SHM_MQ_WOULD_BLOCK => {
                self.pending[worker] = false;
                self.mid = Some(worker);
                Ok(false)
            }
            _ => Err(gone()),
        }
    }

    /// Makes pending writes visible: to hungry workers only, or to all
    /// (before the receiver waits).
    pub fn flush(&mut self, only_hungry: bool) {
        for w in 0..self.handles.len() {
            if !self.pending[w] || self.owed[w] || self.mid == Some(w) {
                continue;
            }
            if only_hungry && !self.pool().worker_hungry[w].load(SeqCst) {
                continue;
            }
            self.pending[w] = false;
            // (A detached worker stops the pool; check_pool sees that.)
            if self.raw_send(w, &[], true) == pg_sys::shm_mq_result::SHM_MQ_WOULD_BLOCK {
                self.owed[w] = true;
            }
        }
    }

    /// A worker that has exited, if any (it also stops the pool, but one
    /// that died before attaching cannot).
    pub fn dead_worker(&self) -> Option<usize> {
        self.workers.iter().position(|w| matches!(w.pid(), Err(BackgroundWorkerStatus::Stopped | BackgroundWorkerStatus::PostmasterDied)))
    }
}

/// A worker's side of taking turns.
pub struct Turn {
    peer: i32,
    epoch: u64,
    slot: usize,
    origin: pg_sys::RepOriginId,
}

impl Turn {
    /// Joins the pool of `epoch` through the segment `handle`: returns the
    /// queue to read, or None if that pool is already gone. From a
    /// worker's main thread, connected to the database, once.
    pub fn join(p: i32, slot: usize, epoch: u64, handle: u32, origin: pg_sys::RepOriginId) -> Option<(Turn, MqReceiver)> {
        let pool = peer(p);
        if pool.stopped(epoch) || slot >= MAX_WORKERS {
            return None;
        }
        let seg = Segment::attach(handle)?;
        seg.stop_pool_on_detach(p, epoch);
        pool.worker_pid[slot].store(my_pid(), Release);
        pool.worker_procno[slot].publish_mine();
        let mqh = seg.receive_queue(slot, QUEUE_SIZE);
        Some((Turn { peer: p, epoch, slot, origin }, mqh))
    }

    pub fn pool(&self) -> &'static PeerPool {
        peer(self.peer)
    }

    /// The peer's replication origin.
    pub fn origin(&self) -> pg_sys::RepOriginId {
        self.origin
    }

    pub fn stopped(&self) -> bool {
        self.pool().stopped(self.epoch)
    }

    /// This worker found its queue empty (and will sleep), or got data.
    pub fn hungry(&self, hungry: bool) {
        self.pool().worker_hungry[self.slot].store(hungry, SeqCst);
    }

    /// The transaction this worker applies was prepared (or committed) on
    /// the peer at `time` (0: none).
    pub fn applying(&self, time: i64) {
        self.pool().worker_txn_time[self.slot].store(time, Release);
    }

    /// This worker starts applying transaction `seq`.
    pub fn started(&self, seq: u64) {
        self.pool().worker_seq[self.slot].store(seq, Release);
    }

    /// A transaction was handed to this worker.
    pub fn busy(&self, busy: bool) {
        self.pool().worker_busy[self.slot].store(busy, Release);
    }

    /// Waits until transaction `seq` may commit, then takes the origin so
    /// the commit records the peer's LSN. Outside a commit; pair with
    /// [`Turn::done`] after the commit.
    pub fn wait(&self, seq: u64) {
        self.wait_unless(seq, || false);
    }

    /// Like [`Turn::wait`], but gives up without taking the turn as soon as
    /// `give_up` says so (checked whenever the worker wakes): false then.
    /// After a false, call it again for the same `seq`.
    pub fn wait_unless(&self, seq: u64, give_up: impl Fn() -> bool) -> bool {
        // Holding the origin means holding the turn (taken together
        // below, given up together in `done`): a second wait for the same
        // transaction (its serial retry) has it.
        if crate::pg::origin::origin_taken() {
            return true;
        }
        let pool = self.pool();
        pool.worker_waits_for[self.slot].store(seq, SeqCst);
        loop {
            if self.stopped() || pgrx::bgworkers::BackgroundWorker::sigterm_received() {
                error!("multimaster: the apply pool for node {} stopped", self.peer);
            }
            let c = pool.committed.load(SeqCst);
            if c + 1 == seq {
                break;
            }
            if c >= seq {
                error!("multimaster: transaction {seq} from node {} is already committed ({c})", self.peer);
            }
            if give_up() {
                return false;
            }
            wait_latch(1000);
        }
        pool.worker_waits_for[self.slot].store(0, Release);
        crate::pg::origin::take_origin(self.origin);
        true
    }

    /// Transaction `seq`, ending at the peer's `remote_end`, is committed:
    /// release the origin and pass the turn on. Only after [`Turn::wait`]
    /// for the same `seq`.
    pub fn done(&self, seq: u64, remote_end: u64) {
        crate::pg::origin::release_origin();
        let pool = self.pool();
        // The positions before the watermark: the receiver's flush tracker
        // reads the pending count first and relies on then finding the
        // positions of every commit that count includes.
        pool.last_local.store(crate::pg::rmgr::wal_insert_position(), Release);
        pool.last_remote.store(remote_end, Release);
        pool.committed.store(seq, SeqCst);
        self.busy(false);
        pool.committed_wake(seq);
    }
}

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

use pgrx::bgworkers::{BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker};
use pgrx::prelude::*;
use pgrx::pg_sys;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering::*};

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
    pub receiver_latch: AtomicUsize,
    /// The receiver waits for a commit.
    pub receiver_waiting: AtomicBool,
    pub receiver_pid: AtomicI32,
    pub n_workers: AtomicU32,
    pub worker_pid: [AtomicI32; MAX_WORKERS],
    pub worker_busy: [AtomicBool; MAX_WORKERS],
    pub worker_latch: [AtomicUsize; MAX_WORKERS],
    /// Each worker's PGPROC number (-1: none), for reading its wait state.
    pub worker_procno: [AtomicI32; MAX_WORKERS],
    /// The transaction number whose turn a worker waits for, 0 if none.
    pub worker_waits_for: [AtomicU64; MAX_WORKERS],
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
                receiver_latch: AtomicUsize::new(0),
                receiver_waiting: AtomicBool::new(false),
                receiver_pid: AtomicI32::new(0),
                n_workers: AtomicU32::new(0),
                worker_pid: std::array::from_fn(|_| AtomicI32::new(0)),
                worker_busy: std::array::from_fn(|_| AtomicBool::new(false)),
                worker_latch: std::array::from_fn(|_| AtomicUsize::new(0)),
                worker_procno: std::array::from_fn(|_| AtomicI32::new(-1)),
                worker_waits_for: std::array::from_fn(|_| AtomicU64::new(0)),
                worker_hungry: std::array::from_fn(|_| AtomicBool::new(false)),
                worker_txn_time: std::array::from_fn(|_| AtomicI64::new(0)),
                serial_until: AtomicU64::new(0),
            }),
        }
    }
}


pub use crate::pg::shmem::POOLS;

/// The replication origin `mtm_node_<peer>` (created by mtm.init_cluster).
///
/// # Safety
/// Outside a transaction, in a backend connected to the database.
pub unsafe fn origin_of(peer: i32) -> pg_sys::RepOriginId {
    let name = std::ffi::CString::new(format!("mtm_node_{peer}")).expect("no NUL");
    pg_sys::StartTransactionCommand();
    let origin = pg_sys::replorigin_by_name(name.as_ptr(), false);
    pg_sys::CommitTransactionCommand();
    origin
}

/// The pool of `peer` (a node id, 1..=16).
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
            let procno = pool.worker_procno[w].load(Acquire);
            if procno < 0 || pool.worker_txn_time[w].load(Acquire) == 0 {
                continue;
            }
            // SAFETY: a PGPROC number a live worker published; PGPROCs and
            // the lock table live in shared memory for the server's life
            // (a LOCK that was freed meanwhile reads as some other lock).
            let wait = unsafe {
                let proc = (*pg_sys::ProcGlobal).allProcs.add(procno as usize);
                let event = std::ptr::read_volatile(&(*proc).wait_event_info);
                let lock = std::ptr::read_volatile(&(*proc).waitLock);
                if event & 0xFF00_0000 != pg_sys::PG_WAIT_LOCK || lock.is_null() {
                    continue;
                }
                let tag = std::ptr::read_volatile(&(*lock).tag);
                let xid = (tag.locktag_type as u32 == pg_sys::LockTagType::LOCKTAG_TRANSACTION).then_some(tag.locktag_field1);
                LockWait { pid: pool.worker_pid[w].load(Acquire), lock: lock as usize, xid }
            };
            out.push(wait);
        }
    }
    out
}

pub fn peer(peer: i32) -> &'static PeerPool {
    let i = usize::try_from(peer).ok().filter(|&i| (1..=MAX_NODES).contains(&i));
    let i = i.unwrap_or_else(|| error!("multimaster: node id {peer} is outside 1..{MAX_NODES}"));
    &POOLS.get().peers[i]
}

impl PeerPool {
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
        let latches = self.worker_latch[..self.workers()].iter().chain([&self.receiver_latch]);
        for l in latches {
            set_latch(l.load(Acquire));
        }
    }

    /// Transaction `seq` committed: wake the worker whose turn is next,
    /// and the receiver if it waits. (Waiters publish what they wait for,
    /// then re-check `committed`; with both sides SeqCst, one of them
    /// sees the other.)
    fn committed_wake(&self, seq: u64) {
        for i in 0..self.workers() {
            if self.worker_waits_for[i].load(SeqCst) == seq + 1 {
                set_latch(self.worker_latch[i].load(Acquire));
            }
        }
        if self.receiver_waiting.load(SeqCst) {
            set_latch(self.receiver_latch.load(Acquire));
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

fn set_latch(latch: usize) {
    if latch != 0 {
        // SAFETY: a PGPROC latch in shared memory.
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
}

/// Waits on this process's latch (set by the pool, by shm_mq, or by a
/// signal) for at most `ms`.
pub fn wait_latch(ms: i64) {
    // SAFETY: our own latch, as any backend waits.
    unsafe {
        let rc = pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            ms as _,
            pg_sys::PG_WAIT_EXTENSION,
        );
        if rc & pg_sys::WL_LATCH_SET as i32 != 0 {
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
    }
    pg_sys::check_for_interrupts!();
}

/// Registered with `on_dsm_detach` by every member of a pool: whoever
/// leaves (error, crash, shutdown) stops the pool of its epoch.
#[pg_guard]
unsafe extern "C-unwind" fn stop_on_detach(_seg: *mut pg_sys::dsm_segment, arg: pg_sys::Datum) {
    let v = arg.value() as u64;
    let (p, epoch) = ((v & 0xff) as i32, v >> 8);
    let pool = peer(p);
    if pool.epoch.load(Acquire) == epoch {
        pool.aborted.store(true, Release);
        pool.wake_all();
    }
}

unsafe fn stop_when_detached(seg: *mut pg_sys::dsm_segment, p: i32, epoch: u64) {
    pg_sys::on_dsm_detach(seg, Some(stop_on_detach), pg_sys::Datum::from(((epoch << 8) | p as u64) as usize));
}

/// The receiver's side: the segment of queues and the workers reading them.
pub struct Queues {
    peer: i32,
    pub epoch: u64,
    handles: Vec<*mut pg_sys::shm_mq_handle>,
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
            // SAFETY: a plain sleep in a backend.
            unsafe { pg_sys::pg_usleep(20_000) };
            pg_sys::check_for_interrupts!();
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
        pool.worker_hungry.iter().for_each(|h| h.store(false, Release));
        pool.worker_latch.iter().for_each(|l| l.store(0, Release));
        pool.worker_procno.iter().for_each(|n| n.store(-1, Release));
        pool.receiver_waiting.store(false, Release);
        // SAFETY: MyProc is this backend's PGPROC, in shared memory.
        unsafe {
            pool.receiver_latch.store(&raw mut (*pg_sys::MyProc).procLatch as usize, Release);
            pool.receiver_pid.store(pg_sys::MyProcPid, Release);
        }
        pool.epoch.store(epoch, Release);
        pool.aborted.store(false, Release);

        // SAFETY: DSM and shm_mq set-up from the receiver's main thread;
        // the queues are created before any worker can attach.
        let (seg, handles) = unsafe {
            let seg = pg_sys::dsm_create(n * QUEUE_SIZE, 0);
            pg_sys::dsm_pin_mapping(seg);
            stop_when_detached(seg, p, epoch);
            let base = pg_sys::dsm_segment_address(seg) as *mut u8;
            let outer = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
            let handles = (0..n)
                .map(|i| {
                    let mq = pg_sys::shm_mq_create(base.add(i * QUEUE_SIZE) as *mut _, QUEUE_SIZE);
                    pg_sys::shm_mq_set_sender(mq, pg_sys::MyProc);
                    pg_sys::shm_mq_attach(mq, seg, std::ptr::null_mut())
                })
                .collect::<Vec<_>>();
            pg_sys::MemoryContextSwitchTo(outer);
            (seg, handles)
        };
        // SAFETY: reads the handle of a segment we created.
        let handle = unsafe { pg_sys::dsm_segment_handle(seg) };
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let w = BackgroundWorkerBuilder::new(&format!("multimaster apply worker {i} for node {p}"))
                .set_type("multimaster apply worker")
                .set_library("multimaster")
                .set_function("mtm_apply_worker_main")
                .set_argument(Some(pg_sys::Datum::from(handle as usize)))
                .set_extra(&format!("{p} {i} {epoch}"))
                .enable_spi_access()
                // SAFETY: this backend's pid.
                .set_notify_pid(unsafe { pg_sys::MyProcPid })
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
        // SAFETY: our attached handle; shm_mq copies the bytes.
        unsafe { pg_sys::shm_mq_send(self.handles[worker], bytes.len(), bytes.as_ptr() as *const _, true, flush) }
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
    /// Between a [`Turn::wait`] that took the turn and [`Turn::done`]: a
    /// second wait for the same transaction (its serial retry) has it.
    holding: std::cell::Cell<bool>,
}

impl Turn {
    /// Joins the pool of `epoch` through the segment `handle`: returns the
    /// queue to read, or None if that pool is already gone.
    ///
    /// # Safety
    /// From a worker's main thread, connected to the database, once.
    pub unsafe fn join(p: i32, slot: usize, epoch: u64, handle: u32, origin: pg_sys::RepOriginId) -> Option<(Turn, *mut pg_sys::shm_mq_handle)> {
        let pool = peer(p);
        if pool.stopped(epoch) || slot >= MAX_WORKERS {
            return None;
        }
        let seg = pg_sys::dsm_attach(handle);
        if seg.is_null() {
            return None;
        }
        pg_sys::dsm_pin_mapping(seg);
        stop_when_detached(seg, p, epoch);
        pool.worker_pid[slot].store(pg_sys::MyProcPid, Release);
        pool.worker_latch[slot].store(&raw mut (*pg_sys::MyProc).procLatch as usize, Release);
        pool.worker_procno[slot].store((*pg_sys::MyProc).pgprocno, Release);
        let mq = (pg_sys::dsm_segment_address(seg) as *mut u8).add(slot * QUEUE_SIZE) as *mut pg_sys::shm_mq;
        pg_sys::shm_mq_set_receiver(mq, pg_sys::MyProc);
        let outer = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
        let mqh = pg_sys::shm_mq_attach(mq, seg, std::ptr::null_mut());
        pg_sys::MemoryContextSwitchTo(outer);
        Some((Turn { peer: p, epoch, slot, origin, holding: std::cell::Cell::new(false) }, mqh))
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

    /// A transaction was handed to this worker.
    pub fn busy(&self, busy: bool) {
        self.pool().worker_busy[self.slot].store(busy, Release);
    }

    /// Waits until transaction `seq` may commit, then takes the origin so
    /// the commit records the peer's LSN.
    ///
    /// # Safety
    /// Outside a commit; pair with [`Turn::done`] after the commit.
    pub unsafe fn wait(&self, seq: u64) {
        self.wait_unless(seq, || false);
    }

    /// Like [`Turn::wait`], but gives up without taking the turn as soon as
    /// `give_up` says so (checked whenever the worker wakes): false then.
    ///
    /// # Safety
    /// As [`Turn::wait`]; after a false, call it again for the same `seq`.
    pub unsafe fn wait_unless(&self, seq: u64, give_up: impl Fn() -> bool) -> bool {
        if self.holding.get() {
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
        pg_sys::replorigin_session_setup(self.origin);
        pg_sys::replorigin_session_origin = self.origin;
        self.holding.set(true);
        true
    }

    /// Transaction `seq`, ending at the peer's `remote_end`, is committed:
    /// release the origin and pass the turn on.
    ///
    /// # Safety
    /// Only after [`Turn::wait`] for the same `seq`.
    pub unsafe fn done(&self, seq: u64, remote_end: u64) {
        pg_sys::replorigin_session_origin = pg_sys::InvalidRepOriginId as pg_sys::RepOriginId;
        pg_sys::replorigin_session_reset();
        self.holding.set(false);
        let pool = self.pool();
        // The positions before the watermark: the receiver's flush tracker
        // reads the pending count first and relies on then finding the
        // positions of every commit that count includes.
        pool.last_local.store(pg_sys::GetXLogInsertRecPtr(), Release);
        pool.last_remote.store(remote_end, Release);
        pool.committed.store(seq, SeqCst);
        self.busy(false);
        pool.committed_wake(seq);
    }
}

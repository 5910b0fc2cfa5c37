//! Which worker takes a transaction, and what must commit before it is
//! handed over. Transactions are numbered 1, 2, … in the peer's commit
//! order; the pool commits them in that order, so "committed" is a single
//! watermark. The rule: a transaction that shares a key with transactions
//! still in flight goes to the worker holding the latest of them (its
//! queue is FIFO), after any others have committed; one that shares
//! nothing goes to the least busy worker at once — except that runs of up
//! to [`BATCH`] independent transactions stay on one worker, because
//! every hand-over of the commit turn to another worker is a process
//! wakeup, which on a busy machine costs more than applying a small
//! transaction; a barrier waits for everything before it, and
//! everything after it depends on it.

use crate::keys::TxnKeys;
use std::collections::{HashMap, VecDeque};

/// Where and when to send one transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Its number in the peer's commit order.
    pub seq: u64,
    pub worker: usize,
    /// Send only once everything up to this number has committed.
    pub wait_for: u64,
}

pub struct Scheduler {
    workers: usize,
    last_seq: u64,
    committed: u64,
    /// Sent, not yet committed: (seq, worker), in seq order.
    in_flight: VecDeque<(u64, usize)>,
    /// Key hash → the latest transaction that touched it.
    last_touch: HashMap<u64, u64>,
    prune_at: usize,
    /// The latest barrier transaction.
    barrier: u64,
    /// The worker that took the last transaction.
    last_worker: usize,
    batch: usize,
    /// Transactions prepared but not yet committed or rolled back here:
    /// their number, and the keys their COMMIT/ROLLBACK PREPARED releases
    /// (or, for a barrier such as DDL, the tables it locked: a barrier
    /// again).
    prepared: HashMap<String, (u64, TxnKeys)>,
    /// Gids committed on promise, oldest first, until their COMMIT
    /// PREPARED comes.
    committed_early: VecDeque<String>,
}

/// How to apply a COMMIT/ROLLBACK PREPARED.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// Its PREPARE has committed here: finish it now, out of the pool's
    /// commit order. It changes no row, only releases the prepared
    /// transaction's locks; in commit order it would wait for every
    /// transaction received before it — and one of those may be waiting
    /// for a lock that a prepared transaction from another peer holds,
    /// whose own COMMIT/ROLLBACK PREPARED waits in that peer's pool behind
    /// a transaction waiting for this one's locks: a cycle that only a
    /// lock timeout (a no vote) would break.
    Now,
    /// Plan it like a transaction with `keys`: its PREPARE, number
    /// `prepare` if this receiver handed it out, is still being applied
    /// (or was received before this receiver started).
    InOrder { keys: TxnKeys, prepare: Option<u64> },
    /// Committed here already, when this node promised to commit it
    /// ([`Scheduler::commit_on_promise`]): nothing to do.
    Done,
}

/// Independent transactions a worker takes in a row before the next one
/// goes to the least busy worker.
pub const BATCH: usize = 8;
const MIN_PRUNE: usize = 1 << 16;
const MAX_PREPARED: usize = 1 << 14;
/// Gids committed on promise whose COMMIT PREPARED has not come yet. One
/// that never comes (its home node finished it another way) is forgotten
/// after this many more; should its COMMIT PREPARED come after all, it is
/// applied as for an unknown gid: found not prepared, and skipped.
const MAX_COMMITTED_EARLY: usize = 1 << 12;

impl Scheduler {
    pub fn new(workers: usize) -> Self {
        Self::with_batch(workers, BATCH)
    }

    /// Runs of `batch` independent transactions per worker (1: spread
    /// every transaction).
    pub fn with_batch(workers: usize, batch: usize) -> Self {
        Scheduler {
            batch: batch.max(1),
            workers: workers.max(1),
            last_seq: 0,
            committed: 0,
            in_flight: VecDeque::new(),
            last_touch: HashMap::new(),
            prune_at: MIN_PRUNE,
            barrier: 0,
            last_worker: 0,
            prepared: HashMap::new(),
            committed_early: VecDeque::new(),
        }
    }

    /// The last number handed out.
    pub fn dispatched(&self) -> u64 {
        self.last_seq
    }

    /// The pool has committed everything up to `seq`.
    pub fn committed(&mut self, seq: u64) {
        self.committed = self.committed.max(seq);
        while self.in_flight.front().is_some_and(|&(s, _)| s <= self.committed) {
            self.in_flight.pop_front();
        }
        if self.last_touch.len() > self.prune_at {
            let c = self.committed;
            self.last_touch.retain(|_, s| *s > c);
            self.prune_at = (self.last_touch.len() * 2).max(MIN_PRUNE);
        }
    }

    /// Plans the next transaction.
    pub fn plan(&mut self, txn: &TxnKeys) -> Plan {
        let seq = self.last_seq + 1;
        self.last_seq = seq;
        let plan = if txn.barrier {
            self.barrier = seq;
            Plan { seq, worker: 0, wait_for: seq - 1 }
        } else {
            let mut deps: Vec<u64> = txn.keys.iter().filter_map(|k| self.last_touch.get(k).copied()).collect();
            deps.push(self.barrier);
            deps.retain(|&d| d > self.committed);
            match deps.iter().max().copied() {
                None => Plan { seq, worker: self.independent_worker(), wait_for: 0 },
                Some(latest) => {
                    let worker = self.worker_of(latest);
                    let wait_for = deps.iter().copied().filter(|&d| self.worker_of(d) != worker).max().unwrap_or(0);
                    Plan { seq, worker, wait_for }
                }
            }
        };
        for &k in txn.keys.iter().chain(&txn.touches) {
            self.last_touch.insert(k, seq);
        }
        self.in_flight.push_back((seq, plan.worker));
        self.last_worker = plan.worker;
        plan
    }

    /// Transaction `seq`, just planned, ends in PREPARE: its rows stay
    /// locked until its COMMIT/ROLLBACK PREPARED ([`Self::finish`]).
    pub fn prepared(&mut self, gid: &str, seq: u64, txn: &TxnKeys) {
        if self.prepared.len() >= MAX_PREPARED {
            // Prepares whose end we will never see (decided before a
            // restart): forgetting them only costs ordering by lock wait.
            self.prepared.clear();
        }
        self.prepared.insert(gid.to_string(), (seq, TxnKeys { keys: txn.keys.clone(), touches: Vec::new(), barrier: txn.barrier }));
    }

    /// How to apply the COMMIT/ROLLBACK PREPARED of `gid` (call
    /// [`Self::committed`] first).
    pub fn finish(&mut self, gid: &str) -> Finish {
        if let Some(i) = self.committed_early.iter().position(|g| g == gid) {
            self.committed_early.remove(i);
            return Finish::Done;
        }
        match self.prepared.remove(gid) {
            Some((seq, _)) if seq <= self.committed => Finish::Now,
            Some((seq, keys)) => Finish::InOrder { keys, prepare: Some(seq) },
            None => Finish::InOrder { keys: TxnKeys::default(), prepare: None },
        }
    }

    /// This node just promised to commit `gid`, and its home node's
    /// promise with ours is a majority: whether it may be committed now
    /// (call [`Self::committed`] first). True if its PREPARE has
    /// committed here: it is then finished as by [`Finish::Now`], and its
    /// COMMIT PREPARED, when the stream brings it, is [`Finish::Done`].
    /// False if it is still applying, or was received before this
    /// receiver started: it waits for its COMMIT PREPARED as usual.
    pub fn commit_on_promise(&mut self, gid: &str) -> bool {
        match self.prepared.get(gid) {
            Some(&(seq, _)) if seq <= self.committed => {
                self.prepared.remove(gid);
                if self.committed_early.len() >= MAX_COMMITTED_EARLY {
                    self.committed_early.pop_front();
                }
                self.committed_early.push_back(gid.to_string());
                true
            }
            _ => false,
        }
    }

    fn worker_of(&self, seq: u64) -> usize {
        self.in_flight.iter().find(|&&(s, _)| s == seq).map(|&(_, w)| w).unwrap_or(0)
    }

    fn independent_worker(&self) -> usize {
        let mut load = vec![0usize; self.workers];
        for &(_, w) in &self.in_flight {
            load[w] += 1;
        }
        if load[self.last_worker] > 0 && load[self.last_worker] < self.batch {
            return self.last_worker;
        }
        (0..self.workers).min_by_key(|&w| load[w]).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(keys: &[u64]) -> TxnKeys {
        TxnKeys { keys: keys.to_vec(), ..Default::default() }
    }

    #[test]
    fn touches_do_not_wait_but_are_waited_for() {
        let mut s = Scheduler::with_batch(3, 1);
        let ins = |k| TxnKeys { touches: vec![k], ..Default::default() };
        let a = s.plan(&ins(9));
        let b = s.plan(&ins(9));
        assert_ne!(a.worker, b.worker, "inserts into a keyless table run side by side");
        let del = s.plan(&t(&[9]));
        assert_eq!((del.worker, del.wait_for), (b.worker, 0), "a delete runs after the latest insert, hence after all");
    }

    #[test]
    fn independent_transactions_spread_over_workers_in_batches() {
        let mut s = Scheduler::new(3);
        let n = 3 * BATCH as u64 + 1;
        let p: Vec<Plan> = (1..=n).map(|k| s.plan(&t(&[k]))).collect();
        let workers: Vec<usize> = p.iter().map(|p| p.worker).collect();
        let expect: Vec<usize> = (0..n as usize).map(|i| (i / BATCH) % 3).collect();
        assert_eq!(workers, expect);
        assert!(p.iter().all(|p| p.wait_for == 0));
        assert_eq!(p.iter().map(|p| p.seq).collect::<Vec<_>>(), (1..=n).collect::<Vec<_>>());
        // A worker with nothing in flight does not keep the run going:
        // the next one goes to whoever is least busy (all idle: worker 0).
        s.committed(n);
        assert_eq!(s.plan(&t(&[1000])).worker, 0);
    }

    #[test]
    fn a_shared_key_follows_its_predecessor_on_the_same_worker() {
        let mut s = Scheduler::with_batch(3, 1);
        s.plan(&t(&[1]));
        let b = s.plan(&t(&[2]));
        let c = s.plan(&t(&[2, 9]));
        assert_eq!((c.worker, c.wait_for), (b.worker, 0));
    }

    #[test]
    fn keys_on_two_workers_wait_for_the_older_one() {
        let mut s = Scheduler::with_batch(3, 1);
        let a = s.plan(&t(&[1]));
        let b = s.plan(&t(&[2]));
        let c = s.plan(&t(&[1, 2]));
        assert_eq!(c.worker, b.worker, "joins the latest predecessor's queue");
        assert_eq!(c.wait_for, a.seq, "and waits for the other one to commit");
    }

    #[test]
    fn committed_predecessors_do_not_count() {
        let mut s = Scheduler::new(2);
        s.plan(&t(&[1]));
        s.plan(&t(&[2]));
        s.committed(2);
        let c = s.plan(&t(&[1, 2]));
        assert_eq!((c.worker, c.wait_for), (0, 0));
    }

    #[test]
    fn barrier_waits_for_all_and_everything_after_waits_for_it() {
        let mut s = Scheduler::new(3);
        s.plan(&t(&[1]));
        s.plan(&t(&[2]));
        let bar = s.plan(&TxnKeys { barrier: true, ..Default::default() });
        assert_eq!(bar.wait_for, 2);
        let next = s.plan(&t(&[77]));
        assert_eq!((next.worker, next.wait_for), (bar.worker, 0), "queued behind the barrier");
        s.committed(bar.seq);
        let later = s.plan(&t(&[78]));
        assert_eq!(later.wait_for, 0);
    }

    #[test]
    fn commit_prepared_of_a_prepare_still_in_flight_follows_its_rows() {
        let mut s = Scheduler::new(3);
        let prep = s.plan(&t(&[5]));
        s.prepared("g1", prep.seq, &t(&[5]));
        s.plan(&t(&[6]));
        let Finish::InOrder { keys: fin_keys, prepare } = s.finish("g1") else { panic!("its PREPARE has not committed") };
        assert_eq!((fin_keys.keys.clone(), prepare), (vec![5], Some(prep.seq)));
        let fin = s.plan(&fin_keys);
        let after = s.plan(&t(&[5]));
        assert_eq!((after.worker, after.wait_for), (fin.worker, 0));
        assert_eq!(s.finish("g1"), Finish::InOrder { keys: TxnKeys::default(), prepare: None }, "forgotten once finished");
    }

    #[test]
    fn commit_prepared_of_a_committed_prepare_runs_now_whatever_is_in_flight() {
        let mut s = Scheduler::new(3);
        let prep = s.plan(&t(&[5]));
        s.prepared("g1", prep.seq, &t(&[5]));
        s.committed(prep.seq);
        // Received after the PREPARE, still applying (it may wait for a
        // lock held by another peer's prepared transaction).
        s.plan(&t(&[6]));
        s.plan(&t(&[5]));
        assert_eq!(s.finish("g1"), Finish::Now);
        assert_eq!(s.finish("g1"), Finish::InOrder { keys: TxnKeys::default(), prepare: None }, "forgotten once finished");
        assert_eq!(s.finish("never-prepared"), Finish::InOrder { keys: TxnKeys::default(), prepare: None });
    }

    #[test]
    fn a_gid_committed_on_promise_is_done_when_its_commit_prepared_comes() {
        let mut s = Scheduler::new(2);
        let prep = s.plan(&t(&[5]));
        s.prepared("g1", prep.seq, &t(&[5]));
        assert!(!s.commit_on_promise("g1"), "its PREPARE is still applying");
        assert!(!s.commit_on_promise("unknown"), "received before this receiver started");
        s.committed(prep.seq);
        assert!(s.commit_on_promise("g1"));
        assert_eq!(s.finish("g1"), Finish::Done);
        assert_eq!(s.finish("g1"), Finish::InOrder { keys: TxnKeys::default(), prepare: None }, "forgotten once done");
        // Its keys no longer hold up a transaction received after it.
        let next = s.plan(&t(&[5]));
        assert_eq!(next.wait_for, 0);
    }

    #[test]
    fn gids_committed_on_promise_whose_commit_prepared_never_comes_are_forgotten() {
        let mut s = Scheduler::new(1);
        for i in 0..(MAX_COMMITTED_EARLY + 1) {
            let gid = format!("g{i}");
            let p = s.plan(&t(&[i as u64]));
            s.prepared(&gid, p.seq, &t(&[i as u64]));
            s.committed(p.seq);
            assert!(s.commit_on_promise(&gid));
        }
        assert_eq!(s.finish("g0"), Finish::InOrder { keys: TxnKeys::default(), prepare: None }, "the oldest made room");
        assert_eq!(s.finish("g1"), Finish::Done);
    }

    #[test]
    fn commit_prepared_of_a_barrier_in_flight_is_a_barrier() {
        let mut s = Scheduler::new(3);
        let ddl = TxnKeys { barrier: true, ..Default::default() };
        let prep = s.plan(&ddl);
        s.prepared("ddl", prep.seq, &ddl);
        let Finish::InOrder { keys: fin, .. } = s.finish("ddl") else { panic!("its PREPARE has not committed") };
        assert!(fin.barrier, "the tables the DDL locked are released only by its COMMIT PREPARED");
        let p = s.plan(&fin);
        assert_eq!(p.wait_for, p.seq - 1, "waits for everything before it");
    }

    #[test]
    fn pruning_keeps_in_flight_keys() {
        let mut s = Scheduler::new(2);
        for k in 0..(MIN_PRUNE as u64 + 10) {
            let p = s.plan(&t(&[k]));
            s.committed(p.seq);
        }
        let keep = s.plan(&t(&[u64::MAX]));
        s.committed(keep.seq - 1);
        assert!(s.last_touch.len() < MIN_PRUNE);
        let dep = s.plan(&t(&[u64::MAX]));
        assert_eq!(dep.worker, keep.worker);
    }
}

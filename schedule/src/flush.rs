//! What a receiver may confirm to its peer as flushed.
//!
//! The peer keeps its slot's WAL only back to the position we confirm,
//! and after a crash here we stream again from our replication origin,
//! which is only as far as our own flushed WAL says. So a position may be
//! confirmed only when the transaction ending there, and every one before
//! it, is committed here *and* its commit record is on disk. Apply workers
//! commit with `synchronous_commit = off`, so "committed" and "flushed"
//! are different moments, and [`FlushTracker`] joins the two: it samples
//! the pool's last commit (peer end LSN, our WAL position after it), holds
//! those samples until our flushed WAL passes them, and confirms the peer
//! positions of the ones that are durable.
//!
//! When nothing is in flight, everything received is durable once the
//! last commit is flushed, and that (like the core apply worker's
//! feedback) may be confirmed even past the last transaction: positions of
//! keepalives and of transactions the peer did not send us. "Nothing in
//! flight" must be read *before* the last commit — see
//! [`FlushTracker::confirmable`].

use std::collections::VecDeque;

/// What the tracker reads from the apply pool and from our WAL.
pub trait CommitSource {
    /// Transactions handed to the pool and not yet committed.
    fn pending(&self) -> u64;
    /// The last committed transaction: the peer's end LSN and our WAL
    /// position after its commit record; (0, 0) before the first.
    fn last_commit(&self) -> (u64, u64);
    /// Our WAL is flushed up to here.
    fn flushed(&self) -> u64;
}

#[derive(Debug, Clone)]
pub struct FlushTracker {
    /// Peer LSN up to which everything is durable here.
    confirmed: u64,
    /// The peer LSN of the newest commit sampled.
    seen_remote: u64,
    /// Sampled commits not yet flushed, oldest first: (peer end, our WAL
    /// position after it); both grow, since the pool commits in order.
    unflushed: VecDeque<(u64, u64)>,
}

impl FlushTracker {
    /// `start`: the peer LSN our origin had durably reached when streaming
    /// started (so it is durable already).
    pub fn new(start: u64) -> Self {
        FlushTracker { confirmed: start, seen_remote: 0, unflushed: VecDeque::new() }
    }

    /// The peer LSN confirmed so far.
    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }

    /// A transaction ending at the peer's `remote_end` committed here, and
    /// is durable once our WAL is flushed to `local_end`. Samples older
    /// than the newest seen are ignored: a sample stands for every
    /// transaction committed before it.
    pub fn committed(&mut self, remote_end: u64, local_end: u64) {
        if remote_end <= self.seen_remote {
            return;
        }
        self.seen_remote = remote_end;
        // A pair read while the next commit was being published can carry
        // the next commit's (larger) local position: later is safe, so
        // never let a sample claim less than the one before it.
        let local_end = self.unflushed.back().map_or(local_end, |&(_, l)| l.max(local_end));
        self.unflushed.push_back((remote_end, local_end));
    }

    /// Our WAL is flushed up to `flushed`: confirms the samples it covers.
    pub fn flushed(&mut self, flushed: u64) -> u64 {
        while let Some(&(remote, local)) = self.unflushed.front() {
            if local > flushed {
                break;
            }
            self.confirmed = self.confirmed.max(remote);
            self.unflushed.pop_front();
        }
        self.confirmed
    }

    /// The peer LSN that is safe to confirm now. `idle_at`: the peer
    /// position received so far, when the receiver holds no part of a
    /// transaction (none being received or streamed to a worker).
    ///
    /// The order of the reads is the point. The pending count is read
    /// first: if it is 0, every transaction handed out had committed by
    /// then, and the last commit read after it is the newest one, so
    /// checking that one is flushed covers them all. Read the other way
    /// round, a transaction committing between the two reads is counted
    /// as done (pending 0) while its commit record — newer than the
    /// sample — is not checked against the flushed WAL, and a crash would
    /// lose a transaction the peer has been told is safe.
    pub fn confirmable(&mut self, source: &impl CommitSource, idle_at: Option<u64>) -> u64 {
        let pending = source.pending();
        let (remote, local) = source.last_commit();
        self.committed(remote, local);
        self.flushed(source.flushed());
        if let Some(received) = idle_at {
            if pending == 0 && self.unflushed.is_empty() {
                self.confirmed = self.confirmed.max(received);
            }
        }
        self.confirmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    /// A pool whose state can change between the tracker's reads, as a
    /// worker committing concurrently would change it.
    #[derive(Default)]
    struct Pool {
        dispatched: Cell<u64>,
        committed: Cell<u64>,
        last: Cell<(u64, u64)>,
        flushed: Cell<u64>,
        /// A commit (peer end, our WAL position) to make after the
        /// tracker's next reads: after as many as the count says, plus one.
        planned: Cell<Option<(usize, (u64, u64))>>,
        reads: RefCell<Vec<&'static str>>,
    }

    impl Pool {
        fn dispatch(&self) {
            self.dispatched.set(self.dispatched.get() + 1);
        }
        fn commit(&self, remote: u64, local: u64) {
            self.last.set((remote, local));
            self.committed.set(self.committed.get() + 1);
        }
        fn read(&self, what: &'static str) {
            self.reads.borrow_mut().push(what);
            match self.planned.take() {
                Some((0, (r, l))) => self.commit(r, l),
                Some((n, c)) => self.planned.set(Some((n - 1, c))),
                None => {}
            }
        }
    }

    impl CommitSource for Pool {
        fn pending(&self) -> u64 {
            let p = self.dispatched.get() - self.committed.get();
            self.read("pending");
            p
        }
        fn last_commit(&self) -> (u64, u64) {
            let l = self.last.get();
            self.read("last_commit");
            l
        }
        fn flushed(&self) -> u64 {
            let f = self.flushed.get();
            self.read("flushed");
            f
        }
    }

    #[test]
    fn the_start_position_is_confirmed_from_the_outset() {
        let mut t = FlushTracker::new(500);
        assert_eq!(t.confirmable(&Pool::default(), None), 500);
        assert_eq!(t.confirmed(), 500);
    }

    #[test]
    fn a_commit_is_confirmed_only_once_flushed() {
        let pool = Pool::default();
        let mut t = FlushTracker::new(0);
        pool.dispatch();
        pool.commit(100, 1_000);
        pool.flushed.set(999);
        assert_eq!(t.confirmable(&pool, None), 0);
        assert_eq!(t.confirmable(&pool, Some(150)), 0, "idle, but the last commit is not on disk");
        pool.flushed.set(1_000);
        assert_eq!(t.confirmable(&pool, None), 100);
    }

    #[test]
    fn commits_flushed_in_part_confirm_the_flushed_prefix() {
        let mut t = FlushTracker::new(0);
        t.committed(100, 1_000);
        t.committed(200, 2_000);
        t.committed(300, 3_000);
        assert_eq!(t.flushed(2_500), 200);
        assert_eq!(t.flushed(2_999), 200);
        assert_eq!(t.flushed(3_000), 300);
    }

    #[test]
    fn stale_or_repeated_samples_are_ignored() {
        let mut t = FlushTracker::new(0);
        t.committed(200, 2_000);
        t.committed(200, 2_000);
        t.committed(100, 1_000);
        assert_eq!(t.unflushed.len(), 1);
        assert_eq!(t.flushed(1_500), 0, "the sample at 200 stands for 100 too: not flushed");
        assert_eq!(t.flushed(2_000), 200);
    }

    #[test]
    fn a_sample_never_claims_less_wal_than_the_one_before() {
        let mut t = FlushTracker::new(0);
        t.committed(100, 2_000);
        t.committed(200, 1_500);
        assert_eq!(t.flushed(1_800), 0);
        assert_eq!(t.flushed(2_000), 200);
    }

    #[test]
    fn idle_and_flushed_confirms_everything_received() {
        let pool = Pool::default();
        let mut t = FlushTracker::new(0);
        pool.dispatch();
        pool.commit(100, 1_000);
        pool.flushed.set(1_000);
        assert_eq!(t.confirmable(&pool, Some(180)), 180);
        // Confirmation never goes back, even if asked with less.
        assert_eq!(t.confirmable(&pool, Some(150)), 180);
    }

    #[test]
    fn work_in_flight_holds_confirmation_at_the_last_flushed_commit() {
        let pool = Pool::default();
        let mut t = FlushTracker::new(0);
        pool.dispatch();
        pool.commit(100, 1_000);
        pool.dispatch();
        pool.flushed.set(5_000);
        assert_eq!(t.confirmable(&pool, Some(300)), 100, "a transaction is handed out, not committed");
        // A transaction still being received (idle_at None) holds it too.
        pool.commit(200, 2_000);
        assert_eq!(t.confirmable(&pool, None), 200);
    }

    #[test]
    fn pending_is_read_before_the_last_commit() {
        let pool = Pool::default();
        let mut t = FlushTracker::new(0);
        t.confirmable(&pool, None);
        assert_eq!(*pool.reads.borrow(), ["pending", "last_commit", "flushed"]);
    }

    /// The race of issue 10, item 1: the one outstanding transaction
    /// commits (asynchronously: its commit record not yet flushed) right
    /// after the tracker's first read. Whatever that read is, the
    /// transaction must not be confirmed before its commit is flushed.
    #[test]
    fn a_commit_between_the_reads_is_not_confirmed_before_it_is_flushed() {
        let pool = Pool::default();
        let mut t = FlushTracker::new(0);
        pool.dispatch();
        pool.commit(100, 1_000);
        pool.flushed.set(1_000);
        assert_eq!(t.confirmable(&pool, None), 100);

        pool.dispatch(); // ends at the peer's 200; received up to 250
        pool.planned.set(Some((0, (200, 2_000))));
        let c = t.confirmable(&pool, Some(250));
        assert!(c < 200, "confirmed {c} while the commit at 200 is not flushed");
        assert_eq!(c, 100);
        assert_eq!(pool.committed.get(), 2, "the commit happened between the reads");

        assert_eq!(t.confirmable(&pool, Some(250)), 100, "still not flushed");
        pool.flushed.set(2_000);
        assert_eq!(t.confirmable(&pool, Some(250)), 250);
    }

    /// The same race, for a commit after each possible read, over many
    /// random histories: what is confirmed is never beyond what is
    /// committed and flushed at that moment.
    #[test]
    fn random_interleavings_never_confirm_what_is_not_durable() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..2_000 {
            let pool = Pool::default();
            let mut t = FlushTracker::new(0);
            // Each transaction: peer end LSN, our WAL position after its commit.
            let mut txns: Vec<(u64, u64)> = Vec::new();
            let mut received = 0;
            let mut prev = 0;
            let mut safe = 0;
            for _ in 0..30 {
                match rand(4) {
                    0 => {
                        received += 1 + rand(50);
                        let local = txns.last().map_or(0, |t| t.1) + 1 + rand(100);
                        txns.push((received, local));
                        pool.dispatch();
                    }
                    1 if pool.planned.get().is_none() && pool.committed.get() < pool.dispatched.get() => {
                        let next = txns[pool.committed.get() as usize];
                        // Now, or right after one of the tracker's next reads.
                        match rand(4) {
                            3 => pool.commit(next.0, next.1),
                            after => pool.planned.set(Some((after as usize, next))),
                        }
                    }
                    2 => {
                        let max = txns.last().map_or(0, |t| t.1);
                        pool.flushed.set(pool.flushed.get().max(rand(max + 1)));
                    }
                    _ => {
                        received += rand(5); // keepalives move the position too
                        let idle = (rand(2) == 0).then_some(received);
                        let c = t.confirmable(&pool, idle);
                        assert!(c >= prev, "confirmation went back");
                        prev = c;
                        assert!(pool.planned.get().is_none(), "three reads consume a planned commit");
                        // What is durable now: committed transactions up to
                        // the first not flushed, and all that was received
                        // if every one is; once durable, always durable.
                        let committed = pool.committed.get() as usize;
                        let flushed = pool.flushed.get();
                        let durable = txns[..committed].iter().take_while(|t| t.1 <= flushed).count();
                        let now = if durable == txns.len() { received } else { txns[..durable].last().map_or(0, |t| t.0) };
                        safe = safe.max(now);
                        assert!(c <= safe, "confirmed {c}, durable only to {safe}: {txns:?}, committed {committed}, flushed {flushed}");
                    }
                }
            }
        }
    }
}

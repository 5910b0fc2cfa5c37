//! Who gives way when transactions from different nodes want the same
//! rows: the rule each node applies on its own, with the same answer on
//! every node, so that a conflict is settled in milliseconds instead of
//! at a lock timeout.
//!
//! Two transactions that change one row on two nodes at once have each
//! locked it on their home node; each peer's apply of the other waits for
//! that lock, so neither can get every vote. One must give way. The one
//! **prepared first** wins: its age is its home node's prepare time, then
//! its home node's id, the same pair on every node (a peer learns it from
//! the stream, the home node from `pg_prepared_xacts`). A transaction
//! that has not been prepared yet is younger than any that has.
//!
//! The extension's `conflicts` module looks, on each node, at every apply
//! worker that waits for a lock, finds who holds it and asks [`verdict`]:
//! - the holder is a transaction prepared here by its own client (this
//!   node is its home) and younger than the waiter: its coordinator is
//!   told to give up (this node refuses it, 40001);
//! - the holder is prepared here for another home node and younger: this
//!   node withdraws its yes vote on it (a no to its home node, which
//!   counts only while its coordinator has not decided; once decided it
//!   commits and the waiter then gets the row);
//! - the holder is another apply worker's transaction, not prepared yet
//!   here, and younger: it is cancelled (this node votes no on it);
//! - the holder is a local session's transaction that is not prepared:
//!   it is cancelled (40001 to its client) — the waiter was prepared first.
//!
//! Anything older than the waiter is waited for. Every wait then goes
//! from a younger transaction to an older one (or to one already decided,
//! which commits), so no cycle of waits is left for a lock timeout to
//! break — the rule is wound-wait, and the oldest transaction always gets
//! through. [`WaitWatch`] says which waits are due for a look.

use std::collections::HashMap;
use std::time::{Duration, Instant};


/// A transaction's age: its home node's prepare (or commit) time in
/// microseconds, then the home node's id. Smaller is older.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Age {
    pub time: i64,
    pub home: i32,
}

/// Who holds the lock an apply worker waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// A prepared transaction (on this node) whose home node is `age.home`.
    Prepared { age: Age },
    /// Another apply worker, applying a transaction of that age.
    Applying { age: Age },
    /// A session of this node, in a transaction not prepared yet.
    Local,
    /// Anything else (a maintenance process, a prepared transaction that
    /// is not the cluster's): waited for, up to the lock timeout.
    Other,
}

/// What to do about one wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let the waiter wait: the holder is older, or another node decides.
    Wait,
    /// The holder, prepared here by its own client, gives up: its
    /// coordinator is refused.
    RefuseHolder,
    /// The holder, prepared here for another home node, is refused after
    /// all: this node sends its home a no vote (too late if it decided).
    WithdrawVote,
    /// The holder's transaction is cancelled: an apply worker votes no on
    /// it, a local session gets 40001.
    CancelHolder,
}

/// The rule, on node `me`, for an apply worker applying a transaction of
/// age `waiter` that waits for a lock of `holder`.
pub fn verdict(me: i32, waiter: Age, holder: Holder) -> Verdict {
    match holder {
        Holder::Prepared { age } if age.home == me && waiter < age => Verdict::RefuseHolder,
        Holder::Prepared { age } if waiter < age => Verdict::WithdrawVote,
        Holder::Prepared { .. } => Verdict::Wait,
        Holder::Applying { age } if waiter < age => Verdict::CancelHolder,
        Holder::Applying { .. } => Verdict::Wait,
        Holder::Local => Verdict::CancelHolder,
        Holder::Other => Verdict::Wait,
    }
}

/// How strongly a transaction locks a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableLock {
    /// What reads and row changes take (AccessShare, RowShare,
    /// RowExclusive, ShareUpdateExclusive).
    Data,
    /// A mode that blocks row changes (Share and up: CREATE INDEX,
    /// ALTER TABLE, DROP, LOCK TABLE…): a schema change.
    Schema,
}

impl TableLock {
    /// The class of a lock mode as `pg_locks.mode` names it.
    pub fn of_mode(mode: &str) -> TableLock {
        match mode {
            "ShareLock" | "ShareRowExclusiveLock" | "ExclusiveLock" | "AccessExclusiveLock" => TableLock::Schema,
            _ => TableLock::Data,
        }
    }

    /// The strongest class among the modes one transaction holds on a
    /// table (`pg_locks.mode` names, comma-separated).
    pub fn of_modes(modes: &str) -> TableLock {
        if modes.split(',').any(|m| TableLock::of_mode(m) == TableLock::Schema) {
            TableLock::Schema
        } else {
            TableLock::Data
        }
    }
}

/// The rule for a wait on a table lock, on node `me`: **a schema change
/// goes before data changes**, whatever their ages; otherwise as
/// [`verdict`]. A schema change conflicts with every row change of its
/// table, and under a steady stream of them there is always one in
/// flight that was prepared before it: by age alone it would give way
/// every time and never commit. Same answer on every node: where the
/// schema change waits for a data change, the data change gives way;
/// where a data change waits for the schema change, it waits.
pub fn table_verdict(me: i32, waiter: Age, waiter_lock: TableLock, holder: Holder, holder_lock: TableLock) -> Verdict {
    match (waiter_lock, holder_lock) {
        (TableLock::Schema, TableLock::Data) => verdict(me, Age { time: i64::MIN, home: i32::MIN }, holder),
        (TableLock::Data, TableLock::Schema) => Verdict::Wait,
        _ => verdict(me, waiter, holder),
    }
}

/// Which of the apply workers' lock waits are due for a look by the
/// rule: one that has lasted `look_after` (most end sooner: the holder
/// commits), then again every `look_again` while it lasts. A wait is a
/// worker (pid) waiting for one lock; a worker that waits for another
/// lock starts a new wait.
#[derive(Debug)]
pub struct WaitWatch {
    look_after: Duration,
    look_again: Duration,
    /// Per worker pid: the lock, since when, last looked at.
    seen: HashMap<i32, (usize, Instant, Option<Instant>)>,
}

impl WaitWatch {
    pub fn new(look_after: Duration, look_again: Duration) -> Self {
        WaitWatch { look_after, look_again, seen: HashMap::new() }
    }

    /// `current`: (pid, lock) of every worker waiting now. Forgets the
    /// waits that ended; returns the pids whose wait is due for a look.
    pub fn due(&mut self, current: &[(i32, usize)], now: Instant) -> Vec<i32> {
        self.seen.retain(|pid, (lock, ..)| current.contains(&(*pid, *lock)));
        let mut due = Vec::new();
        for &(pid, lock) in current {
            let (_, since, looked) = self.seen.entry(pid).or_insert((lock, now, None));
            let fresh = looked.is_none_or(|t| now.duration_since(t) >= self.look_again);
            if now.duration_since(*since) >= self.look_after && fresh {
                due.push(pid);
            }
        }
        due
    }

    /// The wait of `pid` was settled at `now` (looked at again only after
    /// `look_again`). A wait not marked is due again at the next call.
    pub fn looked(&mut self, pid: i32, now: Instant) {
        if let Some((_, _, looked)) = self.seen.get_mut(&pid) {
            *looked = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: i32 = 1;

    fn age(time: i64, home: i32) -> Age {
        Age { time, home }
    }

    #[test]
    fn an_older_waiter_makes_a_younger_transaction_of_this_node_give_up() {
        let holder = Holder::Prepared { age: age(200, ME) };
        assert_eq!(verdict(ME, age(100, 2), holder), Verdict::RefuseHolder);
        // Younger waiter: it waits; the holder's votes decide.
        assert_eq!(verdict(ME, age(300, 2), holder), Verdict::Wait);
    }

    #[test]
    fn equal_times_are_ordered_by_home_node() {
        let holder = Holder::Prepared { age: age(100, ME) };
        // Node 2 is "younger" than node 1 at the same microsecond.
        assert_eq!(verdict(ME, age(100, 2), holder), Verdict::Wait);
        let holder = Holder::Prepared { age: age(100, 3) };
        assert_eq!(verdict(3, age(100, 2), holder), Verdict::RefuseHolder);
    }

    #[test]
    fn a_younger_transaction_prepared_for_another_home_node_loses_this_nodes_vote() {
        let holder = Holder::Prepared { age: age(500, 3) };
        assert_eq!(verdict(ME, age(100, 2), holder), Verdict::WithdrawVote);
        // Older: waited for.
        assert_eq!(verdict(ME, age(600, 2), holder), Verdict::Wait);
    }

    #[test]
    fn a_cycle_over_three_nodes_is_broken_at_its_youngest() {
        // T1 (node 1, oldest), T2 (node 2), T3 (node 3, youngest), each
        // prepared at home and on one other node, each apply waiting for
        // the next: on node 1 T3's apply waits for T1, on node 2 T1's for
        // T2's... wherever the youngest holds a lock an older one needs,
        // it is refused or loses a vote; the oldest never gives way.
        let (t1, t2, t3) = (age(100, 1), age(200, 2), age(300, 3));
        // Node 3 holds T3 (its own), T2's apply waits: T3 refused.
        assert_eq!(verdict(3, t2, Holder::Prepared { age: t3 }), Verdict::RefuseHolder);
        // Node 1 holds T2 prepared for node 2, T1's apply waits: node 1
        // withdraws its vote on T2.
        assert_eq!(verdict(1, t1, Holder::Prepared { age: t2 }), Verdict::WithdrawVote);
        // Node 2 holds T1 prepared for node 1, T3's apply waits: it waits.
        assert_eq!(verdict(2, t3, Holder::Prepared { age: t1 }), Verdict::Wait);
    }

    #[test]
    fn a_younger_apply_is_cancelled_an_older_one_waited_for() {
        assert_eq!(verdict(ME, age(100, 2), Holder::Applying { age: age(200, 3) }), Verdict::CancelHolder);
        assert_eq!(verdict(ME, age(300, 2), Holder::Applying { age: age(200, 3) }), Verdict::Wait);
        // The same peer: a later transaction that took a row the earlier
        // one needs (it would wait for its commit turn forever).
        assert_eq!(verdict(ME, age(100, 2), Holder::Applying { age: age(150, 2) }), Verdict::CancelHolder);
    }

    #[test]
    fn a_local_transaction_not_prepared_always_gives_way() {
        assert_eq!(verdict(ME, age(i64::MAX, 3), Holder::Local), Verdict::CancelHolder);
        assert_eq!(verdict(ME, age(100, 2), Holder::Other), Verdict::Wait);
    }

    #[test]
    fn the_same_conflict_gets_the_same_winner_on_both_nodes() {
        // T1 prepared on node 1 at 100, T2 on node 2 at 120; each node
        // holds its own and applies the other's.
        let (t1, t2) = (age(100, 1), age(120, 2));
        // Node 1: T2's apply waits for T1 → T2 (younger) waits.
        assert_eq!(verdict(1, t2, Holder::Prepared { age: t1 }), Verdict::Wait);
        // Node 2: T1's apply waits for T2 → T2 is refused.
        assert_eq!(verdict(2, t1, Holder::Prepared { age: t2 }), Verdict::RefuseHolder);
    }

    #[test]
    fn a_schema_change_goes_before_older_data_changes_on_every_node() {
        let ddl = Age { time: 500, home: 3 };
        let insert = Age { time: 100, home: 1 };
        let (schema, data) = (TableLock::of_mode("AccessExclusiveLock"), TableLock::of_mode("RowExclusiveLock"));
        assert_eq!((schema, data), (TableLock::Schema, TableLock::Data));
        assert_eq!(TableLock::of_mode("ShareLock"), TableLock::Schema, "CREATE INDEX blocks row changes too");
        assert_eq!(TableLock::of_modes("RowExclusiveLock,AccessExclusiveLock"), TableLock::Schema, "the strongest counts");
        assert_eq!(TableLock::of_modes("AccessShareLock,RowExclusiveLock"), TableLock::Data);
        // On the schema change's home node the older insert's apply waits.
        assert_eq!(table_verdict(3, insert, data, Holder::Prepared { age: ddl }, schema), Verdict::Wait);
        // On the insert's home node the insert gives up; on a third node
        // it loses that node's vote, or its apply is cancelled.
        assert_eq!(table_verdict(1, ddl, schema, Holder::Prepared { age: insert }, data), Verdict::RefuseHolder);
        assert_eq!(table_verdict(2, ddl, schema, Holder::Prepared { age: insert }, data), Verdict::WithdrawVote);
        assert_eq!(table_verdict(2, ddl, schema, Holder::Applying { age: insert }, data), Verdict::CancelHolder);
        // Two schema changes, or two data changes: by age.
        let older_ddl = Age { time: 400, home: 2 };
        assert_eq!(table_verdict(3, older_ddl, schema, Holder::Prepared { age: ddl }, schema), Verdict::RefuseHolder);
        assert_eq!(table_verdict(2, ddl, schema, Holder::Prepared { age: older_ddl }, schema), Verdict::Wait);
        assert_eq!(table_verdict(3, insert, data, Holder::Prepared { age: ddl }, data), Verdict::RefuseHolder);
    }

    #[test]
    fn a_wait_is_looked_at_after_a_while_then_every_so_often() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut w = WaitWatch::new(Duration::from_millis(4), Duration::from_millis(50));
        assert!(w.due(&[(10, 1)], ms(0)).is_empty(), "just started");
        assert_eq!(w.due(&[(10, 1)], ms(5)), [10], "waited long enough");
        // Not settled yet (the holder idles between statements): due again.
        assert_eq!(w.due(&[(10, 1)], ms(6)), [10]);
        w.looked(10, ms(6));
        assert!(w.due(&[(10, 1)], ms(30)).is_empty(), "settled: not before look_again");
        assert_eq!(w.due(&[(10, 1)], ms(57)), [10]);
    }

    #[test]
    fn a_new_lock_or_an_ended_wait_starts_over() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut w = WaitWatch::new(Duration::from_millis(4), Duration::from_millis(50));
        w.due(&[(10, 1), (11, 7)], ms(0));
        assert_eq!(w.due(&[(10, 1), (11, 7)], ms(5)), [10, 11]);
        w.looked(10, ms(5));
        // Worker 10 now waits for another lock; worker 11 stopped waiting.
        assert!(w.due(&[(10, 2)], ms(6)).is_empty(), "a new wait, just started");
        assert!(w.due(&[(10, 2), (11, 7)], ms(7)).is_empty(), "11 waits anew");
        assert_eq!(w.due(&[(10, 2), (11, 7)], ms(12)), [10, 11]);
    }
}

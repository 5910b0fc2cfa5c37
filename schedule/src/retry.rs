//! A second, serial try for a peer's prepared transaction that failed
//! because it was applied side by side with others, before this node
//! votes no on it.
//!
//! The scheduler keeps transactions that touch the same row in order, but
//! not every conflict is on a row it keys on: a secondary unique or
//! exclusion constraint, or a lock that a later transaction of the same
//! peer took while it ran ahead and still holds while it waits for its
//! commit turn (the conflict rule then has the later one give way). Such a
//! failure says nothing about the transaction itself: on the peer, where
//! it committed in order, it succeeded. So the worker waits for its turn —
//! every earlier transaction of the peer is then done here — and applies
//! it once more, alone; only a second failure is a no vote.
//!
//! The worker keeps the transaction's messages as they arrive
//! ([`Replay`]), up to a byte budget: a transaction bigger than that is
//! not tried again (its failure is a no vote, as before).

/// Whether a failure may come from parallel apply rather than from a real
/// conflict: unique / exclusion violations and deadlocks (a later
/// transaction of the same peer ran ahead), and giving way to an older
/// transaction of the same peer. Anything else (a missing table, a check
/// constraint, giving way to another node's transaction) fails the same
/// way however it is applied. Not a lock wait that timed out either: the
/// retry holds the peer's commit turn, and a second wait that long would
/// hold up every later transaction of the peer as well.
pub fn worth_retrying(sqlstate: &str, gave_way_to_same_peer: bool) -> bool {
    gave_way_to_same_peer || matches!(sqlstate, "23505" | "23P01" | "40P01")
}

/// The raw messages of the transaction being applied, from its Begin to
/// its Prepare, kept for one serial retry.
#[derive(Debug)]
pub struct Replay {
    kept: Vec<Vec<u8>>,
    bytes: usize,
    budget: usize,
    /// Every message since the Begin is kept (none was dropped for the
    /// budget, and a Begin was seen).
    whole: bool,
}

impl Replay {
    pub fn new(budget: usize) -> Self {
        Replay { kept: Vec::new(), bytes: 0, budget, whole: false }
    }

    /// A transaction starts with this message: forget the previous one.
    pub fn begin(&mut self, raw: &[u8]) {
        self.clear();
        self.whole = true;
        self.keep(raw);
    }

    /// Keeps a message of the current transaction; past the budget the
    /// transaction can no longer be replayed and nothing more is kept.
    pub fn keep(&mut self, raw: &[u8]) {
        if !self.whole {
            return;
        }
        if self.bytes + raw.len() > self.budget {
            self.clear();
            return;
        }
        self.bytes += raw.len();
        self.kept.push(raw.to_vec());
    }

    /// The whole transaction, if it was kept (and it is no longer).
    pub fn take(&mut self) -> Option<Vec<Vec<u8>>> {
        let whole = self.whole && !self.kept.is_empty();
        let kept = std::mem::take(&mut self.kept);
        self.clear();
        whole.then_some(kept)
    }

    pub fn clear(&mut self) {
        self.kept.clear();
        self.bytes = 0;
        self.whole = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_parallel_apply_can_cause_are_retried() {
        assert!(worth_retrying("23505", false), "a secondary unique key");
        assert!(worth_retrying("23P01", false), "an exclusion constraint");
        assert!(worth_retrying("40P01", false), "a deadlock between workers");
        assert!(!worth_retrying("55P03", false), "a lock wait that timed out would hold the turn as long again");
        assert!(worth_retrying("40001", true), "gave way to an older transaction of the same peer");
        assert!(!worth_retrying("40001", false), "gave way to another node's transaction: a real conflict");
        assert!(!worth_retrying("42P01", false), "a missing table fails however it is applied");
        assert!(!worth_retrying("23514", false), "a check constraint too");
    }

    #[test]
    fn keeps_one_transaction_from_its_begin() {
        let mut r = Replay::new(1000);
        r.keep(b"before any begin");
        assert_eq!(r.take(), None, "nothing without a Begin");
        r.begin(b"B1");
        r.keep(b"I1");
        r.keep(b"P1");
        assert_eq!(r.take(), Some(vec![b"B1".to_vec(), b"I1".to_vec(), b"P1".to_vec()]));
        assert_eq!(r.take(), None, "taken once");
        r.begin(b"B2");
        r.begin(b"B3");
        assert_eq!(r.take(), Some(vec![b"B3".to_vec()]), "a Begin forgets the previous transaction");
    }

    #[test]
    fn a_transaction_over_the_budget_is_not_kept() {
        let mut r = Replay::new(10);
        r.begin(b"BBBB");
        r.keep(b"IIII");
        r.keep(b"IIII");
        r.keep(b"P");
        assert_eq!(r.take(), None);
        r.begin(b"BB");
        r.keep(b"P");
        assert_eq!(r.take(), Some(vec![b"BB".to_vec(), b"P".to_vec()]), "the next one is kept again");
    }
}

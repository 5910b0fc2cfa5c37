//! Where votes are counted: the coordinator side of the commit path. A
//! transaction prepared on its home node is applied and prepared on every
//! peer; each peer's yes or no comes back over the replication stream
//! ([`mtm_protocol::VoteMessage`]) and is recorded here, in a fixed table
//! that lives in the home node's shared memory. The backend that runs
//! `mtm.await_votes(gid)` waits until every peer said yes, one said no,
//! or its time is up.
//!
//! A vote may arrive before anyone waits for it (the coordinator asks
//! right after its PREPARE, the peers may be faster), so votes are kept
//! without a waiter. The table never drops a slot someone waits on; when
//! it is full, the oldest slot nobody waits on makes room — a vote for a
//! gid already decided, or one whose coordinator went away.

/// Gids longer than this are refused by PostgreSQL too (GIDSIZE 200).
pub const GID_MAX: usize = 200;
/// Bytes of a no vote's message that are kept.
pub const MESSAGE_MAX: usize = 400;
/// Slots in the table: more than the transactions that can be prepared
/// and awaited on one node at once.
pub const SLOTS: usize = 1024;
/// Node ids are 1..=MAX_NODE (one bit each).
pub const MAX_NODE: i32 = 64;

#[derive(Copy, Clone)]
pub struct Slot {
    gid: [u8; GID_MAX],
    gid_len: u8,
    /// Bit `id - 1` set: node `id` voted yes.
    yes: u64,
    /// Bit `id - 1` set: node `id` voted no.
    no: u64,
    /// The first node that voted no (0: none), with its reason.
    no_node: i32,
    sqlstate: [u8; 5],
    message: [u8; MESSAGE_MAX],
    message_len: u16,
    /// Who waits for the outcome (a PGPROC number), or -1.
    waiter: i32,
    /// The waiter is woken by a yes only once this many of the nodes in
    /// `wake_mask` said yes (0: by every vote); a no always wakes it.
    wake_mask: u64,
    wake_yes: u8,
    /// Age order, for making room.
    stamp: u64,
}

const EMPTY: Slot = Slot {
    gid: [0; GID_MAX],
    gid_len: 0,
    yes: 0,
    no: 0,
    no_node: 0,
    sqlstate: [0; 5],
    message: [0; MESSAGE_MAX],
    message_len: 0,
    waiter: -1,
    wake_mask: 0,
    wake_yes: 0,
    stamp: 0,
};

/// The vote table: plain data, so it can live in shared memory.
#[derive(Copy, Clone)]
pub struct Tally {
    slots: [Slot; SLOTS],
    /// A hash of each slot's gid (0: the slot is free), so a look-up
    /// strides through 8 KB rather than every slot's 600 bytes.
    keys: [u64; SLOTS],
    next_stamp: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Tally { slots: [EMPTY; SLOTS], keys: [0; SLOTS], next_stamp: 1 }
    }
}

/// A gid's hash, the decision log's: never 0 (which marks a free slot).
fn key_of(gid: &[u8]) -> u64 {
    mtm_state::decisions::gid_hash(gid)
}

/// Where a gid's vote stands for a given set of peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every peer voted yes.
    Yes,
    /// `node` voted no.
    No { node: i32, sqlstate: String, message: String },
    /// Still waiting for these peers.
    Pending { missing: Vec<i32> },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TallyError {
    #[error("gid is longer than {GID_MAX} bytes")]
    GidTooLong,
    #[error("node id {0} is outside 1..={MAX_NODE}")]
    BadNode(i32),
    #[error("all {SLOTS} vote slots are awaited: too many commits in flight")]
    Full,
}

fn bit(node: i32) -> Result<u64, TallyError> {
    if (1..=MAX_NODE).contains(&node) {
        Ok(1u64 << (node - 1))
    } else {
        Err(TallyError::BadNode(node))
    }
}

impl Tally {
    fn find(&self, gid: &[u8]) -> Option<usize> {
        let key = key_of(gid);
        self.keys.iter().enumerate().filter(|(_, &k)| k == key).map(|(i, _)| i).find(|&i| {
            let s = &self.slots[i];
            &s.gid[..s.gid_len as usize] == gid
        })
    }

    fn free(&mut self, i: usize) {
        self.slots[i] = EMPTY;
        self.keys[i] = 0;
    }

    /// The slot of `gid`, taking a free one or the oldest nobody waits on.
    fn slot_for(&mut self, gid: &str) -> Result<usize, TallyError> {
        let g = gid.as_bytes();
        if g.len() > GID_MAX {
            return Err(TallyError::GidTooLong);
        }
        if let Some(i) = self.find(g) {
            return Ok(i);
        }
        let i = match self.keys.iter().position(|&k| k == 0) {
            Some(i) => i,
            None => self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.waiter < 0)
                .min_by_key(|(_, s)| s.stamp)
                .map(|(i, _)| i)
                .ok_or(TallyError::Full)?,
        };
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.keys[i] = key_of(g);
        let s = &mut self.slots[i];
        *s = EMPTY;
        s.gid[..g.len()].copy_from_slice(g);
        s.gid_len = g.len() as u8;
        s.stamp = stamp;
        Ok(i)
    }

    /// Records `voter`'s vote on `gid` (`refusal` None = yes). Returns the
    /// waiter to wake, if any. A later no replaces an earlier yes (a node
    /// may withdraw its yes before the decision); the first no is kept.
    pub fn record(&mut self, gid: &str, voter: i32, refusal: Option<(&str, &str)>) -> Result<Option<i32>, TallyError> {
        let b = bit(voter)?;
        let i = self.slot_for(gid)?;
        let s = &mut self.slots[i];
        match refusal {
            None => s.yes |= b,
            Some((sqlstate, message)) => {
                s.yes &= !b;
                s.no |= b;
                if s.no_node == 0 {
                    s.no_node = voter;
                    s.sqlstate = [b'X'; 5];
                    let code = sqlstate.as_bytes();
                    let n = code.len().min(5);
                    s.sqlstate[..n].copy_from_slice(&code[..n]);
                    let m = truncate_utf8(message, MESSAGE_MAX).as_bytes();
                    s.message[..m.len()].copy_from_slice(m);
                    s.message_len = m.len() as u16;
                }
            }
        }
        let enough = s.wake_yes == 0 || refusal.is_some() || (s.yes & s.wake_mask).count_ones() >= u32::from(s.wake_yes);
        Ok((s.waiter >= 0 && enough).then_some(s.waiter))
    }

    /// `waiter` waits for the outcome of `gid`: its slot is kept until
    /// [`Tally::release`].
    pub fn wait(&mut self, gid: &str, waiter: i32) -> Result<(), TallyError> {
        self.wait_for(gid, waiter, &[], 0)
    }

    /// As [`Tally::wait`], but a yes wakes `waiter` only once `yes_needed`
    /// of `peers` have said yes (a no still wakes it at once): a backend
    /// waiting for every peer is woken once, not once per peer.
    pub fn wait_for(&mut self, gid: &str, waiter: i32, peers: &[i32], yes_needed: usize) -> Result<(), TallyError> {
        let mask = peers.iter().try_fold(0u64, |m, &p| bit(p).map(|b| m | b))?;
        let i = self.slot_for(gid)?;
        let s = &mut self.slots[i];
        s.waiter = waiter;
        s.wake_mask = mask;
        s.wake_yes = yes_needed.min(peers.len()).min(u8::MAX as usize) as u8;
        Ok(())
    }

    /// The outcome of `gid` among `peers`.
    pub fn outcome(&self, gid: &str, peers: &[i32]) -> Outcome {
        let slot = self.find(gid.as_bytes()).map(|i| &self.slots[i]);
        if let Some(s) = slot.filter(|s| s.no_node != 0) {
            return Outcome::No {
                node: s.no_node,
                sqlstate: String::from_utf8_lossy(&s.sqlstate).into_owned(),
                message: String::from_utf8_lossy(&s.message[..s.message_len as usize]).into_owned(),
            };
        }
        let yes = slot.map_or(0, |s| s.yes);
        let missing: Vec<i32> = peers.iter().copied().filter(|&p| bit(p).map_or(true, |b| yes & b == 0)).collect();
        if missing.is_empty() {
            Outcome::Yes
        } else {
            Outcome::Pending { missing }
        }
    }

    /// The outcome of `gid` when it takes only some of `peers`: Yes once
    /// `need_yes` of them said yes, No once `need_no` said no (with the
    /// first no's reason), else Pending on those that did not answer.
    /// (The precommit round: a majority decides either way.)
    pub fn quorum(&self, gid: &str, peers: &[i32], need_yes: usize, need_no: usize) -> Outcome {
        let slot = self.find(gid.as_bytes()).map(|i| &self.slots[i]);
        let (yes, no) = slot.map_or((0, 0), |s| (s.yes, s.no));
        let count = |votes: u64| peers.iter().filter(|&&p| bit(p).is_ok_and(|b| votes & b != 0)).count();
        if count(yes) >= need_yes {
            return Outcome::Yes;
        }
        if let Some(s) = slot.filter(|s| s.no_node != 0 && count(no) >= need_no) {
            return Outcome::No {
                node: s.no_node,
                sqlstate: String::from_utf8_lossy(&s.sqlstate).into_owned(),
                message: String::from_utf8_lossy(&s.message[..s.message_len as usize]).into_owned(),
            };
        }
        let missing = peers.iter().copied().filter(|&p| bit(p).map_or(true, |b| (yes | no) & b == 0)).collect();
        Outcome::Pending { missing }
    }

    /// The outcome of `gid` is decided (or nobody waits any more): forget it.
    pub fn release(&mut self, gid: &str) {
        if let Some(i) = self.find(gid.as_bytes()) {
            self.free(i);
        }
    }

    /// Process `waiter` exits: forget what it waited for. A wait normally
    /// ends with [`Tally::release`]; a process that ends without unwinding
    /// (FATAL: terminated, or its client found gone) would otherwise keep
    /// its slots for good, as no slot with a waiter is ever evicted.
    pub fn release_waiter(&mut self, waiter: i32) {
        for i in 0..SLOTS {
            if self.keys[i] != 0 && self.slots[i].waiter == waiter {
                self.free(i);
            }
        }
    }

    /// Slots in use (for monitoring and tests).
    pub fn in_use(&self) -> usize {
        self.keys.iter().filter(|&&k| k != 0).count()
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed() -> Box<Tally> {
        Box::default()
    }

    #[test]
    fn all_peers_yes_is_yes() {
        let mut t = boxed();
        assert_eq!(t.outcome("g", &[2, 3]), Outcome::Pending { missing: vec![2, 3] });
        assert_eq!(t.record("g", 2, None), Ok(None));
        assert_eq!(t.outcome("g", &[2, 3]), Outcome::Pending { missing: vec![3] });
        t.wait("g", 7).unwrap();
        assert_eq!(t.record("g", 3, None), Ok(Some(7)));
        assert_eq!(t.outcome("g", &[2, 3]), Outcome::Yes);
        assert_eq!(t.outcome("g", &[]), Outcome::Yes);
        t.release("g");
        assert_eq!(t.in_use(), 0);
    }

    #[test]
    fn one_no_decides_and_keeps_the_first_reason() {
        let mut t = boxed();
        t.record("g", 2, None).unwrap();
        t.record("g", 3, Some(("55P03", "lock timeout"))).unwrap();
        t.record("g", 2, Some(("23505", "duplicate key"))).unwrap();
        assert_eq!(
            t.outcome("g", &[2, 3]),
            Outcome::No { node: 3, sqlstate: "55P03".into(), message: "lock timeout".into() }
        );
    }

    #[test]
    fn a_withdrawn_yes_no_longer_counts() {
        let mut t = boxed();
        t.record("g", 2, None).unwrap();
        t.record("g", 2, Some(("40001", "yields to an older transaction"))).unwrap();
        assert!(matches!(t.outcome("g", &[2]), Outcome::No { node: 2, .. }));
    }

    #[test]
    fn a_quorum_decides_without_the_slowest_peers() {
        let mut t = boxed();
        let peers = [2, 3, 4, 5];
        assert_eq!(t.quorum("g", &peers, 2, 3), Outcome::Pending { missing: vec![2, 3, 4, 5] });
        t.record("g", 2, Some(("40001", "promised to roll back"))).unwrap();
        t.record("g", 3, None).unwrap();
        assert_eq!(t.quorum("g", &peers, 2, 3), Outcome::Pending { missing: vec![4, 5] });
        t.record("g", 4, None).unwrap();
        assert_eq!(t.quorum("g", &peers, 2, 3), Outcome::Yes);
        let mut t = boxed();
        for p in [2, 3] {
            t.record("g", p, Some(("40001", "promised to roll back"))).unwrap();
        }
        assert!(matches!(t.quorum("g", &peers, 2, 3), Outcome::Pending { .. }));
        t.record("g", 5, Some(("40001", "no"))).unwrap();
        assert!(matches!(t.quorum("g", &peers, 2, 3), Outcome::No { node: 2, .. }));
        assert_eq!(t.quorum("g", &peers, 0, 1), Outcome::Yes, "nothing needed");
    }

    #[test]
    fn votes_before_the_waiter_are_kept() {
        let mut t = boxed();
        t.record("early", 2, None).unwrap();
        t.wait("early", 1).unwrap();
        assert_eq!(t.outcome("early", &[2]), Outcome::Yes);
    }

    #[test]
    fn a_waiter_that_exits_leaves_no_slot_behind() {
        let mut t = boxed();
        t.wait("mtm-1-a", 7).unwrap();
        t.wait("mtm-1-b#committed", 7).unwrap();
        t.wait("mtm-1-c", 8).unwrap();
        t.release_waiter(7);
        assert_eq!(t.in_use(), 1, "only process 8's wait is left");
        // The exited process's slots were not merely unwaited: a full
        // table of its leftovers would refuse every new wait.
        for i in 0..SLOTS - 1 {
            t.wait(&format!("mtm-1-{i}"), 9).unwrap();
        }
        t.release_waiter(9);
        t.wait("mtm-1-after", 10).unwrap();
    }

    #[test]
    fn a_full_table_evicts_the_oldest_unawaited_slot_never_a_waiter() {
        let mut t = boxed();
        t.wait("awaited", 5).unwrap();
        for i in 0..SLOTS - 1 {
            t.record(&format!("late-{i}"), 2, None).unwrap();
        }
        assert_eq!(t.in_use(), SLOTS);
        // late-0 is the oldest without a waiter; "awaited" is older but kept.
        t.record("fresh", 2, None).unwrap();
        assert_eq!(t.outcome("late-0", &[2]), Outcome::Pending { missing: vec![2] });
        assert_eq!(t.record("awaited", 3, None), Ok(Some(5)));
        assert_eq!(t.outcome("awaited", &[3]), Outcome::Yes);
        // Every slot awaited: refuse rather than drop a waiter.
        let mut t = boxed();
        for i in 0..SLOTS {
            t.wait(&format!("w-{i}"), i as i32).unwrap();
        }
        assert_eq!(t.wait("one-more", 1), Err(TallyError::Full));
    }

    #[test]
    fn a_waiter_for_every_peer_is_woken_once_they_all_said_yes_or_one_said_no() {
        let mut t = boxed();
        t.wait_for("g", 7, &[2, 3], 2).unwrap();
        assert_eq!(t.record("g", 2, None), Ok(None), "one yes of two: nothing decided yet");
        assert_eq!(t.record("g", 3, None), Ok(Some(7)));
        t.wait_for("h", 7, &[2, 3], 2).unwrap();
        assert_eq!(t.record("h", 3, Some(("40001", "conflict"))), Ok(Some(7)), "a no decides at once");
        t.wait_for("q", 8, &[2, 3], 1).unwrap();
        assert_eq!(t.record("q", 3, None), Ok(Some(8)), "a quorum of one");
        t.wait("w", 9).unwrap();
        assert_eq!(t.record("w", 2, None), Ok(Some(9)), "a plain wait is woken by every vote");
        assert!(t.wait_for("x", 9, &[0], 1).is_err());
    }

    #[test]
    fn gids_are_found_among_many_and_freed_slots_are_reused() {
        let mut t = boxed();
        for i in 0..SLOTS {
            t.record(&format!("mtm-{i}"), 2, None).unwrap();
        }
        assert_eq!(t.in_use(), SLOTS);
        assert_eq!(t.outcome("mtm-517", &[2]), Outcome::Yes);
        assert_eq!(t.outcome("mtm-5170", &[2]), Outcome::Pending { missing: vec![2] });
        t.release("mtm-517");
        assert_eq!(t.in_use(), SLOTS - 1);
        assert_eq!(t.outcome("mtm-517", &[2]), Outcome::Pending { missing: vec![2] });
        t.wait("new", 4).unwrap();
        assert_eq!(t.in_use(), SLOTS, "the freed slot is taken, nothing evicted");
        assert_eq!(t.outcome("mtm-518", &[2]), Outcome::Yes);
        t.release_waiter(4);
        assert_eq!(t.in_use(), SLOTS - 1);
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut t = boxed();
        assert_eq!(t.record("g", 0, None), Err(TallyError::BadNode(0)));
        assert_eq!(t.record("g", 65, None), Err(TallyError::BadNode(65)));
        assert_eq!(t.record(&"x".repeat(201), 2, None), Err(TallyError::GidTooLong));
        let long = "é".repeat(300);
        t.record("g", 2, Some(("XX000", &long))).unwrap();
        let Outcome::No { message, .. } = t.outcome("g", &[2]) else { panic!() };
        assert!(message.len() <= MESSAGE_MAX && message.chars().all(|c| c == 'é'));
    }
}

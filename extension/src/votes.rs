//! 2PC votes, both ways.
//!
//! **Cast here.** When an apply worker applies a peer's transaction that
//! ends in PREPARE, the outcome is this node's vote on its gid: yes
//! (prepared and flushed here) or no (the apply failed: conflict,
//! constraint, lock wait past `lock_timeout`, with its SQLSTATE and
//! message). The vote is kept in [`VOTES`] (`mtm.await_prepared` reads it)
//! and sent to the gid's home node by [`send`]: a non-transactional
//! logical message in this node's WAL, which the home node's receiver
//! from us decodes like any other change. So votes travel over the
//! replication connections that already exist, and nobody holds a
//! connection per commit.
//!
//! **Counted here.** The home node's receivers pass the votes they decode
//! to [`record_peer`]; `mtm.await_votes(gid, timeout_ms)` — which the
//! proxy runs right after its PREPARE — waits on its latch until every
//! peer voted yes, one voted no, or time is up. The counting itself is
//! the safe `mtm_schedule::tally` module.

#![deny(unsafe_code)]

use mtm_protocol::VoteMessage;
use mtm_schedule::tally::{Outcome, Tally};
use pgrx::prelude::*;
use std::sync::atomic::Ordering;

const SLOTS: usize = 256;
const GID_MAX: usize = 200;
const MESSAGE_MAX: usize = 512;

#[derive(Copy, Clone, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum VoteState {
    Free = 0,
    Pending = 1,
    Yes = 2,
    No = 3,
}

#[derive(Copy, Clone)]
pub struct VoteSlot {
    state: VoteState,
    gid: [u8; GID_MAX],
    gid_len: u8,
    sqlstate: [u8; 5],
    message: [u8; MESSAGE_MAX],
    message_len: u16,
    /// pgprocno of a backend waiting in await_prepared, or -1.
    waiter: i32,
    /// For a gid this node applied and prepared (yes): its transaction id
    /// here, its home node and its prepare time there (for settling
    /// conflicts, [`crate::conflicts`]); 0 otherwise.
    xid: u32,
    home: i32,
    prepared_at: i64,
    /// Such a gid kept NOTIFYs in `mtm.notifications` to queue at its
    /// commit (without any, the commit skips that look-up).
    notifies: bool,
    /// Order of decisions, for eviction.
    stamp: u64,
}

#[derive(Copy, Clone)]
pub struct VoteTable {
    slots: [VoteSlot; SLOTS],
    next_stamp: u64,
}

impl Default for VoteTable {
    fn default() -> Self {
        let empty = VoteSlot {
            state: VoteState::Free,
            gid: [0; GID_MAX],
            gid_len: 0,
            sqlstate: [0; 5],
            message: [0; MESSAGE_MAX],
            message_len: 0,
            waiter: -1,
            xid: 0,
            home: 0,
            prepared_at: 0,
            notifies: false,
            stamp: 0,
        };
        VoteTable { slots: [empty; SLOTS], next_stamp: 1 }
    }
}


pub use crate::pg::shmem::VOTES;

/// The peers' votes on this node's prepared transactions.
#[derive(Copy, Clone, Default)]
pub struct PeerVotes(Tally);


pub use crate::pg::shmem::PEER_VOTES;

/// This node's id, set by its receivers when they start (0: not yet), so
/// apply workers can sign their votes without a catalog lookup.
pub use crate::pg::shmem::MY_NODE;

/// What a node says about a gid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vote {
    Yes,
    No { sqlstate: String, message: String },
}

impl VoteTable {
    fn find(&self, gid: &[u8]) -> Option<usize> {
        self.slots.iter().position(|s| s.state != VoteState::Free && &s.gid[..s.gid_len as usize] == gid)
    }

    /// The slot for `gid`, taking a free one or evicting the oldest decided.
    fn slot_for(&mut self, gid: &[u8]) -> usize {
        if let Some(i) = self.find(gid) {
            return i;
        }
        let i = self.slots.iter().position(|s| s.state == VoteState::Free).unwrap_or_else(|| {
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| matches!(s.state, VoteState::Yes | VoteState::No))
                .min_by_key(|(_, s)| s.stamp)
                .map(|(i, _)| i)
                .unwrap_or(0)
        });
        let s = &mut self.slots[i];
        s.state = VoteState::Pending;
        s.gid[..gid.len()].copy_from_slice(gid);
        s.gid_len = gid.len() as u8;
        s.waiter = -1;
        s.message_len = 0;
        s.xid = 0;
        s.notifies = false;
        i
    }
}

fn gid_bytes(gid: &str) -> &[u8] {
    let b = gid.as_bytes();
    &b[..b.len().min(GID_MAX)]
}

/// Records this node's vote and wakes a backend waiting for it.
pub fn record(gid: &str, vote: &Vote) {
    let waiter = {
        let mut t = VOTES.exclusive();
        let stamp = t.next_stamp;
        t.next_stamp += 1;
        let i = t.slot_for(gid_bytes(gid));
        let s = &mut t.slots[i];
        s.stamp = stamp;
        match vote {
            Vote::Yes => s.state = VoteState::Yes,
            Vote::No { sqlstate, message } => {
                s.state = VoteState::No;
                let code = sqlstate.as_bytes();
                s.sqlstate = [b'X'; 5];
                s.sqlstate[..code.len().min(5)].copy_from_slice(&code[..code.len().min(5)]);
                let m = message.as_bytes();
                let n = m.len().min(MESSAGE_MAX);
                s.message[..n].copy_from_slice(&m[..n]);
                s.message_len = n as u16;
            }
        }
        s.waiter
    };
    if waiter >= 0 {
        crate::pg::proc::set_latch_of(waiter);
    }
}

/// This node applied and prepared `gid` (transaction `xid` here) from its
/// home node `home`, where it was prepared at `prepared_at`, keeping
/// NOTIFYs for its commit if `notifies`.
pub fn note_applied_prepare(gid: &str, xid: u32, home: i32, prepared_at: i64, notifies: bool) {
    let mut t = VOTES.exclusive();
    if let Some(i) = t.find(gid_bytes(gid)) {
        let s = &mut t.slots[i];
        (s.xid, s.home, s.prepared_at, s.notifies) = (xid, home, prepared_at, notifies);
    }
}

/// Whether `gid` may have NOTIFYs kept for its commit: false only for a
/// gid this node applied, prepared and noted without any.
pub fn may_notify(gid: &str) -> bool {
    let t = VOTES.share();
    match t.find(gid_bytes(gid)) {
        Some(i) => t.slots[i].state != VoteState::Yes || t.slots[i].xid == 0 || t.slots[i].notifies,
        None => true,
    }
}

/// A gid this node applied and prepared, found by its transaction id
/// here: the gid, its home node and its prepare time there.
pub fn applied_prepare_by_xid(xid: u32) -> Option<(String, i32, i64)> {
    let t = VOTES.share();
    let s = t.slots.iter().find(|s| s.state == VoteState::Yes && s.xid == xid && xid != 0)?;
    Some((String::from_utf8_lossy(&s.gid[..s.gid_len as usize]).into_owned(), s.home, s.prepared_at))
}

/// Sends this node's vote on `gid`, prepared on `coordinator`, to it: a
/// non-transactional logical message, logged without the replication
/// origin of the transaction being applied (the coordinator's walsender
/// filters its own origin out) and flushed, so the vote leaves at once —
/// and, for a yes, only after the PREPARE before it is on disk. From a
/// worker's main thread (an apply worker, or the launcher withdrawing a
/// yes), outside a transaction.
pub fn send(coordinator: i32, gid: &str, refusal: Option<(String, String)>) {
    let end = log_vote(coordinator, gid, refusal);
    crate::pg::rmgr::flush(end);
    // Walsenders are woken by flushes of commits, not of a message logged
    // after an asynchronous commit (as an ack of COMMIT PREPARED is): wake
    // them, or the vote waits for their next timeout.
    crate::pg::rmgr::wake_walsenders();
}

/// Logs this node's vote on `gid` to `coordinator` as [`send`] does,
/// without flushing it: it leaves with the next flush. Returns where it
/// ends in the WAL.
fn log_vote(coordinator: i32, gid: &str, refusal: Option<(String, String)>) -> u64 {
    let content = content(coordinator, gid.to_string(), refusal);
    let prefix = std::ffi::CString::new(mtm_protocol::VOTE_PREFIX).expect("no NUL");
    crate::pg::origin::without_session_origin(|| crate::pg::rmgr::log_logical_message(&prefix, &content, false))
}

/// The content of this node's `mtm_vote` message on `gid` to
/// `coordinator` (logged by [`send`], or sent by a walsender as it decodes
/// a PREPARE, `decoder.rs`).
pub fn content(coordinator: i32, gid: String, refusal: Option<(String, String)>) -> Vec<u8> {
    let voter = MY_NODE.get().load(Ordering::Relaxed);
    VoteMessage { coordinator, voter, gid, refusal }.to_bytes()
}

/// A peer's vote, decoded from its stream by our receiver from it.
pub fn record_peer(vote: &VoteMessage) {
    let refusal = vote.refusal.as_ref().map(|(c, m)| (c.as_str(), m.as_str()));
    let waiter = match PEER_VOTES.exclusive().0.record(&vote.gid, vote.voter, refusal) {
        Ok(w) => w,
        Err(e) => {
            warning!("multimaster: vote of node {} on {} dropped: {e}", vote.voter, vote.gid);
            return;
        }
    };
    if let Some(w) = waiter {
        crate::pg::proc::set_latch_of(w);
    }
}

/// The tally key under which peers report they committed (or, for a
/// client's own gid, finished) `gid`: the same table and the same
/// messages as votes (a "yes" on this key). A gid near PostgreSQL's
/// 200-byte limit has its hash (the same on every node) stand in for it.
pub fn committed_key(gid: &str) -> String {
    let key = format!("{gid}#committed");
    if key.len() <= mtm_schedule::tally::GID_MAX {
        key
    } else {
        format!("{:016x}#committed-long", mtm_state::decisions::gid_hash(gid.as_bytes()))
    }
}

/// Tells the coordinator that its transaction `gid` is committed here (an
/// apply worker, after COMMIT PREPARED). Only for the proxy's own gids:
/// nobody waits for a client's.
///
/// From an apply worker's main thread, outside a transaction.
pub fn send_committed(coordinator: i32, gid: &str) {
    if acked(gid) {
        send(coordinator, &committed_key(gid), None);
    }
}

/// Whether peers acknowledge their commit of `gid` to its coordinator
/// as the proxy's commit path expects: the proxy's gids. (A client's own
/// gid is acknowledged to the node its client finished it from, for
/// [`await_finished`].)
pub fn acked(gid: &str) -> bool {
    gid.starts_with("mtm-")
}

/// Longest wait of [`await_finished`] for a peer it still hears from.
const FINISH_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A client's own gid is about to be finished here (COMMIT or ROLLBACK
/// PREPARED): forgets an acknowledgement left under its key by an
/// earlier use of the same gid (clients reuse theirs), so that
/// [`await_finished`] counts only this finish's.
pub fn forget_finished(gid: &str) {
    PEER_VOTES.exclusive().0.release(&committed_key(gid));
}

/// After a client's COMMIT or ROLLBACK PREPARED of its own `gid` here:
/// waits until every peer has finished it too, as on one PostgreSQL the
/// gid is gone from `pg_prepared_xacts` (and its rows visible) for every
/// session once the statement returns. A peer this node no longer hears
/// from ([`crate::pool::unreachable_for_ms`]) is not waited for, nor one
/// slower than [`FINISH_WAIT`] (logged): it finishes the gid when it
/// gets there.
pub fn await_finished(gid: &str) {
    // The gid is finished here already: a statement_timeout or a cancel
    // must not turn the wait into an error that reads as "not done".
    crate::pg::proc::disarm_statement_timeout();
    crate::pg::proc::holding_cancels(|| wait_finished(gid));
}

fn wait_finished(gid: &str) {
    if let Acks::TimedOut(missing) = await_acks(gid, FINISH_WAIT) {
        pgrx::warning!("multimaster: nodes {missing:?} have not finished prepared transaction {gid} yet; they will when they get to it");
    }
}

/// How a wait for the peers' acknowledgements of `gid` ended.
enum Acks {
    All,
    /// Every peer still missing is one this node no longer hears from.
    Unreachable,
    TimedOut(Vec<i32>),
}

/// Waits up to `wait` for every peer's acknowledgement of `gid`
/// ([`committed_key`]), not for peers this node no longer hears from.
fn await_acks(gid: &str, wait: std::time::Duration) -> Acks {
    let key = committed_key(gid);
    let peers = peer_ids();
    let _slot = Awaiting::register(&key, &peers, peers.len());
    let deadline = std::time::Instant::now() + wait;
    loop {
        // Its own statement: the shared lock must be released before the
        // wait (a temporary in a `match` head would live through the arms,
        // and the receivers could not record the acks meanwhile).
        let outcome = PEER_VOTES.share().0.outcome(&key, &peers);
        let missing = match outcome {
            Outcome::Yes => return Acks::All,
            Outcome::Pending { missing } if missing.iter().all(|&p| crate::pool::unreachable_for_ms(p).is_some()) => return Acks::Unreachable,
            Outcome::Pending { missing } => missing,
            // A peer never refuses an acknowledgement: not one.
            Outcome::No { .. } => peers.clone(),
        };
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Acks::TimedOut(missing);
        }
        // The receiver that counts an ack sets our latch.
        crate::pool::wait_latch(left.as_millis().clamp(1, 50) as i64);
    }
}

/// Waits up to `timeout_ms` until every peer has committed `gid`, which
/// this node committed (COMMIT PREPARED) after every peer voted yes. True
/// when all did: a session on any node now sees the transaction. False
/// after the timeout, or as soon as every peer still missing is one this
/// node no longer hears from ([`crate::pool::unreachable_for_ms`]): the
/// transaction is committed anyway and the peer will commit it when it
/// gets there.
#[pg_extern]
fn await_commits(gid: &str, timeout_ms: i32) -> bool {
    crate::pg::proc::disarm_statement_timeout();
    matches!(await_acks(gid, std::time::Duration::from_millis(timeout_ms.max(0) as u64)), Acks::All)
}

thread_local! {
    /// This backend's copy of its node's peers, and when it was read.
    static PEERS: std::cell::RefCell<Option<(std::time::Instant, Vec<i32>)>> = const { std::cell::RefCell::new(None) };
}

/// How long a backend keeps its copy of the peers' ids (read at each
/// commit otherwise; they change only when the cluster is set up).
const PEERS_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// The ids of this node's peers.
fn peer_ids() -> Vec<i32> {
    if let Some(peers) = PEERS.with_borrow(|p| p.as_ref().filter(|(at, ids)| at.elapsed() < PEERS_FOR && !ids.is_empty()).map(|(_, ids)| ids.clone())) {
        return peers;
    }
    let peers: Vec<i32> = crate::pg::catalog::as_superuser(|| {
        Spi::connect(|c| {
            c.select("SELECT id FROM mtm.cluster_nodes WHERE NOT is_self ORDER BY id", None, &[])
                .map(|rows| rows.filter_map(|r| r.get::<i32>(1).ok().flatten()).collect())
                .unwrap_or_default()
        })
    });
    PEERS.set(Some((std::time::Instant::now(), peers.clone())));
    peers
}

/// This node's id: from shared memory once a receiver has started, else
/// from `mtm.cluster_nodes`.
pub(crate) fn my_id() -> i32 {
    match MY_NODE.get().load(Ordering::Relaxed) {
        0 => crate::pg::catalog::as_superuser(|| Spi::get_one::<i32>("SELECT id FROM mtm.cluster_nodes WHERE is_self")).ok().flatten().unwrap_or(0),
        me => me,
    }
}


/// A registered wait for the peers' answers on a key (`await_votes`,
/// `await_commits`); frees its slot however the wait ends.
struct Awaiting<'a>(&'a str);

impl<'a> Awaiting<'a> {
    /// This backend waits for the peers' answers on `key`: its latch is
    /// set once `yes_needed` of `peers` said yes, or one said no.
    fn register(key: &'a str, peers: &[i32], yes_needed: usize) -> Self {
        let me_proc = my_procno();
        // A backend ended by FATAL (pg_terminate_backend, or its client
        // found gone by client_connection_check_interval while it waits
        // here) never runs Drop: its slots are freed as it exits, or they
        // would stay taken, and once the table is full no commit could
        // wait for its votes.
        crate::pg::proc::at_exit(release_my_waits);
        if let Err(e) = PEER_VOTES.exclusive().0.wait_for(key, me_proc, peers, yes_needed) {
            error!("multimaster: cannot wait for the peers' answers on {key}: {e}");
        }
        Awaiting(key)
    }
}

/// This process exits: it waits for nothing any more.
fn release_my_waits() {
    if let Some(me) = crate::pg::proc::my_procno() {
        PEER_VOTES.exclusive().0.release_waiter(me);
    }
}

impl Drop for Awaiting<'_> {
    fn drop(&mut self) {
        PEER_VOTES.exclusive().0.release(self.0);
    }
}

/// Waits up to `timeout_ms` for every peer's vote on `gid`, prepared on
/// this node. `ok` is true when all voted yes; otherwise `node` is the
/// peer that voted no (with its SQLSTATE and message), that did not
/// vote in time (SQLSTATE 40001, "did not vote") or that its receiver
/// has not heard from for [`crate::pool::REACHABLE_WITHIN_MS`] (SQLSTATE
/// 08006, "unreachable"), or this node if `gid` is not prepared here.
/// In a database the cluster does not replicate (the extension created in
/// a second one), a prepared transaction is this node's own: yes at once.
#[pg_extern]
fn await_votes(
    gid: &str,
    timeout_ms: i32,
) -> TableIterator<'static, (name!(ok, bool), name!(node, i32), name!(sqlstate, Option<String>), name!(message, Option<String>))> {
    crate::pg::proc::disarm_statement_timeout();
    let me = my_id();
    let Some(prepared_at) = crate::prepared_at(gid) else {
        return TableIterator::once((false, me, Some("40001".into()), Some(format!("transaction {gid} is not prepared on node {me}"))));
    };
    if !crate::ddl::replicated_database() {
        return TableIterator::once((true, me, None, None));
    }
    // Its age, should an older conflicting transaction need its locks.
    crate::resolver::note_prepare_time(gid, prepared_at);
    let peers = peer_ids();
    let _slot = Awaiting::register(gid, &peers, peers.len());
    let started = std::time::Instant::now();
    let timeout = std::time::Duration::from_millis(timeout_ms.max(0) as u64);
    let mut deadline = started + timeout;
    let mut next_look = started + PROGRESS_AFTER;
    loop {
        let outcome = PEER_VOTES.share().0.outcome(gid, &peers);
        let row = match outcome {
            // Every node has it prepared; a proxy's gid now needs a
            // majority's promise to commit. A client's own gid waits for
            // its client's COMMIT PREPARED or ROLLBACK PREPARED.
            Outcome::Yes if mtm_state::decisions::loggable(gid) => precommit(gid, me, &peers, timeout),
            Outcome::Yes => (true, me, None, None),
            // A peer's no, or this node's own refusal (it gave way to an
            // older conflicting transaction, `crate::conflicts`).
            Outcome::No { node, sqlstate, message } => (false, node, Some(sqlstate), Some(message)),
            Outcome::Pending { missing } => {
                // A peer that went silent cannot vote (its votes come over
                // its own stream): fail now rather than hold the
                // transaction's locks for the whole timeout.
                if let Some((node, silent)) = crate::pool::first_unreachable(missing.iter().copied()) {
                    return TableIterator::once((false, node, Some("08006".into()), Some(unreachable_reason(node, me, silent))));
                }
                let now = std::time::Instant::now();
                if now >= next_look {
                    next_look = now + PROGRESS_LOOK_EVERY;
                    // The timeout starts once a peer has been sent the
                    // transaction: this node's walsender decodes a big one
                    // (and streams it as the peer applies it) for longer
                    // than a vote takes; meanwhile the wait is extended,
                    // up to PATIENCE timeouts.
                    let prepared_at = PREPARED_AT.get();
                    let sending = still_sending(prepared_at);
                    if missing.iter().all(|p| sending.contains(p)) {
                        deadline = deadline.max(now + timeout).min(started + timeout * PATIENCE);
                    }
                }
                let left = deadline.min(next_look).saturating_duration_since(now);
                if !left.is_zero() {
                    crate::pool::wait_latch(left.as_millis().max(1) as i64);
                    continue;
                }
                let node = missing[0];
                (false, node, Some("40001".into()), Some(format!("node {node} did not vote on {gid} within {timeout_ms} ms (or went quiet)")))
            }
        };
        return TableIterator::once(row);
    }
}

/// Refuses to prepare the proxy's transaction (from the PRE_PREPARE
/// callback) while a peer that must vote on it is unreachable
/// ([`crate::pool::unreachable_for_ms`]): it would be refused after the
/// PREPARE anyway, and a client that retries at once while a node is down
/// then costs no two-phase commit. 40001, as a refused vote.
pub fn refuse_if_a_peer_is_unreachable() {
    // Inside PREPARE, with no snapshot for the catalog (no list of peers):
    // every pool; one that never had a receiver counts as reachable.
    let Some((node, ms)) = crate::pool::first_unreachable(1..=crate::pool::MAX_NODES as i32) else {
        return;
    };
    let reason = unreachable_reason(node, MY_NODE.get().load(Ordering::Relaxed), ms);
    crate::raise(
        PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
        format!("could not serialize access: the transaction was rolled back because node {node} cannot vote on it: {reason}"),
        &format!("Every node of the cluster must vote on a write; retry once node {node} is back (reads work meanwhile)."),
        "refuse_if_a_peer_is_unreachable",
    );
}

/// Why `node` cannot vote, as `await_votes` and the refusal at PREPARE
/// both say it (the proxy words the rest of the client's error alike).
fn unreachable_reason(node: i32, me: i32, silent_ms: i64) -> String {
    format!("node {node} is unreachable: node {me} has heard nothing from it for {:.1} s", silent_ms as f64 / 1000.0)
}

/// `await_votes`' row: ok, the node that decided otherwise, its SQLSTATE
/// and message.
type VotesRow = (bool, i32, Option<String>, Option<String>);

/// The precommit round of a proxy's `gid`, which every node voted yes on:
/// this node promises to commit it (PRECOMMIT in the decision log) and
/// asks its peers to (an `mtm_precommit` message in its stream); each
/// answers on `<gid>#precommitted`. It may commit once a majority of the
/// nodes promised, so the decision survives the loss of this node: a
/// resolver anywhere then finds it (`crate::resolver`). A majority of
/// refusals (peers that promised a resolver to roll it back, when this
/// node looked gone) rolls it back. Without either in time the outcome is
/// not this session's to decide: SQLSTATE 40003, the gid stays prepared,
/// and the resolvers finish it once a majority is reachable.
fn precommit(gid: &str, me: i32, peers: &[i32], timeout: std::time::Duration) -> VotesRow {
    use mtm_state::decisions::State;
    if let Err(state) = crate::decisions::promise(gid, State::Precommitted) {
        return (false, me, Some("40001".into()), Some(format!("a resolver promised to roll back {gid} on node {me} ({})", state.as_str())));
    }
    let majority = mtm_state::decisions::majority(peers.len() + 1);
    let (need_yes, need_no) = (majority - 1, majority);
    if peers.is_empty() {
        return (true, me, None, None);
    }
    let key = precommitted_key(gid);
    let _slot = Awaiting::register(&key, peers, need_yes);
    // With at most three nodes, this node's promise and one peer's are a
    // majority: that peer may commit as it promises, and its commit, not
    // this node's COMMIT PREPARED, is what `await_commits` then waits for.
    let content = mtm_protocol::PrecommitMessage { gid: gid.to_string(), commit_on_promise: need_yes == 1 }.to_bytes();
    let prefix = std::ffi::CString::new(mtm_protocol::PRECOMMIT_PREFIX).expect("no NUL");
    // The flush makes this node's promise durable with the message.
    let end = crate::pg::origin::without_session_origin(|| crate::pg::rmgr::log_logical_message(&prefix, &content, false));
    crate::pg::rmgr::flush(end);
    crate::pg::rmgr::wake_walsenders();
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let outcome = PEER_VOTES.share().0.quorum(&key, peers, need_yes, need_no);
        match outcome {
            Outcome::Yes => return (true, me, None, None),
            Outcome::No { node, message, .. } => {
                // A majority promised to roll it back: so may this node now.
                crate::decisions::log(gid, State::Aborted);
                return (false, node, Some("40001".into()), Some(format!("{message}; a majority of the nodes refused to commit {gid}")));
            }
            Outcome::Pending { missing } => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    // Let the resolver have it: this session gives up.
                    crate::resolver::note_finished(gid);
                    let node = missing.first().copied().unwrap_or(me);
                    return (
                        false,
                        node,
                        Some("40003".into()),
                        Some(format!("every node voted yes on {gid}, but a majority did not confirm the decision within {} ms; the cluster will finish it", timeout.as_millis())),
                    );
                }
                crate::pool::wait_latch(left.as_millis().clamp(1, 50) as i64);
            }
        }
    }
}

/// The tally key under which peers answer the precommit of `gid`.
pub fn precommitted_key(gid: &str) -> String {
    format!("{gid}#precommitted")
}

/// A peer's precommit of `gid` (its home node `coordinator` is the stream's
/// node): this node promises to commit it unless it promised a resolver
/// the opposite, and answers. Once it promised, `commit` may commit the
/// gid at once (true if it did): that COMMIT PREPARED's flush then makes
/// the promise and the answer durable, one flush instead of two (the
/// walsender sends the answer only once it is on disk). From a receiver's
/// main thread, outside a transaction.
pub fn answer_precommit(coordinator: i32, gid: &str, commit: impl FnOnce() -> bool) {
    use mtm_state::decisions::State;
    // A precommit the stream replays after a restart, of a gid finished
    // here so long ago that the log trimmed it: nobody waits for it, and a
    // promise would stay in the log, undecided, for good. (The first test
    // is a comparison, the look-ups run only for a gid that old, rarely.)
    if crate::decisions::may_have_forgotten(gid)
        && crate::decisions::state(gid).is_none()
        && !pgrx::bgworkers::BackgroundWorker::transaction(|| crate::prepared_here(gid))
    {
        return;
    }
    let refusal = match crate::decisions::promise(gid, State::Precommitted) {
        Ok(_) => None,
        Err(state) => Some(("40001".to_string(), format!("node {} promised to roll back {gid} ({})", my_id(), state.as_str()))),
    };
    if refusal.is_some() {
        send(coordinator, &precommitted_key(gid), refusal);
        return;
    }
    let end = log_vote(coordinator, &precommitted_key(gid), None);
    if !commit() {
        crate::pg::rmgr::flush(end);
    }
    crate::pg::rmgr::wake_walsenders();
}

/// After how long a wait for votes the peers' progress is watched.
const PROGRESS_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

/// A wait for votes from peers that are alive is extended at most to
/// this many vote timeouts.
const PATIENCE: u32 = 30;

thread_local! {
    /// Where this backend's last PREPARE TRANSACTION ended in the WAL.
    static PREPARED_AT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// This backend prepared a transaction ending at `lsn` (from the
/// transaction callback).
pub fn note_prepared_at(lsn: u64) {
    PREPARED_AT.set(lsn);
}

/// Peers this node's walsender has not yet sent everything up to `lsn`.
fn still_sending(lsn: u64) -> Vec<i32> {
    if lsn == 0 {
        return Vec::new();
    }
    crate::pg::catalog::as_superuser(|| Spi::connect(|c| {
        c.select(
            "SELECT substring(application_name FROM '^mtm_receiver_([0-9]+)_from_')::int
               FROM pg_stat_replication
              WHERE application_name LIKE 'mtm_receiver_%' AND sent_lsn < ('0/0'::pg_lsn + $1::numeric)",
            None,
            &[(lsn as i64).into()],
        )
        .map(|rows| rows.filter_map(|r| r.get::<i32>(1).ok().flatten()).collect())
        .unwrap_or_default()
    }))
}

/// How often a coordinator that waits for votes looks at its peers'
/// progress (after [`PROGRESS_AFTER`]).
const PROGRESS_LOOK_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// This node refuses its own prepared transaction `gid`: it must give
/// way to an older conflicting one (`crate::conflicts`). Its coordinator,
/// waiting in `mtm.await_votes`, wakes and answers no. Too late once every
/// peer said yes and the coordinator read it: then the gid commits, and
/// the refusal is a slot nobody reads.
pub fn refuse_own(gid: &str, me: i32, message: &str) {
    let waiter = match PEER_VOTES.exclusive().0.record(gid, me, Some(("40001", message))) {
        Ok(w) => w,
        Err(e) => {
            warning!("multimaster: cannot refuse {gid}: {e}");
            return;
        }
    };
    if let Some(w) = waiter {
        crate::pg::proc::set_latch_of(w);
    }
}

/// Forgets a gid once it is committed or rolled back here.
pub fn forget(gid: &str) {
    let mut t = VOTES.exclusive();
    if let Some(i) = t.find(gid_bytes(gid)) {
        t.slots[i].state = VoteState::Free;
    }
}

/// A waiter gave up: free its slot unless a vote arrived meanwhile, so
/// awaits on gids that never come do not fill the table.
fn abandon(gid: &str) {
    let mut t = VOTES.exclusive();
    if let Some(i) = t.find(gid_bytes(gid)) {
        if t.slots[i].state == VoteState::Pending {
            t.slots[i].state = VoteState::Free;
        }
    }
}

/// A wait of this backend in `await_prepared`: the slot it left waiting
/// for a vote that did not come is freed however the wait ends — the
/// timeout, a cancel or another ERROR (which unwinds through here), or a
/// FATAL (as the process exits) — or such waits would fill the table, and
/// a full table overwrites its first slot, losing a prepared gid's entry.
struct AwaitingVote<'a>(&'a str);

impl<'a> AwaitingVote<'a> {
    fn register(gid: &'a str) -> Self {
        crate::pg::proc::at_exit(abandon_my_vote_waits);
        AwaitingVote(gid)
    }
}

impl Drop for AwaitingVote<'_> {
    fn drop(&mut self) {
        abandon(self.0);
    }
}

/// This process exits: free the slots it was waiting on that got no vote.
fn abandon_my_vote_waits() {
    if let Some(me) = crate::pg::proc::my_procno() {
        let mut t = VOTES.exclusive();
        for s in t.slots.iter_mut().filter(|s| s.state == VoteState::Pending && s.waiter == me) {
            s.state = VoteState::Free;
        }
    }
}

fn lookup(gid: &str, register_waiter: bool) -> Option<Vote> {
    let mut t = VOTES.exclusive();
    let i = match t.find(gid_bytes(gid)) {
        Some(i) => i,
        None if register_waiter => t.slot_for(gid_bytes(gid)),
        None => return None,
    };
    let s = &mut t.slots[i];
    match s.state {
        VoteState::Yes => Some(Vote::Yes),
        VoteState::No => Some(Vote::No {
            sqlstate: String::from_utf8_lossy(&s.sqlstate).into_owned(),
            message: String::from_utf8_lossy(&s.message[..s.message_len as usize]).into_owned(),
        }),
        _ => {
            if register_waiter {
                s.waiter = my_procno();
            }
            None
        }
    }
}

/// Waits up to `timeout_ms` for this node's vote on `gid`: state is
/// `prepared`, `failed` (with the SQLSTATE and message of the failed
/// apply) or `timeout`.
#[pg_extern]
fn await_prepared(
    gid: &str,
    timeout_ms: i32,
) -> TableIterator<'static, (name!(state, String), name!(sqlstate, Option<String>), name!(message, Option<String>))> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(timeout_ms.max(0) as u64);
    let _waiting = AwaitingVote::register(gid);
    let result = loop {
        if let Some(v) = lookup(gid, true) {
            break v_row(v);
        }
        // A prepare applied before shared memory was (re)initialised.
        if crate::prepared_here(gid) {
            break v_row(Vote::Yes);
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break ("timeout".to_string(), None, None);
        }
        crate::pool::wait_latch(left.as_millis().max(1) as i64);
    };
    TableIterator::once(result)
}

fn v_row(v: Vote) -> (String, Option<String>, Option<String>) {
    match v {
        Vote::Yes => ("prepared".into(), None, None),
        Vote::No { sqlstate, message } => ("failed".into(), Some(sqlstate), Some(message)),
    }
}

/// This backend's PGPROC number (a backend running SQL has a PGPROC).
fn my_procno() -> i32 {
    crate::pg::proc::my_procno().expect("multimaster: a backend without a PGPROC")
}

/// Five SQLSTATE characters packed as PostgreSQL does (MAKE_SQLSTATE);
/// anything else is XX000 (internal_error).
pub fn sqlstate_code(text: &str) -> i32 {
    let b = text.as_bytes();
    if b.len() != 5 || !b.iter().all(|c| c.is_ascii_digit() || c.is_ascii_uppercase()) {
        return sqlstate_code("XX000");
    }
    b.iter().enumerate().fold(0, |acc, (i, c)| acc | (((c - b'0') as i32 & 0x3F) << (6 * i)))
}

/// PostgreSQL's packed SQLSTATE as its five characters.
pub fn sqlstate_text(code: i32) -> String {
    (0..5).map(|i| (((code >> (6 * i)) & 0x3F) as u8 + b'0') as char).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn unpacks_sqlstates() {
        // MAKE_SQLSTATE('2','3','5','0','5')
        let pack = |s: &str| s.bytes().enumerate().fold(0i32, |acc, (i, c)| acc | (((c - b'0') as i32 & 0x3F) << (6 * i)));
        assert_eq!(super::sqlstate_text(pack("23505")), "23505");
        assert_eq!(super::sqlstate_text(pack("40P01")), "40P01");
        assert_eq!(super::sqlstate_code("23505"), pack("23505"));
        assert_eq!(super::sqlstate_code("bogus"), pack("XX000"));
    }
}

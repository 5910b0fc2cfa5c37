//! A receiver: one dynamic background worker per peer. It streams the
//! peer's slot `mtm_slot_<me>` through libpqwalreceiver (the path the core
//! apply worker uses), from the position its replication origin
//! `mtm_node_<peer>` has durably reached, and hands whole transactions to
//! its apply pool ([`crate::pool`]) as `mtm-schedule` plans them:
//! transactions that touch the same rows go to one worker in order, the
//! rest spread over the workers; a transaction bigger than
//! [`STREAM_AT`] is not held in memory but streamed to one worker while
//! nothing else runs. Feedback reports only what is committed here and
//! flushed. A COMMIT/ROLLBACK PREPARED whose PREPARE is already applied
//! is run by the receiver itself, at once (`mtm_schedule::Finish`).
//!
//! Any error ends the receiver (the launcher starts it again), and so
//! does a failed apply worker; the new receiver resumes from the origin,
//! so a transaction that failed to apply is retried, never skipped — the
//! stretch received before the failure one transaction at a time, so a
//! failure caused by running side by side does not repeat.
#![deny(unsafe_code)]

use crate::pg::latch::SocketWait;
use crate::pg::walrcv::{self, Received, Sender, Stream};
use crate::pool::{Queues, SEQ_TAG};
use mtm_protocol::{tag, Message};
use mtm_schedule::{CommitSource, Finish, FlushTracker, KeyTracker, Plan, Scheduler, TxnKeys};
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use std::collections::HashMap;
use std::ffi::CString;
use std::sync::atomic::Ordering::*;
use std::time::{Duration, Instant};

/// A transaction with more bytes of changes than this is streamed to a
/// worker as it arrives instead of being held to plan it.
pub const STREAM_AT: usize = 8 * 1024 * 1024;

/// The receiver worker's body (entered through
/// [`crate::pg::walrcv::mtm_receiver_main`]).
pub fn main() {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let peer: i32 = BackgroundWorker::get_extra().parse().unwrap_or_else(|_| error!("receiver started without a peer id"));
    BackgroundWorker::connect_worker_to_spi(Some(&crate::launcher::database()), None);
    let (me, conninfo) = BackgroundWorker::transaction(|| {
        let me = Spi::get_one::<i32>("SELECT id FROM mtm.cluster_nodes WHERE is_self").ok().flatten();
        let conninfo = Spi::get_one::<String>(&format!("SELECT conninfo FROM mtm.cluster_nodes WHERE id = {peer}")).ok().flatten();
        (me, conninfo)
    });
    let (Some(me), Some(conninfo)) = (me, conninfo) else {
        error!("multimaster receiver: node {peer} is not in mtm.cluster_nodes");
    };
    // Every call below may ERROR, which unwinds to this worker's pg_guard
    // and exits.
    run(me, peer, &conninfo)
}

/// Settings of every process that applies a peer's changes.
pub fn apply_session_settings(application_name: &str) {
    // Applied rows must not fire user triggers a second time.
    crate::pg::guc::set_override(c"session_replication_role", c"replica", pg_sys::GucContext::PGC_SUSET);
    // Commit asynchronously: the peer is told only what our WAL has
    // flushed (Receiver::flush_lsn), so nothing acknowledged can be lost.
    crate::pg::guc::set_override(c"synchronous_commit", c"off", pg_sys::GucContext::PGC_SUSET);
    // Foreign-key checks at the end of an applied transaction must see
    // parents committed since its first row (a database's default of
    // REPEATABLE READ would hide them).
    crate::pg::guc::set_override(c"default_transaction_isolation", c"read committed", pg_sys::GucContext::PGC_SUSET);
    // A cross-node deadlock shows up here as a lock wait that never ends:
    // give up after deadlock_timeout (a no vote for a prepare).
    let deadlock_timeout = CString::new(crate::setting(c"deadlock_timeout").unwrap_or_default()).expect("no NUL");
    crate::pg::guc::set_override(c"lock_timeout", &deadlock_timeout, pg_sys::GucContext::PGC_SUSET);
    // mtm.node_info finds processes by their application_name.
    let appname = CString::new(application_name).expect("no NUL");
    crate::pg::guc::set_override(c"application_name", &appname, pg_sys::GucContext::PGC_USERSET);
}

/// How often the receiver asks whether its apply workers still run (a
/// worker that stops also detaches from its queue, which the next send
/// notices at once).
const POOL_CHECK_EVERY: Duration = Duration::from_millis(100);

fn run(me: i32, peer: i32, conninfo: &str) {
    apply_session_settings(&format!("mtm_receiver_from_{peer}_connecting"));
    let origin = crate::pool::origin_of(peer);
    let finish_origin = crate::pool::finish_origin_of(peer);
    let workers = crate::MAX_WORKERS.get().max(1) as usize;
    let queues = Queues::start(peer, workers);
    // Before anything is applied under them: a walsender sends our vote on
    // a prepare (and our ack of its commit) by the origin (`decoder.rs`),
    // signed with our node id.
    crate::votes::MY_NODE.get().store(me, Relaxed);
    for (slot, id) in queues.pool().origins.iter().zip([origin, finish_origin]) {
        slot.store(id.into(), Release);
    }
    // Read after the old pool's workers (which held the origin) are gone.
    let start = crate::pg::origin::progress(origin);

    let walrcv = walrcv::load();
    let c_conninfo = CString::new(conninfo).unwrap_or_else(|_| error!("conninfo of node {peer} contains NUL"));
    let walsender_name = CString::new(format!("mtm_receiver_{me}_from_{peer}")).expect("no NUL");
    let mut conn = walrcv.connect(&c_conninfo, &walsender_name).unwrap_or_else(|msg| error!("multimaster: cannot connect to node {peer}: {msg}"));
    let slot = CString::new(format!("mtm_slot_{me}")).expect("no NUL");
    if !conn.start_logical(&slot, start, 1, true) {
        error!("multimaster: node {peer} refused to stream slot mtm_slot_{me}");
    }
    let serial_until = queues.pool().serial_until.load(Acquire);
    if serial_until > start {
        log!(
            "multimaster: receiving from node {peer} at {}, one transaction at a time up to {} (after a failed apply)",
            lsn(start),
            lsn(serial_until)
        );
    } else {
        log!("multimaster: receiving from node {peer} at {} with {workers} apply workers", lsn(start));
    }

    // mtm.nodes() counts a receiver as connected by this name: set it
    // only now that the peer streams to us.
    crate::pg::guc::set_override(c"application_name", &CString::new(format!("mtm_receiver_from_{peer}")).expect("no NUL"), pg_sys::GucContext::PGC_USERSET);
    let (mut stream, sender) = conn.split();
    let mut r = Receiver {
        me,
        peer,
        sender,
        scheduler: Scheduler::new(queues.workers()),
        queues,
        finish_origin,
        finished_here: 0,
        keys: KeyTracker::default(),
        described: HashMap::new(),
        txn: None,
        received: start,
        flush: FlushTracker::new(start),
        last_feedback: Instant::now(),
        last_pool_check: Instant::now(),
        last_heard: Instant::now(),
        serial_until,
    };
    r.stream(&mut stream);
    conn.disconnect();
}

fn lsn(l: u64) -> String {
    format!("{:X}/{:X}", l >> 32, l as u32)
}

/// A transaction being received.
struct Txn {
    /// Its messages, held until its end so it can be planned as a whole.
    held: Vec<Vec<u8>>,
    bytes: usize,
    keys: TxnKeys,
    /// Too big to hold: the worker it is being streamed to.
    streaming: Option<usize>,
}

struct Receiver<'c> {
    me: i32,
    peer: i32,
    /// Feedback to the peer, while the stream is read in [`Receiver::stream`].
    sender: Sender<'c>,
    queues: Queues,
    scheduler: Scheduler,
    /// The origin the receiver's own COMMIT/ROLLBACK PREPAREDs run under.
    finish_origin: pg_sys::RepOriginId,
    /// Where in our WAL the last of those ended: reported as flushed to
    /// the peer only once our WAL is flushed that far.
    finished_here: u64,
    keys: KeyTracker,
    /// The last description of each of the peer's relations sent to the
    /// workers (a Relation message, by relation id).
    described: HashMap<u32, Vec<u8>>,
    txn: Option<Txn>,
    /// The peer's WAL position we have seen (XLogData, keepalives).
    received: u64,
    /// What is committed here and flushed: workers commit asynchronously.
    flush: FlushTracker,
    last_feedback: Instant,
    /// When the receiver last asked whether its workers are alive.
    last_pool_check: Instant,
    /// When the peer last sent anything (data or keepalive).
    last_heard: Instant,
    /// Apply one transaction at a time up to this peer LSN.
    serial_until: u64,
}

impl Receiver<'_> {
    fn stream(&mut self, stream: &mut Stream) {
        let mut waiter: Option<SocketWait> = None;
        // Mirrors the pool's `receiver_busy`, so it is stored only when
        // it changes.
        let mut busy = false;
        loop {
            if BackgroundWorker::sigterm_received() {
                return;
            }
            self.check_pool();
            if BackgroundWorker::sighup_received() {
                crate::pg::guc::reload_config_file();
            }
            let fd = match stream.receive() {
                Received::Data(data) => {
                    self.last_heard = Instant::now();
                    self.queues.pool().note_heard();
                    if !busy {
                        busy = true;
                        self.queues.pool().receiver_busy.store(true, Relaxed);
                    }
                    // Also while data keeps coming (a big transaction): the
                    // peer's walsender needs our replies to keep the link.
                    self.maybe_feedback();
                    match data[0] {
                        b'w' if data.len() >= 25 => {
                            self.received = self.received.max(u64::from_be_bytes(data[9..17].try_into().expect("8 bytes")));
                            for payload in mtm_protocol::unbatch(&data[25..]) {
                                match payload {
                                    Ok(payload) => self.message(payload),
                                    Err(e) => error!("multimaster: broken batch of messages from node {}: {e}", self.peer),
                                }
                            }
                        }
                        b'k' if data.len() >= 18 => {
                            self.received = self.received.max(u64::from_be_bytes(data[1..9].try_into().expect("8 bytes")));
                            if data[17] != 0 {
                                self.send_feedback();
                            }
                        }
                        _ => {}
                    }
                    continue;
                }
                Received::Ended => {
                    log!("multimaster: node {} ended the stream", self.peer);
                    return;
                }
                Received::Idle(fd) => fd,
            };
            if busy {
                busy = false;
                self.queues.pool().receiver_busy.store(false, Relaxed);
            }
            // Nothing to read: has the peer gone quiet for too long?
            self.check_peer_alive();
            self.queues.flush(false);
            self.maybe_feedback();
            match &mut waiter {
                Some(w) if w.socket() == fd => w.wait(1000),
                _ => waiter.insert(SocketWait::new(fd)).wait(1000),
            }
        }
    }

    fn decode(&self, payload: &[u8]) -> Message {
        Message::decode(payload).unwrap_or_else(|e| error!("multimaster: undecodable message from node {}: {e}", self.peer))
    }

    /// One protocol message from the peer.
    fn message(&mut self, payload: &[u8]) {
        let Some(&t) = payload.first() else { return };
        match t {
            tag::RELATION => {
                // The peer describes each relation again in every
                // transaction. Workers keep what they were told, so only a
                // new or changed description goes to them: passing each one
                // on woke every worker for every transaction, and made each
                // drop its cached table.
                let relid = Message::relation_id(payload);
                if relid.and_then(|r| self.described.get(&r)).is_some_and(|d| d[..] == *payload) {
                    return;
                }
                if let Message::Relation { relid, columns, .. } = self.decode(payload) {
                    self.keys.relation(relid, &columns);
                    self.described.insert(relid, payload.to_vec());
                }
                for w in 0..self.queues.workers() {
                    self.send(w, payload, false);
                }
            }
            tag::BEGIN => {
                self.txn = Some(Txn { held: vec![payload.to_vec()], bytes: payload.len(), keys: TxnKeys::default(), streaming: None });
            }
            tag::COMMIT_PREPARED | tag::ROLLBACK_PREPARED => {
                let (gid, commit, end, time) = match self.decode(payload) {
                    Message::CommitPrepared { gid, end_lsn, commit_time, .. } => (gid, true, end_lsn, commit_time),
                    Message::RollbackPrepared { gid, rollback_end_lsn, rollback_time, .. } => (gid, false, rollback_end_lsn, rollback_time),
                    _ => unreachable!("tag checked"),
                };
                self.scheduler.committed(self.queues.pool().committed.load(Acquire));
                match self.scheduler.finish(&gid) {
                    Finish::Done => {}
                    Finish::Now => self.finish_now(&gid, commit, end, time),
                    Finish::InOrder { keys, prepare } => {
                        // Rolled back at home while its PREPARE is still
                        // queued or applying here: its worker drops it.
                        if let (false, Some(seq)) = (commit, prepare) {
                            self.queues.pool().abandon(seq);
                        }
                        self.dispatch(vec![payload.to_vec()], &keys, end);
                    }
                }
            }
            tag::MESSAGE if self.txn.is_none() => {
                // Non-transactional: nothing to apply; a vote on one of
                // our prepared transactions is counted.
                if let Message::Message { prefix, content, lsn, .. } = self.decode(payload) {
                    if prefix == mtm_protocol::VOTE_PREFIX {
                        match mtm_protocol::VoteMessage::decode(&content) {
                            Ok(v) if v.coordinator == self.me => crate::votes::record_peer(&v),
                            Ok(_) => {}
                            Err(e) => warning!("multimaster: undecodable vote from node {}: {e}", self.peer),
                        }
                    } else if prefix == mtm_protocol::PRECOMMIT_PREFIX {
                        match mtm_protocol::PrecommitMessage::decode(&content) {
                            Ok(m) => {
                                let peer = self.peer;
                                crate::votes::answer_precommit(peer, &m.gid, || m.commit_on_promise && self.commit_on_promise(&m.gid, lsn));
                            }
                            Err(e) => warning!("multimaster: undecodable precommit from node {}: {e}", self.peer),
                        }
                    }
                }
            }
            _ => self.in_transaction(t, payload),
        }
    }

    fn in_transaction(&mut self, t: u8, payload: &[u8]) {
        if self.txn.is_none() {
            error!("multimaster: message {:?} from node {} outside a transaction", t as char, self.peer);
        }
        let ends = t == tag::COMMIT || t == tag::PREPARE;
        let streaming = self.txn.as_ref().and_then(|x| x.streaming);
        if let Some(w) = streaming {
            self.send(w, payload, ends);
            self.queues.flush(true);
            if ends {
                self.txn = None;
            }
            return;
        }
        // Messages matter to the plan for DDL (a barrier).
        let msg = matches!(t, tag::INSERT | tag::UPDATE | tag::DELETE | tag::TRUNCATE | tag::MESSAGE | tag::PREPARE | tag::COMMIT)
            .then(|| self.decode(payload));
        let txn = self.txn.as_mut().expect("checked above");
        if let Some(m) = &msg {
            self.keys.add(m, &mut txn.keys);
        }
        txn.held.push(payload.to_vec());
        txn.bytes += payload.len();
        match msg {
            Some(Message::Commit { end_lsn, .. }) => {
                let txn = self.txn.take().expect("checked above");
                self.dispatch(txn.held, &txn.keys, end_lsn);
            }
            Some(Message::Prepare { end_lsn, gid, .. }) => {
                let txn = self.txn.take().expect("checked above");
                let seq = self.dispatch(txn.held, &txn.keys, end_lsn);
                self.scheduler.prepared(&gid, seq, &txn.keys);
            }
            _ if txn.bytes > STREAM_AT => self.start_streaming(),
            _ => {}
        }
    }

    /// Plans the next transaction, waits for what it must follow, and
    /// starts it on its worker: the caller sends its messages there.
    fn hand_over(&mut self, keys: &TxnKeys) -> Plan {
        self.scheduler.committed(self.queues.pool().committed.load(Acquire));
        let plan = self.scheduler.plan(keys);
        self.wait_committed(plan.wait_for);
        self.queues.pool().dispatched.store(plan.seq, Release);
        let mut seq = [SEQ_TAG; 9];
        seq[1..].copy_from_slice(&plan.seq.to_be_bytes());
        self.send(plan.worker, &seq, false);
        plan
    }

    /// Hands a whole transaction (ending at the peer's `end`) to the pool;
    /// returns its number.
    fn dispatch(&mut self, msgs: Vec<Vec<u8>>, keys: &TxnKeys, end: u64) -> u64 {
        let plan = self.hand_over(keys);
        let last = msgs.len().saturating_sub(1);
        for (i, m) in msgs.iter().enumerate() {
            self.send(plan.worker, m, i == last);
        }
        self.queues.flush(true);
        if end <= self.serial_until {
            self.wait_committed(plan.seq);
        }
        plan.seq
    }

    /// Runs the COMMIT/ROLLBACK PREPARED of `gid`, whose PREPARE the pool
    /// has committed, here and now rather than in the pool's commit order
    /// (why: [`Finish::Now`]). It commits under [`Receiver::finish_origin`],
    /// not the peer's origin, which moves only in commit order: after a
    /// crash before the pool's commits pass it, it is received again and
    /// skipped (not prepared here any more).
    fn finish_now(&mut self, gid: &str, commit: bool, end: u64, time: pg_sys::TimestampTz) {
        crate::pg::origin::take_origin(self.finish_origin);
        crate::apply::finish_prepared(self.peer, gid, commit, end, time);
        crate::pg::origin::release_origin();
        self.finished_here = crate::pg::rmgr::wal_insert_position();
        self.queues.pool().finished_out_of_order.fetch_add(1, Relaxed);
    }

    /// Commits `gid`, which this node just promised to commit, at once if
    /// its PREPARE has committed here: the home node's promise and ours
    /// are a majority (the precommit said so), so the decision is made and
    /// durable, and waiting for the home node's COMMIT PREPARED would cost
    /// the client one more round trip between the nodes before COMMIT
    /// returns (`await_commits` waits for our commit). True if committed.
    fn commit_on_promise(&mut self, gid: &str, at: u64) -> bool {
        self.scheduler.committed(self.queues.pool().committed.load(Acquire));
        if !self.scheduler.commit_on_promise(gid) {
            return false;
        }
        // Its position on the finish origin means nothing (see
        // `finish_now`); the precommit's is at hand.
        self.finish_now(gid, true, at, crate::pg::latch::now());
        self.queues.pool().committed_on_promise.fetch_add(1, Relaxed);
        true
    }

    /// The current transaction is too big to hold: once everything
    /// before it has committed, stream it to one worker.
    fn start_streaming(&mut self) {
        log!("multimaster: a transaction from node {} is over {} MB: streaming it to one apply worker", self.peer, STREAM_AT >> 20);
        let plan = self.hand_over(&TxnKeys { barrier: true, ..Default::default() });
        let mut txn = self.txn.take().expect("streaming a transaction");
        for m in std::mem::take(&mut txn.held) {
            self.send(plan.worker, &m, false);
        }
        txn.streaming = Some(plan.worker);
        self.txn = Some(txn);
    }

    /// Queues one message for a worker, waiting (and keeping the peer
    /// informed) while its queue is full.
    fn send(&mut self, worker: usize, bytes: &[u8], flush: bool) {
        loop {
            match self.queues.try_send(worker, bytes, flush) {
                Ok(true) => return,
                Ok(false) => self.wait_a_little(),
                Err(e) => self.fail(&e),
            }
        }
    }

    /// Waits until the pool has committed everything up to `seq`.
    fn wait_committed(&mut self, seq: u64) {
        let pool = self.queues.pool();
        pool.receiver_waiting.store(true, SeqCst);
        loop {
            let committed = pool.committed.load(SeqCst);
            self.scheduler.committed(committed);
            if committed >= seq {
                break;
            }
            self.wait_a_little();
        }
        pool.receiver_waiting.store(false, Release);
    }

    /// Waits for the pool (a commit, room in a queue) or 100 ms.
    fn wait_a_little(&mut self) {
        self.queues.flush(false);
        self.check_pool();
        self.maybe_feedback();
        crate::pool::wait_latch(100);
        if BackgroundWorker::sigterm_received() {
            error!("multimaster: receiver from node {} terminated", self.peer);
        }
    }

    /// Ends the receiver (the launcher reconnects) if the peer has sent
    /// nothing for `multimaster.peer_timeout`: a frozen node or a half-open
    /// connection would otherwise look connected forever.
    fn check_peer_alive(&self) {
        let timeout = Duration::from_millis(crate::PEER_TIMEOUT.get().max(1000) as u64);
        if self.last_heard.elapsed() > timeout {
            error!(
                "multimaster: node {} has not answered for {} ms (multimaster.peer_timeout); reconnecting",
                self.peer,
                self.last_heard.elapsed().as_millis()
            );
        }
    }

    /// Ends the receiver if its pool has stopped (a worker failed).
    fn check_pool(&mut self) {
        // Asking the postmaster about each worker takes a lock per worker;
        // the receiver passes here once per message or wait.
        let ask = self.last_pool_check.elapsed() >= POOL_CHECK_EVERY;
        if ask {
            self.last_pool_check = Instant::now();
        }
        if self.queues.pool().stopped(self.queues.epoch) || (ask && self.queues.dead_worker().is_some()) {
            self.fail("an apply worker stopped");
        }
    }

    fn fail(&mut self, why: &str) -> ! {
        let pool = self.queues.pool();
        pool.serial_until.fetch_max(self.received, AcqRel);
        error!(
            "multimaster: applying changes from node {} failed ({why}; the reason is in mtm.nodes() and the log); they will be applied again one transaction at a time from the last committed one",
            self.peer
        );
    }

    /// What may be reported as flushed to the peer: everything received
    /// when nothing is in flight (as the core apply worker does), else
    /// the end of the last transaction committed here and flushed. The
    /// tracker fixes the order of the reads (pending count first).
    fn flush_lsn(&mut self) -> u64 {
        let idle_at = (self.txn.is_none() && walrcv::flushed_up_to() >= self.finished_here).then_some(self.received);
        self.flush.confirmable(&PoolCommits(self.queues.pool()), idle_at)
    }

    fn maybe_feedback(&mut self) {
        if self.last_feedback.elapsed() >= Duration::from_secs(1) {
            self.send_feedback();
        }
    }

    /// Standby status update: everything up to the flush LSN is committed here.
    fn send_feedback(&mut self) {
        let lsn = self.flush_lsn();
        let mut msg = Vec::with_capacity(34);
        msg.push(b'r');
        for _ in 0..3 {
            msg.extend_from_slice(&lsn.to_be_bytes());
        }
        msg.extend_from_slice(&crate::pg::latch::now().to_be_bytes());
        // Ask for a keepalive when the peer has been quiet: a live peer
        // then always answers within a second or two.
        msg.push((self.last_heard.elapsed() >= Duration::from_secs(1)) as u8);
        self.sender.send(&msg);
        self.last_feedback = Instant::now();
    }
}

/// The pool's commits and our WAL, as the flush tracker reads them.
struct PoolCommits(&'static crate::pool::PeerPool);

impl CommitSource for PoolCommits {
    fn pending(&self) -> u64 {
        self.0.pending()
    }
    fn last_commit(&self) -> (u64, u64) {
        self.0.last_commit()
    }
    fn flushed(&self) -> u64 {
        walrcv::flushed_up_to()
    }
}

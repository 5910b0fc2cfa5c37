//! The resolver: finishes the cluster's prepared transactions that their
//! coordinator left behind.
//!
//! The proxy prepares a transaction on its home node under a gid
//! `mtm-<home node id>-…` and asks for the peers' votes
//! (`mtm.await_votes`). Once every peer said yes, the home node promises
//! to commit it (PRECOMMIT in its decision log) and tells its peers,
//! which promise the same; only when a majority of the nodes promised
//! does the proxy run COMMIT PREPARED, which the peers follow through the
//! stream. So a decision to commit is on a majority before any node
//! commits, and survives the loss of any minority.
//!
//! The resolver, run by each node's launcher once a second, finishes the
//! `mtm-` gids prepared here that nobody here coordinates:
//! - its own whose coordinator is gone (the proxy was killed or lost its
//!   connection, or the node restarted): one it never precommitted is
//!   rolled back (nobody was asked to commit it), after promising so;
//! - a peer's one still prepared here after a few seconds (its home node
//!   died or was cut off), and its own precommitted ones: a round over
//!   every node it can reach ([`Nodes::round`]) decides, with promises
//!   that no node breaks, so that two resolvers never decide differently.
//!   A gid whose home node is alive and still at work is left alone.
//!
//! Each node finishes its own copy; the home node's finish, when its
//! stream gets there, finds it done.
//!
//! Which backend coordinates a gid is noted in shared memory when it runs
//! `PREPARE TRANSACTION 'mtm-…'` (the `xact` module's utility hook); the
//! launcher runs [`resolve_orphans`] once a second.
#![deny(unsafe_code)]
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;
use mtm_state::decisions::State;

const SLOTS: usize = 512;
const GID_MAX: usize = 200;
/// Leave a prepared gid alone this long after it was prepared: its
/// coordinator may still be about to be noted.
const GRACE_SECONDS: i32 = 1;

#[derive(Copy, Clone)]
struct Slot {
    pid: i32,
    gid_len: u8,
    gid: [u8; GID_MAX],
    /// The prepared transaction's id, and its prepare time (µs since
    /// 2000, as in `pg_prepared_xacts`; 0 until its coordinator reads it),
    /// for settling conflicts ([`crate::conflicts`]).
    xid: u32,
    prepared_at: i64,
}

#[derive(Copy, Clone)]
pub struct Coordinators {
    slots: [Slot; SLOTS],
}

impl Default for Coordinators {
    fn default() -> Self {
        Coordinators { slots: [Slot { pid: 0, gid_len: 0, gid: [0; GID_MAX], xid: 0, prepared_at: 0 }; SLOTS] }
    }
}


use crate::pg::shmem::COORDINATORS;

impl Coordinators {
    fn find(&self, gid: &[u8]) -> Option<usize> {
        self.slots.iter().position(|s| s.pid != 0 && &s.gid[..s.gid_len as usize] == gid)
    }
}

thread_local! {
    /// The gid the current transaction noted ([`note_prepare`]) and has
    /// not prepared yet.
    static NOTED_NOT_PREPARED: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
    /// Whether this process already warned of a full table.
    static WARNED_FULL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// This backend prepares `gid` and will finish it.
pub fn note_prepare(gid: &str) {
    let g = gid.as_bytes();
    if !gid.starts_with("mtm-") || g.len() > GID_MAX {
        return;
    }
    // A slot outliving its backend would name a pid the kernel may give
    // to another process, which would pass for the gid's coordinator and
    // keep the resolver away from it.
    crate::pg::proc::at_exit(forget_my_gids);
    // A PREPARE in a failed transaction block is a rollback whose abort
    // callback already ran: the gid it noted is freed here.
    transaction_ended(false);
    let me = crate::pg::bgworker::my_pid();
    let mut t = COORDINATORS.exclusive();
    let i = match t.find(g) {
        // Another backend prepared this gid and coordinates it: this
        // PREPARE fails as a duplicate, and must not take that note.
        Some(i) if t.slots[i].pid != me => return,
        Some(i) => Some(i),
        None => t.slots.iter().position(|s| s.pid == 0),
    };
    // A full table only means the resolver may roll back a gid whose
    // coordinator is slow, which that coordinator then reports (40003).
    if let Some(i) = i {
        let s = &mut t.slots[i];
        s.pid = me;
        s.gid_len = g.len() as u8;
        s.gid[..g.len()].copy_from_slice(g);
        // The PREPARE has not run yet: this is the xid it will prepare.
        s.xid = crate::pg::twophase::top_xid_if_any().into_inner();
        s.prepared_at = 0;
        NOTED_NOT_PREPARED.set(Some(gid.to_string()));
    } else if !WARNED_FULL.replace(true) {
        drop(t);
        warning!("multimaster: more than {SLOTS} transactions are being prepared at once on this node; conflicts with the others are settled at the lock timeout, and the resolver may roll one back whose commit takes over a second");
    }
}

/// The transaction that noted a prepare ([`note_prepare`]) ends: prepared
/// (`prepared`), its slot stays until the gid is finished or this backend
/// exits; not prepared — its PREPARE failed (a conflict, a node that
/// cannot vote, anything PostgreSQL refuses to prepare) or ended as a
/// plain commit or rollback — the slot is freed now. Left to the backend's
/// exit, every refused commit of a long-lived session would hold a slot
/// until the table is full. From the transaction callback: raises nothing.
pub fn transaction_ended(prepared: bool) {
    let Some(gid) = NOTED_NOT_PREPARED.take() else { return };
    if prepared {
        return;
    }
    let me = crate::pg::bgworker::my_pid();
    let mut t = COORDINATORS.exclusive();
    if let Some(i) = t.find(gid.as_bytes()).filter(|&i| t.slots[i].pid == me) {
        t.slots[i].pid = 0;
    }
}

/// The coordinator of `gid` read its prepare time.
pub fn note_prepare_time(gid: &str, prepared_at: i64) {
    let mut t = COORDINATORS.exclusive();
    if let Some(i) = t.find(gid.as_bytes()) {
        t.slots[i].prepared_at = prepared_at;
    }
}

/// A transaction prepared here by a session of this node, found by its
/// transaction id: its gid and prepare time (None while not known yet).
pub fn prepared_here_by_xid(xid: u32) -> Option<(String, Option<i64>)> {
    let t = COORDINATORS.share();
    let s = t.slots.iter().find(|s| s.pid != 0 && s.xid == xid && xid != 0)?;
    let gid = String::from_utf8_lossy(&s.gid[..s.gid_len as usize]).into_owned();
    Some((gid, (s.prepared_at != 0).then_some(s.prepared_at)))
}

/// `gid` was committed or rolled back: nobody coordinates it any more.
pub fn note_finished(gid: &str) {
    let mut t = COORDINATORS.exclusive();
    if let Some(i) = t.find(gid.as_bytes()) {
        t.slots[i].pid = 0;
    }
}

/// This process exits: it coordinates nothing any more.
fn forget_my_gids() {
    let me = crate::pg::bgworker::my_pid();
    let mut t = COORDINATORS.exclusive();
    for s in t.slots.iter_mut().filter(|s| s.pid == me) {
        s.pid = 0;
    }
}

/// Whether a live backend of this node coordinates `gid` (slots are
/// cleared as their backend exits, see [`note_prepare`]).
fn coordinated(gid: &str) -> bool {
    COORDINATORS.share().find(gid.as_bytes()).is_some()
}

/// How long a peer's gid stays prepared here before this node's resolver
/// looks into it: its home node normally finishes it in milliseconds,
/// and a home node that is alive but slow answers "busy".
const RESOLVE_AFTER_SECONDS: i64 = 5;

/// Finishes the `mtm-` gids prepared here that nobody here coordinates:
/// this node's own whose coordinator is gone, and peers' ones that their
/// home node left behind. Called by the launcher, outside a transaction.
pub fn resolve_orphans() {
    let (me, orphans) = BackgroundWorker::transaction(|| {
        // Before CREATE EXTENSION there is nothing to resolve.
        let ready = Spi::get_one::<bool>("SELECT to_regclass('mtm.cluster_nodes') IS NOT NULL").ok().flatten().unwrap_or(false);
        if !ready {
            return (0, Vec::new());
        }
        let Some(me) = Spi::get_one::<i32>("SELECT id FROM mtm.cluster_nodes WHERE is_self").ok().flatten() else {
            return (0, Vec::new());
        };
        let orphans: Vec<(String, i64)> = Spi::connect(|c| {
            c.select(
                "SELECT gid, extract(epoch FROM now() - prepared)::int8 FROM pg_prepared_xacts
                  WHERE gid LIKE 'mtm-%' AND database = current_database()
                    AND prepared < now() - make_interval(secs => $1)",
                None,
                &[GRACE_SECONDS.into()],
            )
            .map(|rows| rows.filter_map(|r| Some((r.get::<String>(1).ok().flatten()?, r.get::<i64>(2).ok().flatten()?))).collect())
            .unwrap_or_else(|e| {
                warning!("multimaster: resolver cannot list prepared transactions: {e}");
                Vec::new()
            })
        });
        (me, orphans)
    });
    // Connected once per pass, when a gid needs a round.
    let mut nodes: Option<Nodes> = None;
    for (gid, age) in orphans {
        if coordinated(&gid) {
            continue;
        }
        let own = home_of(&gid) == Some(me);
        if !own && age < RESOLVE_AFTER_SECONDS {
            continue;
        }
        let local = PgTryBuilder::new(|| BackgroundWorker::transaction(|| decide_here(&gid, own)))
            .catch_others(|e| {
                let (code, message) = crate::apply::describe(&e);
                warning!("multimaster: resolver could not decide {gid}: {message} ({code})");
                Err(())
            })
            .execute();
        let decided = match local {
            Ok(Some(commit)) => Some(commit),
            Ok(None) => {
                let asking = nodes.get_or_insert_with(|| Nodes::connect(me));
                let round = PgTryBuilder::new(|| Ok(BackgroundWorker::transaction(|| asking.round(&gid))))
                    .catch_others(|e| {
                        let (code, message) = crate::apply::describe(&e);
                        warning!("multimaster: resolver could not ask the nodes about {gid}: {message} ({code})");
                        Err(())
                    })
                    .execute();
                match round {
                    Ok(decided) => decided,
                    Err(()) => {
                        crate::pg::twophase::abort_current_transaction();
                        break;
                    }
                }
            }
            Err(()) => None,
        };
        match decided {
            Some(commit) => finish(&gid, commit, own),
            None => crate::pg::twophase::abort_current_transaction(),
        }
    }
    if let Some(nodes) = nodes {
        nodes.disconnect();
    }
}

/// The node id in a proxy's gid (`mtm-<home>-…`).
fn home_of(gid: &str) -> Option<i32> {
    gid.strip_prefix("mtm-")?.split('-').next()?.parse().ok()
}

/// What this node alone can decide about `gid`: Ok(Some(commit)) when
/// it finished it or (its own gid, never precommitted) may roll it back,
/// Ok(None) when it takes a majority round. Inside a transaction.
fn decide_here(gid: &str, own: bool) -> Result<Option<bool>, ()> {
    Ok(match crate::decisions::state(gid) {
        Some(State::Committed) => Some(true),
        Some(State::Aborted) => Some(false),
        // This node's own gid that it never precommitted: no node was ever
        // asked to, so nobody can have committed it. The promise makes
        // that last (a precommit of a coordinator that comes back is refused).
        state if own && state != Some(State::Precommitted) => crate::decisions::promise(gid, State::Preaborted).is_ok().then_some(false),
        _ => None,
    })
}

/// How long the resolver waits for a node to connect, or to answer one
/// question: libpqwalreceiver has no timeout of its own for either.
const ASK_TIMEOUT_MS: i32 = 3000;

/// Replication connections to the other nodes, for a resolver's rounds.
struct Nodes {
    majority: usize,
    peers: Vec<(i32, crate::pg::walrcv::Connection)>,
}

impl Nodes {
    /// Connects to every other node it can reach. Outside a transaction,
    /// so the connections outlive one.
    fn connect(me: i32) -> Nodes {
        let nodes: Vec<(i32, String)> = BackgroundWorker::transaction(|| {
            Spi::connect(|c| {
                c.select("SELECT id, conninfo FROM mtm.cluster_nodes ORDER BY id", None, &[])
                    .map(|rows| rows.filter_map(|r| Some((r.get::<i32>(1).ok().flatten()?, r.get::<String>(2).ok().flatten()?))).collect())
                    .unwrap_or_default()
            })
        });
        let walrcv = crate::pg::walrcv::load();
        let mut peers = Vec::new();
        // Only nodes heard from lately: libpqwalreceiver's connect waits
        // without a timeout of its own, forever for a frozen node.
        for (id, conninfo) in nodes.iter().filter(|(id, _)| *id != me && crate::pool::heard_within(*id, crate::pool::REACHABLE_WITHIN_MS)) {
            let Ok(conninfo) = std::ffi::CString::new(conninfo.as_str()) else { continue };
            // An ERROR in the connect (the node died just after it
            // accepted) must not end the launcher.
            let conn = PgTryBuilder::new(|| crate::pg::proc::with_deadline(ASK_TIMEOUT_MS, || walrcv.connect(&conninfo, c"mtm-resolver")))
                .catch_others(|e| Err(crate::apply::describe(&e).1))
                .execute();
            match conn {
                Ok(conn) => peers.push((*id, conn)),
                Err(e) => debug1!("multimaster: resolver cannot reach node {id}: {e}"),
            }
        }
        Nodes { majority: mtm_state::decisions::majority(nodes.len()), peers }
    }

    /// Asks this node and every reachable one `want` about `gid`
    /// ([`answer`]); the answers of those that replied.
    fn ask(&self, gid: &str, want: &str) -> Vec<String> {
        let mut answers = vec![answer(gid, want).to_string()];
        let Ok(sql) = std::ffi::CString::new(format!("SELECT mtm.resolve_gid({}, '{want}')", crate::quote_literal(gid))) else {
            return answers;
        };
        for (id, conn) in &self.peers {
            // An ERROR (the deadline, a broken link) ends the round and
            // the pass; the next pass connects again.
            match crate::pg::proc::with_deadline(ASK_TIMEOUT_MS, || conn.exec(&sql, 1)) {
                Ok(rows) => answers.extend(rows.into_iter().next().and_then(|r| r.into_iter().next().flatten())),
                Err(e) => debug1!("multimaster: resolver's question to node {id} about {gid} failed: {e}"),
            }
        }
        answers
    }

    /// A majority round on `gid`: Some(commit) when decided. A node that
    /// finished it decides; otherwise, if any node precommitted it (so
    /// every node voted yes), every node is asked to promise to commit it,
    /// else to promise to roll it back, and a majority of one promise
    /// decides (`mtm_state::decisions::after_asking` / `after_promising`).
    /// No node makes both promises, so two resolvers, or a resolver and a
    /// coordinator that comes back, never decide differently. Inside a
    /// transaction.
    fn round(&self, gid: &str) -> Option<bool> {
        use mtm_state::decisions::{after_asking, after_promising, Next};
        let first = self.ask(gid, "ask");
        match after_asking(&first, self.majority) {
            Next::Wait => None,
            Next::Finish(commit) => Some(commit),
            Next::Promise(want) => {
                let question = if want == State::Precommitted { "precommit" } else { "preabort" };
                let answers = self.ask(gid, question);
                let decided = after_promising(&answers, want, self.majority);
                if decided.is_none() {
                    debug1!("multimaster: resolver: no majority for {gid} yet (asked {}, then {question}: {})", first.join(","), answers.join(","));
                }
                decided
            }
        }
    }

    fn disconnect(self) {
        for (_, conn) in self.peers {
            conn.disconnect();
        }
    }
}

/// This node's answer to a resolver about `gid`: `ask` only reports,
/// `precommit` / `preabort` promise that outcome unless this node
/// promised (or did) the opposite. The answer is the state afterwards:
/// `busy` (this node is its home and its coordinator is at work),
/// `precommitted`, `preaborted`, `committed`, `aborted`, `prepared`,
/// `notfound` or `forgotten` (finished here long ago, maybe: no promise). A promise is flushed before it is told. Inside a
/// transaction.
fn answer(gid: &str, want: &str) -> &'static str {
    if want != "precommit" && home_of(gid) == Some(crate::votes::my_id()) && coordinated(gid) {
        return "busy";
    }
    let state = crate::decisions::state(gid);
    let unknown_here = state.is_none() && !crate::prepared_here(gid);
    let want = match want {
        "precommit" => State::Precommitted,
        "preabort" => State::Preaborted,
        _ => return state.map_or(if unknown_here { "notfound" } else { "prepared" }, State::as_str),
    };
    // What is neither prepared nor logged here was never seen here, or
    // finished and trimmed from the log. Nothing is promised to commit
    // it; a promise to roll it back only if it cannot have been finished
    // here (it may have been committed).
    if unknown_here {
        if want == State::Precommitted {
            return "notfound";
        }
        if crate::decisions::may_have_forgotten(gid) {
            return "forgotten";
        }
    }
    match crate::decisions::promise(gid, want) {
        Ok(lsn) => {
            if let Some(lsn) = lsn {
                crate::pg::rmgr::flush(lsn);
            }
            crate::decisions::state(gid).map_or("notfound", State::as_str)
        }
        Err(state) => state.as_str(),
    }
}

/// A resolver's question about `gid` to this node (`want`: `ask`,
/// `precommit` or `preabort`); see the resolver. Run by the resolvers of
/// other nodes over a replication connection.
#[pg_extern]
fn resolve_gid(gid: &str, want: &str) -> &'static str {
    if !matches!(want, "ask" | "precommit" | "preabort") {
        crate::raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("invalid question \"{want}\""), "Ask \"ask\", \"precommit\" or \"preabort\".", "resolve_gid");
    }
    answer(gid, want)
}

/// Commits or rolls back `gid` here as decided. A peer's gid is finished
/// under no replication origin of its own that walsenders send on: every
/// node's resolver finishes its own copy, and the home node's stream,
/// when it comes, finds it done.
fn finish(gid: &str, commit: bool, own: bool) {
    let done = PgTryBuilder::new(|| {
        BackgroundWorker::transaction(|| {
            crate::decisions::log(gid, if commit { State::Committed } else { State::Aborted });
            let c_gid = std::ffi::CString::new(gid).expect("gid without NUL");
            if !own {
                crate::pg::origin::set_session_origin(pgrx::pg_sys::DoNotReplicateId as pgrx::pg_sys::RepOriginId);
            }
            // An ERROR (e.g. the coordinator finished it meanwhile)
            // unwinds to the catch below through our frames.
            crate::pg::twophase::finish_prepared(&c_gid, commit);
            if commit {
                crate::notify::deliver(gid);
            }
        });
        true
    })
    .catch_others(|e| {
        let (code, message) = crate::apply::describe(&e);
        let what = if commit { "commit" } else { "roll back" };
        if code == "42704" {
            // Finished meanwhile, by its stream or a client: nothing to do.
            log!("multimaster: resolver did not {what} {gid}: it was finished meanwhile ({message})");
        } else {
            warning!("multimaster: resolver could not {what} {gid}: {message} ({code})");
        }
        false
    })
    .execute();
    crate::pg::origin::set_session_origin(pgrx::pg_sys::InvalidRepOriginId as pgrx::pg_sys::RepOriginId);
    if done {
        note_finished(gid);
        let whose = if own { "its coordinator is gone" } else { "its home node left it" };
        if commit {
            log!("multimaster: resolver committed {gid}: {whose}, and a majority of the nodes promised to commit it");
        } else {
            log!("multimaster: resolver rolled back {gid}: {whose}, and it cannot have committed anywhere");
        }
    } else {
        // Clean up after the failed transaction, as a worker that
        // survives an ERROR must.
        crate::pg::twophase::abort_current_transaction();
    }
}
